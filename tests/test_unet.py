"""UNet backbones, the feature-tap API and self-conditioning (FutureXiang/ddae `model/unet.py`;
docs/design.md §3–4; DDAE++ §4.1)."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from ddaepp_cli.errors import UsageError
from ddaepp_cli.nets import BACKBONES, build_backbone
from ddaepp_cli.nets.common import sinusoidal_embedding
from ddaepp_cli.nets.taps import expand_layer_spec, validate_layers

UNETS = ("ddpm", "ddpmpp")
# Same code paths as the presets (attention level, conv/BigGAN resamplers, skip stack), CPU-cheap.
# Width 64, not 32: with 32 channels GroupNorm(32) has one channel per group and removes the additive
# time embedding entirely, so self-conditioning (which acts through it) would have no effect.
TINY = dict(channels=64, ch_mults=(1, 2), n_blocks=1, attn_resolutions=(8,), image_size=16, dropout=0.0)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(name, **{**TINY, **kw})


def golden_init(model: torch.nn.Module) -> torch.nn.Module:
    """Weights that depend only on each parameter's name and shape (not on construction order)."""
    with torch.no_grad():
        for key, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            std = p[0].numel() ** -0.5 if p.ndim > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def golden_inputs():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 16, 16, generator=g)
    return x, torch.tensor([0.3, 0.9]), torch.randn(2, 9, generator=g)


def inputs(batch: int = 2, size: int = 16, channels: int = 3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, channels, size, size, generator=g), torch.rand(batch, generator=g)


# ------------------------------------------------------------------------------------------------
# Parameter counts (docs/design.md §4, counted on the official modules; DDAE++ Tab. 8 and §4.2)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("ddpm", {}, 35_746_307),
        ("ddpm", {"augment_dim": 9}, 35_747_459),
        ("ddpmpp", {}, 56_524_291),
        ("ddpmpp", {"augment_dim": 9}, 56_525_443),
        ("ddpm", {"selfcond_layer": "out_6"}, 35_746_307 + 460_288),
        ("ddpm", {"selfcond_layer": "out_7", "selfcond_mode": "addition"}, 35_746_307 + 131_584),
        ("ddpmpp", {"selfcond_layer": "out_8"}, 56_984_579),
        ("ddpmpp", {"selfcond_layer": "out_9", "selfcond_mode": "addition"}, 56_524_291 + 131_584),
    ],
)
def test_parameter_counts(name, kwargs, expected):
    with torch.device("meta"):  # no memory, no init cost
        model = build_backbone(name, **kwargs)
    assert n_params(model) == expected


# Outputs of the official DDAE UNet (FutureXiang/ddae `model/unet.py`) for `golden_init` weights mapped
# onto its module names: [mean, std, out[0, 0, 0, :4], out[1, 2, -1, -4:]]; ours agreed to 2.3e-7.
# A parameter rename changes `golden_init` — and breaks old checkpoints — so it must fail here too.
GOLDEN = {
    "ddpm": [0.0459230, 0.0953617, 0.0871758, 0.1059007, 0.0436471,
             0.0012363, 0.0297056, -0.0544247, -0.0395611, 0.0484518],
    "ddpmpp": [0.0513477, 0.1011134, 0.0939482, 0.1182125, 0.0395451,
               -0.0099579, -0.0002794, -0.1019746, -0.0855655, 0.0010286],
}  # fmt: skip


@pytest.mark.parametrize("name", UNETS)
def test_matches_official_ddae_outputs(name):
    model = golden_init(tiny(name, augment_dim=9)).eval()
    x, t, aug = golden_inputs()
    with torch.no_grad():
        out = model(x, t, aug_label=aug)
    got = [out.mean(), out.std(), *out[0, 0, 0, :4], *out[1, 2, -1, -4:]]
    torch.testing.assert_close(torch.stack(got), torch.tensor(GOLDEN[name]), rtol=0, atol=2e-6)
    assert model.out_norm.num_groups == 8 and model.mid.attn.norm.num_groups == 32


# ------------------------------------------------------------------------------------------------
# Layer names and shapes (FutureXiang/ddae `model/unet.py` hooks)
# ------------------------------------------------------------------------------------------------


def test_layer_names():
    with torch.device("meta"):
        ddpm, ddpmpp = build_backbone("ddpm"), build_backbone("ddpmpp")
    for model, k in ((ddpm, 12), (ddpmpp, 15)):
        ks = range(1, k + 1)
        assert model.layer_names == (*(f"in_{i}" for i in ks), "mid", *(f"out_{i}" for i in ks))
        assert list(model.feature_dims) == list(model.layer_names)
        assert model.selfcond_layer is None


def _expected_out_shapes(name: str, c: int) -> dict[str, tuple[int, int, int]]:
    if name == "ddpm":  # 256×4² ×3, 256×8² ×3, 256×16² ×3 (attn), 128×32² ×3 for c = 128
        levels = [(2 * c, 4), (2 * c, 8), (2 * c, 16), (c, 32)]
        per = 3
    else:  # 256 channels at 8², 16² (attn), 32², five blocks each
        levels = [(2 * c, 8), (2 * c, 16), (2 * c, 32)]
        per = 5
    shapes = [(ch, r, r) for ch, r in levels for _ in range(per)]
    return {f"out_{i + 1}": s for i, s in enumerate(shapes)}


def _check_shapes(model, name, c):
    x, t = inputs(batch=1, size=32)
    with torch.no_grad():
        out, feats = model.eval().forward_with_features(x, t, model.layer_names)
    assert out.shape == x.shape
    assert list(feats) == list(model.layer_names)
    for layer, shape in _expected_out_shapes(name, c).items():
        assert tuple(feats[layer].shape[1:]) == shape, layer
    for layer, f in feats.items():
        assert f.shape[1] == model.feature_dims[layer], layer
    k = sum(n.startswith("out_") for n in model.layer_names)
    for i in range(1, k + 1):  # in_i is the skip that out_{k+1-i} consumes: same resolution
        assert feats[f"in_{i}"].shape[2:] == feats[f"out_{k + 1 - i}"].shape[2:]
    assert feats["in_1"].shape[1:] == (c, 32, 32)  # image_proj output
    assert feats["mid"].shape[2:] == feats["out_1"].shape[2:]


def test_full_ddpm_shapes():
    torch.manual_seed(0)
    _check_shapes(build_backbone("ddpm"), "ddpm", 128)


def test_ddpmpp_shapes_at_reduced_width():
    torch.manual_seed(0)
    _check_shapes(build_backbone("ddpmpp", channels=32), "ddpmpp", 32)


# ------------------------------------------------------------------------------------------------
# Feature taps
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", UNETS)
def test_forward_features_early_exit_matches_full_forward(name):
    model = tiny(name).eval()
    x, t = inputs()
    reached_output = []
    hook = model.out_conv.register_forward_hook(lambda *a: reached_output.append(True))
    with torch.no_grad():
        early = model.forward_features(x, t, "out_2,in_2,mid")
        assert not reached_output  # stopped after out_2: the rest of the decoder never ran
        out, full = model.forward_with_features(x, t, ["in_2", "mid", "out_2"])
        assert reached_output
        plain = model(x, t)
    hook.remove()
    assert list(early) == ["out_2", "in_2", "mid"]  # requested order
    for layer in ("in_2", "mid", "out_2"):
        assert torch.equal(early[layer], full[layer])
    assert torch.equal(out, plain)


def test_every_layer_name_resolves():
    for name in UNETS:
        model = tiny(name).eval()
        x, t = inputs()
        for layer in model.layer_names:
            with torch.no_grad():
                (feat,) = model.forward_features(x, t, layer).values()
            assert feat.ndim == 4 and feat.shape[:2] == (2, model.feature_dims[layer])


def test_unknown_layer_lists_valid_names():
    model = tiny("ddpm")
    x, t = inputs()
    with pytest.raises(UsageError, match=r"unknown layer 'out_99' for ddpm; valid: in_1, .*mid, out_1, .*out_4"):
        model.forward_features(x, t, "out_99")
    with pytest.raises(UsageError, match="unknown layer 'out_5'"):
        model.forward_with_features(x, t, "out_3-5")
    with pytest.raises(UsageError, match="unknown layer 'block_1'"):
        model.forward_features(x, t, ["mid", "block_1"])


# ------------------------------------------------------------------------------------------------
# Self-conditioning (DDAE++ §4.1; docs/design.md §3)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", UNETS)
@pytest.mark.parametrize("mode", ("adaptive", "addition"))
def test_selfcond_is_bitwise_noop_at_init(name, mode):
    base = tiny(name).eval()
    sc = tiny(name, selfcond_layer="out_2", selfcond_mode=mode, augment_dim=9).eval()
    missing, unexpected = sc.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == []
    assert sorted(missing) == sorted(k for k in sc.state_dict() if k.startswith(("selfcond.", "time_emb.aug_proj")))
    x, t = inputs()
    with torch.no_grad():
        ref = base(x, t)
        assert torch.equal(sc(x, t), ref)
        assert torch.equal(sc(x, t, aug_label=torch.zeros(2, 9)), ref)
        assert not torch.equal(sc(x, 0.5 * t), ref)  # the comparison can fail


@pytest.mark.parametrize("name", UNETS)
def test_selfcond_trains_both_factors(name):
    base = tiny(name).eval()
    sc = tiny(name, selfcond_layer="out_2")
    sc.load_state_dict(base.state_dict(), strict=False)
    x, t = inputs()
    target = torch.randn_like(x)
    opt = torch.optim.SGD(sc.selfcond.parameters(), lr=1.0)  # only the add-on moves
    m = sc.selfcond

    def step():
        opt.zero_grad()
        torch.nn.functional.mse_loss(sc(x, t), target).backward()
        grads = {k: p.grad.abs().sum().item() for k, p in m.named_parameters()}
        opt.step()
        return grads

    g1 = step()  # P = 0: P learns, s(t) gets exactly zero gradient (dL/ds ∝ P(pool))
    assert g1["proj.weight"] > 0 and g1["proj.bias"] > 0
    assert all(g1[k] == 0 for k in g1 if k.startswith("scale_"))
    g2 = step()  # P ≠ 0 now: s(t) learns too
    assert all(v > 0 for v in g2.values()), g2
    with torch.no_grad():
        assert not torch.equal(sc.eval()(x, t), base(x, t))


def test_selfcond_addition_trains():
    base = tiny("ddpm").eval()
    sc = tiny("ddpm", selfcond_layer="out_3", selfcond_mode="addition")
    sc.load_state_dict(base.state_dict(), strict=False)
    assert not any(k.startswith("selfcond.scale_") for k in sc.state_dict())
    x, t = inputs()
    opt = torch.optim.SGD(sc.selfcond.parameters(), lr=1.0)
    torch.nn.functional.mse_loss(sc(x, t), torch.randn_like(x)).backward()
    assert sc.selfcond.proj.weight.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        assert not torch.equal(sc.eval()(x, t), base(x, t))


def test_selfcond_taps_after_injection_match_full_forward():
    model = tiny("ddpmpp", selfcond_layer="out_1").eval()
    torch.nn.init.normal_(model.selfcond.proj.weight)  # make the self-conditioning path non-trivial
    x, t = inputs()
    with torch.no_grad():
        early = model.forward_features(x, t, "out_1-3")
        _, full = model.forward_with_features(x, t, "out_1-3")
    for layer in early:
        assert torch.equal(early[layer], full[layer])


def test_selfcond_layer_validation():
    with pytest.raises(UsageError, match=r"invalid selfcond_layer 'out_4' for ddpm; valid: out_1, out_2, out_3$"):
        tiny("ddpm", selfcond_layer="out_4")  # the last decoder block has nothing after it to condition
    with pytest.raises(UsageError, match="invalid selfcond_layer 'in_2'"):
        tiny("ddpm", selfcond_layer="in_2")
    with pytest.raises(UsageError, match="unknown self-conditioning mode 'scale'; valid: adaptive, addition"):
        tiny("ddpm", selfcond_layer="out_1", selfcond_mode="scale")


# ------------------------------------------------------------------------------------------------
# Conditioning inputs, time embedding
# ------------------------------------------------------------------------------------------------


def test_aug_label_none_equals_zero_label():
    model = tiny("ddpmpp", augment_dim=9).eval()
    x, t = inputs()
    with torch.no_grad():
        none = model(x, t)
        assert torch.equal(none, model(x, t, aug_label=torch.zeros(2, 9)))
        assert not torch.equal(none, model(x, t, aug_label=torch.ones(2, 9)))


def test_conditioning_misuse_fails_loudly():
    model = tiny("ddpm")
    x, t = inputs()
    with pytest.raises(UsageError, match="augment_dim=0"):
        model(x, t, aug_label=torch.zeros(2, 9))
    with pytest.raises(UsageError, match="unconditional"):
        model(x, t, class_labels=torch.zeros(2, dtype=torch.long))


def test_sinusoid_convention():
    t = torch.tensor([0.7])
    emb = sinusoidal_embedding(t, 128)
    assert emb.shape == (1, 128) and emb.dtype == torch.float32
    # [sin, cos], frequencies endpoint-inclusive from 1 down to 1e-4 (DDAE TimeEmbedding)
    assert emb[0, 0].item() == pytest.approx(math.sin(0.7))
    assert emb[0, 63].item() == pytest.approx(math.sin(0.7e-4), rel=1e-4)
    assert emb[0, 64].item() == pytest.approx(math.cos(0.7))
    assert emb[0, 127].item() == pytest.approx(math.cos(0.7e-4))


# ------------------------------------------------------------------------------------------------
# Layer specs
# ------------------------------------------------------------------------------------------------

UNET_NAMES = ["in_1", "in_2", "in_3", "mid", *(f"out_{k}" for k in range(1, 13))]
DIT_NAMES = [str(k) for k in range(1, 13)]


@pytest.mark.parametrize(
    "spec, valid, expected",
    [
        ("out_6-9", UNET_NAMES, ["out_6", "out_7", "out_8", "out_9"]),
        ("out_6-out_8", UNET_NAMES, ["out_6", "out_7", "out_8"]),
        ("8-11", DIT_NAMES, ["8", "9", "10", "11"]),
        ("7,9,12", DIT_NAMES, ["7", "9", "12"]),
        ("mid", UNET_NAMES, ["mid"]),
        (" in_3 , mid ", UNET_NAMES, ["in_3", "mid"]),
        ("out_9,out_7-9,out_7", UNET_NAMES, ["out_9", "out_7", "out_8"]),  # duplicates dropped, order kept
        (["out_2", "in_1-2", "out_2"], UNET_NAMES, ["out_2", "in_1", "in_2"]),
        ("9-9", DIT_NAMES, ["9"]),
    ],
)
def test_expand_layer_spec(spec, valid, expected):
    assert expand_layer_spec(spec, valid) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("11-8", r"inverted layer range '11-8'; write 8-11"),
        ("out_9-6", r"inverted layer range 'out_9-6'"),
        ("", r"empty layer spec; valid: 1, 2, .*12"),
        ([], r"empty layer spec"),
        ("7,,9", r"empty item"),
        ("13", r"unknown layer '13'; valid: 1, 2, .*12"),
        ("10-13", r"unknown layer '13'"),
        ("block_9", r"unknown layer 'block_9'"),
    ],
)
def test_expand_layer_spec_errors(spec, message):
    with pytest.raises(UsageError, match=message):
        expand_layer_spec(spec, DIT_NAMES)


def test_validate_layers():
    validate_layers(["out_1", "mid"], UNET_NAMES, "ddpm")
    with pytest.raises(UsageError, match="unknown layer 'out_99' for ddpm; valid: in_1"):
        validate_layers(["out_1", "out_99"], UNET_NAMES, "ddpm")


# ------------------------------------------------------------------------------------------------
# Registry, configuration, forward/backward
# ------------------------------------------------------------------------------------------------


def test_registry_and_config_errors():
    assert set(UNETS) <= set(BACKBONES)
    with pytest.raises(UsageError, match="unknown backbone 'unet9'; valid: ddpm, ddpmpp"):
        build_backbone("unet9")
    with pytest.raises(UsageError, match="unknown option 'chanels' for ddpm; valid: in_channels, "):
        build_backbone("ddpm", chanels=64)
    with pytest.raises(UsageError, match="image_size 20 must be divisible by 2\\*\\*\\(levels-1\\) = 8"):
        build_backbone("ddpm", image_size=20)
    with pytest.raises(UsageError, match="channels 48 must be a multiple of 32"):
        build_backbone("ddpm", channels=48)
    with pytest.raises(UsageError, match="attention resolution 12 is not a level resolution; valid: 32, 16, 8, 4"):
        build_backbone("ddpm", attn_resolutions=(12,))
    with pytest.raises(UsageError, match="unknown resample 'fir'"):
        build_backbone("ddpm", resample="fir")


def test_config_rebuilds_the_model():
    model = tiny("ddpmpp", selfcond_layer="out_2", augment_dim=9, in_channels=1)
    again = build_backbone(model.backbone_name, **model.config)
    assert again.load_state_dict(model.state_dict(), strict=True) is not None
    assert again.config == model.config and n_params(again) == n_params(model)


@pytest.mark.parametrize("name", UNETS)
def test_tiny_forward_backward(name):
    model = tiny(name, in_channels=1, dropout=0.1, selfcond_layer="out_2").train()
    torch.nn.init.normal_(model.selfcond.proj.weight, std=0.02)  # so s(t) gets gradient on step 1
    x, t = inputs(channels=1)
    out = model(x, t)
    assert out.shape == x.shape
    out.square().mean().backward()
    for key, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, key


def test_channels_last_and_bf16_autocast():
    model = tiny("ddpmpp").eval()
    x, t = inputs()
    with torch.no_grad():
        ref = model(x, t)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
        torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, feats = model.forward_with_features(x, t, "out_2")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
