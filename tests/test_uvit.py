"""UViT-S: parameter counts, taps, [CLS] self-conditioning, the augmentation token and its mask
(baofff/U-ViT `libs/uvit.py`; DDAE++ §4.1–4.2, Fig. 2, App. B)."""

from __future__ import annotations

import pytest
import torch

from ddaepp_cli.errors import UsageError
from ddaepp_cli.nets import build_backbone
from ddaepp_cli.nets.common import timestep_embedding as uvit_time_embedding
from ddaepp_cli.training.state import param_groups

TINY = dict(image_size=8, in_channels=1, width=32, depth=4, heads=2)


def tiny(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("uvit", **{**TINY, **kw}).eval()


def inputs(batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 8, 8, generator=g), torch.rand(batch, generator=g), torch.randn(batch, 9, generator=g)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# Parameter counts: the official U-ViT CIFAR small config (docs/design.md §4, DDAE++ Tab. 8 "44.3M")
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, expected", [
    ({}, 44_255_328),
    ({"cls_token": True}, 44_255_328 + 512),  # [CLS]: one learned 512-d vector, no positional row
    ({"augment_dim": 9}, 44_255_328 + 9 * 512 + 512),  # bias-free Linear(9→512) + its positional row
    ({"cls_token": True, "augment_dim": 9}, 44_260_960),
])
def test_uvit_s_parameter_counts(kwargs, expected):
    with torch.device("meta"):
        model = build_backbone("uvit", **kwargs)
    assert n_params(model) == expected
    # the parts, counted on baofff/U-ViT `libs/uvit.py`
    assert n_params(model.in_blocks[0]) == 3_150_848 and n_params(model.out_blocks[0]) == 3_675_648
    assert len(model.in_blocks) == len(model.out_blocks) == 6  # + mid = 13 blocks
    assert model.pos_embed.shape[1] == 1 + 256 + int("augment_dim" in kwargs)


def test_dry_run_reports_the_acceptance_counts():
    from pathlib import Path

    from ddaepp_cli.recipe import load_recipe
    from ddaepp_cli.training.train import dry_run

    recipes = Path(__file__).resolve().parent.parent / "recipes"
    counts = {name: dry_run(load_recipe(recipes / f"{name}.yaml"))["params"]
              for name in ("cifar10_ddpm_uvit", "cifar100_ddpm_uvit_sc", "cifar10_ddpm_uvit_sc_aug_cl")}
    assert counts == {"cifar10_ddpm_uvit": 44_255_328, "cifar100_ddpm_uvit_sc": 44_255_840,
                      "cifar10_ddpm_uvit_sc_aug_cl": 44_260_960}


# ------------------------------------------------------------------------------------------------
# Forward, taps and layout
# ------------------------------------------------------------------------------------------------


def test_layer_names_and_tap_shapes():
    model = tiny(cls_token=True)
    assert model.layer_names == ("in_1", "in_2", "mid", "out_1", "out_2", "cls")
    x, t, _ = inputs()
    out, feats = model.forward_with_features(x, t, "in_1,mid,out_1-2,cls")
    assert out.shape == x.shape
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "in_1": (3, 16, 32), "mid": (3, 16, 32), "out_1": (3, 16, 32), "out_2": (3, 16, 32), "cls": (3, 1, 32)}
    assert torch.equal(out, model(x, t))  # taps change nothing
    early = model.forward_features(x, t, ["mid", "cls"])
    assert torch.equal(early["cls"], feats["cls"]) and torch.equal(early["mid"], feats["mid"])
    assert set(model.feature_dims.values()) == {32}


def test_forward_features_stops_after_the_deepest_layer():
    model = tiny(cls_token=True, cls_tap="in_2")
    ran = []
    model.mid_block.register_forward_hook(lambda *a: ran.append("mid"))
    model.forward_features(*inputs()[:2], "cls")  # [CLS] after in_2: the middle block never runs
    assert ran == []
    model.forward_features(*inputs()[:2], "out_1")
    assert ran == ["mid"]


def test_unknown_layers_are_usage_errors():
    with pytest.raises(UsageError, match="unknown layer 'cls'.*valid: in_1, in_2, mid, out_1, out_2"):
        tiny().forward_features(*inputs()[:2], "cls")  # no [CLS] token without self-conditioning
    with pytest.raises(UsageError, match="unknown cls_tap 'out_5'"):
        tiny(cls_token=True, cls_tap="out_5")
    with pytest.raises(UsageError, match="unknown option 'dropout' for uvit"):
        build_backbone("uvit", dropout=0.1)
    x, t, label = inputs()
    with pytest.raises(UsageError, match="augment_dim=0"):
        tiny()(x, t, aug_label=label)


def test_unpatchify_follows_uvit_channel_order():
    """decoder_pred's output per patch is laid out (p1, p2, C) — U-ViT's einops `unpatchify`."""
    torch.manual_seed(0)
    model = build_backbone("uvit", image_size=4, in_channels=3, width=16, depth=0, heads=2).eval()
    captured = {}
    model.decoder_pred.register_forward_hook(lambda m, i, o: captured.setdefault("tokens", o))
    model.final_layer = torch.nn.Identity()
    out = model(torch.randn(1, 3, 4, 4), torch.rand(1))
    tokens = captured["tokens"][0, model.extras:]  # (h·w, p1·p2·C)
    for h in range(2):
        for w in range(2):
            for p1 in range(2):
                for p2 in range(2):
                    for c in range(3):
                        assert out[0, c, 2 * h + p1, 2 * w + p2] == tokens[h * 2 + w, (p1 * 2 + p2) * 3 + c]


def test_time_token_is_the_sinusoid_of_time_scale_times_t():
    t = torch.tensor([0.0, 0.011, 1.0])
    emb = uvit_time_embedding(t * 1000, 8)
    assert torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-torch.log(torch.tensor(1e4)) * torch.arange(4) / 4)
    assert torch.allclose(emb[1], torch.cat([(11 * freqs).cos(), (11 * freqs).sin()]), atol=1e-5)
    # DDPM hands the net t/T; time_scale 1000 makes the token see the integer step (same output as
    # a time_scale-1 model fed t itself)
    a, b = tiny(), tiny(time_scale=1.0)
    x, _, _ = inputs()
    assert torch.allclose(a(x, torch.tensor([0.011, 0.5, 1.0])), b(x, torch.tensor([11.0, 500.0, 1000.0])))


# ------------------------------------------------------------------------------------------------
# [CLS] self-conditioning, augmentation token, masking, weight decay
# ------------------------------------------------------------------------------------------------


def test_zero_aug_label_equals_no_label_bitwise():
    model = tiny(cls_token=True, augment_dim=9)
    x, t, label = inputs()
    assert torch.equal(model(x, t), model(x, t, aug_label=torch.zeros(3, 9)))
    assert not torch.allclose(model(x, t), model(x, t, aug_label=label))  # the label does condition


@pytest.mark.parametrize("masked", [True, False])
def test_cls_does_not_see_the_aug_token_when_masked(masked):
    """DDAE++ Fig. 2b, in a one-block model: only the aug token's input changes."""
    model = tiny(cls_token=True, augment_dim=9, depth=0, cls_tap="mid", mask_cls_aug=masked)
    assert len(model.in_blocks) == 0 and model.layer_names == ("mid", "cls")
    with torch.no_grad():
        model.pos_embed.normal_()  # a non-trivial aug-token row, so the two inputs differ clearly
    x, t, label = inputs()
    a = model.forward_features(x, t, ["mid", "cls"], aug_label=label)
    b = model.forward_features(x, t, ["mid", "cls"], aug_label=-3 * label)
    assert not torch.allclose(a["mid"], b["mid"])  # patches still see the augmentation
    if masked:
        assert torch.equal(a["cls"], b["cls"])
    else:
        assert not torch.allclose(a["cls"], b["cls"])


def test_cls_travels_the_long_skips_and_is_trained_by_diffusion():
    model = tiny(cls_token=True).train()
    x, t, _ = inputs()
    model(x, t).square().mean().backward()
    assert model.cls_token.grad is not None and model.cls_token.grad.abs().sum() > 0
    # removing the [CLS] contribution changes the output: it conditions every later block
    with torch.no_grad():
        y = model(x, t)
        model.cls_token.zero_()
        assert not torch.allclose(y, model(x, t))


def test_weight_decay_on_cls_but_not_on_biases_norms_or_pos_embed():
    model = tiny(cls_token=True, augment_dim=9)
    decay, no_decay = param_groups(model, 0.03)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.03 and no_decay["weight_decay"] == 0.0
    assert {"cls_token", "aug_embed.weight", "in_blocks.0.attn.qkv.weight"} <= decayed
    assert {"pos_embed", "in_blocks.0.attn.proj.bias", "norm.weight", "mid_block.norm1.bias"} <= skipped
    assert not any(n.endswith(".bias") for n in decayed)
