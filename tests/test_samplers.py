"""Samplers on the one case with a known answer: Gaussian data (closed-form E[x0|x_t]); seeding.

For x0 ~ N(μ, Σ) with diagonal Σ and x_t = α·x0 + σ·ε the ideal denoiser is linear,
E[x0 | x_t] = μ + αΣ(α²Σ + σ²)⁻¹(x_t − αμ), and the probability-flow ODE has a closed-form
solution, x0 = μ + (x_T − α_T μ)·√Σ/√(α_T²Σ + σ_T²). Feeding the oracle through each formulation's
own network parameterisation (ε, F or v) tests predict() and every sampler at once.
"""

from __future__ import annotations

import math

import pytest
import torch

from ddaepp_cli.diffusion import FORMULATIONS, SAMPLERS, build_formulation, prior_sample, sample
from ddaepp_cli.errors import UsageError
from ddaepp_cli.seeding import generator_seed, parse_seeds, per_sample_randn

# ---------------------------------------------------------------------------------------------
# The Gaussian data set: a 1×4×4 "image", unequal per-pixel variances (std 0.2 … 0.6, of the order
# of CIFAR pixels in [-1, 1]). Samples leave [-1, 1], so every sampler runs with clip=False (§13).

_perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
MU = torch.linspace(-0.5, 0.5, 16)[_perm].reshape(1, 1, 4, 4).double()
STD = torch.linspace(0.2, 0.6, 16)[_perm.flip(0)].reshape(1, 1, 4, 4).double()


def gaussian_posterior(x, a, s, mu=MU, var=STD**2):
    """(E[x0 | x_t], E[ε | x_t]) per pixel for x_t = a·x0 + s·ε; finite even at s = 0."""
    mu, var = mu.to(x.dtype), var.to(x.dtype)
    inv = 1.0 / (a * a * var + s * s)
    k = x - a * mu
    return mu + a * var * inv * k, s * inv * k


def oracle_net(form, mu=MU, std=STD):
    """The ideal network of `form`: the posterior expressed as ε̂ (DDPM), F (EDM) or v̂ (RF)."""
    var = std**2

    def net(x_in, t_net, aug_label=None, class_labels=None):
        col = lambda v: v.to(x_in.dtype).reshape(-1, 1, 1, 1)  # noqa: E731  (B,) -> (B, 1, 1, 1)
        if form.name == "ddpm":
            t = (t_net.double() * form.T).round()
            _, eps = gaussian_posterior(x_in, col(form.alpha(t)), col(form.sigma(t)), mu, var)
            return eps
        if form.name == "edm":
            sigma = (4 * t_net.double()).exp()  # c_noise = ln(σ)/4
            c_skip, c_out, c_in, _ = (col(c) for c in form.precond(sigma))
            x = x_in / c_in
            x0, _ = gaussian_posterior(x, 1.0, col(sigma), mu, var)
            return (x0 - c_skip * x) / c_out
        t = col(t_net.double())
        x0, eps = gaussian_posterior(x_in, 1.0 - t, t, mu, var)
        return eps - x0

    return net


def exact_flow(form, x_T, t_start, mu=MU, std=STD):
    """Where the probability-flow ODE carries x_T from time t_start to data, exactly."""
    a, s = float(form.alpha(t_start)), float(form.sigma(t_start))
    return mu + (x_T.double() - a * mu) * std / (a * a * std**2 + s * s).sqrt()


def moments_error(x, mu=MU, std=STD, *, z=5.0, bias=0.0):
    """'' when the sample mean and per-pixel variance match μ and Σ, else what is off.

    Tolerances from the sample count N: the per-pixel mean has standard error std/√N and
    var̂/Σ has √(2/(N−1)); each of the 2×16 per-pixel checks allows z = 5 standard errors (a false
    alarm once in ~10⁶). The pixel-averaged relative variance error, whose standard error is 4×
    smaller, catches a systematic scale error of a few per cent. `bias` adds the known O(1/N_steps)
    variance bias of first-order solvers (measured in `test_deterministic_samplers_converge...`).
    """
    n = x.shape[0]
    x = x.double()
    z_mean = ((x.mean(0) - mu) / (std / math.sqrt(n))).abs().max().item()
    rel_var = x.var(0) / std**2 - 1
    se_var = math.sqrt(2 / (n - 1))
    problems = []
    if z_mean > z:
        problems.append(f"mean off by {z_mean:.1f} standard errors")
    if rel_var.abs().max().item() > z * se_var + bias:
        problems.append(f"a pixel variance off by {rel_var.abs().max().item():.1%}")
    if abs(rel_var.mean().item()) > z * se_var / 4 + bias:
        problems.append(f"variances off by {rel_var.mean().item():.2%} on average")
    return "; ".join(problems)


N_SAMPLES = 4000

# (formulation, sampler, options, first-order variance bias allowance). Step counts are chosen so the
# discretisation bias stays below the allowance: first-order solvers (ddim/euler) at 500–1000 steps
# are within 1.5 %, Heun at 100 steps within 0.4 %, RK45 and 1000-step ancestral DDPM ≈ 0.
GAUSSIAN_CASES = [
    ("ddpm", "ddim", {"steps": 1000}, 0.02),
    ("ddpm", "ddpm", {}, 0.0),  # ancestral, 1000 steps, stochastic
    ("ddpm", "sde", {}, 0.02),  # U-ViT's Euler–Maruyama on the VP-SDE limit, 1000 steps, stochastic
    ("edm", "heun", {"steps": 100}, 0.0),
    ("edm", "euler", {"steps": 500}, 0.02),
    ("edm", "ddim", {"steps": 500}, 0.02),
    ("edm", "rk45", {}, 0.0),
    ("rf", "rk45", {}, 0.0),
    ("rf", "euler", {"steps": 500}, 0.02),
    ("rf", "ddim", {"steps": 500}, 0.02),
    ("rf", "euler", {"steps": 1000, "shift": 3.3}, 0.02),
    ("rf", "heun", {"steps": 100}, 0.0),
]


def _prior(form, n, seed=1):
    return form.prior_scale() * torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_every_sampler_of_every_formulation_is_covered():
    covered = {(f, s) for f, s, _, _ in GAUSSIAN_CASES}
    covered |= {(f, "euler") for f in EULER_IS_DDIM}  # the same update on the same grid, shown bitwise
    covered |= {("rf", "sde")}  # its Gaussian tests below: a fine grid, and the default grid's exact moments
    assert covered == {(f, s) for f, cls in FORMULATIONS.items() for s in cls.samplers}


@pytest.mark.parametrize("name, sampler, options, bias", GAUSSIAN_CASES, ids=lambda v: str(v))
def test_gaussian_oracle_samples_have_the_data_moments(name, sampler, options, bias):
    form = build_formulation(name)
    torch.manual_seed(2)  # ancestral DDPM draws its step noise from the global RNG without seeds
    x = sample(form, form.denoiser(oracle_net(form)), _prior(form, N_SAMPLES), sampler=sampler, clip=False, **options)
    assert torch.isfinite(x).all()
    assert moments_error(x, bias=bias) == ""


@pytest.mark.parametrize("sampler, options", [("ddim", {"steps": 1000}), ("ddpm", {})])
@pytest.mark.parametrize(
    "wrong_mu, wrong_std",
    [(MU * 1.5, STD), (MU, STD * math.sqrt(1.1))],  # μ scaled; Σ 10 % too large
    ids=["mu*1.5", "var*1.1"],
)
def test_gaussian_check_rejects_a_wrong_oracle(sampler, options, wrong_mu, wrong_std):
    """Negative control: the same tolerance fails when the oracle believes in the wrong data."""
    form = build_formulation("ddpm")
    torch.manual_seed(2)
    denoise = form.denoiser(oracle_net(form, mu=wrong_mu, std=wrong_std))
    x = sample(form, denoise, _prior(form, N_SAMPLES), sampler=sampler, clip=False, **options)
    assert moments_error(x, bias=0.02) != ""


# (formulation, sampler, options, N): error at N and 2N steps against the exact ODE flow
CONVERGENCE_CASES = [
    ("ddpm", "ddim", {}, 100, 1),
    ("edm", "euler", {}, 50, 1),
    ("edm", "heun", {}, 18, 2),
    ("rf", "euler", {}, 50, 1),
    ("rf", "euler", {"shift": 3.3}, 50, 1),
    ("rf", "heun", {}, 18, 2),
]


@pytest.mark.parametrize("name, sampler, options, steps, order", CONVERGENCE_CASES, ids=lambda v: str(v))
def test_deterministic_samplers_converge_to_the_exact_flow(name, sampler, options, steps, order):
    """Per-sample error against the closed-form ODE solution halves (Euler/DDIM) or quarters (Heun)
    when the steps double: the samplers are consistent discretisations of the right ODE."""
    form = build_formulation(name)
    x_T = _prior(form, 256)
    denoise = form.denoiser(oracle_net(form))
    errors = []
    for n in (steps, 2 * steps):
        x = sample(form, denoise, x_T, sampler=sampler, steps=n, clip=False, **options)
        t_start = form.time_grid(sampler, n, shift=options.get("shift"))[0]
        errors.append((x.double() - exact_flow(form, x_T, t_start)).abs().max().item())
    ratio = errors[0] / errors[1]
    assert 2**order * 0.8 < ratio < 2**order * 1.25, (errors, ratio)


@pytest.mark.parametrize("name", ["edm", "rf"])
def test_rk45_follows_the_exact_flow(name):
    form = build_formulation(name)
    x_T = _prior(form, 256)
    stats = {}
    x = sample(form, form.denoiser(oracle_net(form)), x_T, sampler="rk45", clip=False, stats=stats)
    t_start = form.time_grid("rk45")[0]
    assert (x.double() - exact_flow(form, x_T, t_start)).abs().max().item() < 1e-3  # rtol = atol = 1e-5
    assert stats["nfe"] > 10 and stats["steps"] is None


EULER_IS_DDIM = ["ddpm", "edm", "rf"]


@pytest.mark.parametrize("name", EULER_IS_DDIM)
def test_ddim_is_the_euler_step(name):
    form = build_formulation(name)
    x_T, denoise = _prior(form, 8), form.denoiser(oracle_net(form))
    a = sample(form, denoise, x_T, sampler="ddim", steps=7)
    b = sample(form, denoise, x_T, sampler="euler", steps=7)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Batch-size independence, stats, clipping, errors


def toy_net(x, t_net, aug_label=None, class_labels=None):
    """Deterministic and element-wise, so any batch difference would come from the sampler."""
    return torch.tanh(1.3 * x) + 0.5 * t_net.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_same_seeds_give_identical_samples_at_any_batch_size(sampler):
    form = build_formulation("ddpm")
    seeds = [0, 5, 17, 42]
    denoise = form.denoiser(toy_net)

    def run(batch_seeds):
        x_T = prior_sample(form, batch_seeds, (1, 4, 4))
        return sample(form, denoise, x_T, sampler=sampler, seeds=batch_seeds)

    together = run(seeds)
    one_by_one = torch.cat([run([s]) for s in seeds])
    assert torch.equal(together, one_by_one)
    assert torch.equal(run(seeds[::-1]), together.flip(0))  # order in the batch does not matter either
    assert not torch.equal(together[0], together[1])


def test_ancestral_step_noise_follows_the_seeds():
    form = build_formulation("ddpm")
    x_T = prior_sample(form, [3, 3], (1, 4, 4))  # same start, different step noise below
    x = sample(form, form.denoiser(toy_net), x_T, sampler="ddpm", seeds=[3, 4])
    assert not torch.allclose(x[0], x[1])


@pytest.mark.parametrize(
    "name, sampler, nfe", [("ddpm", "ddim", 100), ("ddpm", "ddpm", 1000), ("edm", "heun", 35), ("rf", "euler", 100)]
)
def test_default_steps_and_nfe(name, sampler, nfe):
    form = build_formulation(name)
    stats = {}
    sample(form, form.denoiser(toy_net), _prior(form, 2), sampler=sampler, stats=stats)
    assert stats == {"sampler": sampler, "steps": form.default_steps[sampler], "nfe": nfe}


def test_default_sampler_is_the_first_listed():
    form = build_formulation("edm")
    stats = {}
    sample(form, form.denoiser(toy_net), _prior(form, 2), stats=stats)
    assert stats["sampler"] == "heun" and stats["nfe"] == 35


def test_clipping_default_follows_the_formulation():
    form = build_formulation("ddpm")
    far = lambda x, t_net, **kw: -50 * torch.ones_like(x)  # noqa: E731  ε̂ = −50 ⇒ x̂0 far above 1
    x_T = _prior(form, 4)
    clipped = sample(form, form.denoiser(far), x_T, sampler="ddim", steps=10)
    assert form.clip_x0 and clipped.abs().max() <= 1.0
    assert sample(form, form.denoiser(far), x_T, sampler="ddim", steps=10, clip=False).max() > 1.0


def test_unknown_sampler_names_the_valid_ones():
    form = build_formulation("ddpm")
    with pytest.raises(UsageError, match="ddim, euler, ddpm"):
        sample(form, form.denoiser(toy_net), _prior(form, 2), sampler="heun")
    with pytest.raises(UsageError, match="rk45 is adaptive"):
        sample(build_formulation("rf"), form.denoiser(toy_net), _prior(form, 2), sampler="rk45", steps=10)
    with pytest.raises(UsageError, match="shift"):
        sample(form, form.denoiser(toy_net), _prior(form, 2), sampler="ddim", shift=3.3)


def test_registry_names_every_sampler():
    for cls in FORMULATIONS.values():
        assert set(cls.samplers) <= set(SAMPLERS)
        assert set(cls.default_steps) == set(cls.samplers)


class TinyConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        torch.nn.init.normal_(self.conv.weight, std=0.05)

    def forward(self, x, t_net, aug_label=None, class_labels=None):
        return self.conv(x) + t_net.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize(
    "name, sampler", [(f, s) for f, cls in FORMULATIONS.items() for s in cls.samplers], ids=lambda v: str(v)
)
def test_every_formulation_and_sampler_runs_a_network(name, sampler):
    torch.manual_seed(0)
    form, net = build_formulation(name), TinyConvNet()
    steps = None if sampler == "rk45" else 3
    x = sample(form, form.denoiser(net), prior_sample(form, [0, 1], (3, 8, 8)), sampler=sampler, steps=steps)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32 and torch.isfinite(x).all()


# ---------------------------------------------------------------------------------------------
# seeding


def test_per_sample_randn_rows_depend_only_on_their_seed():
    together = per_sample_randn([4, 9, 2], (3, 2))
    assert together.shape == (3, 3, 2)
    for i, seed in enumerate([4, 9, 2]):
        assert torch.equal(together[i], per_sample_randn([seed], (3, 2))[0])
    # stream 0 is EDM's StackedRandomGenerator: torch.Generator().manual_seed(seed)
    assert torch.equal(together[1], torch.randn(3, 2, generator=torch.Generator().manual_seed(9)))


def test_streams_are_independent_draws():
    a, b, c = (per_sample_randn([7], (64,), stream=s) for s in (0, 1, 2))
    assert not torch.equal(a, b) and not torch.equal(b, c)
    assert len({generator_seed(s, k) for s in range(50) for k in range(50)}) == 2500


def test_parse_seeds():
    assert parse_seeds("0-99") == list(range(100))
    assert parse_seeds("3,5,9") == [3, 5, 9]
    assert parse_seeds(" 0-2, 7 ") == [0, 1, 2, 7]
    assert parse_seeds("12") == [12]
    for bad, match in [("9-3", "inverted"), ("-1", "non-negative"), ("a-b", "range"), ("", "range"),
                       ("1,1", "repeat"), ("0-4294967296", "too large")]:
        with pytest.raises(UsageError, match=match):
            parse_seeds(bad)


# ---------------------------------------------------------------------------------------------
# SiT's Euler–Maruyama SDE sampler (rf "sde")


def sde_fine_grid(n=1000, last=0.002):
    """Euler–Maruyama points from 1 to `last`, then the deterministic last step to 0."""
    return torch.cat([torch.linspace(1.0, last, n, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])


@pytest.mark.parametrize("wrong", [None, "mu*1.5", "var*1.1"])
def test_sde_sample_moments_converge_to_the_data(wrong):
    """On a fine grid with a small last step the SDE sampler reproduces the data's moments; an oracle that
    believes in the wrong data fails the same check (negative control)."""
    form = build_formulation("rf")
    mu, std = {None: (MU, STD), "mu*1.5": (MU * 1.5, STD), "var*1.1": (MU, STD * math.sqrt(1.1))}[wrong]
    torch.manual_seed(2)
    x, nfe = SAMPLERS["sde"](form, form.denoiser(oracle_net(form, mu, std)), _prior(form, N_SAMPLES).double(),
                             sde_fine_grid())
    assert nfe == 1000 and torch.isfinite(x).all()
    assert (moments_error(x, bias=0.02) == "") == (wrong is None), moments_error(x, bias=0.02)


def sde_exact_moments(form, grid, mu=MU, std=STD):
    """Mean and variance per pixel of the SDE sampler's output from x_T ~ N(0, 1) with the Gaussian oracle.

    The oracle is affine in x, so each step is x' = x + dt·(D1·(x − αμ) − μ) + √(2w|dt|)·z with
    D1 = (2σ − αΣ)/(α²Σ + σ²) (RF: u − w·score = −x̂0 + 2ε̂ for w = σ); mean and variance follow exactly."""
    m, v = torch.zeros_like(mu), torch.ones_like(std)
    var = std**2
    steps = list(zip(grid[:-1].tolist(), grid[1:].tolist()))
    for k, (t, t_next) in enumerate(steps):
        a, s, dt = 1.0 - t, t, t_next - t
        d1 = (2 * s - a * var) / (a * a * var + s * s)
        m = m + dt * (d1 * (m - a * mu) - mu)
        v = (1 + dt * d1) ** 2 * v
        if k < len(steps) - 1:  # the last step is deterministic
            v = v + 2 * s * abs(dt)
    return m, v


def test_sde_default_grid_has_its_exact_moments_and_sits_last_step():
    """The default grid (250 steps: Euler–Maruyama 1 → 0.04, then SiT's deterministic `Mean` step) gives
    the moments its exact linear-Gaussian recursion predicts. The recursion also shows what SiT's large
    deterministic last step costs: pixel variances 2–12 % below the data's (narrow pixels most), while on
    the fine grid the same sampler is within 0.1 %: the sampler converges, the default grid is biased."""
    form = build_formulation("rf", t_max=1.0)  # SiT / latent RF: t up to 1
    grid = form.time_grid("sde")
    assert len(grid) == 251 and grid[0] == 1.0 and grid[-2].item() == pytest.approx(0.04) and grid[-1] == 0.0
    m, v = sde_exact_moments(form, grid)
    _, v_fine = sde_exact_moments(form, sde_fine_grid())
    assert (v_fine / STD**2 - 1).abs().max() < 0.002
    assert (v / STD**2 - 1).max() < -0.01 and (m - MU).abs().max() < 1e-12  # the mean stays exact
    for mu, std, ok in ((MU, STD, True), (MU * 1.5, STD, False), (MU, STD * math.sqrt(1.1), False)):
        torch.manual_seed(3)
        stats = {}
        x = sample(form, form.denoiser(oracle_net(form, mu, std)), _prior(form, N_SAMPLES), sampler="sde",
                   clip=False, stats=stats)
        assert stats == {"sampler": "sde", "steps": 250, "nfe": 250}
        assert (moments_error(x, mu=m, std=v.sqrt()) == "") == ok


def test_sde_noise_follows_the_seeds_at_any_batch_size():
    form = build_formulation("rf")
    denoise = form.denoiser(toy_net)

    def run(batch_seeds):
        return sample(form, denoise, prior_sample(form, batch_seeds, (1, 4, 4)), sampler="sde", steps=5,
                      seeds=batch_seeds)

    together = run([0, 5, 17])
    assert torch.equal(together, torch.cat([run([s]) for s in (0, 5, 17)]))
    x = sample(form, denoise, prior_sample(form, [3, 3], (1, 4, 4)), sampler="sde", steps=5, seeds=[3, 4])
    assert not torch.allclose(x[0], x[1])  # same start, different step noise


# ---------------------------------------------------------------------------------------------
# EDM's stochastic sampler (Karras et al., 2022, Alg. 2): heun with churn


def edm_alg2_reference(denoiser_x0, x_T, sigmas, noises, s_churn, s_min, s_max, s_noise):
    """NVlabs/edm generate.py `edm_sampler` transcribed: D(x; σ) is the x̂0 denoiser, `noises[i]` the z of step i."""
    n = len(sigmas) - 1
    x_next = x_T.double()
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x_cur = x_next
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_min <= t_cur <= s_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + math.sqrt(t_hat**2 - t_cur**2) * s_noise * noises[i]
        d_cur = (x_hat - denoiser_x0(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < n - 1:
            d_prime = (x_next - denoiser_x0(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


@pytest.mark.parametrize("churn", [(40.0, 0.05, 50.0, 1.003), (2.0, 0.0, None, 1.0)])
def test_stochastic_heun_is_edm_algorithm_2(churn):
    form = build_formulation("edm")
    net = oracle_net(form)
    denoise = form.denoiser(net, clip=False)
    seeds = [3, 11, 42]
    x_T = prior_sample(form, seeds, (1, 4, 4), dtype=torch.float64)
    grid = form.time_grid("heun", 10)
    sigmas = grid.tolist()
    noises = [per_sample_randn(seeds, (1, 4, 4), dtype=torch.float64, stream=i + 1) for i in range(len(sigmas) - 1)]
    s_churn, s_min, s_max, s_noise = churn

    def x0_of(x, sigma):
        return denoise(x, torch.full((x.shape[0],), sigma, dtype=torch.float64)).x0

    want = edm_alg2_reference(x0_of, x_T, sigmas, noises, s_churn, s_min, math.inf if s_max is None else s_max, s_noise)
    got = sample(form, denoise, x_T, sampler="heun", steps=10, seeds=seeds, clip=False, churn=churn)
    assert torch.allclose(got, want, rtol=0, atol=1e-10)
    deterministic = sample(form, denoise, x_T, sampler="heun", steps=10, seeds=seeds, clip=False)
    assert (got - deterministic).abs().max() > 1e-3  # the churn is there
    assert torch.equal(sample(form, denoise, x_T, sampler="heun", steps=10, seeds=seeds, clip=False,
                              churn=(0.0, 0.0, None, 1.0)), deterministic)  # S_churn 0 is Alg. 1
    # per-sample noise: one seed's image does not depend on the batch it is in
    one = sample(form, denoise, x_T[1:2], sampler="heun", steps=10, seeds=seeds[1:2], clip=False, churn=churn)
    assert torch.allclose(one, got[1:2], rtol=0, atol=1e-12)


def test_stochastic_heun_is_refused_outside_edm_heun():
    from ddaepp_cli.recipe import load_recipe
    from ddaepp_cli.cli import resolve_recipe_path

    for bad in (["diffusion.formulation=rf", "sample.s_churn=40"], ["sample.sampler=ddim", "sample.s_churn=40"],
                ["sample.s_churn=-1"], ["sample.s_noise=0"], ["sample.s_min=1", "sample.s_max=0.5"]):
        with pytest.raises(UsageError, match="s_churn"):
            load_recipe(resolve_recipe_path("quickstart"), bad)
    form = build_formulation("rf")
    with pytest.raises(ValueError, match="edm"):
        sample(form, form.denoiser(oracle_net(form), clip=False), torch.zeros(1, 1, 4, 4), sampler="heun", steps=4,
               seeds=[0], churn=(40.0, 0.0, None, 1.0))


def test_sample_command_churn_from_the_recipe_and_churn_option(tmp_path):
    """The quickstart recipe samples with EDM's stochastic Heun; `--churn 0` is Alg. 1; another sampler needs
    `--churn 0` (one line, exit 2); the record says which."""
    import json

    import numpy as np

    from conftest import cli_inprocess

    run = tmp_path / "qs"
    r = cli_inprocess("train", "quickstart", "--run-dir", run, "--max-steps", "2", "--set", "train.sample_every=0")
    assert r.returncode == 0, r.output
    outs = {}
    for name, extra in (("recipe", []), ("alg1", ["--churn", "0"]), ("churn1", ["--churn", "1"])):
        r = cli_inprocess("sample", run, "--n", "3", "--steps", "6", "--out", tmp_path / name, "--json", *extra)
        assert r.returncode == 0, r.output
        outs[name] = json.loads(r.stdout)
    import yaml

    from conftest import ROOT

    shipped = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())["sample"]
    want = {k: float(shipped[k]) for k in ("s_churn", "s_min", "s_max", "s_noise")}
    assert want["s_churn"] > 0 and outs["recipe"]["churn"] == want
    assert outs["alg1"]["churn"] is None and outs["churn1"]["churn"]["s_churn"] == 1.0
    images = {k: np.load(tmp_path / k / "samples.npz")["arr_0"] for k in outs}
    assert not np.array_equal(images["recipe"], images["alg1"]) and not np.array_equal(images["recipe"], images["churn1"])  # γ = 1/6, not the cap
    r = cli_inprocess("sample", run, "--n", "2", "--sampler", "ddim", "--out", tmp_path / "ddim")
    assert r.returncode == 2 and "--churn 0" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    r = cli_inprocess("sample", run, "--n", "2", "--sampler", "ddim", "--churn", "0", "--out", tmp_path / "ddim")
    assert r.returncode == 0, r.output
