"""Improved-DDPM learned variance as DiT trains and samples it (Nichol & Dhariwal, 2021, §3.1;
`facebookresearch/DiT:diffusion/gaussian_diffusion.py`, `diffusion_utils.py`, `respace.py`).

The network outputs 2C channels: ε̂ and v ∈ [−1, 1] (unconstrained in practice). With frac = (v + 1)/2
the reverse step's log-variance interpolates between the posterior variance β̃ and β of that step:

    log σ²_θ = frac·log β + (1 − frac)·log β̃,   β̃ = β·(1 − ᾱ_prev)/(1 − ᾱ_t)

Training adds the VLB term to L_simple with a stop-gradient on the mean (ε̂ detached), so the VLB only
trains v: L = ‖ε̂ − ε‖² + L_vlb, L_vlb = KL(q(x_{t−1}|x_t, x0) ‖ p_θ(x_{t−1}|x_t)) in bits per dimension,
and at the first step (our t = 1, DiT's index 0) the discretised-Gaussian decoder NLL instead. DiT uses
`LossType.MSE` (no 1/1000 rescaling of the VLB).

Time indexing: ddaepp's DDPM steps t = 1..T with ᾱ_0 = 1 are DiT's indices t − 1 = 0..T−1. A sampling
step t → t' (t' < t, any respaced grid) has β = 1 − ᾱ_t/ᾱ_t' — improved DDPM's respaced process, whose
cumulative products equal ᾱ at the kept steps, so the marginals q(x_t | x0) are unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------------------
# Gaussian helpers (guided-diffusion `losses.py`, as DiT copies them)
# ------------------------------------------------------------------------------------------------


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), element-wise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of Φ used by guided-diffusion/DiT."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) of a Gaussian discretised to 256 bins on [−1, 1] (edge bins open), element-wise, in nats."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# ------------------------------------------------------------------------------------------------
# One reverse step t → t' of the (possibly respaced) process
# ------------------------------------------------------------------------------------------------


def step_terms(abar_t: Tensor, abar_prev: Tensor) -> dict[str, Tensor]:
    """β, β̃ and the posterior-mean coefficients of the step ᾱ_t → ᾱ_prev (float64 in, float64 out).

    μ̃(x0, x_t) = coef_x0·x0 + coef_xt·x_t (DiT `posterior_mean_coef1/2`)."""
    beta = 1.0 - abar_t / abar_prev
    beta_tilde = beta * (1.0 - abar_prev) / (1.0 - abar_t)
    coef_x0 = beta * abar_prev.sqrt() / (1.0 - abar_t)
    coef_xt = (1.0 - abar_prev) * (1.0 - beta).sqrt() / (1.0 - abar_t)
    return {"beta": beta, "beta_tilde": beta_tilde, "coef_x0": coef_x0, "coef_xt": coef_xt}


def interpolated_log_variance(frac: Tensor, log_beta: Tensor, log_beta_tilde: Tensor) -> Tensor:
    """log σ²_θ = frac·log β + (1 − frac)·log β̃ (DiT `p_mean_variance`, LEARNED_RANGE)."""
    return frac * log_beta + (1.0 - frac) * log_beta_tilde


class VLBTables:
    """Per-step tables of the training schedule (index t = 0..T, row 0 unused), float64.

    `log_beta_tilde` is DiT's `posterior_log_variance_clipped`: at t = 1, where β̃ = 0, it holds β̃ of t = 2."""

    def __init__(self, abar: Tensor):
        abar = abar.to(torch.float64)  # (T+1,), abar[0] = 1
        terms = step_terms(abar[1:], abar[:-1])  # rows t = 1..T
        log_bt = torch.log(terms["beta_tilde"].clone())
        log_bt[0] = log_bt[1]  # clipped: t = 1 takes t = 2's β̃
        pad = torch.zeros(1, dtype=torch.float64)
        self.sqrt_abar, self.sqrt_1m_abar = abar.sqrt(), (1.0 - abar).sqrt()
        self.coef_x0 = torch.cat([pad, terms["coef_x0"]])
        self.coef_xt = torch.cat([pad, terms["coef_xt"]])
        self.log_beta = torch.cat([pad, torch.log(terms["beta"])])
        self.log_beta_tilde = torch.cat([pad, log_bt])

    def lookup(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Table `name` at integer steps t (B,), shaped (B, 1, …) in like's dtype and device."""
        v = getattr(self, name).to(t.device)[t.round().long()]
        return v.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def vlb_bits(tables: VLBTables, eps_frozen: Tensor, v: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """L_vlb per element in bits (DiT `_vb_terms_bpd` with the frozen mean, clip_denoised=False).

    eps_frozen: ε̂ with the gradient stopped; v: the raw variance output. KL(q ‖ p_θ) for t > 1, the
    discretised decoder NLL of x0 at t = 1. Computed in float32 (float64 inputs stay float64)."""
    dt = torch.promote_types(x_t.dtype, torch.float32)
    eps_frozen, v, x0, x_t = (a.to(dt) for a in (eps_frozen, v, x0, x_t))
    look = lambda name: tables.lookup(name, t, x_t)  # noqa: E731
    x0_hat = (x_t - look("sqrt_1m_abar") * eps_frozen) / look("sqrt_abar")
    coef_x0, coef_xt = look("coef_x0"), look("coef_xt")
    true_mean = coef_x0 * x0 + coef_xt * x_t
    model_mean = coef_x0 * x0_hat + coef_xt * x_t
    log_bt = look("log_beta_tilde")
    model_logvar = interpolated_log_variance((v + 1.0) / 2.0, look("log_beta"), log_bt)
    kl = normal_kl(true_mean, log_bt, model_mean, model_logvar) / LN2
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar) / LN2
    first = (t.round() == 1).reshape(-1, *([1] * (x_t.ndim - 1)))
    return torch.where(first, nll, kl)


# ------------------------------------------------------------------------------------------------
# Respacing (improved DDPM / DiT `space_timesteps`)
# ------------------------------------------------------------------------------------------------


def space_timesteps(T: int, steps: int) -> list[int]:
    """DiT `space_timesteps(T, str(steps))` with one section: `steps` indices of 0..T−1, both ends kept,
    stride (T − 1)/(steps − 1) accumulated in floating point and rounded half-to-even as Python's round."""
    if not 1 <= steps <= T:
        raise ValueError(f"cannot space {T} steps into {steps}")
    stride = 1 if steps <= 1 else (T - 1) / (steps - 1)
    cur, taken = 0.0, []
    for _ in range(steps):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))
