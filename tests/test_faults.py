"""Faults during checkpoint writes (issue 7.2): a SIGKILL in the middle of a save, and a save that
cannot be written (file-size limit: works as root, where chmod does not block writes)."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY, run_cli


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def ckpt_names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    p = d / "tiny.yaml"
    p.write_text(TINY)
    return p


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_keeps_previous_and_resumes_exactly(recipe, tmp_path):
    ref = tmp_path / "ref"
    r = run_cli("train", recipe, "--run-dir", ref, "--max-steps", 8)
    assert r.returncode == 0, r.stderr

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ddaepp_cli", "train", str(recipe), "--run-dir", str(run), "--max-steps", "8"]
    # DDAEPP_TEST_SAVE_DELAY (checkpoint.py test hook) pauses every save after model.safetensors is written
    env = dict(os.environ, OMP_NUM_THREADS="1", DDAEPP_TEST_SAVE_DELAY="1.5")
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    tmp_dirs = []
    while not tmp_dirs:
        assert p.poll() is None, p.stderr.read().decode()
        assert time.time() < deadline
        if (run / "checkpoints").is_dir():
            tmp_dirs = [t.parent for t in (run / "checkpoints").glob(".tmp-step-0000008-*/model.safetensors")]
        time.sleep(0.02)
    time.sleep(0.3)  # inside the DDAEPP_TEST_SAVE_DELAY pause: ema/state/recipe not yet written
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stderr.close()
    assert ckpt_names(run) == [".tmp-step-0000008-" + tmp_dirs[0].name.rsplit("-", 1)[1], "step-0000004"]

    # the previous checkpoint is intact and loadable
    s = run_cli("sample", run, "--seeds", "0-1", "--out", tmp_path / "s", "--format", "npz")
    assert s.returncode == 0, s.stderr
    assert np.load(tmp_path / "s" / "samples.npz")["arr_0"].shape == (2, 8, 8, 1)
    from ddaepp_cli.checkpoint import list_checkpoints
    assert [s for s, _ in list_checkpoints(run)] == [4]  # the temporary folder is not a checkpoint

    # re-running resumes from step 4 and reproduces the uninterrupted losses bitwise
    r = run_cli("train", recipe, "--run-dir", run, "--max-steps", 8)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    assert losses(run) == losses(ref)
    assert ckpt_names(run) == ["step-0000004", "step-0000008"]  # the killed save's leftovers are gone


def _limit_file_size():
    # Files may not grow past 64 KiB: a checkpoint write fails with EFBIG (CPython ignores SIGXFSZ),
    # like a full disk; metrics.jsonl and meta.json stay far below the limit.
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


@pytest.mark.slow
def test_unwritable_checkpoint_gives_one_clear_line_and_keeps_old_checkpoints(recipe, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", recipe, "--run-dir", run, "--max-steps", 4)
    assert r.returncode == 0, r.stderr
    before = ckpt_names(run)
    assert before == ["step-0000004"]
    sizes = {p.name: p.stat().st_size for p in (run / "checkpoints" / "step-0000004").iterdir()}
    assert sizes["model.safetensors"] > 64 * 1024  # the limit really bites on a save

    r = run_cli("train", recipe, "--run-dir", run, "--max-steps", 8, preexec_fn=_limit_file_size)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "could not write checkpoint" in errors[0] and "step-0000008" in errors[0], r.stderr
    assert ckpt_names(run) == before  # no half-written folder, the old checkpoint kept
    assert {p.name: p.stat().st_size for p in (run / "checkpoints" / "step-0000004").iterdir()} == sizes


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_checkpoints_folder(recipe, tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", recipe, "--run-dir", run, "--max-steps", 4).returncode == 0
    os.chmod(run / "checkpoints", 0o555)
    try:
        r = run_cli("train", recipe, "--run-dir", run, "--max-steps", 8)
    finally:
        os.chmod(run / "checkpoints", 0o755)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert sum(ln.startswith("error: ") for ln in r.stderr.splitlines()) == 1
    assert ckpt_names(run) == ["step-0000004"]
