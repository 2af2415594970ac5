"""Class labels of class-conditional samples (`sample`, `fid`) and `fid --clip` on latent runs.

Labels are drawn as the papers' FID scripts draw them — uniformly at random,
`y = torch.randint(0, args.num_classes, (n,))` in DiT and SiT `sample_ddp.py`, REPA and SRA `generate.py`
and LightningDiT `inference.py` — but each from its own seed's generator, so they do not depend on the
batch size or the process count; `--labels balanced` (`sample.labels`) gives `seed % num_classes`.
The run is a tiny class-conditional LightningDiT on 8×8 pixels (random, perturbed weights).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from ddaepp_cli import sample as S
from ddaepp_cli.seeding import LABEL_STREAM, generator_seed, per_sample_randint

COND = """\
name: tinycond
data: {dataset: imagefolder, image_size: 8, num_workers: 0}
model: {backbone: dit, patch_size: 2, width: 32, depth: 2, heads: 2, num_classes: 10}
diffusion: {formulation: rf}
sample: {sampler: euler, steps: 2, batch_size: 4}
"""


def cli(*args):
    from ddaepp_cli.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, [ln for ln in r.stderr.splitlines() if ln.strip()], r.stdout


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    from ddaepp_cli.build import build_backbone
    from ddaepp_cli.checkpoint import save_checkpoint
    from ddaepp_cli.recipe import recipe_from_dict

    base = tmp_path_factory.mktemp("labels")
    rec = recipe_from_dict(yaml.safe_load(COND))
    torch.manual_seed(0)
    net = build_backbone(rec)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # past adaLN-Zero and the zero head: the images depend on the label
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    save_checkpoint(base / "run", 1, recipe=rec, model=net, ema=net, state={})
    return {"base": base, "run": base / "run", "recipe": rec}


def test_random_labels_are_uniform_per_seed_and_independent_of_sharding():
    seeds = list(range(5000))
    y = per_sample_randint(seeds, 10)
    counts = Counter(y)
    assert set(counts) == set(range(10))  # every class appears ...
    assert len(set(counts.values())) > 1  # ... and not exactly balanced (that is seed % 10: 500 each)
    assert all(400 < c < 600 for c in counts.values())  # uniform: 500 ± 4.5σ
    assert y != [s % 10 for s in seeds]
    # entry i is torch.randint from seed i's own CPU generator on the label stream, nothing else
    g = torch.Generator().manual_seed(generator_seed(1234, LABEL_STREAM))
    assert y[1234] == int(torch.randint(10, (1,), generator=g))
    # any split over processes or batches gives each seed the same label
    for world in (2, 3, 8):
        for rank in range(world):
            assert per_sample_randint(seeds[rank::world], 10) == y[rank::world]
    assert per_sample_randint([4999, 17, 3], 10) == [y[4999], y[17], y[3]]
    assert per_sample_randint([7], 1000) != per_sample_randint([7], 1000, stream=0)  # not the noise stream


def test_label_rules_and_their_checks(cond_run):
    rec = cond_run["recipe"]
    assert rec.sample.labels == "random"  # the papers' protocol is the default
    seeds = [3, 10, 11, 25]
    assert S.label_mode(rec, 10) == "random"
    assert S.class_labels_for(seeds, 10, "random") == per_sample_randint(seeds, 10)
    assert S.class_labels_for(seeds, 10, S.label_mode(rec, 10, labels="balanced")) == [3, 0, 1, 5]
    assert S.class_labels_for(seeds, 10, S.label_mode(rec, 10, class_label=7), 7) == [7] * 4
    assert S.label_mode(rec, 0) is None and S.class_labels_for(seeds, 0, None) is None
    for kw, fragment in ((dict(labels="uniform"), "--labels must be one of random, balanced"),
                         (dict(labels="random", class_label=2), "not both"),
                         (dict(class_label=10), "--class-label must be in 0..9")):
        with pytest.raises(S.UsageError, match=fragment):
            S.label_mode(rec, 10, **kw)
    with pytest.raises(S.UsageError, match="--labels needs a class-conditional model"):
        S.label_mode(rec, 0, labels="balanced")


def _labels_seen(monkeypatch) -> list[int]:
    """The labels `generate` guides with, batch after batch."""
    from ddaepp_cli.diffusion import cfg

    seen: list[int] = []
    real = cfg.guided_denoiser

    def spy(formulation, model, y, **kw):
        seen.extend(y.tolist())
        return real(formulation, model, y, **kw)

    monkeypatch.setattr(cfg, "guided_denoiser", spy)
    return seen


def test_sample_default_random_labels_any_batch_size_and_recorded(cond_run, tmp_path, monkeypatch):
    run = cond_run["run"]
    seen = _labels_seen(monkeypatch)
    seeds = list(range(12))
    kw = dict(sampler=None, steps=None, weights="ema", formats=["npz"], clip=None)
    a = S.sample_command(str(run), seeds=seeds, out=str(tmp_path / "a"), batch_size=5, **kw)
    assert seen == per_sample_randint(seeds, 10) and seen != [s % 10 for s in seeds]
    seen.clear()
    b = S.sample_command(str(run), seeds=seeds, out=str(tmp_path / "b"), batch_size=12, **kw)
    assert seen == per_sample_randint(seeds, 10)
    x, y = (np.load(tmp_path / d / "samples.npz")["arr_0"] for d in ("a", "b"))
    assert np.array_equal(x, y)  # the same images for any batch size
    proto = json.loads((tmp_path / "a" / "protocol.json").read_text())
    assert a["labels"] == b["labels"] == proto["labels"] == "random" and "torch.randint" in proto["class_labels"]
    seen.clear()
    c = S.sample_command(str(run), seeds=seeds, out=str(tmp_path / "c"), batch_size=5, labels="balanced", **kw)
    assert seen == [s % 10 for s in seeds] and c["labels"] == "balanced"
    assert json.loads((tmp_path / "c" / "protocol.json").read_text())["class_labels"] == "seed % num_classes"
    z = np.load(tmp_path / "c" / "samples.npz")["arr_0"]
    assert np.array_equal(z[0], x[0]) is (seen[0] == per_sample_randint([0], 10)[0])  # the label changes the image
    assert not np.array_equal(z, x)


def test_sample_cli_labels_option_and_recipe_key(cond_run, tmp_path):
    run = cond_run["run"]
    code, err, _ = cli("sample", run, "--seeds", "0-3", "--labels", "balanced", "--out", tmp_path / "s",
                       "--format", "png")
    assert code == 0, err
    assert json.loads((tmp_path / "s" / "protocol.json").read_text())["labels"] == "balanced"
    code, err, _ = cli("sample", run, "--seeds", "0-3", "--labels", "even", "--out", tmp_path / "t")
    assert code == 2 and len(err) == 1 and "--labels must be one of random, balanced" in err[0], err
    code, err, _ = cli("sample", run, "--seeds", "0-3", "--labels", "random", "--class-label", "1",
                       "--out", tmp_path / "t")
    assert code == 2 and len(err) == 1 and "not both" in err[0], err
    from ddaepp_cli.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(COND)
    assert load_recipe(path, ["sample.labels=balanced"]).sample.labels == "balanced"
    with pytest.raises(S.UsageError, match="labels"):
        load_recipe(path, ["sample.labels=stratified"])


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    from ddaepp_cli.eval import inception

    path = tmp_path_factory.mktemp("inc") / "inception.pth"
    torch.save(inception.random_state_dict(0, active=256), path)
    return str(path)


def test_fid_records_the_label_rule_and_balanced_changes_it(cond_run, inception_weights, tmp_path, monkeypatch):
    from ddaepp_cli.eval import fid as F
    from test_fid import write_images

    ref = tmp_path / "ref"
    write_images(ref, seed=3, n=6, size=8)
    seen = _labels_seen(monkeypatch)
    kw = dict(ref=str(ref), inception_weights=inception_weights, extractor_dtype="float32", cache=False)
    r = F.fid(str(cond_run["run"]), n=6, batch_size=4, **kw)
    assert sorted(seen) == sorted(per_sample_randint(range(6), 10))
    record = json.loads(Path(r["eval_record"]).read_text())
    assert r["protocol"]["labels"] == record["protocol"]["labels"] == "random"
    assert record["input"]["labels"] == "random" and "torch.randint" in record["input"]["class_labels"]
    seen.clear()
    b = F.fid(str(cond_run["run"]), n=6, batch_size=3, labels="balanced", **kw)
    assert sorted(seen) == sorted(s % 10 for s in range(6))
    assert b["protocol"]["labels"] == "balanced" and b["input"]["class_labels"] == "seed % num_classes"
    assert b["metrics"]["fid"] != r["metrics"]["fid"]
    code, err, _ = cli("fid", ref, "--ref", ref, "--labels", "balanced", "--inception-weights", inception_weights)
    assert code == 2 and len(err) == 1 and "apply to a run" in err[0], err
    code, err, _ = cli("fid", cond_run["run"], "--ref", ref, "--labels", "many", "--inception-weights",
                       inception_weights)
    assert code == 2 and len(err) == 1 and "--labels must be one of random, balanced" in err[0], err


def test_fid_clip_on_a_latent_run_exits_2_as_sample_does(tmp_path, inception_weights):
    """Issue 21.7: `fid --clip` clipped unit-variance latents to [-1, 1] and recorded the result as an FID."""
    from test_fid_latent import make_latent_run

    d = make_latent_run(tmp_path, steps=(1,))
    ref = tmp_path / "ref"
    from test_fid import write_images

    write_images(ref, seed=3, n=4, size=32)
    code, err_s, _ = cli("sample", d["run"], "--seeds", "0-1", "--clip", "--out", tmp_path / "s")
    code_f, err_f, out = cli("fid", d["run"], "--n", 2, "--clip", "--ref", ref, "--inception-weights",
                             inception_weights, "--extractor-dtype", "float32", "--json")
    assert code == 2 and code_f == 2 and len(err_f) == 1 and out == "", (code_f, err_f)
    assert err_f == err_s and "latents have unit variance" in err_f[0]
    assert not (d["run"] / "eval").exists()  # no record written
    code, err, _ = cli("fid", d["run"], "--n", 2, "--no-clip", "--ref", ref, "--inception-weights",
                       inception_weights, "--extractor-dtype", "float32", "--cfg-scale", 1, "--json")
    assert code == 0, err
