"""Linear probe: the batched heads, the one-pass grid against single probes, the command end to end
against scikit-learn's logistic regression, and the one-line errors (issue 4 acceptance)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, run_cli

# TINY with level multipliers 1-1 instead of 1-2: the same four decoder taps (out_1-2 at 4×4, out_3-4 at
# 8×8) at a third of the CPU cost.
SMALL = TINY.replace("ch_mults: [1, 2]", "ch_mults: [1, 1]")


def invoke(*args):
    """The CLI in-process (real exit codes and separate stdout/stderr, without a second torch import)."""
    from typer.testing import CliRunner

    from ddaepp_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of SMALL after 20 training steps (in-process `ddaepp train`)."""
    from ddaepp_cli.recipe import load_recipe
    from ddaepp_cli.training.train import train

    d = tmp_path_factory.mktemp("probe")
    (d / "small.yaml").write_text(SMALL)
    recipe = load_recipe(d / "small.yaml", ["train.checkpoint_every=1000", "train.log_every=1000"])
    return train(recipe, d / "run", max_steps=20)["checkpoint"]


# ------------------------------------------------------------------------------------------------
# Heads
# ------------------------------------------------------------------------------------------------


def test_head_bank_equals_separate_batchnorm_and_linear_modules():
    from ddaepp_cli.eval.probe import HeadBank

    keys, dims = ["a@1", "b@1", "a@2", "c@2"], [6, 4, 6, 6]
    bank = HeadBank(keys, dims, 3, batchnorm=True, seed=5)
    refs = []
    for k, d in zip(keys, dims):  # the same head alone: same init (keyed by name), same BN semantics
        solo = HeadBank([k], [d], 3, batchnorm=True, seed=5)
        lin = torch.nn.Linear(d, 3)
        lin.weight.data.copy_(solo.weight[0][0])
        lin.bias.data.copy_(solo.bias[0][0])
        refs.append((torch.nn.BatchNorm1d(d, affine=False), lin))
    g = torch.Generator().manual_seed(0)
    for train in (True, True, False):
        feats = [torch.randn(16, d, generator=g) * 3 + 1 for d in dims]
        bank.train(train)
        out = bank(feats)  # (H, B, K)
        assert out.shape == (4, 16, 3)
        for h, ((bn, lin), f) in enumerate(zip(refs, feats)):
            bn.train(train)
            assert torch.allclose(out[h], lin(bn(f)), atol=1e-5), (train, keys[h])
    assert torch.equal(bank.weight[0][0], HeadBank(["a@1"], [6], 3, batchnorm=True, seed=5).weight[0][0])
    assert not torch.equal(bank.weight[0][0], HeadBank(["a@1"], [6], 3, batchnorm=True, seed=6).weight[0][0])


def test_random_crop_is_a_per_sample_shifted_window():
    from ddaepp_cli.eval.features import random_crop

    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    out = random_crop(x, 2, torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    for b in range(2):
        hits = [(i, j) for i in range(5) for j in range(5) if torch.equal(padded[b, :, i:i + 5, j:j + 5], out[b])]
        assert len(hits) == 1
    assert random_crop(x, 0) is x


def test_stratified_split_is_fixed_disjoint_and_balanced():
    from ddaepp_cli.data import load_dataset
    from ddaepp_cli.eval.features import stratified_split

    ds = load_dataset("digits", split="train", image_size=8)
    tr, va = stratified_split(ds, 0.1)
    tr2, va2 = stratified_split(ds, 0.1)
    assert torch.equal(va.indices, va2.indices)
    assert len(tr) + len(va) == len(ds) and not set(tr.indices.tolist()) & set(va.indices.tolist())
    counts = torch.bincount(va.labels, minlength=10)
    assert counts.min() >= 13 and counts.max() <= 15  # ~144 / 10 per class
    assert torch.equal(va.images, ds.images[va.indices])


# ------------------------------------------------------------------------------------------------
# One pass versus single probes
# ------------------------------------------------------------------------------------------------


def test_one_pass_grid_equals_separate_single_probes(trained):
    from ddaepp_cli.build import build_formulation
    from ddaepp_cli.data import load_dataset
    from ddaepp_cli.eval.features import Subset, parse_times
    from ddaepp_cli.eval.probe import PROTOCOLS, run_bank
    from ddaepp_cli.sample import load_model

    recipe, model, _ = load_model(trained, "ema", "cpu")
    form = build_formulation(recipe)
    ds = load_dataset("digits", split="train", image_size=8)
    train_ds, val_ds = Subset(ds, torch.arange(0, 192), "a"), Subset(ds, torch.arange(192, 256), "b")
    times = parse_times(form, "11,101", default=())
    kw = dict(num_classes=10, protocol=PROTOCOLS["ddae++"], epochs=3, batch_size=32, lr=2e-2, seed=1,
              hflip=True, crop_pad=0, cache=False, device=torch.device("cpu"), precision="fp32", eval_stream=99)
    keys, acc, losses = run_bank(model, form, ["out_1", "out_3"], times, train_ds, val_ds, **kw)
    assert keys == ["out_1@11", "out_3@11", "out_1@101", "out_3@101"]
    assert float(acc.max()) > 0.3  # 10 classes: the heads learned something in 18 steps
    for key, a in zip(keys, acc.tolist()):
        layer, t = key.split("@")
        _, single, _ = run_bank(model, form, [layer], [x for x in times if x.text == t], train_ds, val_ds, **kw)
        assert abs(float(single[0]) - a) <= 1.5 / len(val_ds), key  # same batches, noise, flips and init


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


def test_probe_json_beats_chance_and_matches_logistic_regression(trained, tmp_path):
    """Acceptance: accuracies far above chance, and the best cell within a few points of an L-BFGS
    logistic regression on the same extracted features (same layer and time, no flips)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from ddaepp_cli.build import build_formulation
    from ddaepp_cli.eval.features import extract_pooled, load_eval_dataset
    from ddaepp_cli.sample import load_model

    plot = tmp_path / "grid.png"
    r = run_cli("probe", trained, "--layers", "out_1,out_2", "--timesteps", "21", "--no-hflip", "--json",
                "--plot", plot)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # exactly one JSON object on stdout
    assert len(out["cells"]) == 2 and out["selected_on"] == "val" and out["chance"] == 0.1
    assert all(c["accuracy"] > 0.5 for c in out["cells"])
    best = out["best"]
    assert best["accuracy"] == max(c["accuracy"] for c in out["cells"])
    assert out["test_accuracy"] > 0.6
    proto = out["protocol"]
    assert proto["noise"] == "fixed per image (cached)" and proto["epochs"] == 100  # digits defaults
    assert proto["dataset"]["num_val"] == 143 and proto["dataset"]["num_train"] == 1442
    assert proto["weights"] == "ema" and len(proto["weights_sha256"]) == 64
    assert plot.read_bytes()[:4] == b"\x89PNG"
    record = json.loads(open(out["eval_record"]).read())
    assert record["test_accuracy"] == out["test_accuracy"] and "/eval/probe-" in out["eval_record"]

    recipe, model, _ = load_model(trained, "ema", "cpu")
    form = build_formulation(recipe)
    t = form.parse_time(best["timestep"])
    feats = {}
    for split in ("train", "test"):
        ds = load_eval_dataset(recipe, dataset=None, split=split, root=None)
        f, y = extract_pooled(model, form, ds, [best["layer"]], t, n=None, batch_size=512, seed=3,
                              device=torch.device("cpu"), precision="fp32")
        feats[split] = (f[best["layer"]].numpy(), y.numpy())
    scale = StandardScaler().fit(feats["train"][0])
    logreg = LogisticRegression(max_iter=2000).fit(scale.transform(feats["train"][0]), feats["train"][1])
    reference = logreg.score(scale.transform(feats["test"][0]), feats["test"][1])
    assert abs(out["test_accuracy"] - reference) < 0.04, (out["test_accuracy"], reference)


def test_bad_layers_times_datasets_fail_with_one_line(trained, tmp_path):
    cases = [
        (("--layers", "out_7"), 2, "out_4"),  # unknown layer: the valid ones are listed
        (("--timesteps", "11,1001"), 2, "1..1000"),  # outside DDPM's schedule
        (("--timesteps", "idx:4"), 2, "integer"),  # an EDM time for a DDPM model
        (("--dataset", "cifar10", "--data-root", tmp_path / "none"), 3, "cifar-10-batches-py"),
        (("--dataset", "mnist"), 2, "digits"),
        (("--protocol", "ddae", "--cache-features"), 2, "crop"),
        (("--val-fraction", "1.5"), 2, "[0, 1)"),
    ]
    for args, code, word in cases:
        r = invoke("probe", trained, *args)
        assert r.exit_code == code, (args, r.stderr)
        assert r.stderr.startswith("error: ") and r.stderr.strip().count("\n") == 0, r.stderr
        assert word in r.stderr, (args, r.stderr)


def test_image_folders_use_the_model_geometry_and_their_val_split(tmp_path):
    from PIL import Image

    from ddaepp_cli.errors import UsageError
    from ddaepp_cli.eval.features import load_eval_dataset
    from ddaepp_cli.recipe import load_recipe

    for split, n in (("train", 3), ("val", 2)):
        for c in ("cat", "dog"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 12), (40 * i, 90, 200)).save(tmp_path / "imgs" / split / c / f"{i}.png")
    text = SMALL.replace("data: {dataset: digits, image_size: 8,", f"data: {{dataset: imagefolder, root: {tmp_path / 'imgs'},"
                         " image_size: 8,")
    (tmp_path / "r.yaml").write_text(text)
    recipe = load_recipe(tmp_path / "r.yaml")
    test = load_eval_dataset(recipe, dataset=None, split="test", root=None)
    assert test.split == "val" and len(test) == 4 and test.image_size == 8 and test.class_names == ["cat", "dog"]
    with pytest.raises(UsageError, match="3×8×8"):  # a 1-channel digits model cannot read RGB folders
        load_eval_dataset(load_recipe(tmp_path / "r.yaml", ["data.dataset=digits", "data.root=null"]),
                          dataset="imagefolder", split="train", root=str(tmp_path / "imgs"))
    with pytest.raises(UsageError, match="held-out"):
        load_eval_dataset(recipe, dataset=None, split="test", root=str(tmp_path / "imgs" / "train"))
