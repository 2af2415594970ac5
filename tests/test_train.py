"""Training end to end on tiny digits: run folder, exact resume after SIGKILL, signals, guards."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_cli


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 12-step run, shared by the tests below."""
    from conftest import TINY

    d = tmp_path_factory.mktemp("ref")
    recipe = d / "tiny.yaml"
    recipe.write_text(TINY)
    r = run_cli("train", recipe, "--run-dir", d / "run", "--max-steps", 12, "--json")
    assert r.returncode == 0, r.stderr
    return recipe, d / "run", json.loads(r.stdout)


def test_run_directory_layout(reference_run):
    recipe, run, result = reference_run
    assert result["step"] == 12
    assert (run / "recipe.yaml").is_file() and (run / "meta.json").is_file()
    meta = json.loads((run / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["ddaepp"]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-0000008", "step-0000012"]  # keep_last 2 of 4, 8, 12
    c = run / "checkpoints" / "step-0000012"
    assert {p.name for p in c.iterdir()} == {"model.safetensors", "ema.safetensors", "state.pt", "recipe.yaml"}
    steps = losses(run)
    assert sorted(steps) == list(range(1, 13))
    assert all(np.isfinite(v) for v in steps.values())
    from safetensors import safe_open
    with safe_open(str(c / "ema.safetensors"), "pt") as f:
        assert "diffusion:" in f.metadata()["recipe"]  # self-describing weights


def test_info_summarises_the_run(reference_run):
    recipe, run, _ = reference_run
    r = run_cli("info", run, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["name"] == "tiny" and out["backbone"] == "ddpm" and out["formulation"] == "ddpm"
    assert [c["step"] for c in out["checkpoints"]] == [8, 12]
    assert out["last_metrics"]["step"] == 12
    r = run_cli("info", run)
    assert r.returncode == 0, r.stderr
    assert "step 8, step 12" in r.stdout and "self-conditioning" in r.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.stdout)  # the human form is a table, not JSON


@pytest.mark.slow
def test_sigkill_then_rerun_gives_identical_losses(reference_run, tmp_path):
    recipe, ref_run, _ = reference_run
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ddaepp_cli", "train", str(recipe), "--run-dir", str(run), "--max-steps", "12"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DDAEPP_TEST_STEP_DELAY="0.3")
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step-0000004").exists():
        assert p.poll() is None, p.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # in the middle of the next checkpoint interval
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stderr.close()
    done = losses(run)
    assert max(done) < 12  # it really was cut short
    r = run_cli("train", recipe, "--run-dir", run, "--max-steps", 12)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    assert losses(run) == losses(ref_run)  # bitwise: JSON floats round-trip exactly


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_writes_checkpoint_exits_130_and_resumes_exactly(reference_run, tmp_path, sig):
    recipe, ref_run, _ = reference_run
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ddaepp_cli", "train", str(recipe), "--run-dir", str(run), "--max-steps", "12"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DDAEPP_TEST_STEP_DELAY="0.3")
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 5:
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.05)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    last = max(losses(run))
    assert last < 12  # it really stopped early
    assert (run / "checkpoints" / f"step-{last:07d}").is_dir()  # a checkpoint at the step it stopped
    assert "interrupted at step" in err and "Traceback" not in err
    r = run_cli("train", recipe, "--run-dir", run, "--max-steps", 12)
    assert r.returncode == 0, r.stderr
    assert losses(run) == losses(ref_run)  # bitwise, as if never interrupted


@pytest.mark.slow
def test_rerun_with_another_recipe_is_refused(reference_run):
    recipe, run, _ = reference_run
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    r = run_cli("train", recipe, "--run-dir", run, "--set", "train.lr=5e-4")
    assert r.returncode == 2 and "train.lr: 0.001 -> 0.0005" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


@pytest.mark.slow
def test_foreign_nonempty_folder_is_refused(tiny_recipe, tmp_path):
    d = tmp_path / "stuff"
    d.mkdir()
    (d / "thesis.tex").write_text("precious")
    r = run_cli("train", tiny_recipe, "--run-dir", d, "--max-steps", 2)
    assert r.returncode == 2 and "holds no ddaepp run" in r.stderr
    assert [p.name for p in d.iterdir()] == ["thesis.tex"]


@pytest.mark.slow
def test_truncated_checkpoint_is_a_clear_error(reference_run, tmp_path):
    import shutil

    _, ref_run, _ = reference_run
    run = tmp_path / "copy"
    shutil.copytree(ref_run, run)
    f = run / "checkpoints" / "step-0000012" / "ema.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = run_cli("sample", run, "--n", 2, "--out", tmp_path / "s")
    assert r.returncode == 2 and "truncated" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s").exists()
    s = run / "checkpoints" / "step-0000012" / "state.pt"
    s.write_bytes(s.read_bytes()[:100])
    r = run_cli("train", run / "recipe.yaml", "--run-dir", run, "--max-steps", 16)
    assert r.returncode == 2 and "state.pt" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_and_counted(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", tiny_recipe, "--run-dir", run, "--max-steps", 6, env={"DDAEPP_FAULT_NAN_STEPS": "2,3"})
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["nonfinite_skipped"] == 2
    assert all(rec["loss"] is None or np.isfinite(rec["loss"]) for rec in recs)
    # too many in a row: stop with a clear message, the earlier checkpoint stays
    run2 = tmp_path / "run2"
    r = run_cli("train", tiny_recipe, "--run-dir", run2, "--max-steps", 30, "--set", "train.max_nonfinite=3",
                env={"DDAEPP_FAULT_NAN_STEPS": "5,6,7,8"})
    assert r.returncode == 1 and "non-finite" in r.stderr and "Traceback" not in r.stderr
    assert [p.name for p in (run2 / "checkpoints").iterdir()] == ["step-0000004"]


@pytest.mark.slow
def test_sample_is_independent_of_batch_size(reference_run, tmp_path):
    _, run, _ = reference_run
    a, b = tmp_path / "a", tmp_path / "b"
    r1 = run_cli("sample", run, "--seeds", "3-9", "--batch-size", 7, "--out", a, "--json")
    r2 = run_cli("sample", run, "--seeds", "3-9", "--batch-size", 2, "--out", b, "--format", "npz,png")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    out = json.loads(r1.stdout)
    assert out["n"] == 7 and out["sampler"] == "ddim" and out["weights"] == "ema"
    x, y = np.load(a / "samples.npz")["arr_0"], np.load(b / "samples.npz")["arr_0"]
    assert x.shape == (7, 8, 8, 1) and x.dtype == np.uint8
    assert np.array_equal(x, y)
    assert np.array_equal(np.asarray(Image.open(a / "000005.png")), x[2, :, :, 0])
    assert (a / "grid.png").is_file() and (a / "protocol.json").is_file()
    # an existing, non-empty output folder is never overwritten
    r3 = run_cli("sample", run, "--n", 2, "--out", a)
    assert r3.returncode == 2 and "not empty" in r3.stderr
    assert np.array_equal(np.load(a / "samples.npz")["arr_0"], x)
