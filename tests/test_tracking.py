"""Experiment trackers through Accelerate (`train.log_with`, `--log-with`, `--log-to-run`; training/tracking.py).

TensorBoard's event files are read back with TensorBoard's own reader (EventAccumulator, which applies the
purge a resume asks for, as TensorBoard's UI does); wandb runs offline (WANDB_MODE=offline, no network) and its
transaction log `run-<id>.wandb` is decoded with wandb's own protobuf `Record` (see `wandb_records`).
"""

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, cli_inprocess, run_cli
from ddaepp_cli.training import tracking

pytest.importorskip("tensorboard")
EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator

SETS = ["--set", "train.sample_every=4", "--set", "train.sample_grid=4"]  # grids at steps 4 and 8


def metrics(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def events(run: Path) -> EventAccumulator:
    info = json.loads((run / "tracker" / "tracker.json").read_text())
    ea = EventAccumulator(str(run / "tracker" / info["name"]), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea


def assert_scalars_equal_metrics(ea: EventAccumulator, run: Path) -> None:
    """Every metrics.jsonl field is the series train/<field>, one value per logged step, equal to the file's
    (TensorBoard stores float32)."""
    lines = metrics(run)
    fields = {k for rec in lines.values() for k in rec if k != "step"}
    assert {f"train/{k}" for k in fields} <= set(ea.Tags()["scalars"])
    for k in fields:
        series = [(e.step, e.value) for e in ea.Scalars(f"train/{k}")]
        steps = [s for s, _ in series]
        assert len(steps) == len(set(steps)), f"train/{k}: duplicate steps {steps}"
        assert steps == sorted(lines), f"train/{k}: steps {steps}, metrics.jsonl {sorted(lines)}"
        for s, v in series:
            assert v == pytest.approx(lines[s][k], rel=1e-6, abs=1e-12), (k, s)


def test_tensorboard_backfill_resume_from_an_earlier_step_and_grids(tiny_recipe, tmp_path):
    """In-process: steps 1-4 with no tracker; `--log-with tensorboard` to step 6 (the tracker first receives
    steps 1-4 and the step-4 grid); `--resume-from 4` to step 8, which re-trains steps 5-6: TensorBoard's
    purge drops the first session's steps 5-6, so each step holds metrics.jsonl's final line."""
    from ddaepp_cli.recipe import load_recipe
    from ddaepp_cli.training.train import train

    sets = ["train.sample_every=4", "train.sample_grid=4", "sample.steps=2"]
    run = tmp_path / "run"
    train(load_recipe(tiny_recipe, sets), run, max_steps=4)
    assert not (run / "tracker").exists()
    tb = load_recipe(tiny_recipe, sets + ["train.log_with=tensorboard"])
    train(tb, run, max_steps=6)
    first = metrics(run)
    train(tb, run, max_steps=8, resume_step=4)
    assert sorted(metrics(run)) == list(range(1, 9)) and metrics(run)[5]["img_per_s"] != first[5]["img_per_s"]
    ea = events(run)
    assert_scalars_equal_metrics(ea, run)
    assert [g.step for g in ea.Images(tracking.GRID_KEY)] == [4, 8]


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    """`--log-with tensorboard` killed as step 6 starts (steps 5-6 logged after the step-4 checkpoint), then
    the resume from step 4 to step 8."""
    from conftest import TINY

    d = tmp_path_factory.mktemp("tb")
    recipe = d / "tiny.yaml"
    recipe.write_text(TINY)
    run = d / "run"
    base = ["train", recipe, "--run-dir", run, *SETS]
    r = run_cli(*base, "--max-steps", 8, "--log-with", "tensorboard", env={"DDAEPP_FAULT_KILL_STEPS": "6"})
    assert r.returncode != 0
    first = metrics(run)
    assert sorted(first) == [1, 2, 3, 4, 5, 6]
    r = run_cli(*base, "--max-steps", 8, "--log-with", "tensorboard")
    assert r.returncode == 0, r.stderr
    return run, first


@pytest.mark.slow
def test_tensorboard_scalars_equal_metrics_after_kill_and_resume(tb_run):
    run, first = tb_run
    ea = events(run)
    assert_scalars_equal_metrics(ea, run)
    assert sorted(metrics(run)) == list(range(1, 9))
    # the killed session's own lines for steps 5-6 were replaced by the resume's (img/s is never the same twice)
    assert metrics(run)[5]["img_per_s"] != first[5]["img_per_s"]
    # one tracker run, in the run folder, named after it; the resolved recipe as its configuration
    info = json.loads((run / "tracker" / "tracker.json").read_text())
    assert info == {"trackers": ["tensorboard"], "name": "run"}
    hparams = list((run / "tracker" / "run").glob("*/hparams.yml"))
    assert hparams and "train.log_with: tensorboard" in hparams[-1].read_text()


@pytest.mark.slow
def test_tensorboard_holds_the_sample_grids_as_images(tb_run):
    run, _ = tb_run
    ea = events(run)
    grids = ea.Images(tracking.GRID_KEY)
    assert [g.step for g in grids] == [4, 8]
    for g in grids:
        import io

        logged = np.asarray(Image.open(io.BytesIO(g.encoded_image_string)).convert("RGB"))
        png = np.asarray(Image.open(run / "samples" / f"grid-{g.step:07d}.png").convert("RGB"))
        assert np.array_equal(logged, png)


@pytest.mark.slow
def test_probe_log_to_run_puts_the_accuracy_at_the_checkpoint_step(tb_run):
    run, _ = tb_run
    r = run_cli("probe", run, "--log-to-run", "--layers", "out_1", "--timesteps", "11", "--epochs", 1, "--json")
    assert r.returncode == 0, r.stderr
    acc = json.loads(r.stdout)["test_accuracy"]
    assert f"logged eval/probe_acc at step 8 to tensorboard" in r.stderr
    series = [(e.step, e.value) for e in events(run).Scalars("eval/probe_acc")]
    assert series == [(8, pytest.approx(acc, rel=1e-6))]
    assert_scalars_equal_metrics(events(run), run)  # the evaluation purged nothing


# ------------------------------------------------------------------------------------------------
# wandb, offline
# ------------------------------------------------------------------------------------------------


def wandb_records(path: Path):
    """The records of a wandb transaction log, decoded by wandb's protobuf `Record`.

    wandb ≥ 0.2x no longer ships a Python reader of its `.wandb` files (the Go core writes them); the framing
    is LevelDB's log format (google/leveldb doc/log_format.md: 32 KiB blocks of records `crc32 (uint32 LE),
    length (uint16 LE), type (1 full, 2 first, 3 middle, 4 last)`) after wandb's 7-byte header `:W&B`, magic
    0xBEE1, version 0, with zlib's crc32 seeded by the type byte (wandb/wandb, wandb/sdk/internal/datastore.py
    up to 0.19)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    i, pending = 7, b""
    while i + 7 <= len(data):
        left = 32768 - i % 32768
        if left < 7:  # a block's trailer
            i += left
            continue
        crc, n, kind = struct.unpack("<IHB", data[i:i + 7])
        if kind == 0:  # zero padding of a block written so far
            break
        chunk = data[i + 7:i + 7 + n]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc
        i += 7 + n
        pending += chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            pending = b""
            yield rec


def wandb_history(run: Path) -> list[list[dict]]:
    """Per wandb session of the run (oldest first), its history rows as {key: value}."""
    sessions = []
    for folder in sorted((run / "tracker" / "wandb").glob("offline-run-*")):
        (log,) = folder.glob("run-*.wandb")
        sessions.append((folder, [{(it.key or "/".join(it.nested_key)): json.loads(it.value_json)
                                   for it in rec.history.item}
                                  for rec in wandb_records(log) if rec.WhichOneof("record_type") == "history"]))
    return sessions


def wandb_run_records(run: Path) -> list:
    return [r for folder in sorted((run / "tracker" / "wandb").glob("offline-run-*"))
            for log in folder.glob("run-*.wandb") for r in wandb_records(log)]


@pytest.mark.slow
def test_wandb_offline_backfill_resume_and_log_to_run(tiny_recipe, tmp_path):
    pytest.importorskip("wandb")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "wbconfig"),
           "WANDB_CACHE_DIR": str(tmp_path / "wbcache"), "WANDB_DATA_DIR": str(tmp_path / "wbdata")}
    run = tmp_path / "myrun"
    base = ["train", tiny_recipe, "--run-dir", run, *SETS]
    r = run_cli(*base, "--max-steps", 4, env=env)  # no tracker yet; a grid at step 4
    assert r.returncode == 0, r.stderr
    assert not (run / "tracker").exists()
    for steps in (6, 8):  # adds wandb (it first receives steps 1-4), then resumes the same wandb run
        r = run_cli(*base, "--max-steps", steps, "--log-with", "wandb", env=env)
        assert r.returncode == 0, r.stderr
    info = json.loads((run / "tracker" / "tracker.json").read_text())
    assert info["trackers"] == ["wandb"] and info["name"] == "myrun"

    records = wandb_run_records(run)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert len(runs) == 2 and {(x.run_id, x.display_name) for x in runs} == {(info["wandb"]["id"], "myrun")}
    config = {c.key: json.loads(c.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for c in r.config.update}
    assert config["train.log_with"] == "wandb" and config["train.global_batch"] == 32

    sessions = wandb_history(run)
    assert len(sessions) == 2
    lines, logged = metrics(run), {}
    for _, rows in sessions:
        for row in rows:
            if "train/loss" in row:
                logged.setdefault(row["_step"], row)
    assert sorted(logged) == sorted(lines) == list(range(1, 9))
    for step, rec in lines.items():
        for k, v in rec.items():
            if k != "step":
                assert logged[step][f"train/{k}"] == pytest.approx(v, rel=1e-12), (step, k)
    grid_steps = sorted(row["_step"] for _, rows in sessions for row in rows if f"{tracking.GRID_KEY}/_type" in row)
    assert grid_steps == [4, 6, 8]  # step 4's from the folder; 6 and 8: each session's last step

    r = run_cli("probe", run, "--log-to-run", "--layers", "out_1", "--timesteps", "11", "--epochs", 1, "--json",
                env=env)
    assert r.returncode == 0, r.stderr
    acc = json.loads(r.stdout)["test_accuracy"]
    _, rows = wandb_history(run)[-1]
    evals = [row for row in rows if "eval/probe_acc" in row]
    assert len(evals) == 1 and evals[0]["eval/step"] == 8 and evals[0]["eval/probe_acc"] == pytest.approx(acc)


# ------------------------------------------------------------------------------------------------
# Refusals: one line, no traceback
# ------------------------------------------------------------------------------------------------


def test_a_missing_tracker_package_is_exit_3_before_torch(tiny_recipe, tmp_path):
    """The package check comes before torch is imported and before the run folder is made."""
    run = tmp_path / "run"
    code = ("import sys; sys.modules['tensorboard'] = sys.modules['wandb'] = None\n"
            "from ddaepp_cli.cli import main\n"
            f"sys.argv = ['ddaepp', 'train', {str(tiny_recipe)!r}, '--run-dir', {str(run)!r}] + sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    for choice, named in (("tensorboard", "ddaepp[tensorboard]"), ("wandb", "ddaepp[wandb]"),
                          ("all-installed", "ddaepp[tensorboard,wandb]")):
        r = subprocess_python(code, "--log-with", choice)
        assert r.stdout.split() == ["3", "False"], (choice, r.stdout, r.stderr)
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert not run.exists()


def subprocess_python(code: str, *args):
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)


def test_wandb_that_cannot_start_is_one_line_before_training(tiny_recipe, tmp_path):
    """Online wandb without a login: wandb refuses before any network use; train says so in one line, exit 2."""
    pytest.importorskip("wandb")
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "", "HOME": str(tmp_path / "home"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wbconfig"), "NETRC": str(tmp_path / "no-netrc")}
    r = run_cli("train", tiny_recipe, "--run-dir", tmp_path / "run", "--max-steps", 2, "--log-with", "wandb",
                env=env, stdin=subprocess.DEVNULL)
    err = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and len(err) == 1 and "wandb login" in err[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_tracker_is_exit_2(tiny_recipe, tmp_path):
    r = cli_inprocess("train", tiny_recipe, "--run-dir", tmp_path / "run", "--log-with", "mlflow")
    assert r.returncode == 2 and "train.log_with" in r.output and "all-installed" in r.output


def test_log_to_run_without_a_tracker_is_exit_2(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000004").mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: tiny\n")
    for cmd in ("probe", "cka", "segprobe", "fid"):
        r = cli_inprocess(cmd, run, "--log-to-run")
        assert r.returncode == 2, (cmd, r.output)
        assert "has no tracker" in r.output and "--log-with tensorboard" in r.output, r.output
    images = tmp_path / "images"
    images.mkdir()
    r = cli_inprocess("fid", images, "--log-to-run")
    assert r.returncode == 2 and "is not a run folder" in r.output


def test_log_to_run_with_a_missing_tracker_package_is_exit_3(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000004").mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: tiny\n")
    (run / "checkpoints" / "step-0000004" / "ema.safetensors").write_bytes(b"")
    (run / "tracker").mkdir()
    (run / "tracker" / "tracker.json").write_text(json.dumps({"trackers": ["wandb"], "name": "run"}))
    monkeypatch.setattr(tracking, "installed", lambda name: False)
    r = cli_inprocess("probe", run / "checkpoints" / "step-0000004" / "ema.safetensors", "--log-to-run")
    assert r.returncode == 3 and "ddaepp[wandb]" in r.output


# ------------------------------------------------------------------------------------------------
# Series names
# ------------------------------------------------------------------------------------------------


def test_eval_series_names_and_steps():
    probe = {"command": "probe", "test_accuracy": 0.91, "protocol": {"step": 400}}
    assert tracking.eval_scalars(probe) == [(400, {"eval/probe_acc": 0.91})]
    several = {"command": "probe", "checkpoints": [], "results": [probe, {**probe, "protocol": {"step": 800}}]}
    assert [s for s, _ in tracking.eval_scalars(several)] == [400, 800]
    fid = {"command": "fid", "n": 50000, "metrics": {"fid": 2.5, "is_mean": 9.1}, "protocol": {"step": 10}}
    assert tracking.eval_scalars(fid) == [(10, {"eval/fid50k": 2.5, "eval/is_mean50k": 9.1})]
    assert tracking.eval_scalars({**fid, "n": 1234})[0][1] == {"eval/fid1234": 2.5, "eval/is_mean1234": 9.1}
    assert [s for s, _ in tracking.eval_scalars({"command": "fid", "checkpoints": [fid, fid]})] == [10, 10]
    seg = {"command": "segprobe", "dataset": "voc", "miou": 0.3, "pixel_accuracy": 0.8, "protocol": {"step": 5}}
    assert tracking.eval_scalars(seg) == [(5, {"eval/segprobe_miou_voc": 0.3, "eval/segprobe_pixel_acc_voc": 0.8})]
    cka = {"command": "cka", "matrix": [[1.0, 0.4], [0.6, 1.0]], "protocol": {"models": [{"step": 7}]}}
    assert tracking.eval_scalars(cka) == [(7, {"eval/cka_offdiag_mean": pytest.approx(0.5)})]
    two = {**cka, "layerwise": {"out_1": 0.2, "out_2": 0.4}}
    assert tracking.eval_scalars(two) == [(7, {"eval/cka_layerwise/out_1": 0.2, "eval/cka_layerwise/out_2": 0.4,
                                               "eval/cka_layerwise_mean": pytest.approx(0.3)})]
    with pytest.raises(Exception, match="has no step"):
        tracking.eval_scalars({**probe, "protocol": {"step": None, "checkpoint": "x/model.safetensors"}})


def test_metrics_lines_become_train_series():
    rec = {"step": 3, "epoch": 0.1, "loss": None, "grad_norm": 2.0, "nonfinite_skipped": 1, "simple": 0.5}
    assert tracking.scalars(rec) == {"train/epoch": 0.1, "train/grad_norm": 2.0, "train/nonfinite_skipped": 1,
                                     "train/simple": 0.5}


def test_dry_run_names_the_trackers(tiny_recipe):
    r = cli_inprocess("train", tiny_recipe, "--dry-run", "--log-with", "tensorboard", "--json")
    assert r.returncode == 0, r.output
    out = json.loads(r.stdout)
    assert out["recipe"]["train"]["log_with"] == "tensorboard" and out["trackers"] == ["tensorboard"]


@pytest.mark.slow
def test_two_processes_log_once(tiny_recipe, tmp_path):
    """torchrun, 2 CPU processes (gloo): rank 0 alone writes the one event file; its scalars are metrics.jsonl's;
    a 2-process `probe --log-to-run` adds its accuracy once."""
    from test_multiprocess import torchrun

    run = tmp_path / "run"
    r = torchrun("train", tiny_recipe, "--run-dir", run, "--max-steps", 6, "--log-with", "tensorboard", *SETS)
    assert r.returncode == 0, r.stderr
    assert len(list((run / "tracker" / "run").glob("events.out.tfevents.*"))) == 1
    ea = events(run)
    assert_scalars_equal_metrics(ea, run)
    assert [g.step for g in ea.Images(tracking.GRID_KEY)] == [4, 6]

    # `--log-to-run` under the same launch: rank 0 alone logs, once, at the checkpoint's step
    r = torchrun("probe", run, "--log-to-run", "--layers", "out_1", "--timesteps", 11, "--epochs", 1, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    acc = json.loads(r.stdout)["test_accuracy"]
    assert r.stderr.count("logged eval/probe_acc at step 6 to tensorboard") == 1, r.stderr
    ea = events(run)
    assert [(e.step, e.value) for e in ea.Scalars("eval/probe_acc")] == [(6, pytest.approx(acc, rel=1e-6))]
    assert_scalars_equal_metrics(ea, run)


def test_tracker_extras_are_declared_and_in_the_test_extra():
    """`pip install 'ddaepp[tensorboard]'` / `[wandb]` as the exit-3 line says; CI's `.[test]` installs both."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name in tracking.TRACKERS:
        (req,) = extras[name]
        assert req.startswith(name) and req in extras["test"]
