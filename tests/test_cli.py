"""The CLI contract: --dry-run numbers, --json purity, exit codes and one-line errors."""

import json

import pytest

from conftest import ROOT, cli_inprocess, run_cli

RECIPES = ROOT / "recipes"


def dry(recipe, *extra):
    r = cli_inprocess("train", recipe, "--dry-run", "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # exactly one JSON object on stdout


def test_dry_run_parameter_counts():
    # Acceptance (issue 2): official DDAE counts, +460,288 for self-conditioning.
    assert dry(RECIPES / "cifar10_edm_ddpmpp.yaml")["params"] == 56_524_291
    sc = dry(RECIPES / "cifar10_edm_ddpmpp_sc.yaml")
    assert sc["params"] == 56_984_579 and sc["trainable_params"] == 56_984_579
    assert dry(RECIPES / "cifar100_ddpm_ddpm.yaml")["params"] == 35_746_307
    assert dry(RECIPES / "cifar10_rf_ddpm_sc.yaml")["params"] == 35_746_307 + 460_288
    add = dry(RECIPES / "cifar10_rf_ddpm_sc.yaml", "--set", "model.selfcond.mode=addition")
    assert add["params"] == 35_746_307 + 131_584


def test_dry_run_batch_plan():
    out = dry(RECIPES / "cifar10_edm_ddpmpp.yaml", "--num-processes", "4",
              "--set", "train.batch_per_process=32")
    assert out["global_batch"] == 256 and out["per_process_batch"] == 64
    assert out["micro_batch"] == 32 and out["grad_accum"] == 2
    assert out["steps_per_epoch"] == 50_000 // 256
    assert out["total_steps"] == 2000 * (50_000 // 256)
    assert out["recipe"]["model"]["selfcond"]["layer"] is None


def test_dry_run_human_output_shows_recipe_and_plan():
    r = cli_inprocess("train", RECIPES / "cifar10_edm_ddpmpp_sc.yaml", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "56,984,579" in r.stdout and "layer: out_9" in r.stdout and "gradient accumulation" in r.stdout


@pytest.mark.parametrize("args, code, fragment", [
    (["train", "nope.yaml"], 2, "recipe not found"),
    (["train", RECIPES / "cifar10_edm_ddpmpp.yaml", "--dry-run", "--set", "train.lrr=1"], 2, "unknown key 'train.lrr'"),
    (["train", RECIPES / "cifar10_edm_ddpmpp.yaml", "--dry-run", "--set", "train.lr=fast"], 2, "train.lr: expected float"),
    (["train", RECIPES / "cifar10_edm_ddpmpp.yaml", "--dry-run", "--set", "model.selfcond.layer=out_99"], 2, "invalid selfcond_layer 'out_99'"),
    (["train", RECIPES / "cifar10_edm_ddpmpp.yaml", "--dry-run", "--set", "model.selfcond.layer=out_15"], 2, "out_14"),
    (["train", RECIPES / "cifar10_edm_ddpmpp.yaml", "--dry-run", "--num-processes", "3"], 2, "not divisible"),
    (["train", RECIPES / "cifar10_edm_ddpmpp.yaml", "--set", "data.root=/nonexistent", "--run-dir", "/tmp/ddaepp-never"], 3, "cifar-10-batches-py"),
    (["sample", "/nonexistent/run", "--n", "4"], 2, "no such run or checkpoint"),
    (["sample", RECIPES, "--n", "4"], 2, "holds no checkpoint"),
    (["sample", RECIPES, "--seeds", "9-3"], 2, "seed"),
])
def test_bad_input_exits_cleanly(args, code, fragment):
    r = run_cli(*args)
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert fragment in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_recipes_command_lists_every_recipe():
    r = run_cli("recipes", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {row["name"] for row in rows} == {p.stem for p in RECIPES.glob("*.yaml")}
    assert all(row["about"] for row in rows)


def test_module_entry_point_help():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("train", "sample", "recipes", "info"):
        assert cmd in r.stdout
