"""Recipe loading: inheritance, overrides, typing, validation messages."""

from pathlib import Path

import pytest

from ddaepp_cli.errors import UsageError
from ddaepp_cli.recipe import (DDPMConfig, EDMConfig, UNetPPConfig, diff_recipes, load_recipe,
                               recipe_from_dict, recipe_to_dict)

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path, "a.yaml", "model: {backbone: ddpmpp, dropout: 0.13}\ndiffusion: {formulation: edm}\ntrain: {lr: 1.0e-4}\n")
    b = write(tmp_path, "b.yaml", "base: a.yaml\nmodel: {selfcond: {layer: out_9}}\ntrain: {global_batch: 64}\n")
    r = load_recipe(b, ["train.lr=2e-4", "train.betas=[0.9, 0.95]", "model.selfcond.mode=addition"])
    assert isinstance(r.model, UNetPPConfig) and r.model.dropout == 0.13 and r.model.selfcond.layer == "out_9"
    assert r.model.selfcond.mode == "addition"
    assert isinstance(r.diffusion, EDMConfig)
    assert r.train.lr == 2e-4 and r.train.betas == (0.9, 0.95) and r.train.global_batch == 64
    assert r.name == "b"
    # frozen
    with pytest.raises(Exception):
        r.train.lr = 1.0


def test_switching_a_tag_replaces_the_section(tmp_path):
    a = write(tmp_path, "a.yaml", "diffusion: {formulation: edm, p_mean: -1.0}\n")
    r = load_recipe(a, ["diffusion.formulation=ddpm"])
    assert isinstance(r.diffusion, DDPMConfig)
    b = write(tmp_path, "b.yaml", "base: a.yaml\ndiffusion: {formulation: ddpm}\n")
    assert isinstance(load_recipe(b).diffusion, DDPMConfig)


@pytest.mark.parametrize("override, fragment", [
    ("train.lrr=1", "unknown key 'train.lrr' (did you mean 'lr'?)"),
    ("train.lr=abc", "train.lr: expected float"),
    ("train.global_batch=1.5", "train.global_batch: expected int"),
    ("train.global_batch=0", "train.global_batch must be positive"),
    ("model.selfcond.mode=foo", "not one of adaptive, addition"),
    ("diffusion.formulation=xx", "diffusion.formulation: 'xx' is not one of ddpm, edm, rf"),
    ("diffusion.p_mean=1", "unknown key 'diffusion.p_mean'"),  # a DDPM recipe has no p_mean
    ("train.betas=[1]", "train.betas: expected 2 values"),
    ("train.ema.decay=1.5", "train.ema.decay must be in [0, 1)"),
    ("data.dataset=mnist", "data.dataset: 'mnist' is not one of digits, cifar10, cifar100, imagefolder"),
    ("train", "--set expects KEY=VALUE"),
    ("train.lr.x=1", "train.lr: expected float"),
])
def test_bad_overrides_name_the_key(tmp_path, override, fragment):
    a = write(tmp_path, "a.yaml", "diffusion: {formulation: ddpm}\n")
    with pytest.raises(UsageError) as e:
        load_recipe(a, [override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(UsageError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = write(tmp_path, "bad.yaml", "train: {lr: [1, 2\n")
    with pytest.raises(UsageError, match="malformed YAML.*line"):
        load_recipe(bad)
    lst = write(tmp_path, "list.yaml", "- a\n- b\n")
    with pytest.raises(UsageError, match="must be a YAML mapping"):
        load_recipe(lst)
    write(tmp_path, "c1.yaml", "base: c2.yaml\n")
    c2 = write(tmp_path, "c2.yaml", "base: c1.yaml\n")
    with pytest.raises(UsageError, match="cycle"):
        load_recipe(c2)
    # YAML is read with the safe loader: python tags are refused, not executed.
    evil = write(tmp_path, "evil.yaml", "name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UsageError, match="malformed YAML"):
        load_recipe(evil)


def test_round_trip_and_diff():
    r = load_recipe(RECIPES / "cifar10_edm_ddpmpp_sc.yaml")
    again = recipe_from_dict(recipe_to_dict(r))
    assert again == r
    other = load_recipe(RECIPES / "cifar10_edm_ddpmpp_sc.yaml", ["train.lr=1e-4"])
    assert diff_recipes(r, other) == ["train.lr: 0.0004 -> 0.0001"]


def test_every_shipped_recipe_loads():
    files = sorted(RECIPES.glob("*.yaml"))
    assert len(files) >= 25
    for f in files:
        r = load_recipe(f)
        assert r.name == f.stem, f
        header = f.read_text().splitlines()[0]
        assert header.startswith("# "), f"{f.name} lacks its header comment"


def test_sc_recipes_follow_table9():
    # DDAE++ Table 9 (CIFAR-10 / CIFAR-100 self-conditioning = baseline's best probe layer)
    expected = {"cifar10_ddpm_ddpm": "out_6", "cifar10_edm_ddpm": "out_7", "cifar10_rf_ddpm": "out_7",
                "cifar10_ddpm_ddpmpp": "out_7", "cifar10_edm_ddpmpp": "out_9", "cifar10_rf_ddpmpp": "out_8",
                "cifar100_ddpm_ddpm": "out_6", "cifar100_edm_ddpm": "out_6", "cifar100_rf_ddpm": "out_7",
                "cifar100_ddpm_ddpmpp": "out_8", "cifar100_edm_ddpmpp": "out_8", "cifar100_rf_ddpmpp": "out_8"}
    for name, layer in expected.items():
        base, sc = load_recipe(RECIPES / f"{name}.yaml"), load_recipe(RECIPES / f"{name}_sc.yaml")
        assert base.model.selfcond.layer is None
        assert sc.model.selfcond.layer == layer
        diffs = [d for d in diff_recipes(base, sc) if not d.startswith("name:")]
        assert diffs == [f"model.selfcond.layer: None -> '{layer}'"]
        edm = name.split("_")[1] == "edm"
        assert base.model.dropout == (0.13 if edm else 0.1)  # Tab. 7
        assert base.train.ema.decay == (0.9993 if edm else 0.9999)  # Tab. 7
        assert base.train.warmup_epochs == (200 if edm else 13)  # Tab. 10
        assert base.train.global_batch == (512 if name.endswith("_ddpm") else 256)  # Tab. 10


def test_recipe_defaults_match_backbone_presets():
    # The recipe schema passes every value explicitly; its defaults must be the presets' (one truth).
    from ddaepp_cli.nets.unet import UNET_PRESETS
    from ddaepp_cli.recipe import MODEL_SCHEMAS

    for name in ("ddpm", "ddpmpp"):
        cfg = MODEL_SCHEMAS[name]()
        for key, value in UNET_PRESETS[name].items():
            assert getattr(cfg, key) == value, (name, key)
