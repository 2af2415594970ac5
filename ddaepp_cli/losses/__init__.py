"""The training objective L = L_diff + Σ auxiliary losses (DDAE++ §4.2 contrastive self-distillation, SRA) as one
module, with its per-sample draws.

`Objective` holds everything that receives gradients — the backbone and the auxiliary modules (EDM2's
uncertainty u(σ), the `AuxLoss` heads of aux.py) — so that one DDP wrapper all-reduces all of them. The
train step (training/step.py) is

    draws = objective.draw(B_global, shape, generator=shared)[lo:hi]     # every random number
    batch = objective.batch(x, draws)                                    # views, times, noise, labels
    teach = objective.teacher_outputs(ema_net, ema_aux, batch, draws)   # no grad; {aux name: output}
    loss, parts = ddp_objective(batch, teach, epoch)

It names no auxiliary method: they are the `AUX_LOSSES` below, each built from its recipe section.

Class-conditional backbones (DiT with `num_classes > 0`): the data labels are replaced by the null class
with probability `label_dropout` (CFG training, LightningDiT 0.1); the drop bits are per-sample draws.

Randomness: all per-sample draws (augmentation parameters, the views, diffusion times and noise, the
label dropout, each auxiliary loss's own draws) come from one generator for the whole global batch in a
fixed order, so a rank's slice is the same for any process count. The order starts with t and noise
exactly as a plain diffusion step draws them, so recipes without augmentation keep their random stream.

Views: with augmentation the batch is the augmented image (label = its 9-d EDM label); an auxiliary loss
with `views = 2` (contrastive learning) gets two independently augmented views of each image, stacked
(2b, …), each with its own diffusion time and noise; its `diffusion_views` says which get the diffusion
loss: `both` (the contrastive default — the online forward of both views is needed anyway, so the second
diffusion loss is free) or `first`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..diffusion.augment import AugmentPipe, AugParams
from .aux import AuxLoss
from .contrastive import ContrastiveHead, Keys
from .sra import SRAHead

# Every auxiliary method; `build_objective` asks each for its instance from the recipe (None when off).
AUX_LOSSES: tuple[type[AuxLoss], ...] = (ContrastiveHead, SRAHead)

__all__ = ["AUX_LOSSES", "AuxLoss", "Batch", "ContrastiveHead", "Draws", "Keys", "Objective", "SRAHead"]


@dataclass
class Draws:
    """Per-sample random draws of one step for n images; `draws[lo:hi]` slices every field."""

    t: Tensor  # (n,) diffusion time of view 1 (paper convention)
    noise: Tensor  # (n, C, H, W)
    aug: AugParams | None = None  # view 1's augmentation
    aug2: AugParams | None = None  # a second view's augmentation, time and noise (views = 2)
    t2: Tensor | None = None
    noise2: Tensor | None = None
    label_drop: Tensor | None = None  # (n,) bool: CFG label dropout (class-conditional models)
    extra: dict[str, Tensor] = field(default_factory=dict)  # the auxiliary losses' own draws, by name

    def __getitem__(self, sl: slice) -> "Draws":
        out = replace(self, **{f.name: getattr(self, f.name)[sl] for f in fields(self)
                               if f.name != "extra" and getattr(self, f.name) is not None})
        out.extra = {k: v[sl] for k, v in self.extra.items()}
        return out

    def __getattr__(self, name: str) -> Tensor | None:  # d.key_noise, d.sra_u: an auxiliary loss's draw
        if name.startswith("__"):
            raise AttributeError(name)
        return self.__dict__.get("extra", {}).get(name)


@dataclass
class Batch:
    """What the network trains on: x0 of every view (V·b, C, H, W) with its time, noise and label."""

    x0: Tensor
    t: Tensor
    noise: Tensor
    aug_label: Tensor | None
    views: int  # 1, or 2 with contrastive learning (view 1 rows first)
    class_labels: Tensor | None = None  # (b,) after label dropout; None for unconditional backbones


class Objective(nn.Module):
    """Diffusion loss plus the auxiliary losses of a backbone; `aux` holds the trainable non-backbone modules."""

    def __init__(self, net: nn.Module, formulation, *, augment: AugmentPipe | None = None,
                 aux_losses: tuple[AuxLoss, ...] = (), num_classes: int = 0, label_dropout: float = 0.0):
        super().__init__()
        self.net = net  # the backbone (possibly compiled); checkpointed separately
        self.formulation = formulation
        self.augment = augment
        self.num_classes, self.label_dropout = num_classes, label_dropout if num_classes > 0 else 0.0
        self.aux = nn.ModuleDict()  # optimised, EMA'd and checkpointed with the training state
        if getattr(formulation, "uncertainty", None) is not None:
            self.aux["uncertainty"] = formulation.uncertainty  # EDM2 u(σ): the formulation calls it
        for loss in aux_losses:
            self.aux[loss.name] = loss
        self.views = max([1, *(a.views for a in self.aux_losses)])
        if self.views > 2:
            raise ValueError("at most two views per image are supported")
        if self.views > 1 and augment is None:
            raise ValueError("several views per image need the augmentation pipe")

    @property
    def aux_losses(self) -> list[AuxLoss]:
        return [m for m in self.aux.values() if isinstance(m, AuxLoss)]

    # ------------------------------------------------------------------ randomness and inputs

    def draw(self, n: int, shape: tuple[int, ...], *, generator: torch.Generator | None,
             device: torch.device | str) -> Draws:
        """Every per-sample draw for n images of `shape` (C, H, W), in a fixed order (module doc)."""
        size = tuple(shape[-2:])
        aug = self.augment.draw(n, size=size, generator=generator, device=device) if self.augment else None
        t = self.formulation.sample_time(n, device=device, generator=generator)
        noise = torch.randn((n, *shape), device=device, generator=generator)
        d = Draws(t=t, noise=noise, aug=aug)
        if self.views == 2:
            d.aug2 = self.augment.draw(n, size=size, generator=generator, device=device)
            d.t2 = self.formulation.sample_time(n, device=device, generator=generator)
            d.noise2 = torch.randn((n, *shape), device=device, generator=generator)
        for a in self.aux_losses:
            if a.views > 1:  # draws that belong with the views (the contrastive teacher's noise)
                d.extra.update(a.draw(n, shape, generator=generator, device=device))
        if self.label_dropout > 0:  # after the draws above: recipes without labels keep their stream
            d.label_drop = torch.rand(n, device=device, generator=generator) < self.label_dropout
        for a in self.aux_losses:
            if a.views == 1:
                d.extra.update(a.draw(n, shape, generator=generator, device=device))
        return d

    @torch.no_grad()
    def batch(self, x: Tensor, d: Draws, labels: Tensor | None = None) -> Batch:
        """Views of the images x (b, C, H, W) under the draws d (b rows); `labels` (b,) the data's classes."""
        if self.num_classes > 0:
            if labels is None:
                raise ValueError("a class-conditional backbone needs the data's labels")
            y = labels.to(x.device).long()
            if d.label_drop is not None:
                y = torch.where(d.label_drop, torch.full_like(y, self.num_classes), y)  # null class
            return Batch(x, d.t, d.noise, None, 1, y)
        if self.augment is None:
            return Batch(x, d.t, d.noise, None, 1)
        x1 = self.augment(x, d.aug)
        if self.views == 1:
            return Batch(x1, d.t, d.noise, d.aug.label.to(x.dtype), 1)
        x2 = self.augment(x, d.aug2)
        return Batch(torch.cat((x1, x2)), torch.cat((d.t, d.t2)), torch.cat((d.noise, d.noise2)),
                     torch.cat((d.aug.label, d.aug2.label)).to(x.dtype), 2)

    @torch.no_grad()
    def teacher_outputs(self, teacher: nn.Module, teacher_aux: nn.ModuleDict | None, batch: Batch, d: Draws, *,
                        gather: Callable[[Tensor], Tensor] = lambda k: k, rank: int = 0) -> dict[str, Any]:
        """Each auxiliary loss's EMA-teacher output ({} without auxiliary losses)."""
        return {a.name: a.teacher(teacher, teacher_aux[a.name] if teacher_aux is not None else None,
                                  self.formulation, batch, d, gather=gather, rank=rank)
                for a in self.aux_losses}

    # ------------------------------------------------------------------ the loss

    def forward(self, batch: Batch, teacher_out: dict[str, Any] | None = None,
                epoch: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar training loss and its detached parts (for logging)."""
        losses = self.aux_losses
        layers = tuple(dict.fromkeys(name for a in losses for name in a.student_layers))
        out = self.formulation.loss(self.net, batch.x0, t=batch.t, noise=batch.noise,
                                    aug_label=batch.aug_label, class_labels=batch.class_labels,
                                    feature_layers=layers)
        per_sample = out.loss.float()  # (V·b,)
        if not losses:
            return per_sample.mean(), {}
        b = batch.x0.shape[0] // batch.views
        first_only = any(a.diffusion_views == "first" for a in losses)
        l_diff = (per_sample[:b] if first_only else per_sample).mean()
        total, parts = l_diff, {"loss_diff": l_diff.detach()}
        for a in losses:
            weighted, logged = a.loss(out.features, batch, (teacher_out or {}).get(a.name), epoch, self.formulation)
            total = total + weighted
            parts.update(logged)
        return total, parts
