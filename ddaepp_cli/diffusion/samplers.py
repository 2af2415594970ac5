"""Samplers as pure functions of a denoiser (x_t, t) -> Prediction: DDIM/Euler, DDPM ancestral (fixed or
learned variance), Heun, RK45, SiT's Euler–Maruyama SDE sampler and, for DDPM, U-ViT's VP-SDE one.

Each sampler walks `formulation.time_grid(...)` (paper time, descending to data) and knows nothing
about networks: it sees the formulation's α(t), σ(t), their derivatives and the denoiser's (x̂0, ε̂).
Per-sample seeds make stochastic samplers independent of batch size and process count.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from ..seeding import per_sample_randn
from .base import Denoiser, Formulation, Prediction
from .learned_var import interpolated_log_variance

# RF:ImageGeneration/sampling.py `rk45_sampler` (sde.ode_tol = 1e-5 in the RF configs)
RK45_RTOL = 1e-5
RK45_ATOL = 1e-5


def _steps(grid: Tensor) -> list[tuple[float, float]]:
    times = grid.tolist()
    return list(zip(times[:-1], times[1:]))


def _full(t: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)  # (B,)


def ddim(formulation: Formulation, denoise: Denoiser, x: Tensor, grid: Tensor, *, seeds=None) -> tuple[Tensor, int]:
    """Deterministic DDIM, η = 0 (Song et al., 2021): x' = α(t')·x̂0 + σ(t')·ε̂.

    For EDM (α = 1, σ' = 1) and RF (α = 1 − t) this is exactly an Euler step of the probability-flow
    ODE, x' = x + (t' − t)·dx/dt, which is why "euler" and "ddim" share this function.
    """
    for t_cur, t_next in _steps(grid):
        pred = denoise(x, _full(t_cur, x))
        x = float(formulation.alpha(t_next)) * pred.x0 + float(formulation.sigma(t_next)) * pred.eps
    return x, len(grid) - 1


def ddpm_ancestral(
    formulation: Formulation, denoise: Denoiser, x: Tensor, grid: Tensor, *, seeds: Sequence[int] | None = None
) -> tuple[Tensor, int]:
    """Ancestral DDPM sampling (Ho et al., 2020, Alg. 2) with σ_t² = β_t as in ddae:model/DDPM.py, or the
    learned variance when the prediction carries one (improved DDPM / DiT `p_sample`, learned_var.py).

    x_{t'} = (x_t − β/σ_t·ε̂)/√(1 − β) + σ·z with 1 − β = ᾱ_t/ᾱ_{t'} — the posterior mean μ̃(x̂0, x_t) of
    one step of the respaced process (a coarser grid takes the same form with β spanning the skipped
    steps, improved DDPM's respacing). σ² = β (fixed), or exp(frac·log β + (1 − frac)·log β̃) with
    β̃ = β(1 − ᾱ_{t'})/(1 − ᾱ_t) (learned). No noise on the step to t = 0. The noise z of step t comes from
    `per_sample_randn(seeds, stream=t)` when seeds are given, else from the global torch RNG.
    """
    for t_cur, t_next in _steps(grid):
        pred = denoise(x, _full(t_cur, x))
        abar_cur, abar_next = float(formulation.alpha(t_cur) ** 2), float(formulation.alpha(t_next) ** 2)
        keep = abar_cur / abar_next  # ᾱ_t / ᾱ_{t'}
        beta = 1.0 - keep
        x = (x - beta / float(formulation.sigma(t_cur)) * pred.eps) / keep**0.5  # Alg. 2, line 4
        if t_next > 0:
            if seeds is None:
                z = torch.randn_like(x)
            else:
                z = per_sample_randn(seeds, x.shape[1:], device=x.device, dtype=x.dtype, stream=int(round(t_cur)))
            if pred.var_frac is None:
                std = beta**0.5
            else:
                beta_tilde = beta * (1.0 - abar_next) / (1.0 - abar_cur)
                log_var = interpolated_log_variance(pred.var_frac.to(x.dtype), math.log(beta), math.log(beta_tilde))
                std = torch.exp(0.5 * log_var)
            x = x + std * z
    return x, len(grid) - 1


def sde_diffusion(formulation: Formulation, t: float) -> float:
    """SiT's diffusion coefficient w(t) = σ(t) (`diffusion_form="sigma"`, the default of SiT's sampling
    scripts, `train_utils.py parse_sde_args`; SRA/REPA's `compute_diffusion` = 2t is g² = 2w for RF)."""
    return float(formulation.sigma(t))


def euler_maruyama(formulation: Formulation, denoise: Denoiser, x: Tensor, grid: Tensor, *,
                   seeds: Sequence[int] | None = None) -> tuple[Tensor, int]:
    """SiT's SDE sampler (Ma et al., 2024; `SiT:transport/integrators.py sde`, `transport.py
    sample_sde`): Euler–Maruyama on the reverse SDE in paper time (dt < 0)

        dx = [u(x, t) − w(t)·∇log p_t(x)] dt + √(2w(t)) dW̄,   u = α'·x̂0 + σ'·ε̂,  ∇log p_t = −ε̂/σ(t)

    with w = σ (`sde_diffusion`). Every step but the last adds noise; the last (0.04 → 0 on the default
    grid) is SiT's deterministic `last_step="Mean"`: x + dt·drift. N grid steps cost N network calls.
    The step-k noise comes from `per_sample_randn(seeds, stream=k + 1)` when seeds are given.
    """
    steps = _steps(grid)
    for k, (t_cur, t_next) in enumerate(steps):
        pred = denoise(x, _full(t_cur, x))
        w, dt = sde_diffusion(formulation, t_cur), t_next - t_cur
        score = -pred.eps / float(formulation.sigma(t_cur))
        x = x + dt * (formulation.drift(pred, t_cur) - w * score)
        if k < len(steps) - 1:
            if seeds is None:
                z = torch.randn_like(x)
            else:
                z = per_sample_randn(seeds, x.shape[1:], device=x.device, dtype=x.dtype, stream=k + 1)
            x = x + math.sqrt(2.0 * w * abs(dt)) * z
    return x, len(steps)


def vp_euler_maruyama(formulation: Formulation, denoise: Denoiser, x: Tensor, grid: Tensor, *,
                      seeds: Sequence[int] | None = None) -> tuple[Tensor, int]:
    """Euler–Maruyama on the reverse VP-SDE (Song et al., 2021, Eq. 6) of a DDPM formulation: U-ViT's
    `euler_maruyama_sde` (`baofff/U-ViT:sde.py` `euler_maruyama`, `ReverseSDE`, `VPSDE`).

    The SDE is the continuous limit of the linear DDPM schedule, β(τ) = β_min + τ·(β_max − β_min) with
    β_min = T·β_1, β_max = T·β_T (0.1 and 20 for DDPM's 1e-4…0.02, T = 1000: U-ViT's `VPSDE(0.1, 20)`), in
    τ = t/T for the DDPM step t of the grid. Each step τ → τ' (dτ = τ' − τ < 0), g = √β(τ):

        x' = x + dτ·[−½β(τ)·x − g²·s],   s = −ε̂ / √(1 − exp(−∫₀^τ β)),   then + g·√|dτ|·z

    with no noise on the step to τ = 0. ε̂ is the network's (the DDPM table does not enter). U-ViT's
    grid [0, linspace(1e-3, 1, 1000)] is τ = k/1000 — ddaepp's 1000-step DDPM grid. The coefficients are
    evaluated as U-ViT's `VPSDE` evaluates them, in the state's dtype (1 − exp(−∫β), g² = (√β)²), so that
    float32 sampling reproduces U-ViT's rounding too: with float64 coefficients the samples differ from
    U-ViT's by ~1e-5 relative, through 1 − exp(−∫β) at small τ. The noise z of step t comes from
    `per_sample_randn(seeds, stream=t)` as in `ddpm_ancestral`.
    """
    if formulation.name != "ddpm":
        raise ValueError(f"vp_euler_maruyama needs the ddpm formulation, got {formulation.name}")
    T = formulation.T
    b_min, b_max = T * float(formulation.betas[1]), T * float(formulation.betas[T])
    steps = _steps(grid)
    for t_cur, t_next in steps:
        pred = denoise(x, _full(t_cur, x))
        tau = torch.tensor(t_cur / T, dtype=x.dtype, device=x.device)
        dtau = torch.tensor(t_next / T, dtype=x.dtype, device=x.device) - tau
        beta = b_min + tau * (b_max - b_min)  # VPSDE.squared_diffusion
        g = beta**0.5  # VPSDE.diffusion
        cum_beta = 1.0 - (-(b_min * tau + (b_max - b_min) * tau**2 * 0.5)).exp()  # VPSDE.cum_beta
        score = -cum_beta.rsqrt() * pred.eps.to(x.dtype)  # ScoreModel.score
        x = x + (-0.5 * beta * x - g**2 * score) * dtau  # ReverseSDE.drift: f − g²·s
        if t_next > 0:
            if seeds is None:
                z = torch.randn_like(x)
            else:
                z = per_sample_randn(seeds, x.shape[1:], device=x.device, dtype=x.dtype, stream=int(round(t_cur)))
            x = x + g * (-dtau).sqrt() * z
    return x, len(steps)


def sde(formulation: Formulation, denoise: Denoiser, x: Tensor, grid: Tensor, *,
        seeds: Sequence[int] | None = None) -> tuple[Tensor, int]:
    """The "sde" sampler: SiT's Euler–Maruyama for RF (`euler_maruyama`), U-ViT's VP-SDE one for DDPM."""
    step = vp_euler_maruyama if formulation.name == "ddpm" else euler_maruyama
    return step(formulation, denoise, x, grid, seeds=seeds)


Churn = tuple[float, float, float | None, float]  # (S_churn, S_min, S_max or None: ∞, S_noise)


def heun(formulation: Formulation, denoise: Denoiser, x: Tensor, grid: Tensor, *, seeds=None,
         churn: Churn | None = None) -> tuple[Tensor, int]:
    """EDM's 2nd-order Heun sampler (Karras et al., 2022): Alg. 1, deterministic, or with `churn` Alg. 2.

    State in float64 as in edm:generate.py; the step onto t = 0 is plain Euler, so N steps cost
    2N − 1 network evaluations (18 steps = 35 NFE). Works for any path via dx/dt = α'·x̂0 + σ'·ε̂.
    `churn` = (S_churn, S_min, S_max, S_noise), EDM formulation only (x_t = x0 + t·ε, so noise of variance
    t̂² − t² moves x from t to t̂): for S_min ≤ t_i ≤ S_max, γ = min(S_churn/N, √2 − 1), t̂ = t_i + γ·t_i,
    x̂ = x + √(t̂² − t_i²)·S_noise·z, then the Heun step from t̂ (`edm_sampler`). z of step i is
    `per_sample_randn(seeds, stream=i + 1)`.
    """
    x = x.to(torch.float64)
    nfe = 0
    steps = _steps(grid)
    if churn is not None and churn[0] > 0 and formulation.name != "edm":
        raise ValueError(f"EDM's stochastic sampler (S_churn > 0) needs the edm formulation, got {formulation.name}")
    for i, (t_cur, t_next) in enumerate(steps):
        if churn is not None and churn[0] > 0:
            s_churn, s_min, s_max, s_noise = churn
            gamma = min(s_churn / len(steps), math.sqrt(2) - 1) if s_min <= t_cur <= (s_max or math.inf) else 0.0
            if gamma > 0:
                t_hat = t_cur + gamma * t_cur
                if seeds is None:
                    z = torch.randn_like(x)
                else:
                    z = per_sample_randn(seeds, x.shape[1:], device=x.device, dtype=x.dtype, stream=i + 1)
                x = x + math.sqrt(t_hat**2 - t_cur**2) * s_noise * z
                t_cur = t_hat
        d_cur = formulation.drift(denoise(x, _full(t_cur, x)), t_cur)
        x_next = x + (t_next - t_cur) * d_cur
        nfe += 1
        if t_next > 0:  # 2nd-order correction everywhere but the last step
            d_next = formulation.drift(denoise(x_next, _full(t_next, x)), t_next)
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
            nfe += 1
        x = x_next
    return x, nfe


def rk45(formulation: Formulation, denoise: Denoiser, x: Tensor, grid: Tensor, *, seeds=None) -> tuple[Tensor, int]:
    """Adaptive Dormand–Prince RK45 on the probability-flow ODE through scipy (RF's `rk45_sampler`).

    Integrates grid[0] → grid[1] with rtol = atol = 1e-5; a third grid point 0 adds one Euler step
    (EDM stops the ODE at σ_min). The step size is chosen from the error of the whole batch, so
    samples depend on the batch they were drawn with — at the level of the tolerance only.
    """
    shape, device = x.shape, x.device
    nfe = 0

    def velocity(t: float, y: np.ndarray) -> np.ndarray:
        nonlocal nfe
        nfe += 1
        x_t = torch.from_numpy(y).reshape(shape).to(device)  # float64
        return formulation.drift(denoise(x_t, _full(t, x_t)), t).reshape(-1).cpu().numpy()

    t_start, t_stop = float(grid[0]), float(grid[1])
    y0 = x.detach().to(torch.float64).reshape(-1).cpu().numpy()
    solution = solve_ivp(
        velocity, (t_start, t_stop), y0, method="RK45", rtol=RK45_RTOL, atol=RK45_ATOL, t_eval=[t_stop]
    )
    if not solution.success:
        raise RuntimeError(f"rk45 failed: {solution.message}")
    x = torch.from_numpy(solution.y[:, -1].copy()).reshape(shape).to(device)
    if len(grid) == 3:
        x, extra = ddim(formulation, denoise, x, grid[1:])
        nfe += extra
    return x, nfe


Sampler = Callable[..., tuple[Tensor, int]]

SAMPLERS: dict[str, Sampler] = {
    "ddim": ddim,
    "euler": ddim,  # the same update; see `ddim`
    "ddpm": ddpm_ancestral,
    "heun": heun,
    "rk45": rk45,
    "sde": sde,
}


def clipped(formulation: Formulation, denoise: Denoiser) -> Denoiser:
    """The denoiser with x̂0 clipped to [-1, 1] and ε̂ recomputed from it (idempotent)."""

    def denoise_clipped(x_t: Tensor, t: Tensor) -> Prediction:
        return formulation.clip_prediction(denoise(x_t, t), x_t, t)

    return denoise_clipped


@torch.no_grad()
def sample(
    formulation: Formulation,
    denoise: Denoiser,
    x_T: Tensor,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    seeds: Sequence[int] | None = None,
    clip: bool | None = None,
    shift: float | None = None,
    stats: dict | None = None,
    churn: Churn | None = None,
) -> Tensor:
    """Generate x0 from x_T = prior_scale·N(0, I) with one of `formulation.samplers`.

    sampler None → the formulation's default; steps None → its default for that sampler.
    clip None → `formulation.clip_x0` (True for pixel DDPM and EDM, as DDAE). shift: RF grids only.
    churn: EDM's stochastic Heun (`heun`), (S_churn, S_min, S_max, S_noise); None or S_churn 0: deterministic.
    `stats`, when given, receives {"sampler", "steps", "nfe"}. Returns x0 in x_T's dtype.
    """
    sampler = formulation.samplers[0] if sampler is None else sampler
    grid = formulation.time_grid(sampler, steps, shift=shift)  # validates sampler, steps and shift
    if seeds is not None and len(seeds) != x_T.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {x_T.shape[0]}")
    if formulation.clip_x0 if clip is None else clip:
        denoise = clipped(formulation, denoise)
    if churn is not None and churn[0] > 0:  # EDM's stochastic sampler (Alg. 2): Heun with churn
        if sampler != "heun":
            raise ValueError(f"S_churn > 0 (EDM's stochastic sampler) needs the heun sampler, got {sampler}")
        x0, nfe = heun(formulation, denoise, x_T, grid, seeds=seeds, churn=churn)
    else:
        x0, nfe = SAMPLERS[sampler](formulation, denoise, x_T, grid, seeds=seeds)
    if stats is not None:
        stats.update(sampler=sampler, steps=len(grid) - 1 if sampler != "rk45" else None, nfe=nfe)
    return x0.to(x_T.dtype)


def prior_sample(
    formulation: Formulation,
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """x_T for the given per-sample seeds (stream 0): (B, *shape), scaled by the prior's σ."""
    return formulation.prior_scale() * per_sample_randn(seeds, shape, device=device, dtype=dtype, stream=0)
