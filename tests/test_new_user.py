"""What a new user hits (issue 17): `--force` never deletes what ddaepp did not write, one writer per
run folder, OS errors as one line, rk45 on EDM runs, truthful messages, and the CLI conventions.

In-process (typer's CliRunner) against tiny trained runs where the exit code and output suffice;
subprocesses where processes, signals, stdout redirection or the working directory are the point."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY, run_cli

SMALL = TINY.replace("ch_mults: [1, 2]", "ch_mults: [1, 1]")
EDM = SMALL.replace("diffusion: {formulation: ddpm}", "diffusion: {formulation: edm}").replace(
    "sample: {sampler: ddim, steps: 5, batch_size: 16}", "sample: {sampler: heun, steps: 4, batch_size: 16}")


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A workspace holding a trained DDPM run, a trained EDM run and their recipes."""
    from ddaepp_cli.recipe import load_recipe
    from ddaepp_cli.training.train import train

    d = tmp_path_factory.mktemp("newuser")
    (d / "small.yaml").write_text(SMALL)
    (d / "edm.yaml").write_text(EDM)
    over = ["train.checkpoint_every=1000", "train.log_every=1000"]
    train(load_recipe(d / "small.yaml", over), d / "runs" / "run", max_steps=2)
    train(load_recipe(d / "edm.yaml", over), d / "runs" / "edm", max_steps=1)
    return d


def invoke(*args):
    from typer.testing import CliRunner

    from ddaepp_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(r, code=2):
    err = r.stderr if hasattr(r, "stderr") else r.output
    assert r.returncode == code if hasattr(r, "returncode") else r.exit_code == code, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# 1. --force never deletes what ddaepp did not write
# ------------------------------------------------------------------------------------------------


def test_force_refuses_the_current_directory_and_keeps_its_files(w, tmp_path, monkeypatch):
    here = tmp_path / "mywork"
    (here / "sub").mkdir(parents=True)
    (here / "thesis.tex").write_text("precious")
    (here / "sub" / "data.csv").write_text("1,2,3")
    before = tree(here)
    monkeypatch.chdir(here)
    r = invoke("sample", w / "runs" / "run", "--n", 1, "--out", ".", "--force")
    assert "current directory" in one_error_line(r)
    assert tree(here) == before


def test_force_refuses_a_run_folder_and_its_ancestors(w):
    run = w / "runs" / "run"
    before = tree(run)
    for target in (run, w / "runs"):
        r = invoke("sample", run, "--n", 1, "--out", target, "--force")
        one_error_line(r)
        assert tree(run) == before
    assert (run / "checkpoints").is_dir() and (run / "recipe.yaml").is_file()


def test_force_refuses_a_file_and_a_foreign_folder(w, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    r = invoke("sample", w / "runs" / "run", "--n", 1, "--out", notes, "--force")
    assert "file" in one_error_line(r)
    assert notes.read_text() == "precious"

    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.png").write_bytes(b"not written by ddaepp")
    r = invoke("sample", w / "runs" / "run", "--n", 1, "--out", mine, "--force")
    assert "protocol.json" in one_error_line(r)
    assert (mine / "holiday.png").read_bytes() == b"not written by ddaepp"


def test_force_replaces_only_a_clean_sample_folder(w, tmp_path):
    out = tmp_path / "samples"
    r = invoke("sample", w / "runs" / "run", "--seeds", "0-1", "--out", out, "--format", "png,npz")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "protocol.json", "samples.npz"]

    # a user file added to the sample folder: --force refuses and the file survives
    (out / "my_notes.txt").write_text("precious")
    r = invoke("sample", w / "runs" / "run", "--seeds", "5-5", "--out", out, "--force")
    assert "my_notes.txt" in one_error_line(r)
    assert (out / "my_notes.txt").read_text() == "precious" and (out / "000000.png").is_file()

    # without it, --force replaces the earlier sample folder with the new one
    (out / "my_notes.txt").unlink()
    r = invoke("sample", w / "runs" / "run", "--seeds", "5-5", "--out", out, "--force", "--format", "png")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["000005.png", "protocol.json"]
    assert json.loads((out / "protocol.json").read_text())["seeds"] == [5, 5]
    assert [p.name for p in tmp_path.iterdir()] == ["samples"]  # nothing left aside


def test_fid_save_samples_refuses_a_file_and_a_path_under_a_file(w, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    for target in (notes, notes / "sub"):
        r = invoke("fid", w / "runs" / "run", "--n", 2, "--save-samples", target)
        one_error_line(r)
    assert notes.read_text() == "precious"


def test_checkpoint_pruning_leaves_user_files_alone(tmp_path):
    """The audit: pruning removes only step-* folders (cache-latents' refusal of a foreign --out folder
    is tested in test_latents.py::test_cache_latents_cli_errors)."""
    from ddaepp_cli.checkpoint import prune_checkpoints

    run = tmp_path / "run"
    for s in (1, 2, 3):
        (run / "checkpoints" / f"step-{s:07d}").mkdir(parents=True)
    (run / "checkpoints" / "README.txt").write_text("mine")
    (run / "checkpoints" / "best").mkdir()
    prune_checkpoints(run, keep_last=1)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["README.txt", "best", "step-0000003"]


# ------------------------------------------------------------------------------------------------
# 2. One writer per run folder; unique, exclusive evaluation records
# ------------------------------------------------------------------------------------------------


def _popen_train(recipe, run, *extra, delay="0"):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DDAEPP_TEST_STEP_DELAY=delay)
    cmd = [sys.executable, "-m", "ddaepp_cli", "train", str(recipe), "--run-dir", str(run), *map(str, extra)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, p, timeout=120):
    deadline = time.time() + timeout
    while not cond():
        assert p.poll() is None, p.stderr.read()
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_trains_into_one_folder_one_runs_the_other_exits_2(w, tmp_path):
    run = tmp_path / "run"
    first = _popen_train(w / "small.yaml", run, "--max-steps", 5, delay="3")
    _wait_for(lambda: (run / "metrics.jsonl").is_file(), first)
    second = run_cli("train", w / "small.yaml", "--run-dir", run, "--max-steps", 5)
    line = one_error_line(second)
    assert f"PID {first.pid}" in line and "in use" in line
    assert first.wait(timeout=120) == 0, first.stderr.read()
    first.stderr.close()
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # one writer: no line logged twice


@pytest.mark.slow
def test_a_killed_holder_leaves_no_stale_lock(w, tmp_path):
    run = tmp_path / "run"
    p = _popen_train(w / "small.yaml", run, "--max-steps", 8, delay="0.4")
    _wait_for(lambda: (run / "checkpoints" / "step-0000004").is_dir(), p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stderr.close()
    r = run_cli("train", w / "small.yaml", "--run-dir", run, "--max-steps", 8)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr and "step 4" in r.stderr
    assert (run / "checkpoints" / "step-0000008").is_dir()


def test_run_lock_in_process(tmp_path):
    from ddaepp_cli.errors import UsageError
    from ddaepp_cli.training.runlock import run_lock

    with run_lock(tmp_path / "r"):
        with pytest.raises(UsageError, match=f"PID {os.getpid()}"):
            with run_lock(tmp_path / "r"):
                pass
    with run_lock(tmp_path / "r"):  # released on exit
        pass
    assert not (tmp_path / "r").exists()  # a folder it made and nothing wrote to is removed again


def test_evaluation_records_of_concurrent_processes_get_distinct_names(tmp_path, monkeypatch):
    from ddaepp_cli.eval import evalrecord

    ckpt = tmp_path / "run" / "checkpoints" / "step-0000100"
    monkeypatch.setattr(evalrecord.os, "getpid", lambda: 1111)
    a = evalrecord.new_record_path(ckpt, "cka")
    monkeypatch.setattr(evalrecord.os, "getpid", lambda: 2222)
    b = evalrecord.new_record_path(ckpt, "cka")  # the same second, before either is written
    assert a != b
    monkeypatch.undo()
    assert evalrecord.save_record(a, {"who": "a"}) == a
    taken = evalrecord.save_record(a, {"who": "late"})  # the name is taken: never an overwrite
    assert taken != a and json.loads(a.read_text()) == {"who": "a"}
    assert json.loads(taken.read_text()) == {"who": "late"}
    assert sorted(p.name for p in a.parent.iterdir()) == sorted([a.name, taken.name])  # no temporary left


# ------------------------------------------------------------------------------------------------
# 3. OS errors on user paths: one line, exit 2
# ------------------------------------------------------------------------------------------------


def test_unusable_run_dir_is_one_line(w, tmp_path):
    (tmp_path / "afile").write_text("x")
    for bad in (tmp_path / "afile" / "sub", Path("/proc/ddaepp-nope")):
        r = invoke("train", w / "small.yaml", "--run-dir", bad, "--max-steps", 1)
        assert "--run-dir" in one_error_line(r)
    assert (tmp_path / "afile").read_text() == "x"


# ------------------------------------------------------------------------------------------------
# 4. rk45 on an EDM run whose recipe names a fixed-step sampler
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rk45_samples_an_edm_run(w, tmp_path):
    r = invoke("sample", w / "runs" / "edm", "--n", 2, "--sampler", "rk45", "--out", tmp_path / "s", "--json")
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "s" / "protocol.json").read_text())
    assert record["sampler"] == "rk45" and record["steps"] is None


# ------------------------------------------------------------------------------------------------
# 5. Messages that tell the truth
# ------------------------------------------------------------------------------------------------


def test_nonfinite_stop_without_a_checkpoint_does_not_claim_one(w, tmp_path, monkeypatch):
    from ddaepp_cli.errors import NonFiniteError
    from ddaepp_cli.recipe import load_recipe
    from ddaepp_cli.training.train import train

    monkeypatch.setenv("DDAEPP_FAULT_NAN_STEPS", "0,1,2")
    rec = load_recipe(w / "small.yaml", ["train.max_nonfinite=3", "train.checkpoint_every=1000"])
    with pytest.raises(NonFiniteError) as e:
        train(rec, tmp_path / "run", max_steps=10)
    assert "no checkpoint was written yet" in str(e.value) and "is kept" not in str(e.value)


@pytest.mark.slow
def test_two_sigints_still_write_the_checkpoint_that_exit_130_promises(w, tmp_path):
    run = tmp_path / "run"
    p = _popen_train(w / "small.yaml", run, "--max-steps", 60, "--set", "train.checkpoint_every=1000", delay="0.5")
    _wait_for(lambda: (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2, p)
    p.send_signal(signal.SIGINT)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=120) == 130
    err = p.stderr.read()
    p.stderr.close()
    from ddaepp_cli.checkpoint import list_checkpoints

    assert list_checkpoints(run), err  # exit 130 means a checkpoint was written
    assert "checkpoint written" in err


def test_max_steps_below_the_run_is_not_reported_as_trained_to(w, tmp_path):
    r = invoke("train", w / "small.yaml", "--run-dir", w / "runs" / "run", "--max-steps", 1,
               "--set", "train.checkpoint_every=1000", "--set", "train.log_every=1000")
    assert r.exit_code == 0, r.output
    assert "2/1" not in r.output and "nothing to train" in r.output and "step 2" in r.output


def test_num_processes_zero_is_refused(w):
    r = invoke("train", w / "small.yaml", "--dry-run", "--num-processes", 0)
    assert "--num-processes" in one_error_line(r)


def test_bad_inception_weights_message_has_no_stray_number(w, tmp_path):
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8)).save(imgs / f"{i}.png")
    junk = tmp_path / "junk.pth"
    for text in ("hello world", "junk", "e\n"):  # torch.load's own errors: "(101)", "unpack requires a buffer…"
        junk.write_text(text)
        line = one_error_line(invoke("fid", imgs, "--ref", imgs, "--inception-weights", junk))
        assert not re.search(r"\(\d+\)", line) and "unpack" not in line and "pop from" not in line, line
        assert "torch.load" in line and "weights-inception" in line


def test_profile_layers_lists_only_accepted_layers(w, tmp_path):
    line = one_error_line(invoke("profile-layers", w / "small.yaml", "--candidates", "out_9", "--steps", 1,
                                 "--run-dir", tmp_path / "p"))
    valid = line.split("valid:")[1].replace(" ", "").split(",")
    from ddaepp_cli.build import build_backbone
    from ddaepp_cli.errors import UsageError
    from ddaepp_cli.training.profile import candidate_layers
    from ddaepp_cli.recipe import load_recipe

    rec = load_recipe(w / "small.yaml")
    accepted = []
    for name in build_backbone(rec, device="meta").layer_names:  # every tappable layer, tried one by one
        try:
            candidate_layers(rec, name)
            accepted.append(name)
        except UsageError:
            pass
    assert valid == accepted and "in_1" not in valid and "mid" not in valid


def test_profile_layers_calls_a_difference_within_the_noise_a_tie(w, tmp_path, monkeypatch):
    from ddaepp_cli.training import profile, train
    from ddaepp_cli.recipe import load_recipe

    rng = np.random.default_rng(0)
    base = list(0.5 + 0.05 * rng.standard_normal(400))
    jitter = 0.01 * rng.standard_normal(400)  # paired noise: 2 standard errors over 100 steps ≈ 0.002
    curves = {"baseline": base, "layer-out_1": list(np.asarray(base) - 0.0004 + jitter)}
    monkeypatch.setattr(train, "train", lambda *a, **k: None)
    monkeypatch.setattr(profile, "read_losses", lambda folder: curves[folder.name])
    out = profile.profile_layers(load_recipe(w / "small.yaml"), "out_1", tmp_path, steps=400)
    assert out["verdict"] == "tie" and out["beats_baseline"] is False
    assert abs(out["margin"]) <= out["noise"]

    curves["layer-out_1"] = list(np.asarray(base) - 0.01 + jitter)  # a real improvement
    out = profile.profile_layers(load_recipe(w / "small.yaml"), "out_1", tmp_path, steps=400)
    assert out["verdict"] == "better" and out["beats_baseline"] is True


# ------------------------------------------------------------------------------------------------
# 6. The README matches what happens
# ------------------------------------------------------------------------------------------------


def test_readme_setup_and_examples():
    readme = (ROOT / "README.md").read_text()
    commands = (ROOT / "docs" / "commands.md").read_text()  # the `train` reference moved there (issue 23)
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in readme
    assert re.search(r"ddaepp train recipes/quickstart.yaml --run-dir \S+ --max-steps 100 --seed 3", commands)
    # the quickstart grid: one folder, whichever instruction is followed
    pixi = (ROOT / "pixi.toml").read_text()
    setup = readme.split("## What next")[0]  # the set-up routes and the quickstart
    outs = set(re.findall(r"ddaepp sample runs/quickstart --n 64(?: --out (\S+))?", setup + pixi))
    assert outs == {"runs/quickstart/final"}, outs
    assert "log_every" in commands.split("**Resume**")[1].split("\n*")[0]  # the logged-loss caveat, stated


# ------------------------------------------------------------------------------------------------
# 7. Conventions
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_probe_table_goes_to_stdout_and_json_stays_one_object(w, tmp_path):
    args = ["probe", w / "runs" / "run", "--layers", "out_1", "--timesteps", "1,11", "--epochs", 1]
    with open(tmp_path / "out.txt", "w") as f:
        r = subprocess.run([sys.executable, "-m", "ddaepp_cli", *map(str, args)], stdout=f, stderr=subprocess.PIPE,
                           text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "out.txt").read_text()
    assert "linear probe" in text and "test accuracy" in text and "out_1" in text
    j = run_cli(*args, "--json")
    assert j.returncode == 0, j.stderr
    assert json.loads(j.stdout)["command"] == "probe"  # exactly one object, nothing else


def test_help_shows_flags_as_flags_and_version():
    for cmd in ([], ["sample"], ["train"], ["probe"], ["fid"]):
        r = invoke(*cmd, "--help")
        assert r.exit_code == 0 and "--json" in r.output or not cmd
        assert "<bool>" not in r.output, cmd
    from ddaepp_cli import __version__

    r = invoke("--version")
    assert r.exit_code == 0 and r.output.strip() == f"ddaepp {__version__}"


def test_recipes_listing_is_readable_when_piped_at_80_columns():
    r = run_cli("recipes", env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    names = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    for name in names:
        assert re.search(rf"^{re.escape(name)}\s", r.stdout, re.M), name  # every name whole
    assert max(map(len, r.stdout.splitlines())) <= 80
    assert "Table 2" in r.stdout  # the paper rows are there, not squeezed away


def test_checkpoint_files_have_the_usual_permissions(w):
    ckpt = next((w / "runs" / "run" / "checkpoints").iterdir())
    modes = {p.name: p.stat().st_mode & 0o777 for p in ckpt.iterdir()}
    assert modes["model.safetensors"] == modes["ema.safetensors"] == modes["recipe.yaml"], modes


@pytest.mark.slow
def test_a_wheel_ships_the_recipes(tmp_path):
    import zipfile

    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "dist"), "-q"], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("ddaepp_cli/recipes/")}
    assert shipped == {p.name for p in (ROOT / "recipes").glob("*.yaml")}
    packages = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in (ROOT / "ddaepp_cli").rglob("__init__.py")}
    assert all(any(n.startswith(pkg.replace(".", "/") + "/__init__.py") for n in names) for pkg in packages)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "ddaepp_cli", "recipes", "--json"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=120)
    rows = json.loads(out.stdout)
    assert len(rows) == len(shipped) and all(str(tmp_path / "site") in row["path"] for row in rows)


def test_base_finds_shipped_recipes_and_empty_recipes_are_errors(tmp_path):
    from ddaepp_cli.errors import UsageError
    from ddaepp_cli.recipe import load_recipe

    (tmp_path / "mine.yaml").write_text("base: quickstart\nname: mine\ntrain: {lr: 3.0e-4}\n")
    rec = load_recipe(tmp_path / "mine.yaml")
    assert rec.name == "mine" and rec.train.lr == 3e-4 and rec.data.dataset == "digits"
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(UsageError, match="empty"):
        load_recipe(tmp_path / "empty.yaml")
    assert "empty" in one_error_line(invoke("train", tmp_path / "empty.yaml", "--dry-run"))


def test_a_model_safetensors_path_samples_those_weights(w, tmp_path):
    ckpt = next((w / "runs" / "run" / "checkpoints").iterdir())
    common = ["--seeds", "0-3", "--format", "npz"]
    for name, args in (("file", [ckpt / "model.safetensors"]), ("raw", [ckpt, "--weights", "raw"]),
                       ("ema", [ckpt])):
        r = invoke("sample", *args, *common, "--out", tmp_path / name)
        assert r.exit_code == 0, r.output
    arr = {k: np.load(tmp_path / k / "samples.npz")["arr_0"] for k in ("file", "raw", "ema")}
    assert np.array_equal(arr["file"], arr["raw"]) and not np.array_equal(arr["raw"], arr["ema"])
    assert json.loads((tmp_path / "file" / "protocol.json").read_text())["weights"] == "raw"


# ------------------------------------------------------------------------------------------------
# 8. noisy-classifier defaults follow the dataset
# ------------------------------------------------------------------------------------------------


def test_noisy_classifier_defaults_fit_digits(w):
    r = invoke("noisy-classifier", w / "runs" / "run", "--layer", "out_1", "--epochs", 1, "--n-test", 8, "--json")
    assert r.exit_code == 0, r.output
    proto = json.loads(r.stdout)["protocol"]
    assert proto["batch_size"] == 128 and proto["crop_pad"] == 0 and proto["epochs"] == 1
    from ddaepp_cli.eval.analysis import noisy_defaults

    assert noisy_defaults("digits") == {"epochs": 50, "batch_size": 128, "crop": False}
    assert noisy_defaults("cifar10") == {"epochs": 15, "batch_size": 512, "crop": True}  # DDAE's
    assert noisy_defaults("digits", epochs=3, crop=True) == {"epochs": 3, "batch_size": 128, "crop": True}
