"""What a new user meets first (issue 23): refusals that come before torch is imported, progress that
counts only this session's steps, one wording for Ctrl-C, usage lines without braces, the probe's best
cell with one cell, the dry-run's augmentation multipliers explained, recipe paths as typed, CPU threads
shared among processes, and `ddaepp info RUN --plot`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY, cli_inprocess

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run folder after 4 logged steps (in-process `ddaepp train`)."""
    d = tmp_path_factory.mktemp("first_hour")
    (d / "tiny.yaml").write_text(TINY.replace("ch_mults: [1, 2]", "ch_mults: [1, 1]"))
    r = cli_inprocess("train", d / "tiny.yaml", "--run-dir", d / "run", "--max-steps", "4")
    assert r.returncode == 0, r.output
    return d / "run"


# ------------------------------------------------------------------------------------------------
# Refusals before torch
# ------------------------------------------------------------------------------------------------

# Each refusal runs through `ddaepp_cli.cli.main` in one fresh interpreter that has not imported torch;
# after each, the interpreter reports its exit code, its stderr and whether torch got imported.
_REFUSE = r"""
import contextlib, io, json, sys
from ddaepp_cli.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
    out.append({"argv": argv, "code": code, "stderr": err.getvalue(), "torch": "torch" in sys.modules})
print(json.dumps(out))
"""


def test_refusals_come_before_torch_is_imported(tmp_path):
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty.yaml").write_text("")
    cases = [
        (["probe", "not-a-run"], "no such run or checkpoint: not-a-run"),
        (["probe", str(tmp_path / "not_a_run")], "holds no checkpoint"),
        (["sample", str(tmp_path / "notes.txt"), "--n", "4"], "is not a run folder, checkpoint folder or .safetensors"),
        (["sample", "not-a-run", "--n", "4"], "no such run or checkpoint"),
        (["sample", "not-a-run", "--seeds", "0-3"], "no such run or checkpoint"),
        (["export", "not-a-run", str(tmp_path / "o"), "--to", "diffusers"], "no such run or checkpoint"),
        (["cka", "not-a-run"], "no such run or checkpoint"),
        (["cka", str(QUICKSTART.parent), "not-a-run"], "holds no checkpoint"),
        (["align", "not-a-run"], "no such run or checkpoint"),
        (["noisy-classifier", "not-a-run"], "no such run or checkpoint"),
        (["segprobe", "not-a-run"], "no such run or checkpoint"),
        (["fid", "not-a-run"], "no such folder, .npz or run: not-a-run"),
        (["info", "not-a-run"], "not a ddaepp run folder"),
        (["train", "missing.yaml"], "recipe not found: missing.yaml"),
        (["train", str(tmp_path / "empty.yaml")], "is empty"),
        (["train", str(QUICKSTART), "--set", "train.lr"], "--set expects KEY=VALUE"),
        (["train", str(QUICKSTART), "--set", "train.nokey=1"], "unknown key 'train.nokey'"),
        (["train", str(QUICKSTART), "--max-steps", "0"], "--max-steps must be positive"),
        (["profile-layers", "missing.yaml", "--candidates", "1"], "recipe not found"),
        (["import", "missing.pt", "--from", "ddae", "--recipe", "quickstart", "--out", str(tmp_path / "o")],
         "no such checkpoint file: missing.pt"),
        (["import", "missing.pt", "--from", "ddae", "--recipe", "missing", "--out", str(tmp_path / "o")],
         "recipe not found"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _REFUSE, json.dumps([a for a, _ in cases])], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    for (argv, needle), got in zip(cases, json.loads(r.stdout)):
        assert got["code"] == 2, got
        lines = got["stderr"].splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], got
        assert not got["torch"], f"`ddaepp {' '.join(argv)}` imported torch before refusing"


def test_every_command_taking_a_run_is_among_the_refusals():
    """A new command with a RUN_OR_CKPT argument must check it before torch too (listed above)."""
    import inspect

    from ddaepp_cli.cli import app

    takes_run = set()
    for c in app.registered_commands:
        params = inspect.signature(c.callback).parameters
        if "run_or_ckpt" in params or "samples_or_run" in params or c.name == "export":
            takes_run.add(c.name or c.callback.__name__.replace("_", "-"))
    assert takes_run == {"probe", "sample", "cka", "noisy-classifier", "segprobe", "fid", "export"}


def test_a_refusal_answers_within_two_seconds():
    """Wall clock of a whole `ddaepp probe not-a-run` (a shared machine: the best of three tries)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "ddaepp_cli", "probe", "not-a-run"], capture_output=True,
                           text=True, cwd=ROOT, env=env, timeout=60)
        best = min(best, time.perf_counter() - t0)
        assert r.returncode == 2 and "no such run or checkpoint" in r.stderr
        if best < 2.0:
            break
    assert best < 2.0, f"a refusal took {best:.2f}s"


# ------------------------------------------------------------------------------------------------
# Progress, interruption, usage lines, messages
# ------------------------------------------------------------------------------------------------


def test_progress_after_a_resume_counts_only_the_resumed_steps(capsys):
    from ddaepp_cli.console import _Plain

    now = [100.0]
    bar = _Plain(10_000, "train", "step", every=10.0, start=9_990, clock=lambda: now[0])
    bar.update(0)  # train's first call: the loss line before any step finished
    for _ in range(10):
        now[0] += 0.5
        bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "train: 9990/10000 step (eta ?)"
    # 10 steps in 5 s of wall time: 2 step/s (not 10000 / 5 = 2000 step/s, "eta 0s")
    assert lines[-1] == "train: 10000/10000 step (10 steps in 5.0s, 2.00 step/s)"

    bar = _Plain(100, "train", "step", every=1.0, start=40, clock=lambda: now[0])
    for _ in range(4):
        now[0] += 0.5
        bar.update(1)
    assert capsys.readouterr().err.splitlines()[-1] == "train: 43/100 step (2.00 step/s, eta 28s)"  # printed at 41 and 43


def test_interruption_reads_the_same_in_every_command(run, monkeypatch):
    import ddaepp_cli.sample
    import ddaepp_cli.training.train
    from ddaepp_cli.errors import Interrupted

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    def signalled(*a, **k):
        raise Interrupted("interrupted at step 3; checkpoint written to r/checkpoints; re-run the same command "
                          "to resume")

    monkeypatch.setattr(ddaepp_cli.sample, "sample_command", ctrl_c)
    monkeypatch.setattr(ddaepp_cli.training.train, "train", signalled)
    s = cli_inprocess("sample", run, "--n", "2")
    t = cli_inprocess("train", run / "recipe.yaml", "--run-dir", run)
    assert s.returncode == t.returncode == 130
    assert s.output.strip() == "interrupted: `ddaepp sample` stopped before it finished; re-run the same command"
    assert t.output.strip().startswith("interrupted at step 3; checkpoint written")  # no "error:" either


def test_usage_lines_name_arguments_in_capitals():
    from ddaepp_cli.cli import app

    assert "Usage: ddaepp import [OPTIONS] SOURCE" in cli_inprocess("import", "--help").output
    assert "Usage: ddaepp cka [OPTIONS] RUN_OR_CKPT [OTHER]" in cli_inprocess("cka", "--help").output
    for c in app.registered_commands:
        name = c.name or c.callback.__name__.replace("_", "-")
        usage = next(ln for ln in cli_inprocess(name, "--help").output.splitlines() if "Usage:" in ln)
        assert "{" not in usage and "}" not in usage, usage


def test_dry_run_explains_the_augmentation_multipliers(tmp_path):
    import yaml

    (tmp_path / "tiny.yaml").write_text(TINY)
    r = cli_inprocess("train", tmp_path / "tiny.yaml", "--dry-run")
    assert r.returncode == 0, r.output
    assert "xflip: 1.0e+8  # × p ≥ 1: every image considered, half of them flipped" in r.stdout
    assert "yflip: 1.0  # × p = 12% of images considered, half of them flipped" in r.stdout
    assert "100000000.0" not in r.stdout
    lines = r.stdout.splitlines()
    recipe_lines = lines[:next(i for i, ln in enumerate(lines) if "plan: tiny" in ln)]
    assert yaml.safe_load("\n".join(recipe_lines))["augment"]["xflip"] == 1e8  # still YAML; 1.0e+8 a float


def test_recipe_messages_name_the_path_as_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    r = cli_inprocess("train", "empty.yaml", "--dry-run")
    assert r.returncode == 2
    assert r.output.startswith("error: recipe empty.yaml is empty;") and str(tmp_path) not in r.output


def test_probe_with_one_cell_reports_its_accuracy(run):
    r = cli_inprocess("probe", run, "--layers", "out_1", "--timesteps", "21", "--epochs", "2", "--no-hflip",
                      "--json")
    assert r.returncode == 0, r.output
    out = json.loads(r.stdout)
    assert out["selected_on"] == "none" and out["cells"] == []
    assert out["best"]["accuracy"] == out["test_accuracy"] is not None
    assert out["best"]["accuracy_on"] == "test"


# ------------------------------------------------------------------------------------------------
# Threads
# ------------------------------------------------------------------------------------------------


def test_default_threads_share_the_cores_among_a_launch():
    from ddaepp_cli.threads import cgroup_cpu_limit, default_threads, set_default, usable_cores

    assert default_threads(8, {}) == 8
    assert default_threads(8, {"LOCAL_WORLD_SIZE": "3"}) == 2  # 3 processes × 2 threads ≤ 8 cores
    assert default_threads(2, {"LOCAL_WORLD_SIZE": "4"}) == 1  # never 0
    assert cgroup_cpu_limit("200000 100000\n") == 2 and cgroup_cpu_limit("150000 100000") == 1
    assert cgroup_cpu_limit("max 100000") is None
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))
    env = {"OMP_NUM_THREADS": "3"}
    assert set_default(env) is None and env["OMP_NUM_THREADS"] == "3"  # the user's (or launcher's) choice wins
    env = {"LOCAL_WORLD_SIZE": str(usable_cores())}
    assert set_default(env) == 1 and env["OMP_NUM_THREADS"] == "1"


def test_a_busy_machine_gets_a_hint_to_use_one_thread():
    from ddaepp_cli.threads import busy_hint

    hint = busy_hint(2, load=7.8, cores=2)
    assert hint.startswith("note: this machine is busy (load average 7.8 on 2 cores)") and "--threads 1" in hint
    assert busy_hint(1, load=7.8, cores=2) is None  # one thread already
    assert busy_hint(2, load=0.4, cores=2) is None  # a quiet machine


def test_the_command_line_sets_this_process_share_before_torch():
    """Without OMP_NUM_THREADS, N processes of a launch on this machine's usable cores get one thread each
    (torch alone would give each one thread per physical core of the machine): `main` chooses before any
    command imports torch, and torch takes it."""
    from ddaepp_cli.threads import usable_cores

    code = ("import sys\nfrom ddaepp_cli.cli import main\ntry:\n    main(['recipes', '--json'])\n"
            "except SystemExit:\n    pass\nimport torch\nprint('threads', torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["LOCAL_WORLD_SIZE"] = str(usable_cores())
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "threads 1"


def test_threads_option(tmp_path, monkeypatch):
    (tmp_path / "tiny.yaml").write_text(TINY)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        r = cli_inprocess("train", tmp_path / "tiny.yaml", "--dry-run", "--json", "--threads", "2")
        assert r.returncode == 0, r.output
        assert json.loads(r.stdout)["threads"] == 2 and os.environ["OMP_NUM_THREADS"] == "2"
    finally:
        torch.set_num_threads(1)
    r = cli_inprocess("train", tmp_path / "tiny.yaml", "--dry-run", "--threads", "0")
    assert r.returncode == 2 and r.output.strip() == "error: --threads must be 1 or more, got 0"


def test_every_computing_command_takes_threads():
    """Each command that trains, samples, encodes or evaluates with torch has --threads (help lists it)."""
    computing = ["train", "sample", "probe", "cka", "align", "noisy-classifier", "fid", "segprobe", "profile-layers",
                 "cache-latents"]
    for name in computing:
        r = cli_inprocess(name, "--help")
        assert r.returncode == 0 and "--threads" in r.output, name


# ------------------------------------------------------------------------------------------------
# ddaepp info RUN --plot
# ------------------------------------------------------------------------------------------------


def test_info_plot_draws_the_training_curves(run):
    from PIL import Image

    r = cli_inprocess("info", run, "--plot", "--json")
    assert r.returncode == 0, r.output
    out = json.loads(r.stdout)
    png = run / "training_curves.png"
    assert out["plot"] == str(png) and out["last_metrics"]["step"] == 4
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 800
    r = cli_inprocess("info", run, "--plot")
    assert r.returncode == 0 and f"plot: {png}" in r.output


def test_info_plot_without_logged_steps_is_one_line(run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "recipe.yaml").write_text((run / "recipe.yaml").read_text())
    r = cli_inprocess("info", bare, "--plot")
    assert r.returncode == 2 and r.output.strip() == f"error: {bare / 'metrics.jsonl'} holds no logged step yet: " \
                                                     f"nothing to plot"
