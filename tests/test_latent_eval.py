"""Evaluation of latent (DiT) runs end to end on a CPU (issue 12): real digits written as an ImageNet-style
folder → a tiny random VAE in the released LDM checkpoint layout → labelled train and validation latent
caches → a tiny DiT trained a few hundred steps → probe (grid, layer-wise curve, raw-latent baseline,
several checkpoints), cka, segprobe on an ADE20K-layout set; two processes against one; bad input.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import ROOT, run_cli
from ddaepp_cli.cli import app
from ddaepp_cli.errors import UsageError

STEPS = 600  # training steps of the tiny DiT (two checkpoints: 300 and 600); ~90 s on a loaded 2-core CPU
VAE = dict(ch=32, ch_mult=(1, 2, 2, 2), z=16)  # f = 8: 32 px digits → 16×4×4 latents
# patch 2: a 2×2 token grid. Average-pooled tokens of a DiT this small and this briefly trained carry little
# beyond the patch embedding on a larger grid (measured: 4×4 tokens, 300 steps → 14 % test accuracy)
DIT = ["model.width=96", "model.depth=4", "model.heads=2", "model.patch_size=2", "train.global_batch=32",
       "train.lr=3e-3", "train.ema.decay=0.98"]


def cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    return r, lines


def train_dit(cache: Path, run: Path, steps: int, extra=()) -> dict:
    from ddaepp_cli.recipe import load_recipe
    from ddaepp_cli.training.train import train

    sets = [f"data.root={cache}", "data.num_workers=0", "train.batch_per_process=null", "train.precision=fp32",
            "train.compile=false", "train.log_every=50", f"train.checkpoint_every={max(1, steps // 2)}",
            "train.milestones=[]", "train.sample_every=0", *DIT, *extra]
    rec = load_recipe(ROOT / "recipes" / "imagenet256_rf_ditb.yaml", sets)
    return train(rec, run, max_steps=steps)


def ade_layout(root: Path, n_train: int = 8, n_val: int = 4) -> Path:
    """ADEChallengeData2016/images/{training,validation}/*.jpg + annotations/…/*.png: two regions."""
    rng = np.random.default_rng(0)
    ade = root / "ADEChallengeData2016"
    for split, n in (("training", n_train), ("validation", n_val)):
        (ade / "images" / split).mkdir(parents=True)
        (ade / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            cut = 20 + int(rng.integers(-6, 7))
            img = np.zeros((36, 40, 3), np.int32)
            img[:, :cut], img[:, cut:] = (220, 30, 30), (30, 30, 220)
            img = np.clip(img + rng.integers(-15, 16, img.shape), 0, 255).astype(np.uint8)
            lab = np.full((36, 40), 4, np.uint8)
            lab[:, cut:] = 5
            lab[:2] = 0  # ADE "other": ignored
            Image.fromarray(img).save(ade / "images" / split / f"ADE_{split}_{i:08d}.jpg", quality=95)
            Image.fromarray(lab).save(ade / "annotations" / split / f"ADE_{split}_{i:08d}.png")
    return root


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from test_latents import write_tiny_vae

    base = tmp_path_factory.mktemp("latent-eval")
    r = run_cli("export-digits", base / "digits", "--json")  # the README's command
    assert r.returncode == 0, r.stderr
    exported = json.loads(r.stdout)
    assert (exported["train"], exported["val"]) == (1442, 355)
    vae = base / "vae.safetensors"
    write_tiny_vae(vae, **VAE)
    train_cache, val_cache = base / "lat", base / "lat_val"
    common = ["--vae", vae, "--image-size", "32", "--num-workers", "0", "--batch-size", "128"]
    r, _ = cli("cache-latents", "--data", base / "digits" / "train", "--out", train_cache, "--shard-size", "1000",
               *common)
    assert r.exit_code == 0, r.output
    r, _ = cli("cache-latents", "--data", base / "digits" / "val_flat", "--labels", base / "digits" / "val_labels.txt",
               "--classes", train_cache, "--out", val_cache, "--json", *common)
    assert r.exit_code == 0, r.output
    result = train_dit(train_cache, base / "run", STEPS)
    assert result["step"] == STEPS
    return base


def probe_args(*extra):
    # digits are 1,298 training images: batch 128 and 60 epochs on cached features instead of ImageNet's
    # 1440 × 30 (one step per epoch here)
    return ["--epochs", "60", "--batch-size", "128", "--cache-features", "--device", "cpu", "--json", *extra]


# ------------------------------------------------------------------------------------------------
# caches
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_labelled_caches_name_their_classes(pipeline):
    train = json.loads((pipeline / "lat" / "manifest.json").read_text())
    val = json.loads((pipeline / "lat_val" / "manifest.json").read_text())
    assert train["class_names"] == val["class_names"] == [str(d) for d in range(10)]
    assert sum(train["class_counts"]) == 1442 and sum(val["class_counts"]) == 355
    assert val["class_counts"] == [35, 36, 35, 36, 36, 36, 36, 35, 34, 36]  # sklearn's digits, every 5th per class
    assert train["labels_source"]["layout"] == "class folders"
    assert val["labels_source"]["layout"] == "flat + labels file" and "text" in val["labels_source"]["format"]
    from ddaepp_cli.data.latentstore import LatentDataset

    ds = LatentDataset(pipeline / "lat_val", split="val", stats_root=pipeline / "lat")
    labels_from_files = [int(line.split()[1]) for line in (pipeline / "digits" / "val_labels.txt").read_text().split("\n")
                         if line]
    assert ds.file_labels.tolist() == labels_from_files and ds.stats_root == pipeline / "lat"


def test_label_files_loc_csv_and_text(tmp_path):
    from ddaepp_cli.data.labelfiles import labels_for

    files = [str(tmp_path / f"ILSVRC2012_val_{i:08d}.JPEG") for i in (1, 2, 3)]
    classes = ["n01440764", "n01443537", "n01484850"]
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\nILSVRC2012_val_00000002,n01484850 1 2 3 4 n01484850 5 6 7 8\n"
                   "ILSVRC2012_val_00000001,n01443537 0 0 9 9\nILSVRC2012_val_00000003,n01440764 1 1 2 2\n"
                   "ILSVRC2012_val_00000009,n01440764 1 1 2 2\n")
    labels, fmt = labels_for(files, tmp_path, csv, classes)
    assert labels == [1, 2, 0] and "LOC_val_solution" in fmt
    txt = tmp_path / "val.txt"
    txt.write_text("# caffe\nILSVRC2012_val_00000001.JPEG 2\nILSVRC2012_val_00000002.JPEG n01440764\n"
                   "ILSVRC2012_val_00000003.JPEG 1\n")
    assert labels_for(files, tmp_path, txt, classes)[0] == [2, 0, 1]
    txt.write_text("ILSVRC2012_val_00000001.JPEG 3\n")
    with pytest.raises(UsageError, match="outside 0..2"):
        labels_for(files[:1], tmp_path, txt, classes)
    txt.write_text("ILSVRC2012_val_00000001.JPEG 2\n")
    with pytest.raises(UsageError, match="no label for ILSVRC2012_val_00000002"):
        labels_for(files[:2], tmp_path, txt, classes)
    txt.write_text("ILSVRC2012_val_00000001.JPEG dog\n")
    with pytest.raises(UsageError, match="neither a class index"):
        labels_for(files[:1], tmp_path, txt, classes)


def test_cache_latents_label_options_are_checked(tmp_path):
    from test_latents import make_image_folder, write_tiny_vae

    vae = tmp_path / "vae.safetensors"
    write_tiny_vae(vae)
    folders = make_image_folder(tmp_path / "img")
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted(folders.glob("*/*.png"))[:3]:
        shutil.copy(f, flat / f"{f.parent.name}_{f.name}")
    (tmp_path / "labels.txt").write_text("cat_00.png cat\ncat_01.png 1\n")
    base = ["cache-latents", "--vae", vae, "--image-size", "32", "--num-workers", "0"]
    r, lines = cli(*base, "--data", folders, "--labels", tmp_path / "labels.txt", "--out", tmp_path / "a")
    assert r.exit_code == 2 and len(lines) == 1 and "flat folder" in lines[0]
    r, lines = cli(*base, "--data", flat, "--labels", tmp_path / "labels.txt", "--out", tmp_path / "b")
    assert r.exit_code == 2 and len(lines) == 1 and "--classes" in lines[0]
    r, lines = cli(*base, "--data", flat, "--labels", tmp_path / "labels.txt", "--classes", folders, "--out", tmp_path / "c")
    assert r.exit_code == 2 and len(lines) == 1 and "cat_02" in lines[0]  # the third image has no label
    (tmp_path / "labels.txt").write_text("cat_00.png cat\ncat_01.png 1\ncat_02 dog\n")
    r, _ = cli(*base, "--data", flat, "--labels", tmp_path / "labels.txt", "--classes", folders, "--out",
               tmp_path / "d", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["class_names"] == ["cat", "dog"] and m["class_counts"] == [1, 2]


def test_imagenet_recipes_keep_the_paper_epochs():
    """DDAE++ Tab. 5 / Fig. 4 evaluate 100/200/400-epoch checkpoints: milestones = epochs × ⌊1,281,167 / 1024⌋."""
    from ddaepp_cli.recipe import load_recipe

    spe = 1_281_167 // 1024
    for name, epochs in (("imagenet256_rf_ditb", (100, 200, 400)), ("imagenet256_rf_ditl_sc", (100, 200, 400)),
                         ("imagenet256_rf_ditb_cond_sc", (100,)), ("imagenet256_rf_ditxl_cond", (40,))):
        t = load_recipe(ROOT / "recipes" / f"{name}.yaml", []).train
        assert t.milestones == tuple(e * spe for e in epochs), name
        assert all(m % t.checkpoint_every == 0 for m in t.milestones), name  # a checkpoint is written there


# ------------------------------------------------------------------------------------------------
# probe, cka, segprobe on the trained tiny DiT
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_probe_beats_chance_and_draws_the_layer_curve(pipeline):
    r, _ = cli("probe", pipeline / "run", *probe_args("--layers", "all"))
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["layers"] == ["1", "2", "3", "4"] and [t["text"] for t in out["timesteps"]] == ["0.25"]
    assert out["selected_on"] == "val" and out["chance"] == pytest.approx(0.1)
    assert out["test_accuracy"] > 0.22, out["test_accuracy"]  # 10 classes: more than twice chance
    assert out["best"]["accuracy"] > 0.25
    assert out["protocol"]["class_condition"] == "none" and out["protocol"]["lr"] == 2e-3  # Tab. 10, DiT-B
    assert out["protocol"]["dataset"]["num_test"] == 355 and out["protocol"]["dataset"]["split"] == "train/test"
    curve = out["layer_curve"]
    assert curve["layers"] == out["layers"] and len(curve["test_accuracy"]) == 4
    assert curve["test_accuracy"][out["layers"].index(out["best"]["layer"])] == out["test_accuracy"]
    assert Image.open(curve["png"]).size[0] > 100
    saved = json.loads(Path(curve["json"]).read_text())
    assert saved["test_accuracy"] == curve["test_accuracy"] and saved["timestep"]["value"] == 0.25


@pytest.mark.slow
def test_raw_latent_baseline_and_paper_defaults(pipeline):
    r, _ = cli("probe", pipeline / "run", *probe_args("--layers", "latent"))
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["layers"] == ["latent"] and out["best"]["timestep"] == "clean" and out["cells"] == []
    assert out["test_accuracy"] > 0.4  # the flattened latent keeps the layout (measured 0.6 by sklearn)
    assert out["protocol"]["features_kind"].startswith("flattened clean latent")
    from ddaepp_cli.eval.latentprobe import latent_defaults
    from ddaepp_cli.recipe import load_recipe

    for size, lr in (("B", 2e-3), ("L", 1e-3)):
        rec = load_recipe(ROOT / "recipes" / f"imagenet256_rf_dit{size.lower()}.yaml", [])
        assert latent_defaults(rec) == {"epochs": 30, "batch_size": 1440, "cache_features": False, "lr": lr}


@pytest.mark.slow
def test_probe_over_checkpoints(pipeline):
    r, _ = cli("probe", pipeline / "run", *probe_args("--layers", "4", "--checkpoints", "all"))
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    steps = [c["step"] for c in out["checkpoints"]]
    assert steps == [STEPS // 2, STEPS] and len(out["results"]) == 2
    assert out["best"]["score"] == max(res["test_accuracy"] for res in out["results"])
    r, lines = cli("probe", pipeline / "run", *probe_args("--checkpoints", "7"))
    assert r.exit_code == 2 and len(lines) == 1 and f"{STEPS // 2}, {STEPS}" in lines[0]


@pytest.mark.slow
def test_cka_within_and_between_runs(pipeline):
    r, _ = cli("cka", pipeline / "run", "--n", "200", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    m = np.array(out["matrix"])
    assert m.shape == (4, 4) and np.allclose(np.diag(m), 1.0) and np.allclose(m, m.T)
    assert out["timestep"]["text"] == "0.25" and out["n"] == 200 and Path(out["plot"]).is_file()
    assert out["protocol"]["dataset"]["split"] == "val"
    first = pipeline / "run" / "checkpoints" / f"step-{STEPS // 2:07d}"
    r, _ = cli("cka", pipeline / "run", first, "--n", "200", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out["layerwise"]) == {"1", "2", "3", "4"} and all(0 < v <= 1 + 1e-9 for v in out["layerwise"].values())


@pytest.mark.slow
def test_segprobe_on_a_latent_run(pipeline, tmp_path, monkeypatch):
    monkeypatch.setenv("DDAEPP_CACHE", str(tmp_path / "cache"))
    data = ade_layout(tmp_path / "seg")
    args = ["segprobe", pipeline / "run", "--dataset", "ade20k", "--data-root", data, "--epochs", "20",
            "--batch-size", "4", "--label-size", "32", "--device", "cpu", "--json"]
    r, _ = cli(*args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["layers"] == ["2", "3"]  # DiT-B's blocks 5 and 7 of 12 at the same relative depth
    assert out["timestep"]["text"] == "0.25" and out["classes_evaluated"] == 2
    assert 0 <= out["miou"] <= 1 and out["train_losses"][-1] < out["train_losses"][0]
    assert "VAE latents" in out["protocol"]["model_input"] and out["protocol"]["val"]["latent_shape"] == [16, 4, 4]
    caches = sorted((tmp_path / "cache" / "seg-latents").iterdir())
    assert [c.name.split("-")[1] for c in caches] == ["train", "val"]
    stamps = [(c / "shard-00000.safetensors").stat().st_mtime_ns for c in caches]
    r, _ = cli(*args, "--checkpoints", "all")  # every checkpoint; the encodings are re-used, not recomputed
    assert r.exit_code == 0, r.output
    both = json.loads(r.stdout)
    assert [c["step"] for c in both["checkpoints"]] == [STEPS // 2, STEPS]
    assert both["results"][1]["miou"] == out["miou"] and both["best"]["score"] == max(x["miou"] for x in both["results"])
    assert [(c / "shard-00000.safetensors").stat().st_mtime_ns for c in caches] == stamps


@pytest.mark.slow
def test_bad_input_on_latent_runs(pipeline, tmp_path, monkeypatch):
    run = pipeline / "run"
    for args, code, needle in [
        (("probe", run, "--layers", "latent", "--timesteps", "0.3"), 2, "takes no --timesteps"),
        (("probe", run, "--layers", "9"), 2, "valid: 1, 2, 3, 4"),
        (("probe", run, "--protocol", "ddae", "--layers", "2"), 2, "random crops"),
        (("probe", run, "--test-root", tmp_path / "none"), 3, "cache-latents"),
        (("probe", run, "--dataset", "digits"), 2, "latent"),
        (("align", run), 2, "latent"),
        (("noisy-classifier", run), 2, "latent"),
        (("segprobe", run, "--data-root", ade_layout(tmp_path / "seg"), "--image-size", "64"), 2, "give 32"),
        (("segprobe", run, "--dataset", "coco"), 2, "ade20k, voc"),
        (("cka", run, "--timestep", "2"), 2, "0.25"),
    ]:
        r, lines = cli(*args)
        assert r.exit_code == code and len(lines) == 1 and needle in lines[0], (args, r.exit_code, r.output)
    # the VAE file is gone: segprobe cannot encode the images (exit 3, naming the file)
    monkeypatch.setenv("DDAEPP_CACHE", str(tmp_path / "cache"))
    vae = pipeline / "vae.safetensors"
    moved = tmp_path / "moved.safetensors"
    shutil.move(vae, moved)
    try:
        r, lines = cli("segprobe", run, "--data-root", tmp_path / "seg", "--device", "cpu")
        assert r.exit_code == 3 and len(lines) == 1 and "vae.safetensors" in lines[0], r.output
    finally:
        shutil.move(moved, vae)


# ------------------------------------------------------------------------------------------------
# two processes give the same latent probe features as one
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_latent_probe_two_processes_match_one(pipeline, tmp_path):
    from mp_helpers.latent_probe_features import main as features
    from test_multiprocess import HELPERS, torchrun

    run = pipeline / "run"
    ckpt = run / "checkpoints" / f"step-{STEPS:07d}"
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):  # own copies: each writes its own eval records
        shutil.copytree(run, d, ignore=shutil.ignore_patterns("eval", "samples"))
    features(str(one / "checkpoints" / ckpt.name), str(tmp_path / "one.pt"))
    r = torchrun(two / "checkpoints" / ckpt.name, tmp_path / "two.pt", script=HELPERS / "latent_probe_features.py")
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in ("one", "two"))
    assert (a["world"], b["world"]) == (1, 2) and a["keys"] == b["keys"]
    for name in ("live_train", "live_eval", "raw_train", "cache"):
        for x, y in zip(a[name], b[name]):
            torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5, msg=name)
    assert a["bank"]["keys"] == b["bank"]["keys"] and torch.equal(a["bank"]["acc"], b["bank"]["acc"])
    p, q = a["probe"], b["probe"]
    assert q["cells"] == p["cells"] and q["best"] == p["best"] and q["test_accuracy"] == p["test_accuracy"]
    assert (p["protocol"]["world_size"], q["protocol"]["world_size"]) == (1, 2)


def test_class_conditional_dit_is_probed_with_the_null_label():
    """`probe`, `cka` and `segprobe` call the tap API without labels: a conditional DiT then reads the null
    class (row num_classes), as pixel runs do — not class 0, and not a real label."""
    from ddaepp_cli.build import build_formulation
    from ddaepp_cli.eval.features import noised_features
    from ddaepp_cli.nets.dit import build_dit
    from ddaepp_cli.recipe import load_recipe

    torch.manual_seed(0)
    net = build_dit("B", in_channels=4, image_size=4, patch_size=1, width=32, depth=2, heads=2, num_classes=3).eval()
    with torch.no_grad():
        for p in net.parameters():  # non-zero adaLN gates, so the label reaches the features
            p.add_(0.05 * torch.randn_like(p))
    form = build_formulation(load_recipe(ROOT / "recipes" / "imagenet256_rf_ditb_cond.yaml", []))
    x = torch.randn(2, 4, 4, 4)
    noise = torch.randn(2, 4, 4, 4)
    got = noised_features(net, form, x, 0.25, ["2"], noise=noise)["2"]
    x_in, t_net = (x * 0.75 + noise * 0.25), torch.full((2,), 0.25)
    null = net.forward_features(x_in, form.net_time(t_net), ["2"], class_labels=torch.full((2,), 3))["2"].mean(1)
    zero = net.forward_features(x_in, form.net_time(t_net), ["2"], class_labels=torch.zeros(2, dtype=torch.long))["2"].mean(1)
    torch.testing.assert_close(got, null)
    assert not torch.allclose(got, zero)


# ------------------------------------------------------------------------------------------------
# Fast checks of the pieces the end-to-end tests above run (they are in the fast tier)
# ------------------------------------------------------------------------------------------------


def test_export_digits_writes_the_imagenet_layouts(tmp_path):
    from PIL import Image

    from ddaepp_cli.data.exportdigits import export_digits
    from ddaepp_cli.errors import UsageError

    out = export_digits(tmp_path / "d", image_size=8)
    assert (out["train"], out["val"]) == (1442, 355)
    train = sorted((tmp_path / "d" / "train").glob("*/*.png"))
    assert len(train) == 1442 and {p.parent.name for p in train} == {str(d) for d in range(10)}
    lines = (tmp_path / "d" / "val_labels.txt").read_text().splitlines()
    assert len(lines) == 355
    name, label = lines[0].split()
    assert (tmp_path / "d" / "val" / label / name).is_file() and (tmp_path / "d" / "val_flat" / name).is_file()
    assert Image.open(tmp_path / "d" / "val_flat" / name).size == (8, 8)
    with pytest.raises(UsageError, match="not an empty folder"):
        export_digits(tmp_path / "d", image_size=8)  # never writes into a used folder


def test_segmentation_latents_are_cached_per_dataset_split_size_vae_and_root(tmp_path, monkeypatch):
    from ddaepp_cli.eval.seglatent import cache_folder

    monkeypatch.setenv("DDAEPP_CACHE", str(tmp_path / "cache"))
    a = cache_folder("ade20k", "train", tmp_path / "ade", 256, "ab" * 32)
    assert a.parent == tmp_path / "cache" / "seg-latents" and a.name.startswith("ade20k-train-256px-" + "ab" * 6)
    others = {cache_folder("ade20k", "val", tmp_path / "ade", 256, "ab" * 32),
              cache_folder("ade20k", "train", tmp_path / "other", 256, "ab" * 32),
              cache_folder("ade20k", "train", tmp_path / "ade", 128, "ab" * 32),
              cache_folder("ade20k", "train", tmp_path / "ade", 256, "cd" * 32)}
    assert a not in others and len(others) == 4
