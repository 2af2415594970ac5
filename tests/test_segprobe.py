"""`ddaepp segprobe`: ADE20K / VOC readers in their real layouts, the mIoU arithmetic, the paper's
defaults, and the whole probe end to end on a CPU (issue 6)."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from conftest import ROOT, run_cli
from ddaepp_cli.eval import segprobe as S
from ddaepp_cli.errors import UsageError
from ddaepp_cli.eval.segdata import IGNORE, SegmentationSet, read_label, voc_palette

TINY_RGB = """\
name: tinyseg
data: {dataset: imagefolder, image_size: 16, num_workers: 0}
model: {backbone: ddpm, channels: 32, ch_mults: [1, 2], n_blocks: 1, attn_resolutions: [8], dropout: 0.0}
diffusion: {formulation: ddpm}
"""


def scene(rng, w, h, left, right):
    """Two vertical regions of different colour and class (a task a linear probe can learn)."""
    cut = w // 2 + int(rng.integers(-w // 6, w // 6 + 1))
    img = np.zeros((h, w, 3), np.int32)
    img[:, :cut], img[:, cut:] = (200, 40, 40), (40, 40, 200)
    img = np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
    lab = np.empty((h, w), np.uint8)
    lab[:, :cut], lab[:, cut:] = left, right
    return img, lab, cut


def save_palette_png(path, lab):
    im = Image.new("P", (lab.shape[1], lab.shape[0]))
    im.putdata(lab.flatten().tolist())
    im.putpalette(voc_palette().flatten().tolist())
    im.save(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from ddaepp_cli.build import build_backbone
    from ddaepp_cli.checkpoint import save_checkpoint
    from ddaepp_cli.recipe import recipe_from_dict

    root = tmp_path_factory.mktemp("seg")
    rng = np.random.default_rng(0)
    ade = root / "ADEChallengeData2016"  # images/{training,validation}/*.jpg, annotations/…/*.png
    for split, n in (("training", 8), ("validation", 4)):
        (ade / "images" / split).mkdir(parents=True)
        (ade / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            img, lab, _ = scene(rng, 40, 30, 4, 5)  # ADE classes 4, 5 → indices 3, 4
            lab[:2] = 0  # "other": ignored
            Image.fromarray(img).save(ade / "images" / split / f"ADE_{split}_{i:08d}.jpg", quality=95)
            Image.fromarray(lab).save(ade / "annotations" / split / f"ADE_{split}_{i:08d}.png")
    voc = root / "VOCdevkit" / "VOC2012"  # JPEGImages, SegmentationClass (palette), ImageSets/Segmentation
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    for split, n in (("train", 8), ("val", 4)):
        ids = []
        for i in range(n):
            name = f"2007_{split}{i:04d}"
            img, lab, cut = scene(rng, 30, 40, 0, 15)  # background | person
            lab[:, cut - 1:cut + 1] = 255  # VOC's object border
            Image.fromarray(img).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
            save_palette_png(voc / "SegmentationClass" / f"{name}.png", lab)
            ids.append(name)
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    rec = recipe_from_dict(yaml.safe_load(TINY_RGB))
    torch.manual_seed(0)
    net = build_backbone(rec)
    save_checkpoint(root / "run", 3, recipe=rec, model=net, ema=net, state={})
    return root


def test_miou_against_a_hand_computed_confusion_matrix():
    target = torch.tensor([[0, 0, 1, 1],
                           [0, 2, 2, IGNORE],
                           [IGNORE, IGNORE, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [0, 2, 0, 3],
                         [3, 3, 1, 2]])
    cm = S.confusion_matrix(pred, target, num_classes=4)
    expected = torch.tensor([[2, 1, 0, 0],  # rows: ground truth 0..3, columns: prediction
                             [0, 3, 1, 0],
                             [1, 0, 1, 0],
                             [0, 0, 0, 0]])
    assert torch.equal(cm, expected)  # the three ignored pixels are not counted, whatever was predicted
    s = S.iou_from_confusion(cm)
    # IoU = TP / (TP + FP + FN): class 0: 2/(3+3-2) = 1/2, class 1: 3/(4+4-3) = 3/5, class 2: 1/(2+2-1) = 1/3;
    # class 3 never occurs in the ground truth nor (on counted pixels) in the prediction: left out of the mean
    assert s["per_class_iou"][:3] == pytest.approx([1 / 2, 3 / 5, 1 / 3]) and s["per_class_iou"][3] is None
    assert s["miou"] == pytest.approx((1 / 2 + 3 / 5 + 1 / 3) / 3)
    assert s["pixel_accuracy"] == pytest.approx(6 / 9) and s["pixels"] == 9 and s["classes_evaluated"] == 3


def test_labels_decode_as_indices_and_stay_aligned(data, tmp_path):
    lab = np.array([[0, 1], [150, 7]], np.uint8)
    Image.fromarray(lab).save(tmp_path / "ade.png")
    assert np.array_equal(np.array(read_label("ade20k", tmp_path / "ade.png")), [[IGNORE, 0], [149, 6]])
    voc = np.array([[0, 15], [255, 20]], np.uint8)
    save_palette_png(tmp_path / "voc.png", voc)  # a palette PNG: indices, not colours
    assert np.array_equal(np.array(read_label("voc", tmp_path / "voc.png")), voc)
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(UsageError, match="not colours"):
        read_label("voc", tmp_path / "rgb.png")
    save_palette_png(tmp_path / "bad.png", np.array([[0, 30]], np.uint8))
    with pytest.raises(UsageError, match="0..20 or 255"):
        read_label("voc", tmp_path / "bad.png")
    # central square crop (40×30 → columns 5..34), image bilinear, labels nearest: classes survive as they are
    ds = SegmentationSet("ade20k", "val", data, image_size=32, label_size=15)
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and y.shape == (15, 15)
    assert set(torch.unique(y).tolist()) <= {3, 4, IGNORE} and (y[0] == IGNORE).all()
    assert (y[1:, 0] == 3).all() and (y[1:, -1] == 4).all()
    assert SegmentationSet("voc", "train", data / "VOCdevkit", image_size=16, label_size=16, channels=1)[0][0].shape \
        == (1, 16, 16)


def test_paper_defaults_for_every_backbone():
    from ddaepp_cli.build import build_backbone, build_formulation
    from ddaepp_cli.recipe import load_recipe

    want = {"cifar10_ddpm_ddpm": ["out_5", "out_7"], "cifar10_edm_ddpmpp": ["out_6", "out_9"],
            "cifar10_rf_ddpm": ["out_5", "out_7"], "cifar10_ddpm_uvit": ["in_5", "out_1"]}
    for name, layers in want.items():
        rec = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        net = build_backbone(rec, device="meta")
        assert S.default_layers(net) == layers, name
        f = build_formulation(rec)
        for ds, t_rf in (("ade20k", 0.25), ("voc", 0.45)):
            t = f.parse_time(S.default_time(f, ds))
            ratio = float(f.sigma(torch.tensor(t)) / f.alpha(torch.tensor(t)))
            assert ratio == pytest.approx(t_rf / (1 - t_rf), rel=0.02), (name, ds)  # same σ/α as RF at t
    assert S.default_time(build_formulation(load_recipe(ROOT / "recipes" / "cifar10_rf_ddpm.yaml")), "voc") == "0.45"


def test_feature_maps_meet_on_one_grid():
    tokens = torch.arange(2 * 64 * 3, dtype=torch.float32).reshape(2, 64, 3)  # (B, N, D), 8×8 patches
    g = S.to_grid(tokens, 8, "x")
    assert g.shape == (2, 3, 8, 8) and g[0, :, 0, 1].tolist() == tokens[0, 1].tolist()  # row-major patches
    fine = torch.randn(2, 5, 32, 32)
    assert torch.allclose(S.to_grid(fine, 16, "x"), fine.reshape(2, 5, 16, 2, 16, 2).mean((3, 5)))
    assert S.to_grid(torch.randn(2, 5, 4, 4), 16, "x").shape == (2, 5, 16, 16)
    with pytest.raises(UsageError, match="not a square patch grid"):
        S.to_grid(torch.randn(2, 1, 3), 16, "cls")


@pytest.mark.slow
def test_ade20k_end_to_end_cli(data):
    r = run_cli("segprobe", data / "run", "--dataset", "ade20k", "--data-root", data, "--epochs", "15",
                "--batch-size", "4", "--image-size", "32", "--label-size", "32", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["layers"] == ["out_2", "out_3"] and out["protocol"]["grid"] == 16
    assert out["timestep"]["text"] == "98"  # DDPM step with RF t = 0.25's σ/α
    assert len(out["per_class_iou"]) == 150 and out["classes_evaluated"] == 2
    assert out["miou"] > 0.5 and out["train_losses"][-1] < out["train_losses"][0]  # it learns the two regions
    record = json.loads(open(out["eval_record"]).read())
    assert record["miou"] == out["miou"] and record["protocol"]["train"]["num_images"] == 8
    png = np.array(Image.open(out["plot"]))
    assert png.shape == (4 * 32, 3 * 32, 3)  # 4 rows: image | ground truth | prediction


def test_voc_cached_and_recomputed_features_give_the_same_probe(data, tmp_path):
    kw = dict(dataset="voc", data_root=str(data), epochs=2, batch_size=3, image_size=32, label_size=32,
              record=False, layers="out_1,out_3", timestep="50")
    a = S.segprobe(str(data / "run"), cache_features="on", plot=str(tmp_path / "a.png"), **kw)
    b = S.segprobe(str(data / "run"), cache_features="off", plot=str(tmp_path / "b.png"), **kw)
    assert a["train_losses"] == b["train_losses"] and a["miou"] == b["miou"]
    assert a["protocol"]["feature_channels"] == 64 + 32 and len(a["per_class_iou"]) == 21
    assert a["class_names"][15] == "person" and a["per_class_iou"][15] is not None


def test_bad_input_exit_codes(data, tmp_path):
    from ddaepp_cli.cli import app

    def cli(*args):
        r = CliRunner().invoke(app, ["segprobe", str(data / "run"), *map(str, args)])
        return r.exit_code, [ln for ln in r.stderr.splitlines() if ln.strip()]

    code, lines = cli("--data-root", tmp_path)
    assert code == 3 and len(lines) == 1 and "ADEChallengeData2016.zip" in lines[0], lines
    code, lines = cli("--dataset", "voc", "--data-root", tmp_path)
    assert code == 3 and "VOCtrainval_11-May-2012.tar" in lines[0]
    code, lines = cli("--data-root", data, "--layers", "out_9")
    assert code == 2 and len(lines) == 1 and "out_4" in lines[0]  # lists the valid layers
    code, lines = cli("--dataset", "coco")
    assert code == 2 and "ade20k, voc" in lines[0]
    code, lines = cli("--data-root", data, "--image-size", "31")
    assert code == 2 and "multiple of 2" in lines[0]
