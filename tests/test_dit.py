"""LightningDiT backbone (nets/dit.py): parameter counts against docs/design.md §4 and DDAE++ Tab. 4,
self-conditioning as an exact no-op at init, the tap API, labels, and the shipped Table 4 recipes."""

import json

import pytest
import torch

from conftest import ROOT, cli_inprocess
from ddaepp_cli.errors import UsageError
from ddaepp_cli.nets import build_backbone
from ddaepp_cli.nets.common import sincos_pos_embed_2d
from ddaepp_cli.nets.dit import rope_tables


def count(**kw) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_backbone("dit", **kw).parameters())


@pytest.mark.parametrize("size, classes, expected", [
    ("B", 1000, 130_556_192), ("L", 1000, 458_152_960), ("XL", 1000, 675_256_736),
    ("B", 0, 129_788_960), ("L", 0, 457_129_984),  # the paper's 129.8M / 457.1M (2-row label table)
])
def test_parameter_counts(size, classes, expected):
    assert count(size=size, num_classes=classes) == expected


@pytest.mark.parametrize("size, extra", [("B", 1_378_560), ("L", 2_362_368), ("XL", 2_952_576)])
def test_selfcond_counts(size, extra):
    assert count(size=size, num_classes=1000, selfcond_layer="9") - count(size=size, num_classes=1000) == extra


def test_dry_run_counts_of_table4_recipes():
    expected = {"imagenet256_rf_ditb": 129_788_960, "imagenet256_rf_ditl_sc": 457_129_984 + 2_362_368,
                "imagenet256_rf_ditxl_cond": 675_256_736, "imagenet256_rf_ditb_cond_sc": 130_556_192 + 1_378_560}
    for name, params in expected.items():
        r = cli_inprocess("train", ROOT / "recipes" / f"{name}.yaml", "--dry-run", "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["params"] == params, name
        assert out["steps_per_epoch"] == 1_281_167 // 1024


def tiny(**kw):
    torch.manual_seed(0)
    return build_backbone("dit", **{**dict(width=64, depth=4, heads=4, in_channels=4, image_size=8,
                                          num_classes=10), **kw})


def test_selfcond_starts_as_the_baseline_and_learns():
    base, sc = tiny(), tiny(selfcond_layer="2")
    sc.load_state_dict(base.state_dict(), strict=False)
    for blk in base.blocks:  # leave adaLN-Zero so that every block matters
        torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.02)
    torch.nn.init.normal_(base.final_layer.linear.weight, std=0.02)
    sc.load_state_dict(base.state_dict(), strict=False)
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 3])
    assert torch.equal(base(x, t, class_labels=y), sc(x, t, class_labels=y))
    torch.nn.init.normal_(sc.selfcond.proj.weight, std=0.1)
    assert not torch.allclose(base(x, t, class_labels=y), sc(x, t, class_labels=y))


def test_taps_early_exit_and_names():
    m = tiny()
    for blk in m.blocks:
        torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.02)
    assert m.layer_names == ("1", "2", "3", "4") and m.feature_dims["3"] == 64
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    out, full = m.forward_with_features(x, t, "1-4")
    early = m.forward_features(x, t, "2")
    assert torch.equal(early["2"], full["2"]) and full["4"].shape == (2, 64, 64)
    with pytest.raises(UsageError, match="valid: 1, 2, 3, 4"):
        m.forward_features(x, t, "5")
    with pytest.raises(UsageError, match="valid: 1, 2, 3"):
        tiny(selfcond_layer="4")  # after the last block only the final layer would see it


def test_labels_null_class_and_unconditional():
    m = tiny()
    torch.nn.init.normal_(m.final_layer.linear.weight, std=0.02)
    torch.nn.init.normal_(m.final_layer.adaLN_modulation[-1].weight, std=0.02)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    assert torch.equal(m(x, t), m(x, t, class_labels=torch.tensor([10, 10])))  # None = null class
    assert not torch.equal(m(x, t), m(x, t, class_labels=torch.tensor([0, 1])))
    u = tiny(num_classes=0)
    assert u.y_embedder.weight.shape[0] == 2
    with pytest.raises(UsageError, match="unconditional"):
        u(x, t, class_labels=torch.tensor([0, 0]))


def test_pos_embed_and_rope_layout():
    pe = sincos_pos_embed_2d(8, 4)  # first half: column, second: row
    assert pe.shape == (16, 8)
    assert (pe[0:4, 4:] == pe[0, 4:]).all() and not (pe[0:4, :4] == pe[0, :4]).all()
    cos, sin = rope_tables(16, 4)  # first half rotates with the row, second with the column
    assert cos.shape == (16, 16) and torch.equal(cos[0:4, :8], cos[0:1, :8].expand(4, 8))
    assert torch.equal(cos[0::4, 8:], cos[0:1, 8:].expand(4, 8))


def test_backward_and_patch2():
    m = tiny(patch_size=2, selfcond_layer="1", qk_norm=True)
    x = torch.randn(2, 4, 8, 8)
    m(x, torch.rand(2), class_labels=torch.tensor([0, 9])).square().mean().backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad)
    assert not m.pos_embed.requires_grad
