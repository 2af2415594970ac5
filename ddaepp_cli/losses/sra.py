"""SRA — self-representation alignment (Jiang et al., 2025, "No Other Representation Component Is Needed";
`SRA:SiT-SRA/loss.py`, `models/sit.py`; repository vvvvvjdy/SRA).

    L = L_diff + λ(epoch) · mean ℓ( head(h_s(x_t, t)), sg(h̄_T(x_t', t')) )

h_s: the student's block `student_layer` output tokens (B, N, D); head: Linear(D→2D) → SiLU →
Linear(2D→D) (SRA `SimpleHead`, discarded after training); h̄_T: the EMA teacher's raw block
`teacher_layer` output at the lower noise t' = clamp(t − Δ·u, 0, 1), u ~ U(0, 1) (the paper's dynamic
interval; DDPM: Δ·T steps, clamped to step index ≥ 1 as DiT-SRA), with the same noise and labels. ℓ: smooth-L1 with
β = 0.05 averaged over batch, tokens and channels (paper), or 1 − cosine similarity over channels per
token ("cosine"; the SRA code's own cosine runs over the token axis, a quirk we do not copy).

The teacher runs `forward_features` (taps.py), which stops after its block under no-grad: nothing past
the block is ever used (the official code runs the full forward and drops the rest).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .aux import AuxLoss, teacher_input

SRA_LOSSES = ("smooth_l1", "cosine")
SRA_SCHEDULES = ("constant", "step_decay")


class SRAHead(AuxLoss):
    """The student's projection head and the alignment loss; an `AuxLoss` (aux.py) whose teacher is the EMA
    backbone itself (the head's own EMA copy is kept but never used)."""

    name = "sra"

    @classmethod
    def from_recipe(cls, recipe, model: nn.Module, formulation) -> "SRAHead | None":
        import dataclasses

        r = recipe.sra
        if not r.enabled:
            return None
        (student,), (teacher,) = model.resolve_layers([r.student_layer]), model.resolve_layers([r.teacher_layer])
        kw = {k: v for k, v in dataclasses.asdict(r).items() if k not in ("enabled", "student_layer", "teacher_layer")}
        return cls(model.feature_dims[student], student_layer=student, teacher_layer=teacher, **kw)

    def __init__(self, dim: int, *, student_layer: str, teacher_layer: str, weight: float = 0.2,
                 schedule: str = "constant", decay_start_epochs: float = 149.0, decay_period_epochs: float = 1000.0,
                 loss: str = "smooth_l1", beta: float = 0.05, interval: float = 0.2, dynamic: bool = True):
        super().__init__()
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.weight, self.schedule = float(weight), schedule
        self.decay_start, self.decay_period = float(decay_start_epochs), float(decay_period_epochs)
        self.loss_type, self.beta = loss, float(beta)
        self.interval, self.dynamic = float(interval), bool(dynamic)
        self.head = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))  # 2,361,600 for D=768
        for m in self.head:  # SRA `initialize_weights`: xavier-uniform, zero bias
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def student_layers(self) -> tuple[str, ...]:
        return (self.student_layer,)

    def draw(self, n: int, shape: tuple[int, ...], *, generator, device) -> dict[str, Tensor]:
        return {"sra_u": torch.rand(n, device=device, generator=generator)}  # the dynamic teacher-time gap

    @torch.no_grad()
    def teacher(self, net: nn.Module, own_ema: nn.Module | None, formulation, batch, draws, *,
                gather: Callable[[Tensor], Tensor], rank: int) -> Tensor:
        """The EMA teacher's block output at t' < t, same noise and labels; `forward_features` stops right
        after the block (taps.py early exit)."""
        t = self.teacher_time(formulation, batch.t, draws.sra_u)  # (b,) paper time
        x_in = teacher_input(formulation, batch.x0, t, batch.noise)
        feats = net.forward_features(x_in, formulation.net_time(t), [self.teacher_layer],
                                     class_labels=batch.class_labels)
        return feats[self.teacher_layer]  # (b, N, D)

    def loss(self, features: dict[str, Tensor], batch, teacher_out: Tensor, epoch: float,
             formulation) -> tuple[Tensor, dict[str, Tensor]]:
        l_sra = self(features[self.student_layer], teacher_out)
        return self.weight_at(epoch) * l_sra, {"loss_sra": l_sra.detach()}

    def weight_at(self, epoch: float) -> float:
        """λ(epoch): constant, or the SRA code's λ·0.1^((epoch − start)/period) after `start` epochs."""
        if self.schedule == "step_decay" and epoch > self.decay_start:
            return self.weight * 0.1 ** ((epoch - self.decay_start) / self.decay_period)
        return self.weight

    def teacher_time(self, formulation, t: Tensor, u: Tensor) -> Tensor:
        """t' = t − Δ·u (dynamic) or t − Δ (fixed), clamped to the schedule (paper time, t = 0 is data)."""
        gap = u if self.dynamic else torch.ones_like(u)
        if formulation.name == "ddpm":
            # DiT-SRA (SRA repo, DiT-SRA/diffusion/gaussian_diffusion.py `training_losses`): on its step index
            # i = t − 1 ∈ 0..T−1, i' = clamp(i − U{0..Δ·T−1}, 1, T−1) — index ≥ 1, so ddaepp's t' ≥ 2. (At
            # i = 0 that gives i' = 1, a teacher one step noisier than the student, exactly as DiT-SRA.)
            steps = torch.floor(gap * self.interval * formulation.T).clamp(max=max(0, self.interval * formulation.T - 1))
            return (t - steps.to(t.dtype)).clamp(2, formulation.T)
        return (t - (gap * self.interval).to(t.dtype)).clamp(0.0, 1.0)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """student, teacher (B, N, D) → scalar alignment loss (before λ)."""
        z = self.head(student).float()  # (B, N, D)
        target = teacher.detach().float()
        if self.loss_type == "cosine":
            return (1.0 - F.cosine_similarity(z, target, dim=-1)).mean()
        return F.smooth_l1_loss(z, target, beta=self.beta)  # mean over B, N, D


def epoch_of(step: int, steps_per_epoch: int | None) -> float:
    return step / steps_per_epoch if steps_per_epoch else 0.0
