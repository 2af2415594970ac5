"""Improved-DDPM learned variance (diffusion/learned_var.py, DDPM `learn_sigma`): closed forms, the VLB of a
Gaussian oracle, the stop-gradient, respacing, and the ancestral sampler with a learned-variance oracle
(with wrong oracles as negative controls)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm

from ddaepp_cli.diffusion import DDPM, sample
from ddaepp_cli.diffusion.cfg import guided_denoiser
from ddaepp_cli.diffusion.learned_var import LN2, discretized_gaussian_log_likelihood, space_timesteps, step_terms, vlb_bits
from test_samplers import MU, N_SAMPLES, STD, gaussian_posterior, moments_error


def true_reverse_variance(abar_t, abar_prev, var):
    """Var(x_{t'} | x_t) for Gaussian data of variance `var` and the step ᾱ_t → ᾱ_{t'} (closed form)."""
    keep = abar_t / abar_prev
    v_prev = abar_prev * var + 1 - abar_prev  # Var(x_{t'})
    return v_prev * (1 - keep) / (keep * v_prev + 1 - keep)


def lv_oracle(form, nxt, mu=MU, std=STD, var_std=None, v_const=None):
    """The ideal learned-variance network on a known grid: ε̂ = E[ε | x_t] and v giving Var(x_{t'} | x_t)
    of the step t → nxt[t]. `var_std` makes only the variance wrong; `v_const` fixes v (±1: β or β̃)."""
    var, vvar = std**2, (std if var_std is None else var_std) ** 2

    def net(x_in, t_net, aug_label=None, class_labels=None):
        col = lambda a: a.to(torch.float64).reshape(-1, 1, 1, 1)  # noqa: E731
        t = (t_net.double() * form.T).round()
        tn = torch.tensor([nxt[int(v)] for v in t.tolist()], dtype=torch.float64)
        ab, abn = col(form.alpha(t)) ** 2, col(form.alpha(tn)) ** 2
        _, eps = gaussian_posterior(x_in, ab.sqrt().to(x_in.dtype), (1 - ab).sqrt().to(x_in.dtype), mu, var)
        terms = step_terms(ab, abn.clamp(max=1 - 1e-12))
        frac = (true_reverse_variance(ab, abn, vvar).log() - terms["beta_tilde"].log()) / (
            terms["beta"].log() - terms["beta_tilde"].log())
        v = (2 * frac - 1) if v_const is None else torch.full_like(frac, v_const)
        v = torch.where(col(tn) > 0, v, torch.zeros_like(v))  # no noise on the step to 0 anyway
        return torch.cat([eps, v.expand_as(eps).to(x_in.dtype)], dim=1)

    return net


def _next(grid):
    g = grid.long().tolist()
    return dict(zip(g[:-1], g[1:]))


# ------------------------------------------------------------------------------------------------
# The sampler


@pytest.mark.parametrize("steps, wrong", [(10, None), (250, None), (10, "beta"), (10, "beta_tilde"), (10, "var*1.3")])
def test_learned_variance_sampler_reproduces_gaussian_data(steps, wrong):
    """With the exact ε̂ and the exact reverse variance the respaced ancestral sampler reproduces the data's
    moments at 10 and at DiT's 250 steps; at 10 steps the same check fails for a variance fixed at β or β̃,
    or one computed for data 30 % wider (at 250 steps β and β̃ are too close for the controls to bite)."""
    form = DDPM(learn_sigma=True, respacing="iddpm")
    nxt = _next(form.time_grid("ddpm", steps))
    kw = {None: {}, "beta": dict(v_const=1.0), "beta_tilde": dict(v_const=-1.0),
          "var*1.3": dict(var_std=STD * math.sqrt(1.3))}[wrong]
    torch.manual_seed(2)
    x_T = torch.randn(N_SAMPLES, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    stats = {}
    x = sample(form, form.denoiser(lv_oracle(form, nxt, **kw)), x_T, sampler="ddpm", steps=steps, clip=False,
               stats=stats)
    assert stats["nfe"] == steps and torch.isfinite(x).all()
    assert (moments_error(x) == "") == (wrong is None), moments_error(x)


def test_ancestral_sampler_uses_the_learned_variance_of_its_step():
    """One step by hand: mean = posterior mean of x̂0, σ² = exp(frac·log β + (1 − frac)·log β̃) of that step."""
    form = DDPM(learn_sigma=True)
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    eps, v = torch.randn(3, 2, 2, 2).double(), (torch.rand(3, 2, 2, 2) * 2 - 1).double()  # float32-exact
    net = lambda x_in, t_net, **kw: torch.cat([eps, v], 1).to(x_in.dtype)  # noqa: E731
    from ddaepp_cli.diffusion.samplers import ddpm_ancestral
    from ddaepp_cli.seeding import per_sample_randn

    grid = torch.tensor([700.0, 650.0], dtype=torch.float64)  # one step, with noise
    out, _ = ddpm_ancestral(form, form.denoiser(net), x, grid, seeds=[1, 2, 3])
    ab, abn = form.alpha(700.0) ** 2, form.alpha(650.0) ** 2
    terms = step_terms(ab, abn)
    x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
    mean = terms["coef_x0"] * x0 + terms["coef_xt"] * x
    frac = (v + 1) / 2
    std = torch.exp(0.5 * (frac * terms["beta"].log() + (1 - frac) * terms["beta_tilde"].log()))
    z = per_sample_randn([1, 2, 3], (2, 2, 2), dtype=torch.float64, stream=700)
    torch.testing.assert_close(out, mean + std * z)


def test_cfg_guides_eps_and_keeps_the_conditional_variance():
    form = DDPM(learn_sigma=True)

    def net(x_in, t_net, aug_label=None, class_labels=None):
        y = class_labels.to(x_in.dtype).reshape(-1, 1, 1, 1)
        return torch.cat([x_in * 0 + y, x_in * 0 + 0.1 * y - 0.5], dim=1)  # ε̂ = y, v = 0.1y − 0.5

    x = torch.zeros(2, 4, 2, 2)
    for channels in ("all", "first3"):
        d = guided_denoiser(form, net, torch.tensor([3, 3]), null_label=1, scale=2.0, channels=channels)
        pred = d(x, torch.full((2,), 500.0))
        eps_guided = 1 + 2.0 * (3 - 1)  # u + w(c − u)
        expect_eps = torch.full((2, 4, 2, 2), float(eps_guided))
        if channels == "first3":  # DiT: channel 3 and the variance pass the conditional output
            expect_eps[:, 3:] = 3.0
        torch.testing.assert_close(pred.eps, expect_eps)
        torch.testing.assert_close(pred.var_frac, torch.full((2, 4, 2, 2), (0.3 - 0.5 + 1) / 2))
    # the interval is a fraction of the DDPM schedule: t = 500 of 1000 lies outside [0, 0.4]
    d = guided_denoiser(form, net, torch.tensor([3, 3]), null_label=1, scale=2.0, interval=(0.0, 0.4))
    torch.testing.assert_close(d(x, torch.full((2,), 500.0)).eps, torch.full((2, 4, 2, 2), 3.0))
    torch.testing.assert_close(d(x, torch.full((2,), 400.0)).eps, torch.full((2, 4, 2, 2), 5.0))


# ------------------------------------------------------------------------------------------------
# The VLB term


def test_vlb_closed_forms():
    """Exact noise and v = −1 (σ² = β̃): KL 0. v = +1 (σ² = β): ½(log(β/β̃) + β̃/β − 1)/ln 2 per element."""
    form = DDPM(learn_sigma=True)
    torch.manual_seed(0)
    x0, noise = torch.rand(4, 3, 2, 2) * 2 - 1, torch.randn(4, 3, 2, 2)
    t = torch.tensor([2.0, 10.0, 500.0, 1000.0])
    x_t = form.perturb(x0, t, noise)
    ones = torch.ones_like(x0)
    kl0 = vlb_bits(form._vlb, noise, -ones, x0, x_t, t)
    assert kl0.abs().max() < 1e-5
    kl1 = vlb_bits(form._vlb, noise, ones, x0, x_t, t)
    ab = form._abar_train.double()
    terms = step_terms(ab[t.long()], ab[t.long() - 1])
    ratio = terms["beta_tilde"] / terms["beta"]
    expect = (0.5 * (-ratio.log() + ratio - 1) / LN2).float().reshape(-1, 1, 1, 1).expand_as(kl1)
    torch.testing.assert_close(kl1, expect, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("t", [2, 20, 200, 900])
def test_vlb_of_the_gaussian_oracle(t):
    """For Gaussian data and the Bayes ε̂ with the exact reverse variance, E[KL] = ½·log(σ²_true/β̃)
    (the expected KL between q(x_{t−1}|x_t, x0) and q(x_{t−1}|x_t)); the Monte-Carlo mean of our VLB term
    matches it within 5 standard errors per pixel. Controls: on the same draws every other variance
    (v ± 0.5) gives a larger VLB, and an oracle believing in μ·1.5 misses the closed form (t ≥ 200, where
    the mean matters at this sample size)."""
    form = DDPM(learn_sigma=True)
    n = 20_000
    g = torch.Generator().manual_seed(t)
    x0 = (MU + STD * torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64))
    noise = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    tt = torch.full((n,), float(t))
    x_t = form.perturb(x0, tt, noise)
    ab, abp = form._abar_train[t], form._abar_train[t - 1]
    expect = 0.5 * (true_reverse_variance(ab, abp, STD**2) / step_terms(ab, abp)["beta_tilde"]).log() / LN2

    def z_scores(net, dv=0.0):
        out = net(x_t, form.net_time(tt))
        vb = vlb_bits(form._vlb, out[:, :1], out[:, 1:] + dv, x0, x_t, tt)  # (n, 1, 4, 4) bits
        return (vb.mean(0) - expect) / (vb.std(0) / math.sqrt(n)), vb

    z, vb = z_scores(lv_oracle(form, {t: t - 1}))
    assert z.abs().max() < 5, z
    for dv in (-0.5, 0.5):
        _, vb_off = z_scores(lv_oracle(form, {t: t - 1}), dv)
        assert ((vb_off - vb).mean(0) > 0).all()
    if t >= 200:
        z_wrong, _ = z_scores(lv_oracle(form, {t: t - 1}, mu=MU * 1.5))
        assert z_wrong.abs().max() > 5


def test_decoder_nll_at_the_first_step():
    """t = 1: the discretised Gaussian NLL of x0 in bits (tanh approximation of Φ, 1/255 half-bins)."""
    x = torch.tensor([-0.5, 0.0, 0.3, 0.9], dtype=torch.float64)
    mean, log_scale = torch.tensor([-0.49, 0.01, 0.28, 0.93], dtype=torch.float64), torch.full((4,), math.log(0.02))
    got = discretized_gaussian_log_likelihood(x, mean, log_scale)
    s = 0.02
    exact = torch.log(torch.tensor(norm.cdf((x + 1 / 255 - mean) / s) - norm.cdf((x - 1 / 255 - mean) / s)))
    torch.testing.assert_close(got, exact, rtol=2e-3, atol=2e-3)
    one = torch.ones(1, dtype=torch.float64)
    edge = discretized_gaussian_log_likelihood(one, one, one * math.log(s))  # the top bin is open: P(x > 1 − 1/255)
    torch.testing.assert_close(edge, torch.log(one * (1 - norm.cdf(-1 / 255 / s))), rtol=1e-3, atol=1e-3)
    form = DDPM(learn_sigma=True)  # vlb_bits uses it at t = 1 (and the KL elsewhere)
    x0 = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    eps, v = torch.zeros_like(x0), torch.zeros_like(x0)
    x_t = form.perturb(x0, torch.tensor([1.0]), eps)
    tables = form._vlb
    logvar = 0.5 * (tables.log_beta[1] + tables.log_beta_tilde[1])
    expect = -discretized_gaussian_log_likelihood(x0, x0, (0.5 * logvar).reshape(1, 1, 1, 1)) / LN2
    torch.testing.assert_close(vlb_bits(tables, eps, v, x0, x_t, torch.tensor([1.0])), expect)


def test_loss_is_mse_plus_vlb_with_the_mean_frozen():
    """L = ‖ε̂ − ε‖² + L_vlb; the VLB sends no gradient to ε̂, the MSE none to v (DiT `frozen_out`)."""
    form = DDPM(learn_sigma=True)
    torch.manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([1.0, 37.0, 800.0])
    out = torch.randn(3, 4, 4, 4, requires_grad=True)
    loss = form.loss(lambda x_in, t_net, **kw: out, x0, t=t, noise=noise).loss
    x_t = form.perturb(x0, t, noise)
    mse = ((out[:, :2] - noise) ** 2).flatten(1).mean(1)
    vb = vlb_bits(form._vlb, out[:, :2].detach(), out[:, 2:], x0, x_t, t).flatten(1).mean(1)
    torch.testing.assert_close(loss, mse + vb)
    (g,) = torch.autograd.grad(loss.sum(), out)
    (g_mse,) = torch.autograd.grad(mse.sum(), out)
    torch.testing.assert_close(g[:, :2], g_mse[:, :2])  # ε̂ gets the MSE gradient only
    assert g[:, 2:].abs().sum() > 0 and g_mse[:, 2:].abs().sum() == 0
    with pytest.raises(ValueError, match="expects 4 output channels"):
        form.loss(lambda x_in, t_net, **kw: out[:, :2], x0, t=t, noise=noise)


# ------------------------------------------------------------------------------------------------
# Respacing


def test_space_timesteps_as_dit():
    kept = space_timesteps(1000, 250)
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert set(torch.tensor(kept).diff().tolist()) == {4, 5}
    assert space_timesteps(1000, 1000) == list(range(1000)) and space_timesteps(1000, 1) == [0]
    assert space_timesteps(10, 4) == [0, 3, 6, 9]
    form = DDPM(respacing="iddpm")
    grid = form.time_grid("ddpm", 250)
    assert grid[0] == 1000 and grid[-2] == 1 and grid[-1] == 0 and len(grid) == 251
    assert DDPM().time_grid("ddpm", 250)[0] == 997  # DDAE's grid starts below T


@pytest.mark.parametrize("respacing", ["ddae", "iddpm"])
def test_respacing_keeps_the_marginal_variances(respacing):
    """The respaced process x_{t_i} = √(1 − β_i)·x_{t_{i−1}} + √β_i·z, β_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i−1}}, has
    q(x_{t_i} | x0) = N(√ᾱ_{t_i}·x0, 1 − ᾱ_{t_i}) (closed form and Monte Carlo), and the posterior variance
    β̃ of each respaced step is the Gaussian conditional Var(x_{t_{i−1}} | x_{t_i}, x0)."""
    form = DDPM(respacing=respacing)
    grid = form.time_grid("ddpm", 25).flip(0)  # 0, t_1, …, t_25 ascending
    ab = form._abar_train[grid.long()]
    terms = step_terms(ab[1:], ab[:-1])
    torch.testing.assert_close(torch.cumprod(1 - terms["beta"], 0), ab[1:], rtol=1e-12, atol=0)
    # β̃ = Var(x_{t'} | x_t, x0) from the joint Gaussian of (x_{t'}, x_t) given x0
    keep = ab[1:] / ab[:-1]
    cond_var = (1 - ab[:-1]) - keep * (1 - ab[:-1]) ** 2 / (1 - ab[1:])
    torch.testing.assert_close(terms["beta_tilde"], cond_var, rtol=1e-9, atol=1e-15)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = 0.5 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    x = x0.clone()
    for i, beta in enumerate(terms["beta"], start=1):
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
        if i % 5 == 0:
            var = ab[i] * 0.09 + 1 - ab[i]
            assert abs(x.var().item() / var.item() - 1) < 5 * math.sqrt(2 / n)
            assert abs((x.mean() - ab[i].sqrt() * 0.5).item()) < 5 * math.sqrt(var.item() / n)
