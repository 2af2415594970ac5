"""EDM's non-leaky augmentation pipe: label layout, per-transform rates, geometry, batch-split
invariance, and the zero label as "no augmentation" (NVlabs/edm `training/augment.py`; DDAE++ §4.2)."""

from __future__ import annotations

import math

import pytest
import torch

from ddaepp_cli.diffusion.augment import LABEL_DIM, AugmentPipe, AugParams, rotate2d, scale2d, translate2d
from ddaepp_cli.errors import UsageError
from ddaepp_cli.nets import build_backbone


def draw(n: int, seed: int = 0, size=(32, 32), **kw) -> AugParams:
    return AugmentPipe(**kw).draw(n, size=size, generator=torch.Generator().manual_seed(seed))


def blob(H: int = 32, W: int = 32, cx: float = 3.0, cy: float = -2.0, sigma: float = 1.5) -> torch.Tensor:
    """A smooth Gaussian blob centred at (cx, cy) in centred pixel coordinates, (1, 1, H, W)."""
    y = torch.arange(H, dtype=torch.float64) - (H - 1) / 2
    x = torch.arange(W, dtype=torch.float64) - (W - 1) / 2
    return torch.exp(-((x[None] - cx) ** 2 + (y[:, None] - cy) ** 2) / (2 * sigma**2))[None, None]


def centroid(img: torch.Tensor, near: torch.Tensor, radius: float = 7.0) -> torch.Tensor:
    """Centroid (x, y) of each one-channel image within `radius` px of `near` (N, 2): reflect padding
    may show mirrored copies of the blob near the borders, which must not count."""
    H, W = img.shape[-2:]
    y = (torch.arange(H, dtype=img.dtype) - (H - 1) / 2)[None, :, None]
    x = (torch.arange(W, dtype=img.dtype) - (W - 1) / 2)[None, None, :]
    window = ((x - near[:, 0, None, None]) ** 2 + (y - near[:, 1, None, None]) ** 2) < radius**2
    img = img[:, 0] * window  # (N, H, W)
    m = img.sum(dim=(-2, -1))
    return torch.stack([(img * x).sum(dim=(-2, -1)) / m, (img * y).sum(dim=(-2, -1)) / m], dim=-1)


def test_label_layout_and_rates_match_edm():
    """Non-zero rate of each label column over many images = EDM's (NVlabs/edm `training/augment.py`, counted on
    the reference: [0.50, 0.06, 0.12, 0.12, 0.12, 0.12, 0.06, 0.12, 0.12] at p = 0.12)."""
    p = draw(40_000)
    lab = p.label
    assert lab.shape == (40_000, LABEL_DIM) and lab.dtype == torch.float32
    rates = (lab != 0).double().mean(0)
    expected = torch.tensor([0.5, 0.06, 0.12, 0.12, 0.12, 0.12, 0.06, 0.12, 0.12], dtype=torch.float64)
    assert torch.allclose(rates, expected, atol=0.01), rates  # binomial sd ≤ 0.0025
    # flips are bits and say what was done
    assert set(lab[:, 0].unique().tolist()) == {0.0, 1.0} and torch.equal(lab[:, 0].bool(), p.xflip)
    assert torch.equal(lab[:, 1].bool(), p.yflip)
    # isotropic scale: w ~ N(0, 1) when applied
    w = lab[lab[:, 2] != 0, 2]
    assert abs(w.mean()) < 0.1 and abs(w.std() - 1) < 0.1
    # rotation: (cos θ − 1, sin θ) on the unit circle, θ uniform on (−π, π)
    rot = lab[:, 3:5]
    assert torch.allclose((rot[:, 0] + 1) ** 2 + rot[:, 1] ** 2, torch.ones(len(rot)), atol=1e-5)
    theta = torch.atan2(rot[rot[:, 1] != 0, 1], rot[rot[:, 1] != 0, 0] + 1)
    assert abs(theta.abs().mean() - math.pi / 2) < 0.1
    # anisotropy: the axis is rotated (w·sin r ≠ 0) for half of the applied ones
    applied = lab[:, 5] != 0
    assert abs((lab[applied, 6] != 0).double().mean() - 0.5) < 0.05
    # translation: one gate for both axes, N(0, 1) in units of 0.125·size
    assert torch.equal(lab[:, 7] != 0, lab[:, 8] != 0)
    assert abs(lab[lab[:, 7] != 0, 7].std() - 1) < 0.1


def test_disabled_transforms_keep_zero_labels_and_p_scales_rates():
    lab = draw(20_000, p=0.5, yflip=0, rotate_frac=0).label
    assert (lab[:, 1] == 0).all() and (lab[:, 3:5] == 0).all()
    assert abs((lab[:, 2] != 0).double().mean() - 0.5) < 0.02
    with pytest.raises(UsageError, match="augment.p must be"):
        AugmentPipe(p=-0.1)


def test_draws_come_from_the_generator_only():
    a, b = draw(64, seed=3), draw(64, seed=3)
    assert torch.equal(a.label, b.label) and a.margin == b.margin
    assert not torch.equal(a.label, draw(64, seed=4).label)


def test_geometry_moves_the_image_as_the_matrix_says():
    """A blob's centroid lands where the forward transform (the inverse of g_inv) sends it."""
    # every geometric transform applied; moderate shifts keep the blob inside the image
    pipe = AugmentPipe(p=1.0, xflip=0.5, yflip=0.5, translate_frac_std=0.05)
    params = pipe.draw(16, size=(32, 32), generator=torch.Generator().manual_seed(5))
    x = blob().expand(16, 1, 32, 32).contiguous()
    out = pipe(x, params)
    assert out.shape == x.shape and out.dtype == x.dtype
    c = torch.tensor([3.0, -2.0], dtype=torch.float64).expand(16, 2).clone()
    c[params.xflip, 0] *= -1  # the blits come first
    c[params.yflip, 1] *= -1
    forward = torch.linalg.inv(params.g_inv.double())
    expected = (forward[:, :2, :2] @ c[:, :, None])[:, :, 0] + forward[:, :2, 2]
    # EDM's sym6 is not linear-phase: up- and down-sampling delays cancel only for the identity,
    # leaving a ≤ 0.15 px shift under rotation/scaling (the reference pipe behaves the same)
    assert (centroid(out, expected) - expected).abs().max() < 0.25
    assert (params.label[:, [2, 3, 4, 5, 7, 8]] != 0).all()  # p = 1: every geometric transform applied


def test_integer_translation_is_exact_and_a_quarter_turn_turns_the_right_way():
    H = W = 16
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.randn(2, 3, H + 3, W + 3, generator=g, dtype=torch.float64), 4, 1)
    like = torch.zeros(2, dtype=torch.float64)

    def apply(g_inv):
        params = AugParams(torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool), g_inv,
                           torch.zeros(2, LABEL_DIM), AugmentPipe._margin(g_inv, H, W))
        return AugmentPipe()(x, params)

    # translate2d_inv(t) as g_inv: out(p) = in(p − t), the content moves by +2 px in x (exact away
    # from the borders, where the reflect padding meets the non-symmetric filter)
    out = apply(translate2d(torch.full((2,), -2.0, dtype=torch.float64), 0, like))
    assert torch.allclose(out[..., 4:-4, 4:-4], x.roll(2, 3)[..., 4:-4, 4:-4], atol=1e-9)
    # rotate2d(θ) as g_inv (what a drawn rotation θ gives): out(p) = in(R(θ)p);
    # θ = π/2 → out[i, j] = in[j, W−1−i].
    # Not bit-exact: sym6 is not linear-phase, so the up/down-sampling delays no longer cancel (~0.05)
    out = apply(rotate2d(torch.full((2,), math.pi / 2, dtype=torch.float64), like))[..., 3:-3, 3:-3]
    assert (out - x.transpose(2, 3).flip(2)[..., 3:-3, 3:-3]).abs().max() < 0.1
    assert (out - x.transpose(2, 3).flip(3)[..., 3:-3, 3:-3]).abs().max() > 0.5  # not the other way round
    # identity: the sym6 up/down round trip is perfect reconstruction
    out = apply(scale2d(1.0, 1.0, like))
    assert torch.allclose(out, x, atol=1e-6)


def test_result_does_not_depend_on_how_the_batch_is_split():
    """The pad margin comes from the whole drawn (global) batch: a rank's slice gives the same images."""
    params = draw(12, seed=2)
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    pipe = AugmentPipe()
    whole = pipe(x, params)
    parts = torch.cat([pipe(x[i:i + 4], params[i:i + 4]) for i in (0, 4, 8)])
    assert torch.allclose(whole, parts, atol=1e-6)
    assert params[4:8].margin == params.margin and len(params[4:8]) == 4


@pytest.mark.parametrize("backbone, kw", [
    ("ddpm", dict(channels=32, ch_mults=(1, 2), n_blocks=1, attn_resolutions=(4,), image_size=8, in_channels=1)),
    ("uvit", dict(width=32, depth=4, heads=2, image_size=8, in_channels=1, cls_token=True)),
])
def test_zero_label_leaves_the_network_output_unchanged(backbone, kw):
    torch.manual_seed(0)
    net = build_backbone(backbone, augment_dim=9, **kw).eval()
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    assert torch.equal(net(x, t, aug_label=torch.zeros(4, 9)), net(x, t))
    real = draw(4, size=(8, 8)).label
    real[:, 0] = 1.0  # at least one non-zero entry per row
    assert not torch.allclose(net(x, t, aug_label=real), net(x, t))


# ------------------------------------------------------------------------------------------------
# EDM2 uncertainty weighting, used with EDM + Aug (DDAE++ App. B; NVlabs/edm2 `training/training_loop.py`)
# ------------------------------------------------------------------------------------------------


def test_edm2_uncertainty_weighting():
    from ddaepp_cli.diffusion import build_formulation

    plain, unc = build_formulation("edm"), build_formulation("edm", uncertainty=True)
    assert plain.uncertainty is None and sum(p.numel() for p in unc.uncertainty.parameters()) == 128
    assert torch.equal(unc.uncertainty.freqs, build_formulation("edm", uncertainty=True).uncertainty.freqs)
    net = lambda x, t, **kw: 0.1 * x + t[:, None, None, None]  # noqa: E731 - any fixed "network"
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma, noise = torch.tensor([0.01, 0.3, 2.0, 40.0]), torch.randn(4, 3, 8, 8)
    base = plain.loss(net, x0, t=sigma, noise=noise).loss  # λ(σ)·‖D − y‖², mean over elements
    u = unc.uncertainty(torch.log(sigma) / 4)
    # the forward above renormalised the stored weight (EDM2's forced weight normalisation)
    assert torch.allclose(unc.uncertainty.weight.norm(), torch.tensor(128**0.5), rtol=1e-3)
    got = unc.loss(net, x0, t=sigma, noise=noise).loss
    assert torch.allclose(got, base / u.exp() + u, rtol=1e-5)  # EDM2Loss: λ/e^u·‖D − y‖² + u
    got.mean().backward()
    assert unc.uncertainty.weight.grad.abs().sum() > 0
    # sampling never sees u
    assert torch.equal(unc.predict(net, x0, sigma).x0, plain.predict(net, x0, sigma).x0)
