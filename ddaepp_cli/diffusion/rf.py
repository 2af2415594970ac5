"""Rectified flow (Liu et al., 2023; DDAE++ App. A): x_t = (1 − t)·x0 + t·ε, v = ε − x0, in pixel space and,
with LightningDiT's options, in latent space (DDAE++ Tab. 7; hustvl/LightningDiT `transport/`, `train.py`): logit-normal t, the
extra cosine term, t up to 1 and the timestep-shifted Euler grid. CFG wraps the denoiser (cfg.py).

Paper convention, t = 0 is data. The official RF code (gnobitab/RectifiedFlow) runs the mirrored
time t_RF = 1 − t; conventions and constants are mapped in docs/design.md §1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import UsageError
from .base import Formulation, Prediction, expand_like

# RF:ImageGeneration/losses.py and sampling.py keep t_RF ∈ [1e-3, 1] (eps = 1e-3): in paper time the
# network trains on t ∈ [0, 1 − 1e-3] and RK45/Euler start at t = 1 − 1e-3 from pure noise.
PIXEL_T_MAX = 1.0 - 1e-3
# SiT `sample_sde(last_step="Mean", last_step_size=0.04)`: Euler–Maruyama from t = 1 to 0.04 (SiT time
# 0 → 0.96 in `num_steps` points), then one deterministic drift step to data.
SDE_LAST_STEP = 0.04


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Timestep shift in paper time, t' = s·t / (1 + (s − 1)·t) (the SD3 shift, Esser et al. 2024).

    s > 1 pushes steps towards noise (t near 1); s = 1 is the identity. DDAE++'s "3.3" is this form;
    LightningDiT writes the mirrored map with s = 0.3 ≈ 1/3.3
    (hustvl/LightningDiT `transport/transport.py`, `configs/*.yaml`).
    """
    return shift * t / (1.0 + (shift - 1.0) * t)


class RF(Formulation):
    """Linear interpolation between data and noise with velocity prediction.

    `t_max` bounds training times and starts the samplers (official RF: 1 − 1e-3; latent RF as in
    LightningDiT: 1.0). `shift` is the default timestep shift of the euler/ddim/heun grids.
    `time_sampling`: "uniform" (official RF) or "logit_normal", t = sigmoid(n), n ~ N(0, 1) (LightningDiT
    `use_lognorm`; symmetric about 1/2, so the same in both time conventions). `cosine_loss` adds
    LightningDiT's 1 − cos(v̂, v) taken over channels at each position, averaged over positions.
    `net_convention`: "ddaepp" (the network sees paper t and predicts ε − x0) or "sit" — the network
    sees 1 − t and predicts x0 − ε, as LightningDiT's and SiT's transport train it (t = 1 is data there;
    LightningDiT:transport/path.py `ICPlan`, SiT:transport/path.py). Weights imported from those code
    bases (`ddaepp import`) keep their convention; the formulation converts at its boundary.
    """

    name = "rf"
    # rk45 first: DDAE++ Tab. 7 samples pixel RF with adaptive RK45 (140–160 NFE).
    # "euler" and "ddim" are the same step, x' = (1 − t')·x̂0 + t'·ε̂ = x + (t' − t)·v.
    # "sde": SiT's Euler–Maruyama sampler, 250 steps (SiT `sample_sde`; the SRA paper's SiT sampler).
    samplers = ("rk45", "euler", "ddim", "heun", "sde")
    default_steps = {"rk45": None, "euler": 100, "ddim": 100, "heun": 18, "sde": 250}
    clip_x0 = False  # the official RF samplers never clip; clipping also makes RK45's right-hand side kinked
    _takes_shift = True

    def __init__(self, t_max: float | None = PIXEL_T_MAX, shift: float = 1.0, time_sampling: str = "uniform",
                 cosine_loss: bool = False, net_convention: str = "ddaepp"):
        t_max = PIXEL_T_MAX if t_max is None else t_max
        if time_sampling not in ("uniform", "logit_normal"):
            raise UsageError(f"unknown rf time_sampling {time_sampling!r}; valid: uniform, logit_normal")
        self.time_sampling, self.cosine_loss = time_sampling, bool(cosine_loss)
        if net_convention not in ("ddaepp", "sit"):
            raise UsageError(f"unknown rf net_convention {net_convention!r}; valid: ddaepp, sit")
        self.net_convention = net_convention
        self._v_sign = -1.0 if net_convention == "sit" else 1.0  # network output = sign · (ε − x0)
        if not 0.0 < t_max <= 1.0:
            raise ValueError(f"t_max must lie in (0, 1], got {t_max}")
        if not shift > 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.t_max = float(t_max)
        self.shift = float(shift)

    # ------------------------------------------------------------------ the forward process

    def alpha(self, t: Tensor | float) -> Tensor:
        return 1.0 - torch.as_tensor(t, dtype=torch.float64)

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.as_tensor(t, dtype=torch.float64)

    def alpha_dot(self, t: Tensor | float) -> float:
        return -1.0

    def sigma_dot(self, t: Tensor | float) -> float:
        return 1.0

    def sample_time(self, n: int, *, device: torch.device | str = "cpu", generator=None) -> Tensor:
        if self.time_sampling == "logit_normal":  # hustvl/LightningDiT `use_lognorm` (`transport/transport.py`)
            return torch.sigmoid(torch.randn(n, device=device, generator=generator)) * self.t_max
        return torch.rand(n, device=device, generator=generator) * self.t_max  # t ~ U[0, t_max)

    def net_time(self, t: Tensor) -> Tensor:
        # Raw paper t ∈ [0, 1], the same range and direction as DDPM's t/T, so the DDAE UNets'
        # embedding sees what it sees under DDPM (official RF feeds 999·t_RF).
        if self.net_convention == "sit":  # SiT/LightningDiT time: 1 is data (class doc)
            return (1.0 - t.to(torch.float64)).to(torch.float32)
        return t.to(torch.float32)

    # ------------------------------------------------------------------ training and inference

    def _loss_elements(self, out, x0, x_t, noise, t):
        target = self._v_sign * (noise - x0)  # the network's own convention (class doc)
        sq = (out - target) ** 2  # ‖v_θ(x_t, t) − (ε − x0)‖², unweighted (DDAE++ App. A)
        if not self.cosine_loss:
            return sq
        # LightningDiT train.py: + mean over positions of 1 − cos(v̂, v) along channels; broadcast over C
        # so that the per-sample mean over (C, H, W) adds exactly that mean.
        cos = torch.nn.functional.cosine_similarity(out.float(), target.float(), dim=1)  # (B, H, W)
        return sq + (1.0 - cos)[:, None].to(sq.dtype)

    def _prediction(self, out: Tensor, x_t: Tensor, t: Tensor) -> Prediction:
        t = expand_like(t, x_t)
        v = out if self._v_sign == 1.0 else -out  # ε − x0 in paper convention
        return Prediction(x0=x_t - t * v, eps=x_t + (1.0 - t) * v)

    def prior_scale(self) -> float:
        return 1.0

    # ------------------------------------------------------------------ grids and CLI times

    def _grid(self, sampler: str, steps: int | None, shift: float | None) -> Tensor:
        if sampler == "rk45":
            return torch.tensor([self.t_max, 0.0], dtype=torch.float64)  # official RF ends at data exactly
        shift = self.shift if shift is None else float(shift)
        if not shift > 0:
            raise UsageError(f"timestep shift must be positive, got {shift}")
        if sampler == "sde":  # SiT: `steps` points from 1 down to the last-step size 0.04, then 0
            if self.t_max <= SDE_LAST_STEP:
                raise UsageError(f"sde needs t_max > {SDE_LAST_STEP}, got {self.t_max}")
            grid = torch.linspace(1.0, SDE_LAST_STEP, steps, dtype=torch.float64)
            return torch.cat([self.t_max * shift_time(grid, shift), torch.zeros(1, dtype=torch.float64)])
        uniform = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        return self.t_max * shift_time(uniform, shift)

    def parse_time(self, text: str) -> float:
        """t in [0, 1] (`0.25`; DDAE++ probes pixel RF at 0.06, Tab. 9)."""
        text = str(text).strip()
        usage = f"rf time '{text}': give t in [0, 1] (0 is data, e.g. 0.25)"
        try:
            t = float(text)
        except ValueError:
            raise UsageError(usage) from None
        if not (math.isfinite(t) and 0.0 <= t <= 1.0):
            raise UsageError(usage)
        return t
