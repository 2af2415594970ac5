"""EDM (Karras et al., 2022; DDAE++ App. A): x_σ = x0 + σ·ε, time = σ, preconditioned denoiser D.

Preconditioning, loss weight and sampling schedule of edm:training/networks.py `EDMPrecond`,
edm:training/loss.py `EDMLoss` and ddae:model/EDM.py (NVlabs/edm, FutureXiang/ddae); "Table 1", "Eq. 5" and
"Alg. 1" below refer to Karras et al. 2022.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import UsageError
from .base import Formulation, Prediction, expand_like


class Uncertainty(nn.Module):
    """EDM2's learned loss log-variance u(c_noise) (edm2:training/networks_edm2.py `Precond.logvar_*`).

    u = MPConv(128→1)(MPFourier(128)(c_noise)): fixed random Fourier features √2·cos(2π(f·c + φ)),
    f ~ N(0, 1), φ ~ U(0, 1), then a bias-free, weight-normalised linear map (w/‖w‖/√128) whose stored
    weight is re-normalised in every training forward ("forced weight normalisation"). 128 trainable
    parameters. Buffers and weight come from a fixed seed, so every process builds the same module.
    """

    def __init__(self, channels: int = 128, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))
        self.weight = nn.Parameter(torch.randn(1, channels, generator=g))

    @staticmethod
    def _normalize(w: Tensor, eps: float = 1e-4) -> Tensor:  # edm2 `normalize` for a (1, C) weight
        norm = torch.linalg.vector_norm(w, dim=1, keepdim=True, dtype=torch.float32)
        return w / (eps + norm * math.sqrt(norm.numel() / w.numel())).to(w.dtype)

    def forward(self, c_noise: Tensor) -> Tensor:
        """(B,) c_noise = ln(σ)/4 → (B,) float32 log-variance u."""
        w = self.weight.float()
        if self.training:
            with torch.no_grad():
                self.weight.copy_(self._normalize(w))  # forced weight normalisation (EDM2 §2.3)
        w = self._normalize(w) / math.sqrt(w.shape[1])  # magnitude-preserving scaling
        feat = (c_noise.float()[:, None] * self.freqs + self.phases).cos() * math.sqrt(2)  # (B, C)
        return (feat * w).sum(dim=1)  # (B,); elementwise, so autocast keeps it in float32


class EDM(Formulation):
    """Variance-exploding diffusion in σ with EDM preconditioning: D = c_skip·x + c_out·F(c_in·x, c_noise).

    The loss is λ(σ)·(D − y)² averaged over elements as in DDAE (EDM sums over pixels: a constant
    factor C·H·W apart). `uncertainty=True` adds EDM2's learned weighting (DDAE++ App. B, used with
    augmentation): λ(σ)/e^u(σ)·(D − y)² + u(σ), u = `Uncertainty`; a training-only module (the
    trainer optimises and checkpoints `self.uncertainty`), never used in sampling.
    """

    name = "edm"
    # "euler" and "ddim" are the same step, x' = x̂0 + σ'·ε̂ = x + (σ' − σ)·(x − D)/σ.
    samplers = ("heun", "euler", "ddim", "rk45")
    default_steps = {"heun": 18, "euler": 100, "ddim": 100, "rk45": None}  # heun 18 = 35 NFE (Tab. 7)
    clip_x0 = True  # ddae:model/EDM.py `pred_eps_(clip_x=True)` clips D to [-1, 1]
    probe_steps = 18  # `idx:k` on the command line indexes the reversed 18-step Heun schedule

    def __init__(
        self,
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        uncertainty: bool = False,
    ):
        self.sigma_data = sigma_data
        self.p_mean, self.p_std = p_mean, p_std  # ln σ ~ N(P_mean, P_std²) in training
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho  # sampling schedule
        self.uncertainty = Uncertainty() if uncertainty else None  # EDM2 log-variance u(σ)

    # ------------------------------------------------------------------ the forward process

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.as_tensor(t, dtype=torch.float64)

    def alpha_dot(self, t: Tensor | float) -> float:
        return 0.0

    def sigma_dot(self, t: Tensor | float) -> float:
        return 1.0

    def sample_time(self, n: int, *, device: torch.device | str = "cpu", generator=None) -> Tensor:
        rnd = torch.randn(n, device=device, generator=generator)
        return (rnd * self.p_std + self.p_mean).exp()  # σ, log-normal (EDM Table 1, "Training")

    def precond(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) of EDM Table 1 at noise level σ."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1.0 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """λ(σ) = (σ² + σ_d²)/(σ·σ_d)², which makes the effective target of F unit-variance."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def net_time(self, t: Tensor) -> Tensor:
        return (t.to(torch.float64).log() / 4).to(torch.float32)  # c_noise = ln(σ)/4

    def net_input_scale(self, t: Tensor) -> Tensor:
        return self.precond(t.to(torch.float64))[2]  # c_in

    # ------------------------------------------------------------------ training and inference

    def _denoised(self, out: Tensor, x_t: Tensor, sigma: Tensor) -> Tensor:
        c_skip, c_out, _, _ = self.precond(sigma.to(torch.float64))
        return expand_like(c_skip, x_t) * x_t + expand_like(c_out, x_t) * out  # D(x; σ)

    def _loss_elements(self, out, x0, x_t, noise, t):
        weight = expand_like(self.loss_weight(t.to(torch.float64)), x0)
        if self.uncertainty is None:
            return weight * (self._denoised(out, x_t, t) - x0) ** 2  # λ(σ)·‖D − y‖²
        u = expand_like(self.uncertainty(self.net_time(t)), x0)  # (B, 1, 1, 1) log-variance of c_noise
        return weight / u.exp() * (self._denoised(out, x_t, t) - x0) ** 2 + u  # EDM2Loss, per element

    def _prediction(self, out: Tensor, x_t: Tensor, t: Tensor) -> Prediction:
        x0 = self._denoised(out, x_t, t)
        return Prediction(x0=x0, eps=(x_t - x0) / expand_like(t, x_t))

    def prior_scale(self) -> float:
        return float(self.sigma_max)

    # ------------------------------------------------------------------ grids and CLI times

    def karras_sigmas(self, steps: int) -> Tensor:
        """σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ for i < N, σ_N = 0 (EDM Eq. 5)."""
        if steps == 1:
            return torch.tensor([self.sigma_max, 0.0], dtype=torch.float64)
        i = torch.arange(steps, dtype=torch.float64)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        sigmas = (hi + i / (steps - 1) * (lo - hi)) ** self.rho
        return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])

    def _grid(self, sampler: str, steps: int | None, shift: float | None) -> Tensor:
        if sampler == "rk45":  # integrate σ_max → σ_min, then the Euler step to 0 (like Heun's last)
            return torch.tensor([self.sigma_max, self.sigma_min, 0.0], dtype=torch.float64)
        return self.karras_sigmas(steps)

    def parse_time(self, text: str) -> float:
        """σ (`0.06`) or `idx:k`, k-th entry of the reversed 18-step Heun schedule (idx:4 → σ ≈ 0.0599)."""
        text = str(text).strip()
        usage = (
            f"edm time '{text}': give σ in [{self.sigma_min:g}, {self.sigma_max:g}] (e.g. 0.06) "
            f"or a schedule index idx:1..{self.probe_steps} (idx:4 is σ ≈ 0.06)"
        )
        if text.startswith("idx:"):
            index = text[4:]
            if not index.isdigit() or not 1 <= int(index) <= self.probe_steps:
                raise UsageError(usage)
            # ddae:model/EDM.py perturb: reversed(sample_schedule(18))[t], the schedule with its trailing 0
            return float(self.karras_sigmas(self.probe_steps).flip(0)[int(index)])
        try:
            sigma = float(text)
        except ValueError:
            raise UsageError(usage) from None
        if not (math.isfinite(sigma) and self.sigma_min <= sigma <= self.sigma_max):
            raise UsageError(usage)
        return sigma
