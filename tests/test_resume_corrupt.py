"""Resuming a run whose latest checkpoint is damaged (issue 23, deliver 3): one line naming the problem, the
newest intact earlier checkpoint and the exact `--resume-from STEP` command; that command resumes exactly;
the newer checkpoint is moved aside (never deleted) and never read, counted or pruned again.

In-process (typer's CliRunner) on one tiny reference run copied per test."""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, cli_inprocess


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` with its bytes and modification time: what a refusal must leave as it is."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error(r) -> str:
    text = r.stderr or r.output
    assert r.returncode == 2, text
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    return lines[0]


def truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted 12-step run of the tiny recipe: checkpoints at steps 8 and 12 (keep_last 2)."""
    d = tmp_path_factory.mktemp("resume_corrupt")
    recipe = d / "tiny.yaml"
    recipe.write_text(TINY)
    r = cli_inprocess("train", recipe, "--run-dir", d / "ref", "--max-steps", 12)
    assert r.returncode == 0, r.output
    assert sorted(p.name for p in (d / "ref" / "checkpoints").iterdir()) == ["step-0000008", "step-0000012"]
    return recipe, d / "ref"


@pytest.fixture
def run(ref, tmp_path) -> Path:
    shutil.copytree(ref[1], tmp_path / "run")
    return tmp_path / "run"


def test_truncated_latest_names_earlier_and_resume_from_continues_exactly(ref, run, monkeypatch):
    recipe, ref_run = ref
    monkeypatch.chdir(run.parent)  # the command in the message is run as printed, from where it was typed
    truncate(run / "checkpoints" / "step-0000012" / "ema.safetensors")
    before = snapshot(run)
    line = one_error(cli_inprocess("train", recipe, "--run-dir", "run", "--max-steps", 12))
    assert "step-0000012 is corrupt: ema.safetensors is truncated" in line, line
    assert "the newest intact checkpoint is step 8" in line, line
    assert snapshot(run) == before  # nothing deleted, moved or rewritten by the refusal

    command = line.split("`")[1]
    assert command == f"ddaepp train {recipe} --run-dir run --max-steps 12 --resume-from 8"
    words = shlex.split(command)
    r = cli_inprocess(*words[1:])  # `ddaepp` is the app itself
    assert r.returncode == 0, r.output
    assert "moved the checkpoints after step 8 aside" in " ".join(r.output.split()), r.output

    # bitwise the uninterrupted run from step 8 on: its logged losses and its step-12 weights
    assert losses(run) == losses(ref_run)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(run / "checkpoints" / "step-0000012" / name), load_file(ref_run / "checkpoints" /
                                                                                  "step-0000012" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the damaged checkpoint is kept, byte for byte, under a name no reader takes for a checkpoint
    aside = run / "checkpoints" / "set-aside-step-0000012"
    assert {f"checkpoints/set-aside-step-0000012/{p.name}": before[f"checkpoints/step-0000012/{p.name}"][0]
            for p in aside.iterdir()} == {k.replace("step-0000012", "set-aside-step-0000012"): v[0]
                                          for k, v in before.items() if "step-0000012" in k}
    from ddaepp_cli.checkpoint import list_checkpoints

    assert [s for s, _ in list_checkpoints(run)] == [8, 12]
    # later saves and keep_last (2) ignore it: step 8 is pruned, the set-aside folder stays
    r = cli_inprocess("train", recipe, "--run-dir", run, "--max-steps", 16)
    assert r.returncode == 0, r.output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        ["set-aside-step-0000012", "step-0000012", "step-0000016"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_corrupt_state_says_so_in_one_line(ref, run, damage):
    recipe, _ = ref
    state = run / "checkpoints" / "step-0000012" / "state.pt"
    if damage == "garbage":
        state.write_bytes(os.urandom(4096))
    elif damage == "truncated":
        truncate(state)
    else:
        state.unlink()
    before = snapshot(run)
    line = one_error(cli_inprocess("train", recipe, "--run-dir", run, "--max-steps", 16))
    want = {"garbage": "state.pt is not a training state written by ddaepp",
            "truncated": "state.pt is truncated", "missing": "state.pt is missing"}[damage]
    assert f"step-0000012 is corrupt: {want}" in line, line
    assert "Errno" not in line and "weights_only" not in line
    assert f"--run-dir {run} --max-steps 16 --resume-from 8`" in line, line
    assert snapshot(run) == before


def test_state_damaged_inside_a_complete_archive(ref, run):
    """The zip archive is complete (its structure passes) but the pickle inside is not: found on loading,
    with the same answer."""
    recipe, _ = ref
    state = run / "checkpoints" / "step-0000012" / "state.pt"
    data = bytearray(state.read_bytes())
    data[100:164] = b"\xff" * 64  # the start of data.pkl
    state.write_bytes(bytes(data))
    from ddaepp_cli.checkpoint import checkpoint_problem

    assert checkpoint_problem(state.parent) is None
    before = snapshot(run)
    line = one_error(cli_inprocess("train", recipe, "--run-dir", run, "--max-steps", 16))
    assert "step-0000012 is corrupt: state.pt cannot be loaded" in line, line
    assert "the newest intact checkpoint is step 8" in line and "--resume-from 8`" in line, line
    assert snapshot(run) == before


def test_resume_from_a_step_without_an_intact_checkpoint_lists_the_intact_steps(ref, run, tmp_path):
    recipe, _ = ref
    before = snapshot(run)
    line = one_error(cli_inprocess("train", recipe, "--run-dir", run, "--resume-from", 5))
    assert f"--resume-from 5: {run} has no checkpoint at step 5; intact checkpoints: steps 8, 12" in line, line
    (run / "checkpoints" / "step-0000012" / "model.safetensors").unlink()
    before = snapshot(run)
    line = one_error(cli_inprocess("train", recipe, "--run-dir", run, "--resume-from", 12))
    assert "the checkpoint at step 12 is corrupt: model.safetensors is missing; intact checkpoints: step 8" in line
    assert snapshot(run) == before
    line = one_error(cli_inprocess("train", recipe, "--run-dir", tmp_path / "new", "--resume-from", 4))
    assert "holds no checkpoint to resume from" in line, line
    assert not (tmp_path / "new").exists()


def test_no_intact_earlier_checkpoint(ref, run):
    recipe, _ = ref
    for step in (8, 12):
        truncate(run / "checkpoints" / f"step-{step:07d}" / "model.safetensors")
    line = one_error(cli_inprocess("train", recipe, "--run-dir", run))
    assert "model.safetensors is truncated" in line and "no earlier checkpoint is intact" in line, line


def test_set_aside_names_are_never_checkpoints(tmp_path):
    """Moved aside twice (two roll-backs past step 12): two names, neither listed, counted or pruned."""
    from ddaepp_cli.checkpoint import list_checkpoints, prune_checkpoints, set_aside_checkpoints

    root = tmp_path / "checkpoints"
    for step in (4, 8, 12):
        (root / f"step-{step:07d}").mkdir(parents=True)
    assert set_aside_checkpoints([root / "step-0000012"]) == [root / "set-aside-step-0000012"]
    (root / "step-0000012").mkdir()
    assert set_aside_checkpoints([root / "step-0000012"]) == [root / "set-aside-step-0000012-2"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 8]
    prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["set-aside-step-0000012", "set-aside-step-0000012-2",
                                                     "step-0000008"]


@pytest.mark.slow
def test_two_processes_refuse_together_and_resume_from_earlier(tmp_path):
    """Under `torchrun --nproc_per_node 2` (CPU, gloo): rank 0 checks the checkpoint and decides; every rank
    stops with the same one line; `--resume-from` resumes on both, rank 0 alone moves the newer checkpoint
    aside (once), and the losses after step 4 are logged again bitwise."""
    import subprocess

    from conftest import ROOT
    from test_agreement import HELPERS
    from test_multiprocess import torchrun_cmd

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY.replace("channels: 64", "channels: 32").replace("ch_mults: [1, 2]", "ch_mults: [1]")
                      .replace("attn_resolutions: [4]", "attn_resolutions: []").replace("keep_last: 2", "keep_last: 3"))
    run = tmp_path / "run"

    def launch(name: str, *extra) -> tuple[list[int], list[str]]:
        out = tmp_path / name
        out.mkdir()
        cmd, env = torchrun_cmd(out, "train", recipe, "--run-dir", run, "--max-steps", 8, *extra,
                                script=HELPERS / "rank_exit.py")
        subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        ends = [json.loads((out / f"exit-{k}.json").read_text())["code"] for k in (0, 1)]
        return ends, [(out / f"stderr-{k}.txt").read_text() for k in (0, 1)]

    codes, errs = launch("first")
    assert codes == [0, 0], errs
    first = losses(run)
    truncate(run / "checkpoints" / "step-0000008" / "ema.safetensors")
    before = snapshot(run)
    codes, errs = launch("refused")
    assert codes == [2, 2], errs
    finals = {e.strip().splitlines()[-1] for e in errs}
    assert len(finals) == 1, errs
    line = finals.pop()
    assert "step-0000008 is corrupt: ema.safetensors is truncated" in line and "--resume-from 4`" in line, line
    assert snapshot(run) == before
    codes, errs = launch("resumed", "--resume-from", 4)
    assert codes == [0, 0], errs
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        ["set-aside-step-0000008", "step-0000004", "step-0000008"]
    assert losses(run) == first
