"""Formulations (DDAE++ App. A): schedules, preconditioning, targets, CLI times; every test over the registry."""

from __future__ import annotations

import math

import pytest
import torch

from ddaepp_cli.diffusion import DDPM, EDM, FORMULATIONS, RF, build_formulation, shift_time
from ddaepp_cli.errors import UsageError

NAMES = list(FORMULATIONS)


class TinyNet(torch.nn.Module):
    """A stand-in backbone with the project's call signature and feature-tap API."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(channels, 8, 3, padding=1)
        self.t_proj = torch.nn.Linear(1, 8)
        self.conv_out = torch.nn.Conv2d(8, channels, 3, padding=1)

    def forward_with_features(self, x, t_net, layers, aug_label=None, class_labels=None):
        h = torch.relu(self.conv_in(x) + self.t_proj(t_net.reshape(-1, 1))[:, :, None, None])  # (B, 8, H, W)
        return self.conv_out(h), {name: h for name in layers}

    def forward(self, x, t_net, aug_label=None, class_labels=None):
        return self.forward_with_features(x, t_net, (), aug_label=aug_label, class_labels=class_labels)[0]


def true_output(form, x0, noise, t):
    """The network output that reproduces x0 and noise exactly, written from the papers' definitions."""
    col = lambda v: torch.as_tensor(v, dtype=torch.float64).reshape(-1, 1, 1, 1)  # noqa: E731
    if isinstance(form, DDPM):
        return noise  # ε-prediction
    if isinstance(form, EDM):
        sigma = col(t)
        x_t = x0 + sigma * noise
        c_skip = 0.25 / (sigma**2 + 0.25)
        c_out = sigma * 0.5 / (sigma**2 + 0.25).sqrt()
        return (x0 - c_skip * x_t) / c_out  # F such that D = c_skip·x + c_out·F = x0
    return noise - x0  # RF velocity


def oracle(form, x0, noise, t):
    """A 'network' that returns the true output for the exact (x_t, t) it was built for."""

    def net(x_in, t_net, aug_label=None, class_labels=None):
        assert torch.equal(t_net, form.net_time(t))
        return true_output(form, x0, noise, t)  # float64: the round trip is exact to rounding

    return net


def _batch(name, n=5):
    gen = torch.Generator().manual_seed(0)
    form = build_formulation(name)
    x0 = torch.rand(n, 3, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64)
    t = form.sample_time(n, generator=gen)
    return form, x0, noise, t


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_builds_every_formulation():
    for name, cls in FORMULATIONS.items():
        form = build_formulation(name)
        assert isinstance(form, cls) and form.name == name
        assert form.samplers[0] in form.default_steps


def test_unknown_formulation_names_the_valid_ones():
    with pytest.raises(UsageError, match="ddpm, edm, rf"):
        build_formulation("vp")


# ---------------------------------------------------------------------------------------------
# perturb / predict / loss


@pytest.mark.parametrize("name", NAMES)
def test_oracle_prediction_recovers_x0_and_noise(name):
    form, x0, noise, t = _batch(name)
    x_t = form.perturb(x0, t, noise)
    pred = form.predict(oracle(form, x0, noise, t), x_t, t)
    assert torch.allclose(pred.x0, x0, atol=1e-9)
    assert torch.allclose(pred.eps, noise, atol=1e-9)
    # and the prediction is consistent with the path: x_t = α·x̂0 + σ·ε̂
    assert torch.allclose(form.perturb(pred.x0, t, pred.eps), x_t, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_zero_for_the_oracle(name):
    form, x0, noise, t = _batch(name)
    out = form.loss(oracle(form, x0, noise, t), x0, t=t, noise=noise)
    assert out.loss.shape == (5,) and torch.equal(out.t, t) and out.features == {}
    assert out.loss.abs().max() < 1e-12
    wrong = form.loss(oracle(form, x0, noise, t), x0, t=t, noise=noise + 0.1)
    assert (wrong.loss > 1e-4).all()


@pytest.mark.parametrize("name", NAMES)
def test_loss_backprops_into_a_tiny_conv_net(name):
    torch.manual_seed(0)
    form, net = build_formulation(name), TinyNet()
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    out = form.loss(net, x0, feature_layers=["h"])  # t and noise from the global RNG
    assert out.loss.shape == (4,) and out.t.shape == (4,)
    assert out.features["h"].shape == (4, 8, 8, 8)
    out.loss.mean().backward()
    for p in net.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_clipped_prediction_stays_on_the_path(name):
    form, x0, noise, t = _batch(name)
    x_t = form.perturb(3 * x0, t, noise)  # data far outside [-1, 1]
    pred = form.predict(oracle(form, 3 * x0, noise, t), x_t, t, clip=True)
    assert pred.x0.abs().max() <= 1.0
    assert torch.allclose(form.perturb(pred.x0, t, pred.eps), x_t, atol=1e-9)


def test_denoiser_binds_conditioning():
    seen = {}

    def net(x, t_net, aug_label=None, class_labels=None):
        seen.update(aug_label=aug_label, class_labels=class_labels)
        return torch.zeros_like(x)

    form = build_formulation("rf")
    labels = torch.tensor([3, 1])
    form.denoiser(net, class_labels=labels)(torch.zeros(2, 3, 4, 4), torch.full((2,), 0.5))
    assert seen["class_labels"] is labels and seen["aug_label"] is None


# ---------------------------------------------------------------------------------------------
# DDPM


def test_ddpm_schedule_facts():
    form = DDPM()
    assert form.betas[0] == 0 and len(form.betas) == 1001  # leading β_0 = 0, indices 1..T
    assert float(form.alpha(0)) == 1.0
    assert math.isclose(float(form.alpha(1)) ** 2, 0.9999, rel_tol=1e-12)
    # DDAE++ Tab. 9 probe time t = 11: √ᾱ = 0.99890, noise std 0.0468 (FutureXiang/ddae `model/DDPM.py` schedule)
    assert abs(float(form.alpha(11)) - 0.99890) < 5e-6 and abs(float(form.sigma(11)) - 0.0468) < 5e-5
    assert torch.equal(form.net_time(torch.tensor([500, 1000])), torch.tensor([0.5, 1.0]))
    t = form.sample_time(10_000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.min() == 1 and t.max() == 1000


def test_ddpm_ddim_grid_is_ddae():
    grid = DDPM().time_grid("ddim")
    assert grid[:3].tolist() == [991, 981, 971] and grid[-3:].tolist() == [11, 1, 0] and len(grid) == 101
    assert DDPM().time_grid("ddpm").tolist() == list(range(1000, -1, -1))
    assert len(DDPM().time_grid("ddim", 300)) == 301  # a step count that does not divide T
    with pytest.raises(UsageError, match="at most 1000"):
        DDPM().time_grid("ddim", 2000)


def test_ddae_ddim_quirk_changes_sampling_only():
    plain, quirk = DDPM(), DDPM(ddae_ddim_quirk=True)
    assert abs(float(quirk.alpha(1)) ** 2 - 0.99978) < 1e-5  # ᾱ'_1 (FutureXiang/ddae `model/DDPM.py` `schedules(..., 'DDIM')`)
    assert math.isclose(float(quirk.alpha(0)) ** 2, 1 - 1e-4)  # ᾱ'_0 = 1 − β'_0, no leading zero
    x0, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([1, 500])
    assert torch.equal(plain.perturb(x0, t, noise), quirk.perturb(x0, t, noise))


# ---------------------------------------------------------------------------------------------
# EDM


def test_edm_preconditioning_by_hand():
    # σ_data = 0.5: c_skip = 0.25/(σ²+0.25), c_out = 0.5σ/√(σ²+0.25), c_in = 1/√(σ²+0.25), c_noise = ln σ/4
    hand = {
        0.5: (0.5, 0.3535533906, 1.414213562, -0.1732867951),
        80.0: (3.906097418e-05, 0.4999902347, 0.01249975587, 1.095506659),
        0.002: (0.9999840003, 0.001999984, 1.999984, -1.553652025),
    }
    form = EDM()
    for sigma, expected in hand.items():
        got = form.precond(torch.tensor(sigma, dtype=torch.float64))
        for g, e in zip(got, expected):
            assert math.isclose(float(g), e, rel_tol=1e-8), (sigma, float(g), e)
        # λ(σ)·c_out² = 1: the weighted D-loss equals the unweighted loss on F
        assert math.isclose(float(form.loss_weight(torch.tensor(sigma)) * got[1] ** 2), 1.0, rel_tol=1e-6)
    assert math.isclose(float(form.net_time(torch.tensor([0.5]))), math.log(0.5) / 4, rel_tol=1e-6)


def test_edm_training_sigmas_are_log_normal():
    ln_sigma = EDM().sample_time(100_000, generator=torch.Generator().manual_seed(0)).log()
    assert abs(ln_sigma.mean() + 1.2) < 0.02 and abs(ln_sigma.std() - 1.2) < 0.02  # N(−1.2, 1.2²)


def test_edm_heun_grid():
    grid = EDM().time_grid("heun")
    assert len(grid) == 19 and grid[0] == 80 and math.isclose(float(grid[-2]), 0.002) and grid[-1] == 0
    assert (grid[1:] < grid[:-1]).all()


# ---------------------------------------------------------------------------------------------
# RF


def test_rf_time_range_and_net_time():
    form = RF()
    t = form.sample_time(10_000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() < 1 - 1e-3 + 1e-7  # official RF keeps t_RF ≥ 1e-3
    assert torch.equal(form.net_time(torch.tensor([0.25])), torch.tensor([0.25]))
    assert form.time_grid("euler", 4).tolist() == pytest.approx([0.999, 0.74925, 0.4995, 0.24975, 0.0])
    assert RF(t_max=1.0).time_grid("rk45").tolist() == [1.0, 0.0]


def test_shift_one_is_the_identity():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(shift_time(t, 1.0), t)


def test_shift_concentrates_steps_near_noise():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    shifted = shift_time(t, 3.3)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:] > shifted[:-1]).all()
    assert (shifted[1:-1] > t[1:-1]).all()  # every interior time moves towards noise (t → 1)
    grid = RF(t_max=1.0).time_grid("euler", 100, shift=3.3)
    assert (grid > 0.5).sum() > 70  # most of the 100 steps are spent at t > 0.5
    # DDAE++'s 3.3 in paper time is LightningDiT's 0.3 in its mirrored time (docs/design.md §1)
    assert torch.allclose(1 - shift_time(1 - t, 1 / 0.3), shift_time(t, 0.3), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# time values on the command line


def test_parse_time_valid():
    assert DDPM().parse_time("11") == 11.0
    assert abs(EDM().parse_time("idx:4") - 0.0599) < 1e-3  # DDAE++ Tab. 9 "σ_t = 0.06, t = 4"
    assert abs(EDM().parse_time("idx:3") - 0.0229) < 1e-3 and abs(EDM().parse_time("idx:5") - 0.1395) < 1e-3
    assert EDM().parse_time("0.06") == 0.06
    assert RF().parse_time("0.25") == 0.25 and RF().parse_time("0") == 0.0


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("ddpm", "0", "1..1000"),
        ("ddpm", "1001", "1..1000"),
        ("ddpm", "11.5", "1..1000"),
        ("ddpm", "idx:4", "1..1000"),
        ("edm", "0.001", r"\[0.002, 80\]"),
        ("edm", "81", r"\[0.002, 80\]"),
        ("edm", "idx:0", "idx:1..18"),
        ("edm", "idx:19", "idx:1..18"),
        ("edm", "nan", "idx:1..18"),
        ("rf", "1.5", r"\[0, 1\]"),
        ("rf", "-0.1", r"\[0, 1\]"),
        ("rf", "abc", r"\[0, 1\]"),
    ],
)
def test_parse_time_out_of_range(name, text, match):
    with pytest.raises(UsageError, match=match):
        build_formulation(name).parse_time(text)
