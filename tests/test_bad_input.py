"""Bad input over every command (issue 7.4): exit 2 (3 for missing offline weights/data), exactly one
`error: ` line on stderr, no traceback, nothing on stdout, nothing half-written left behind.

In-process (typer's CliRunner) against one tiny trained run, so the whole suite takes seconds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import TINY

SMALL = TINY.replace("ch_mults: [1, 2]", "ch_mults: [1, 1]")


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """The workspace: a trained run, a bad checkpoint zoo, bad recipes, bad image folders."""
    from ddaepp_cli.recipe import load_recipe
    from ddaepp_cli.training.train import train

    d = tmp_path_factory.mktemp("bad")
    (d / "small.yaml").write_text(SMALL)
    recipe = load_recipe(d / "small.yaml", ["train.checkpoint_every=1000", "train.log_every=1000"])
    ckpt = Path(train(recipe, d / "run", max_steps=2)["checkpoint"])
    # truncated safetensors
    shutil.copytree(ckpt, d / "trunc")
    f = d / "trunc" / "ema.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    # weights of this ddpm UNet under the recipe of another backbone
    shutil.copytree(ckpt, d / "foreign")
    (d / "foreign" / "recipe.yaml").write_text((ckpt / "recipe.yaml").read_text().replace("channels: 64", "channels: 32"))
    # a file that is not safetensors at all
    (d / "junk.safetensors").write_bytes(b"this is not a safetensors file")
    # recipes
    (d / "malformed.yaml").write_text("name: x\nmodel: {backbone: ddpm\n  - [\n")
    (d / "unknown_key.yaml").write_text(SMALL.replace("  dropout: 0.0", "  dropout: 0.0\n  dropuot: 0.1"))
    (d / "wrong_type.yaml").write_text(SMALL.replace("lr: 1.0e-3", "lr: fast"))
    (d / "not_mapping.yaml").write_text("- just\n- a list\n")
    # image folders
    (d / "empty").mkdir()
    (d / "mixed").mkdir()
    Image.new("RGB", (8, 8)).save(d / "mixed" / "a.png")
    Image.new("RGB", (12, 10)).save(d / "mixed" / "b.png")
    (d / "same").mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8)).save(d / "same" / f"{i}.png")
    (d / "out_full").mkdir()
    (d / "out_full" / "keep.txt").write_text("precious")
    (d / "foreign_dir").mkdir()
    (d / "foreign_dir" / "thesis.tex").write_text("precious")
    return d


def invoke(*args):
    from typer.testing import CliRunner

    from ddaepp_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


# (id, expected exit code, args with {d} = the workspace folder)
CASES = [
    # train
    ("train-malformed-yaml", 2, "train {d}/malformed.yaml --run-dir {d}/x"),
    ("train-not-a-mapping", 2, "train {d}/not_mapping.yaml --run-dir {d}/x"),
    ("train-unknown-key", 2, "train {d}/unknown_key.yaml --run-dir {d}/x"),
    ("train-wrong-type", 2, "train {d}/wrong_type.yaml --run-dir {d}/x"),
    ("train-set-unknown-key", 2, "train {d}/small.yaml --run-dir {d}/x --set train.bogus=1"),
    ("train-set-wrong-type", 2, "train {d}/small.yaml --run-dir {d}/x --set train.lr=abc"),
    ("train-epochs-0", 2, "train {d}/small.yaml --run-dir {d}/x --set train.epochs=0"),
    ("train-batch-negative", 2, "train {d}/small.yaml --run-dir {d}/x --set train.global_batch=-1"),
    ("train-max-steps-0", 2, "train {d}/small.yaml --run-dir {d}/x --max-steps 0"),
    ("train-unknown-layer", 2, "train {d}/small.yaml --run-dir {d}/x --set model.selfcond.layer=out_99"),
    ("train-missing-recipe", 2, "train {d}/nope.yaml --run-dir {d}/x"),
    ("train-foreign-folder", 2, "train {d}/small.yaml --run-dir {d}/foreign_dir --max-steps 1"),
    ("train-other-recipe", 2, "train {d}/small.yaml --run-dir {d}/run --set train.lr=5e-4"),
    # sample
    ("sample-n-0", 2, "sample {d}/run --n 0 --out {d}/x"),
    ("sample-seeds-inverted", 2, "sample {d}/run --seeds 9-3 --out {d}/x"),
    ("sample-batch-negative", 2, "sample {d}/run --n 2 --batch-size -1 --out {d}/x"),
    ("sample-steps-0", 2, "sample {d}/run --n 2 --steps 0 --out {d}/x"),
    ("sample-batch-0", 2, "sample {d}/run --n 2 --batch-size 0 --out {d}/x"),
    ("sample-unknown-sampler", 2, "sample {d}/run --n 2 --sampler nope --out {d}/x"),
    ("sample-unknown-weights", 2, "sample {d}/run --n 2 --weights nope --out {d}/x"),
    ("sample-unknown-format", 2, "sample {d}/run --n 2 --format nope --out {d}/x"),
    ("sample-missing-run", 2, "sample {d}/nope --n 2 --out {d}/x"),
    ("sample-empty-folder", 2, "sample {d}/empty --n 2 --out {d}/x"),
    ("sample-truncated", 2, "sample {d}/trunc --n 2 --out {d}/x"),
    ("sample-junk-safetensors", 2, "sample {d}/junk.safetensors --n 2 --out {d}/x"),
    ("sample-other-backbone", 2, "sample {d}/foreign --n 2 --out {d}/x"),
    ("sample-existing-out", 2, "sample {d}/run --n 2 --out {d}/out_full"),
    # fid
    ("fid-missing-input", 2, "fid {d}/nope --ref {d}/mixed"),
    ("fid-empty-folder", 2, "fid {d}/empty --ref {d}/mixed"),
    ("fid-mixed-sizes", 2, "fid {d}/mixed --ref {d}/mixed"),
    ("fid-n-0", 2, "fid {d}/run --n 0"),
    ("fid-seeds-inverted", 2, "fid {d}/run --seeds 9-3"),
    ("fid-unknown-metric", 2, "fid {d}/run --n 2 --metrics nope"),
    ("fid-unknown-preset", 2, "fid {d}/run --preset fid7"),
    ("fid-batch-negative", 2, "fid {d}/run --n 2 --batch-size -1"),
    ("fid-truncated", 2, "fid {d}/trunc --n 2"),
    ("fid-missing-inception", 3, "fid {d}/same --ref {d}/same --inception-weights {d}/nope.pth"),
    # probe
    ("probe-unknown-layer", 2, "probe {d}/run --layers out_99"),
    ("probe-timestep-outside", 2, "probe {d}/run --timesteps 5000"),
    ("probe-epochs-0", 2, "probe {d}/run --epochs 0"),
    ("probe-batch-negative", 2, "probe {d}/run --batch-size -1"),
    ("probe-unknown-protocol", 2, "probe {d}/run --protocol nope"),
    ("probe-unknown-dataset", 2, "probe {d}/run --dataset nope"),
    ("probe-missing-run", 2, "probe {d}/nope"),
    ("probe-truncated", 2, "probe {d}/trunc"),
    ("probe-missing-data", 3, "probe {d}/run --dataset cifar10 --data-root {d}/nodata"),
    # cka
    ("cka-n-0", 2, "cka {d}/run --n 0"),
    ("cka-unknown-layer", 2, "cka {d}/run --layers out_99"),
    ("cka-timestep-outside", 2, "cka {d}/run --timestep 5000"),
    ("cka-unknown-split", 2, "cka {d}/run --split nope"),
    ("cka-unknown-features", 2, "cka {d}/run --features nope"),
    ("cka-batch-negative", 2, "cka {d}/run --batch-size -1"),
    ("cka-other-missing", 2, "cka {d}/run {d}/nope"),
    # align
    ("align-unknown-layer", 2, "align {d}/run --layers out_99"),
    ("align-n-0", 2, "align {d}/run --n 0"),
    ("align-timestep-outside", 2, "align {d}/run --timestep 5000"),
    ("align-missing", 2, "align {d}/nope"),
    ("align-truncated", 2, "align {d}/trunc"),
    # noisy-classifier
    ("noisy-unknown-layer", 2, "noisy-classifier {d}/run --layer out_99"),
    ("noisy-epochs-0", 2, "noisy-classifier {d}/run --epochs 0"),
    ("noisy-batch-negative", 2, "noisy-classifier {d}/run --batch-size -1"),
    ("noisy-missing", 2, "noisy-classifier {d}/nope"),
    ("noisy-other-backbone", 2, "noisy-classifier {d}/foreign"),
    # segprobe
    ("segprobe-unknown-dataset", 2, "segprobe {d}/run --dataset nope --data-root {d}/nodata"),
    ("segprobe-epochs-0", 2, "segprobe {d}/run --epochs 0 --data-root {d}/nodata"),
    ("segprobe-unknown-layer", 2, "segprobe {d}/run --layers out_98,out_99 --data-root {d}/nodata"),
    ("segprobe-missing-run", 2, "segprobe {d}/nope --data-root {d}/nodata"),
    ("segprobe-missing-data", 3, "segprobe {d}/run --data-root {d}/nodata"),
    # profile-layers
    ("profile-candidates-inverted", 2, "profile-layers {d}/small.yaml --candidates 11-8 --steps 2 --run-dir {d}/x"),
    ("profile-unknown-layer", 2, "profile-layers {d}/small.yaml --candidates out_99 --steps 2 --run-dir {d}/x"),
    ("profile-steps-0", 2, "profile-layers {d}/small.yaml --candidates out_1 --steps 0 --run-dir {d}/x"),
    ("profile-malformed-yaml", 2, "profile-layers {d}/malformed.yaml --candidates out_1 --steps 2 --run-dir {d}/x"),
    ("profile-unknown-key", 2, "profile-layers {d}/small.yaml --candidates out_1 --steps 2 --set x.y=1 --run-dir {d}/x"),
    # cache-latents
    ("cache-missing-data", 2, "cache-latents --data {d}/nope --vae {d}/junk.safetensors --out {d}/x"),
    ("cache-empty-folder", 2, "cache-latents --data {d}/empty --vae {d}/junk.safetensors --out {d}/x"),
    ("cache-batch-0", 2, "cache-latents --data {d}/mixed --vae {d}/junk.safetensors --out {d}/x --batch-size 0"),
    ("cache-junk-vae", 2, "cache-latents --data {d}/mixed --vae {d}/junk.safetensors --out {d}/x"),
    ("cache-unknown-kind", 2, "cache-latents --data {d}/mixed --vae-kind nope --out {d}/x"),
    ("cache-missing-vae", 3, "cache-latents --data {d}/mixed --vae {d}/nope.safetensors --out {d}/x"),
    # info
    ("info-missing", 2, "info {d}/nope"),
    ("info-not-a-run", 2, "info {d}/empty"),
    ("info-malformed-recipe", 2, "info {d}/badrun"),
]


@pytest.mark.parametrize("code,args", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(w, code, args):
    if "badrun" in args and not (w / "badrun").exists():
        (w / "badrun").mkdir()
        (w / "badrun" / "recipe.yaml").write_text("name: [unclosed\n")
    before = sorted(p.name for p in w.iterdir())
    r = invoke(*args.format(d=w).split())
    check(r, code)
    assert sorted(p.name for p in w.iterdir()) == before  # nothing half-written (no x/, no new folders)
    assert sorted(p.name for p in (w / "out_full").iterdir()) == ["keep.txt"]
    assert [p.name for p in (w / "foreign_dir").iterdir()] == ["thesis.tex"]


def test_zero_steps_and_batch_are_refused_not_replaced_by_defaults(w):
    # regression: `steps or recipe.sample.steps` silently turned --steps 0 into the default
    r = invoke("sample", w / "run", "--n", 2, "--steps", 0, "--out", w / "y")
    check(r, 2)
    assert "--steps must be positive, got 0" in r.stderr
    r = invoke("sample", w / "run", "--n", 2, "--batch-size", 0, "--out", w / "y")
    check(r, 2)
    assert "--batch-size must be positive, got 0" in r.stderr
    assert not (w / "y").exists()


def check(r, code):
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.exit_code == code, r.stderr
    assert len(errors) == 1, r.stderr
    assert r.stdout == ""


def test_recipes_with_a_broken_shipped_recipe(tmp_path, monkeypatch):
    import ddaepp_cli.cli.base as cli  # where the shipped-recipes folder is looked up

    (tmp_path / "broken.yaml").write_text("name: x\nmodel: {backbone: ddpm\n  - [\n")
    monkeypatch.setattr(cli, "RECIPES_DIR", tmp_path)
    check(invoke("recipes"), 2)


# Click's own parse errors, through the real entry point (`main`, what the `ddaepp` script runs).
PARSE_CASES = [
    ("not-an-int", "sample RUN --n abc", "Invalid value for '--n'"),
    ("not-a-float", "probe RUN --lr fast", "Invalid value for '--lr'"),
    ("unknown-option", "train RECIPE --bogus 1", "No such option: --bogus"),
    ("unknown-command", "frobnicate", "No such command 'frobnicate'"),
    ("missing-argument", "train", "Missing argument"),
    ("missing-option-value", "sample RUN --n", "requires an argument"),
]


@pytest.mark.parametrize("args,needle", [c[1:] for c in PARSE_CASES], ids=[c[0] for c in PARSE_CASES])
def test_parse_errors_are_one_line(args, needle, capsys):
    from ddaepp_cli.cli import main

    with pytest.raises(SystemExit) as e:
        main(args.split())
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ddaepp"), err
    assert needle in lines[0]


def test_parse_error_through_the_installed_module():
    from conftest import run_cli

    r = run_cli("sample", "nowhere", "--n", "abc")
    assert r.returncode == 2
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: ddaepp sample:"), r.stderr


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", ""])
def test_recipe_name_cannot_escape_runs(tmp_path, name):
    p = tmp_path / "r.yaml"
    p.write_text(SMALL.replace("name: tiny", f"name: {name!r}"))
    r = invoke("train", p, "--dry-run")
    check(r, 2)
    assert "plain folder name" in r.stderr
    assert not (tmp_path / "escape").exists() and not Path("runs/escape").exists()


def test_yaml_is_read_with_a_safe_loader(tmp_path):
    """A Python-object tag in a recipe is refused, never constructed."""
    p = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    p.write_text(SMALL + f"extra: !!python/object/apply:os.system ['touch {marker}']\n")
    r = invoke("train", p, "--dry-run")
    check(r, 2)
    assert not marker.exists()
