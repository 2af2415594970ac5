"""The interface of an auxiliary training loss beside L_diff: contrastive self-distillation (contrastive.py)
and SRA (sra.py) implement it; a new method (e.g. REPA-style alignment to a frozen encoder) is one new file
implementing it, its recipe section, and its class in `losses.AUX_LOSSES`.

    L = L_diff + Σ_aux  aux.loss(student features, aux.teacher(...), epoch)

An `AuxLoss` is an `nn.Module`; its parameters (heads) are trained with the backbone, get an EMA copy
(the method's own teacher copy, `own_ema` below), and are checkpointed with the training state. The
objective (losses/__init__.py) calls it in this order for every micro-batch:

    aux.draw(n, shape, generator=…, device=…)     its per-sample draws for the global batch (dict)
    aux.teacher(ema_net, own_ema, formulation, batch, draws, gather=…, rank=…)   no grad; any value
    aux.loss(features, batch, teacher_out, epoch, formulation) → (weighted loss, logged parts)

`features` holds the student's taps named in `student_layers`, read from the very forward that computes
the diffusion loss (no extra pass). `views` > 1 asks the objective for that many independently augmented
views of each image (stacked, view 1 first), each with its own time and noise; `diffusion_views` says
whether every view gets the diffusion loss ("both") or only the first ("first").
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn


class AuxLoss(nn.Module):
    name: str = "aux"  # key in Objective.aux and prefix of the logged part (`loss_<name>` by convention)
    views: int = 1
    diffusion_views: str = "both"

    @classmethod
    def from_recipe(cls, recipe, model: nn.Module, formulation) -> "AuxLoss | None":
        """The loss configured by the recipe's section, or None when it is off. Layers are validated here."""
        raise NotImplementedError

    @property
    def student_layers(self) -> tuple[str, ...]:
        return ()

    def draw(self, n: int, shape: tuple[int, ...], *, generator: torch.Generator | None,
             device: torch.device | str) -> dict[str, Tensor]:
        """Per-sample draws for n images, each (n, …) so that a rank can take its rows."""
        return {}

    @torch.no_grad()
    def teacher(self, net: nn.Module, own_ema: nn.Module | None, formulation, batch, draws, *,
                gather: Callable[[Tensor], Tensor], rank: int) -> Any:
        """The EMA teacher's side of the loss (no grad); `net` is the EMA backbone, `own_ema` this module's
        EMA copy."""
        return None

    def loss(self, features: dict[str, Tensor], batch, teacher_out: Any, epoch: float,
             formulation) -> tuple[Tensor, dict[str, Tensor]]:
        """(weighted loss to add to L_diff, {logged name: unweighted detached value})."""
        raise NotImplementedError


def teacher_input(formulation, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """x0 noised at paper time t and scaled as the network expects (shared by every teacher)."""
    x_t = formulation.perturb(x0, t, noise)
    scale = formulation.net_input_scale(t)
    return (x_t if isinstance(scale, float) else x_t * scale.reshape(-1, 1, 1, 1)).to(x0.dtype)
