"""`ddaepp profile-layers` (profile.py): argmin of the reported losses, and one-line usage errors."""

import json

import pytest

from conftest import run_cli
from ddaepp_cli.training.profile import window_mean

RECIPE = """\
name: tinyprof
data: {dataset: digits, image_size: 8, num_workers: 0}
model: {backbone: dit, width: 32, depth: 3, heads: 2, patch_size: 2}
diffusion: {formulation: rf, time_sampling: logit_normal, t_max: 1.0}
train: {global_batch: 16, optimizer: adamw, lr: 1.0e-3, warmup_epochs: 0, precision: fp32}
"""


@pytest.fixture
def recipe(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(RECIPE)
    return p


@pytest.mark.slow
def test_reports_the_argmin(recipe, tmp_path):
    r = run_cli("profile-layers", recipe, "--candidates", "1-2", "--steps", "4", "--run-dir", tmp_path / "runs",
                "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["losses"]) == {"1", "2"} and out["best"] == min(out["losses"], key=out["losses"].get)
    assert (tmp_path / "runs" / "loss_curves.png").stat().st_size > 0
    for name in ("baseline", "layer-1", "layer-2"):  # identical data order and draws: same first loss
        assert (tmp_path / "runs" / name / "metrics.jsonl").is_file()
    first = {n: json.loads((tmp_path / "runs" / n / "metrics.jsonl").read_text().splitlines()[0])["loss"]
             for n in ("baseline", "layer-1", "layer-2")}
    assert len(set(first.values())) == 1  # P = 0 at init: every run starts as the baseline
    assert out["losses"]["1"] == pytest.approx(window_mean(
        [json.loads(x)["loss"] for x in (tmp_path / "runs" / "layer-1" / "metrics.jsonl").read_text().splitlines()],
        0.25))


@pytest.mark.parametrize("args, fragment", [
    (["--candidates", "2-1"], "inverted layer range '2-1'"),
    # depth 3: blocks 1-3 are tappable, the last cannot self-condition, so the list offers only 1, 2
    (["--candidates", "1-7"], "unknown layer '3' for dit; valid: 1, 2"),
    (["--candidates", "3"], "unknown layer '3' for dit; valid: 1, 2"),
])
@pytest.mark.slow
def test_bad_candidates_exit_2(recipe, tmp_path, args, fragment):
    r = run_cli("profile-layers", recipe, *args, "--steps", "2", "--run-dir", tmp_path / "x")
    assert r.returncode == 2 and fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_backbone_without_selfcond_layer_exits_2(tmp_path):
    r = run_cli("profile-layers", "cifar10_ddpm_uvit", "--candidates", "1", "--steps", "2", "--run-dir", tmp_path / "x")
    assert r.returncode == 2 and "uses uvit" in r.stderr


def test_window_mean():
    assert window_mean([4.0, 3.0, 2.0, 1.0], 0.5) == 1.5 and window_mean([5.0], 0.1) == 5.0


def test_contrastive_recipe_without_its_layer_is_refused_before_any_run(tmp_path):
    # contrastive.layer unset follows the self-conditioning layer; the baseline run has none, so the recipe's
    # own check would stop the baseline mid-profile with a message about the recipe, not about profiling
    from conftest import cli_inprocess

    r = cli_inprocess("profile-layers", "cifar10_edm_ddpm_sc_aug_cl", "--candidates", "out_6,out_7", "--steps", "2",
                      "--run-dir", tmp_path / "x")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.output
    assert "profile-layers" in lines[0] and "--set contrastive.layer=" in lines[0]
    assert not (tmp_path / "x").exists()
