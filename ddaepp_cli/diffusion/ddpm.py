"""DDPM (Ho et al., 2020; DDAE++ App. A): x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, integer t ∈ 1..T, ε-prediction.

Schedule and sampling grid as in ddae:model/DDPM.py (architecture.md §5.1): T = 1000, linear β from
1e-4 to 0.02 with a leading β_0 = 0 so that t indexes 1..T and ᾱ_0 = 1; the network embeds t/T.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UsageError
from .base import Formulation, Prediction, expand_like


def alphas_cumprod(betas: Tensor) -> Tensor:
    """ᾱ_t = ∏_{i≤t} (1 − β_i), in float64 (DDAE accumulates in float32 via exp(cumsum(log)))."""
    return torch.cumprod(1.0 - betas, dim=0)


class DDPM(Formulation):
    """Discrete variance-preserving diffusion with ε-prediction.

    `ddae_ddim_quirk=True` reproduces DDAE's sampling schedule: its DDIM sampler reads ᾱ from a
    separate table built from linspace(β_1, β_T, T + 1) *without* the leading zero
    (`schedules(..., 'DDIM')`), so ᾱ'_1 ≈ 0.99978 instead of 0.9999 and ᾱ'_0 = 1 − β_1. With the
    quirk on, `alpha`/`sigma` — what `predict` and every sampler see — come from that table, while
    `perturb` and `loss` keep the training table. Off by default: the mismatch is a bug in DDAE,
    worth turning on only to compare with DDAE's published FIDs. (DDAE's own ancestral sampler
    used the training table, so keep the quirk off with sampler `ddpm`.)
    """

    name = "ddpm"
    # "euler" is the same step as "ddim" (x' = α'·x̂0 + σ'·ε̂; DDAE++ Tab. 7 says "Euler (DDIM)")
    samplers = ("ddim", "euler", "ddpm")
    default_steps = {"ddim": 100, "euler": 100, "ddpm": 1000}  # DDAE++ Tab. 7; ancestral = T steps
    clip_x0 = True  # ddae:model/DDPM.py `pred_eps_(clip_x=True)` in both its samplers

    def __init__(
        self,
        T: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        ddae_ddim_quirk: bool = False,
    ):
        self.T = int(T)
        self.ddae_ddim_quirk = bool(ddae_ddim_quirk)
        betas = torch.linspace(beta_start, beta_end, self.T, dtype=torch.float64)
        self.betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])  # (T+1,), β_0 = 0
        self._abar_train = alphas_cumprod(self.betas)  # (T+1,), ᾱ_0 = 1
        if self.ddae_ddim_quirk:  # ddae:model/DDPM.py schedules(type='DDIM')
            quirk_betas = torch.linspace(beta_start, beta_end, self.T + 1, dtype=torch.float64)
            self._abar_sample = alphas_cumprod(quirk_betas)
        else:
            self._abar_sample = self._abar_train

    # ------------------------------------------------------------------ the forward process

    @staticmethod
    def _lookup(table: Tensor, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t)
        return table.to(t.device)[t.round().long()]

    def alpha(self, t: Tensor | float) -> Tensor:
        return self._lookup(self._abar_sample, t).sqrt()

    def sigma(self, t: Tensor | float) -> Tensor:
        return (1.0 - self._lookup(self._abar_sample, t)).sqrt()

    def perturb(self, x0: Tensor, t: Tensor | float, noise: Tensor) -> Tensor:
        t = self._time(t, x0)
        abar = self._lookup(self._abar_train, t)  # training table, quirk or not
        return expand_like(abar.sqrt(), x0) * x0 + expand_like((1.0 - abar).sqrt(), x0) * noise

    def sample_time(self, n: int, *, device: torch.device | str = "cpu", generator=None) -> Tensor:
        return torch.randint(1, self.T + 1, (n,), device=device, generator=generator)  # t ~ U{1..T}

    def net_time(self, t: Tensor) -> Tensor:
        return t.to(torch.float32) / self.T  # ddae:model/DDPM.py calls the net with t / n_T

    # ------------------------------------------------------------------ training and inference

    def _loss_elements(self, out, x0, x_t, noise, t):
        return (out - noise) ** 2  # ‖ε_θ(x_t, t) − ε‖², unweighted (DDAE++ App. A)

    def _prediction(self, out: Tensor, x_t: Tensor, t: Tensor) -> Prediction:
        a, s = expand_like(self.alpha(t), x_t), expand_like(self.sigma(t), x_t)
        return Prediction(x0=(x_t - s * out) / a, eps=out)

    def prior_scale(self) -> float:
        return 1.0

    # ------------------------------------------------------------------ grids and CLI times

    def _grid(self, sampler: str, steps: int | None, shift: float | None) -> Tensor:
        if steps > self.T:
            raise UsageError(f"{sampler} on ddpm takes at most {self.T} steps, got {steps}")
        # DDAE: arange(0, T, T // steps) + 1 visited in reverse, then 0 — 100 steps: 991, 981, …, 1, 0.
        # Written as 1 + ⌊kT/steps⌋ so a step count that does not divide T still gives `steps` steps.
        times = 1 + (torch.arange(steps, dtype=torch.int64) * self.T) // steps
        return torch.cat([times.flip(0), torch.zeros(1, dtype=torch.int64)]).to(torch.float64)

    def parse_time(self, text: str) -> float:
        """An integer step 1..T (`11` is the DDAE++ probe time, Tab. 9)."""
        text = str(text).strip()
        if not text.isdigit() or not 1 <= int(text) <= self.T:
            raise UsageError(f"ddpm time '{text}' is not a step: give an integer in 1..{self.T} (e.g. 11)")
        return float(int(text))
