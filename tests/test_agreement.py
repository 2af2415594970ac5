"""Many processes decide together, and one run folder has one writer (issue 21).

Fast checks of each decision in one process (a fake reduction stands in for the other ranks, threads
for racing processes); the slow ones start real processes: three `train`s racing for one new folder,
and a chain of faults injected into one rank of `torchrun --nproc_per_node 2` (gloo) runs, each
stopping every rank with one message, each re-run resuming exactly (training/faults.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY

HELPERS = Path(__file__).resolve().parent / "mp_helpers"


# ------------------------------------------------------------------------------------------------
# One writer per run folder (training/runlock.py)
# ------------------------------------------------------------------------------------------------


def test_a_refused_train_leaves_the_new_folder_to_its_holder(tmp_path, monkeypatch):
    """Before: B looked first (no folder), A created and locked it, B was refused and removed the still
    empty folder: A held a lock on a deleted folder, and a third `train` C got "the" lock too."""
    from ddaepp_cli.errors import UsageError
    from ddaepp_cli.training.runlock import run_lock

    run = tmp_path / "new"
    real_exists = Path.exists
    b_looked, a_locked = threading.Event(), threading.Event()

    def exists(self, *a, **k):
        out = real_exists(self, *a, **k)
        if self == run and threading.current_thread().name == "B" and not b_looked.is_set():
            b_looked.set()
            a_locked.wait(10)  # A creates and locks the folder between B's look and B's lock
        return out

    monkeypatch.setattr(Path, "exists", exists)
    refusals = []

    def b():
        try:
            with run_lock(run):
                refusals.append(None)
        except UsageError as e:
            refusals.append(str(e))

    t = threading.Thread(target=b, name="B")
    t.start()
    assert b_looked.wait(10)
    with run_lock(run):  # A
        a_locked.set()
        t.join(10)
        assert refusals and "in use" in refusals[0]
        assert run.is_dir()  # B did not remove the holder's folder
        with pytest.raises(UsageError, match="in use"):  # C
            with run_lock(run):
                pass
    assert not real_exists(run)  # the holder removes the folder it made and left empty


def test_a_lock_taken_on_a_removed_folder_is_taken_again(tmp_path, monkeypatch):
    """D opens the folder, the holder A finishes (removing its empty folder), then D locks: D must lock
    the folder the path names now, not the deleted one (else E could lock a new folder beside it)."""
    from ddaepp_cli.errors import UsageError
    from ddaepp_cli.training import runlock

    run = tmp_path / "new"
    a = runlock.run_lock(run)
    a.__enter__()
    real = runlock._lock

    def late(fd, path):
        monkeypatch.setattr(runlock, "_lock", real)
        a.__exit__(None, None, None)  # between D's open and D's lock
        return real(fd, path)

    monkeypatch.setattr(runlock, "_lock", late)
    with runlock.run_lock(run):  # D
        assert run.is_dir()
        with pytest.raises(UsageError, match="in use"):  # E
            with runlock.run_lock(run):
                pass


def _train_cmd(recipe: Path, run: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "ddaepp_cli", "train", str(recipe), "--run-dir", str(run), *map(str, extra)]


@pytest.mark.slow
def test_three_trains_race_for_one_new_folder(tmp_path):
    """Three `train`s on one new folder, three times: exactly one trains (exit 0), two exit 2 naming the
    holder, and the folder holds one run's files (each step logged once, one checkpoint). Attempt 0 starts
    all three at once; attempts 1 and 2 start two at once and the third as soon as one was refused — the
    order that lost the lock: the refused one removed the new, still empty folder, and the third locked a
    new one beside the holder's. DDAEPP_TEST_LOCK_DELAY (runlock.py) makes the two look at the folder
    before either locks it; DDAEPP_TEST_STEP_DELAY keeps the holder training while the third starts."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY.replace("channels: 64", "channels: 32").replace("ch_mults: [1, 2]", "ch_mults: [1]")
                      .replace("attn_resolutions: [4]", "attn_resolutions: []"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DDAEPP_TEST_LOCK_DELAY="1.5",
               DDAEPP_TEST_STEP_DELAY="3")

    def start(run):
        return subprocess.Popen(_train_cmd(recipe, run, "--max-steps", 3), cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    for attempt in range(3):
        run = tmp_path / f"run{attempt}"
        procs = [start(run), start(run)]
        if attempt == 0:
            procs.append(start(run))
        else:
            deadline = time.time() + 240
            while all(p.poll() is None for p in procs):
                assert time.time() < deadline
                time.sleep(0.05)
            procs.append(start(run))
        outs = [p.communicate(timeout=300)[1] for p in procs]
        codes = [p.returncode for p in procs]
        assert sorted(codes) == [0, 2, 2], (attempt, codes, outs)
        for code, err in zip(codes, outs):
            if code == 2:
                assert "in use" in err and "Traceback" not in err, err
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3], steps  # one writer
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000003"]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("run")) == \
            [f"run{k}" for k in range(attempt + 1)]


# ------------------------------------------------------------------------------------------------
# Files: --checkpoints all on a displaced checkpoint, exclusive evaluation records
# ------------------------------------------------------------------------------------------------


def test_checkpoints_all_reports_the_step_of_a_displaced_checkpoint(tmp_path):
    """Before: `.old-step-0000020-4242` (a re-save that crashed between its renames) was reported as step 4242."""
    from ddaepp_cli.eval.evalrecord import checkpoint_step
    from ddaepp_cli.eval.latentprobe import over_checkpoints

    root = tmp_path / "run" / "checkpoints"
    for name in ("step-0000010", ".old-step-0000020-4242"):
        (root / name).mkdir(parents=True)
    scores = iter((0.5, 0.7))
    result = over_checkpoints(str(tmp_path / "run"), "all", lambda c: {"score": next(scores)},
                              lambda r: r["score"], "probe")
    assert [row["step"] for row in result["checkpoints"]] == [10, 20]
    assert result["best"]["step"] == 20
    assert checkpoint_step(root / ".old-step-0000020-4242") == 20  # what eval records store as the step


def test_new_file_names_never_replace_a_racing_writers_file(tmp_path, monkeypatch):
    """Where hard links fail, the old fallback checked that the name was free and then renamed over it:
    a writer taking the name in between lost its file. Here one takes it inside our rename."""
    from ddaepp_cli import atomic

    def no_links(*a, **k):
        raise PermissionError(1, "Operation not permitted")

    real_replace, real_pid, raced = os.replace, os.getpid, []

    def replace(src, dst):
        if not raced:  # another process (another PID: another temporary name) writes the same record
            raced.append(1)
            monkeypatch.setattr(atomic.os, "getpid", lambda: real_pid() + 1)
            raced.append(atomic.write_text_new(tmp_path / "eval.json", "theirs"))
            monkeypatch.setattr(atomic.os, "getpid", real_pid)
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "link", no_links)
    monkeypatch.setattr(atomic.os, "replace", replace)
    mine = atomic.write_text_new(tmp_path / "eval.json", "mine")
    theirs = raced[1]
    assert mine != theirs and mine.read_text() == "mine" and theirs.read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval-2.json", "eval.json"]  # no temporary left


# ------------------------------------------------------------------------------------------------
# The step's decisions are every rank's (training/step.py)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_state():
    """A tiny UNet TrainState with the fp16 gradient scaler on the CPU (fp32 compute), one batch."""
    from ddaepp_cli.recipe import recipe_from_dict
    from ddaepp_cli.training.state import TrainState
    from ddaepp_cli.training.train import make_plan
    import yaml

    rec = recipe_from_dict(yaml.safe_load(TINY.replace("channels: 64", "channels: 32")))
    ts = TrainState(rec, device=torch.device("cpu"))
    ts.scaler = torch.amp.GradScaler("cpu")  # what DDAEPP_FAULT_FP16_SCALER does in train.py
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (32,), generator=g)
    return ts, make_plan(rec, 1, 1000), x, y


def _other_rank(bad: tuple[float, float]):
    """A reduce_mean over this rank and one other whose (gradients, loss) non-finite flags are `bad`."""
    return lambda flags: (flags + torch.tensor(bad)) / 2


def test_a_nan_loss_on_another_rank_is_no_overflow_here(fp16_state):
    """Before: a rank whose own loss was finite called the step an fp16 overflow (not counted towards
    train.max_nonfinite) while the rank with the NaN loss counted it: that rank alone stopped, the others
    hung in their next collective. Gradients are all-reduced, so here they overflow too."""
    from ddaepp_cli.training.faults import Faults
    from ddaepp_cli.training.step import train_step

    ts, plan, x, y = fp16_state
    ts.reduce_mean = _other_rank((1.0, 1.0))  # its loss was NaN (and so its gradients)
    step = ts.step
    r = train_step(ts, x, y, plan=plan, warmup_steps=0, faults=Faults(overflow=frozenset({step})))
    assert torch.isfinite(r.loss)  # this rank's loss was fine
    assert not r.applied and not r.overflow  # counted as non-finite, as on the other rank


def test_an_overflow_is_skipped_uncounted_and_backs_the_scale_off(fp16_state):
    """fp16's overflow decision on a CPU (the DDAEPP_FAULT_OVERFLOW_STEPS hook): infinite gradients with a
    finite loss on every rank skip the step without counting it, halve the scale, and training goes on."""
    from ddaepp_cli.training.faults import Faults
    from ddaepp_cli.training.step import train_step

    ts, plan, x, y = fp16_state
    ts.reduce_mean = _other_rank((1.0, 0.0))  # the other rank's gradients overflowed too, its loss finite
    scale, before = ts.scaler.get_scale(), [p.detach().clone() for p in ts.model.parameters()]
    r = train_step(ts, x, y, plan=plan, warmup_steps=0, faults=Faults(overflow=frozenset({ts.step})))
    assert not r.applied and r.overflow and ts.scaler.get_scale() == scale / 2
    assert all(torch.equal(a, b) for a, b in zip(before, ts.model.parameters()))
    ts.reduce_mean = _other_rank((0.0, 0.0))
    r = train_step(ts, x, y, plan=plan, warmup_steps=0)
    assert r.applied and not r.overflow
    assert any(not torch.equal(a, b) for a, b in zip(before, ts.model.parameters()))


# ------------------------------------------------------------------------------------------------
# One rank fails: every rank stops, with one line; the re-run resumes exactly (torchrun, gloo)
# ------------------------------------------------------------------------------------------------


def test_the_first_failure_published_is_every_processs_line(monkeypatch, capsys):
    """failures.py's protocol on an in-memory store: the first published (code, line) wins; a process that
    fails later prints that one, and the publisher waits until every process has printed it."""
    from torch.distributed import HashStore

    from ddaepp_cli import failures

    store = HashStore()
    first, later = failures._Channel(store, 0, 2), failures._Channel(store, 1, 2)
    assert first.publish(1, "error: rank 0 failed") == (1, "error: rank 0 failed")
    monkeypatch.setattr(failures, "_channel", later)
    monkeypatch.setattr(failures, "world_size", lambda: 2)
    monkeypatch.setattr(failures.signal, "signal", lambda *a: None)  # keep pytest's own handlers
    acked = threading.Timer(0.3, lambda: first.ack_and_wait(False))  # rank 0 prints it 0.3 s later
    acked.start()
    t0 = time.monotonic()
    assert failures.stop_together(2, "error: rank 1 failed too") == (1, "error: rank 0 failed")
    assert 0.25 < time.monotonic() - t0 < failures.ACK_WAIT_S  # waited for rank 0's acknowledgement
    assert capsys.readouterr().err == "error: rank 0 failed\n"
    assert int(store.add("acks", 0)) == 2

STEPS = 14
CHAIN = [  # run k resumes what run k-1 left; rank 1 alone gets each fault (training/faults.py; steps from 0)
    # an fp16 overflow at step 0 (skipped, not counted), then NaN losses past train.max_nonfinite = 2
    ("nan", {"DDAEPP_FAULT_OVERFLOW_STEPS": "0", "DDAEPP_FAULT_NAN_STEPS": "4,5"}, 1,
     "error: 2 non-finite losses/gradients in a row at step 6; stopped; the last good checkpoint", 3),
    # resumed from a displaced checkpoint (rank 1 loads it 2 s late), then an exception between forward and
    # backward: rank 0 waits inside the gradient all-reduce
    ("raise", {"DDAEPP_FAULT_RESUME_DELAY": "2", "DDAEPP_FAULT_RAISE_STEPS": "7"}, 1,
     "error: rank 1 failed after step 7: RuntimeError: injected fault at step 7", 6),
    ("kill", {"DDAEPP_FAULT_KILL_STEPS": "10"}, 1, "error: lost contact with another process after step 10", 9),
    ("signal", {"DDAEPP_FAULT_SIGNAL_STEPS": "10"}, 130, "interrupted at step 11; checkpoint written", 11),
]


def _torchrun_train(out: Path, recipe: Path, run: Path, faults: dict) -> tuple[dict, dict]:
    """One `torchrun --nproc_per_node 2 … train` launch through mp_helpers/rank_exit.py: each rank's
    {"code", "end"} and stderr."""
    from test_multiprocess import torchrun_cmd

    out.mkdir()
    cmd, env = torchrun_cmd(out, "train", recipe, "--run-dir", run, "--max-steps", STEPS,
                            script=HELPERS / "rank_exit.py")
    env.update({"DDAEPP_FAULT_FP16_SCALER": "1", "DDAEPP_FAULT_RANKS": "1", **faults})
    subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    ends = {k: json.loads((out / f"exit-{k}.json").read_text()) for k in (0, 1)}
    return ends, {k: (out / f"stderr-{k}.txt").read_text() for k in (0, 1)}


def _losses(run: Path) -> dict[int, float | None]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_one_rank_fails_every_rank_stops_with_one_line_and_resumes(tmp_path):
    """Rank 1 alone: NaN losses (under the fp16 scaler), an exception, SIGKILL, SIGTERM. Each time every
    surviving rank ends within seconds with one and the same line and exit code, the last good checkpoint
    is the one the line names, and the next run resumes from it, reproducing the logged losses bitwise.
    The second run also resumes from a displaced checkpoint (`.old-step-N-PID`, a re-save that crashed
    between its renames) that rank 1 loads late: rank 0 puts it back before any rank resolves it."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY.replace("channels: 64", "channels: 32").replace("ch_mults: [1, 2]", "ch_mults: [1]")
                      .replace("attn_resolutions: [4]", "attn_resolutions: []")
                      .replace("checkpoint_every: 4\n  keep_last: 2", "checkpoint_every: 3\n  keep_last: 10\n"
                                                                       "  max_nonfinite: 2"))
    run, logged = tmp_path / "run", []
    for k, (name, faults, code, line, ckpt) in enumerate(CHAIN):
        if name == "raise":
            (run / "checkpoints" / "step-0000003").rename(run / "checkpoints" / ".old-step-0000003-4242")
        ends, errs = _torchrun_train(tmp_path / name, recipe, run, faults)
        alive = [r for r in (0, 1) if ends[r]["code"] != -9]
        assert [ends[r]["code"] for r in alive] == [code] * len(alive), (name, ends, errs)
        assert alive == ([0] if name == "kill" else [0, 1]) and ends[1]["code"] in (code, -9), (name, ends)
        finals = {errs[r].strip().splitlines()[-1] for r in alive}
        assert len(finals) == 1 and next(iter(finals)).startswith(line), (name, errs)
        ckpt_dir = run / "checkpoints" / f"step-{ckpt:07d}"
        if code == 1:
            assert f"the last good checkpoint {ckpt_dir} is kept" in next(iter(finals))
        for r in alive:  # one message each, no stray traceback (but the failing rank's own)
            assert sum(ln.startswith(("error:", "interrupted")) for ln in errs[r].splitlines()) == 1, errs[r]
            assert ("Traceback" in errs[r]) == (name == "raise" and r == 1), errs[r]
        assert max(e["end"] for e in ends.values()) - min(e["end"] for e in ends.values()) < 10, (name, ends)
        assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))[-1] == \
            ckpt_dir.name
        assert {p.name for p in ckpt_dir.iterdir()} == {"model.safetensors", "ema.safetensors", "state.pt",
                                                        "recipe.yaml"}
        if k:
            previous = CHAIN[k - 1][4]
            assert f"from step {previous} (step-{previous:07d})" in " ".join(errs[0].split()), errs[0]  # resumed there
        logged.append(_losses(run))
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".old")]  # put back, once

    ends, errs = _torchrun_train(tmp_path / "last", recipe, run, {})
    assert [ends[r]["code"] for r in (0, 1)] == [0, 0], errs
    final = _losses(run)
    assert sorted(final) == list(range(1, STEPS + 1))  # each step logged once
    for before in logged:  # every loss logged before a fault, logged again bitwise after resuming
        assert {s: v for s, v in before.items() if v is not None and s < max(before)} == \
            {s: final[s] for s, v in before.items() if v is not None and s < max(before)}
    assert final[1] is None and all(v is not None for s, v in final.items() if s > 1)  # step 1: the overflow


@pytest.mark.slow
def test_ranks_take_rank_zeros_view_of_files(tmp_path):
    """Checkpoint lists (`--checkpoints`, the latest checkpoint) and the data-set size are read by every
    rank; with a training run writing into the folder (or a cache rewritten) the ranks could see different
    things. Rank 0's list is every rank's; different data-set sizes are refused by every rank in one line
    (tests/mp_helpers/rank_views.py)."""
    from test_multiprocess import torchrun

    run = tmp_path / "run"
    for name in ("step-0000010", ".old-step-0000020-4242"):
        (run / "checkpoints" / name).mkdir(parents=True)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY.replace("channels: 64", "channels: 32").replace("ch_mults: [1, 2]", "ch_mults: [1]")
                      .replace("attn_resolutions: [4]", "attn_resolutions: []"))
    out = tmp_path / "out"
    out.mkdir()
    r = torchrun(run, recipe, out, script=HELPERS / "rank_views.py")
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = (json.loads((out / f"rank-{k}.json").read_text()) for k in (0, 1))
    assert a["listed"] == b["listed"] == ["step-0000010", ".old-step-0000020-4242"]  # rank 0's list
    assert a["latest"] == b["latest"] == "step-0000030"
    assert a["train_error"] == b["train_error"] and "data sets of different sizes (1442, 1412 images" in a["train_error"]
    assert not (out / "train-run" / "checkpoints").exists()  # refused before training


@pytest.mark.slow
def test_a_finished_command_leaves_no_process_group_behind(tmp_path):
    """`ddaepp sample` under torchrun returns with the process group destroyed on every rank (after a barrier):
    the interpreter's exit then tears down no live gloo threads, whose teardown can abort a process that has
    done its work ("terminate called without an active exception", exit -6; seen once in CI on
    tests/mp_helpers/rank_views.py, which ends with the group alive)."""
    from conftest import run_cli
    from test_multiprocess import torchrun

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY.replace("channels: 64", "channels: 32").replace("ch_mults: [1, 2]", "ch_mults: [1]")
                      .replace("attn_resolutions: [4]", "attn_resolutions: []"))
    r = run_cli("train", recipe, "--run-dir", tmp_path / "run", "--max-steps", "1")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    out.mkdir()
    r = torchrun(out, "sample", tmp_path / "run", "--seeds", "0-3", "--out", tmp_path / "s",
                 script=HELPERS / "close_at_exit.py")
    assert r.returncode == 0, r.stdout + r.stderr
    ranks = [json.loads((out / f"rank-{k}.json").read_text()) for k in (0, 1)]
    assert [(x["code"], x["initialized"]) for x in ranks] == [(0, False), (0, False)], ranks
    assert len(list((tmp_path / "s").glob("*.png"))) == 5  # 4 seeds and the grid
