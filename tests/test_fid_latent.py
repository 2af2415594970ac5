"""`ddaepp fid` on latent (DiT) runs, sFID / ADM IS / ADM reference batches, and `--checkpoints` (issue 12).

A tiny latent run is built as a user builds one: a random KL autoencoder saved in the released LDM
layout → `cache-latents` → DiT checkpoints (random weights, perturbed so that the zero-initialised
output layers do not make every sample the same and CFG a no-op). The reference is a file in the
layout of ADM's `VIRTUAL_imagenet256_labeled.npz`: images `arr_0` plus `mu, sigma, mu_s, sigma_s`.
Inception gets random weights in torch-fidelity's exact layout (tests/test_fid.py), in float32 for speed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ddaepp_cli.eval import fid as F
from ddaepp_cli.eval import inception

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "imagenet256_rf_ditb_cond.yaml"
SETS = ["data.num_workers=0", "model.width=32", "model.depth=2", "model.heads=2", "model.num_classes=2",
        "train.global_batch=4", "train.batch_per_process=null", "train.precision=fp32", "train.compile=false",
        "train.milestones=[]", "train.sample_every=0", "sample.steps=2", "sample.batch_size=8"]


def perturbed_dit(rec, seed: int):
    from ddaepp_cli.build import build_backbone

    torch.manual_seed(seed)
    net = build_backbone(rec)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


def make_latent_run(base: Path, steps=(1, 2)) -> dict:
    """VAE file → latent cache → DiT checkpoints at `steps` (the recipe's CFG: 2.0 on [0, 0.89])."""
    from test_latents import make_image_folder, write_tiny_vae

    from ddaepp_cli.checkpoint import save_checkpoint
    from ddaepp_cli.data.latents import cache_latents
    from ddaepp_cli.recipe import load_recipe

    vae = base / "tiny-vae.safetensors"
    write_tiny_vae(vae)
    images = make_image_folder(base / "images")
    cache = base / "cache"
    cache_latents(images, vae, cache, image_size=32, batch_size=4, shard_size=8, num_workers=0)
    rec = load_recipe(RECIPE, [f"data.root={cache}", *SETS])
    for step in steps:
        net = perturbed_dit(rec, step)
        save_checkpoint(base / "run", step, recipe=rec, model=net, ema=net, state={})
    return {"run": base / "run", "vae": vae, "cache": cache, "recipe": rec}


def write_adm_reference(base: Path, weights: str, n: int = 8, size: int = 32) -> Path:
    """Images in a folder → their statistics (`--save-stats`, with mu_s / sigma_s) → one .npz in ADM's
    reference-batch layout: arr_0 (uint8 N×H×W×3), mu, sigma, mu_s, sigma_s."""
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    folder = base / "ref-images"
    folder.mkdir()
    for i, a in enumerate(arr):
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    F.fid(str(folder), save_stats=str(base / "ref-stats.npz"), inception_weights=weights, extractor_dtype="float32",
          cache=False)
    with np.load(base / "ref-stats.npz") as z:
        assert z["mu_s"].shape == (2023,) and z["sigma_s"].shape == (2023, 2023)
        keys = {k: z[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
    path = base / "VIRTUAL_tiny_labeled.npz"
    np.savez(path, arr_0=arr, **keys)
    return path


@pytest.fixture(scope="module")
def lat(tmp_path_factory):
    base = tmp_path_factory.mktemp("fidlat")
    weights = base / "inception.pth"
    torch.save(inception.random_state_dict(0, active=256), weights)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDAEPP_CACHE", str(base / "ddaepp-cache"))
        d = make_latent_run(base)
        d.update(base=base, w=str(weights), ref=str(write_adm_reference(base, str(weights))))
        yield d


def cli(args, env=None):
    from ddaepp_cli.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args], env=env)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    return r.exit_code, lines, r.stdout


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.slow
def test_latent_run_n64_with_and_without_cfg(lat):
    """Acceptance: `fid RUN --n 64` on a latent DiT run, with the recipe's CFG and with --cfg-scale 1; against
    an ADM reference batch the default metrics are ADM's (FID, sFID, IS, precision/recall)."""
    base = ["fid", lat["run"], "--n", 64, "--ref", lat["ref"], "--inception-weights", lat["w"],
            "--extractor-dtype", "float32", "--json"]
    code, lines, out = cli(base)
    assert code == 0, lines
    guided = json.loads(out)
    code, lines, out = cli([*base, "--cfg-scale", 1])
    assert code == 0, lines
    plain = json.loads(out)
    for r in (guided, plain):
        assert set(r["metrics"]) == {"fid", "sfid", "is_mean", "is_std", "precision", "recall", "f_score"}
        assert all(np.isfinite(v) for v in r["metrics"].values())
        assert r["n"] == 64 and r["protocol"]["latent"] is True and r["protocol"]["metric_protocol"] == "adm"
        assert r["protocol"]["settings"]["is"]["split_size"] == 5000 and r["protocol"]["settings"]["sfid"]["dim"] == 2023
        assert r["reference"]["kind"] == "stats" and r["reference"]["spatial_statistics"]
        assert r["metrics"]["fid"] > 0 and r["metrics"]["sfid"] > 0
    assert guided["protocol"]["cfg_scale"] == 2.0 and guided["protocol"]["cfg_interval"] == [0.0, 0.89]
    assert plain["protocol"]["cfg_scale"] == 1.0
    assert guided["metrics"]["fid"] != plain["metrics"]["fid"]  # guidance changes the images


def test_run_png_folder_and_npz_give_the_same_numbers(lat, tmp_path):
    """Generated on the fly (2 per batch) == the PNGs and the npz it saved == `ddaepp sample` of the same seeds,
    for every metric, against the ADM-layout reference (its statistics for FID/sFID, its images for PRC)."""
    from ddaepp_cli.sample import sample_command

    kw = dict(ref=lat["ref"], inception_weights=lat["w"], extractor_dtype="float32", metrics="fid,sfid,is,prc")
    live = F.fid(str(lat["run"]), n=6, batch_size=2, save_samples=str(tmp_path / "kept"), **kw)
    # the same batches as `fid` (2): a DiT's float32 outputs change by ~1e-7 with the batch size on the CPU (small-M
    # matmuls of the conditioning MLPs), enough to move a uint8 pixel now and then
    sample_command(str(lat["run"]), seeds=list(range(6)), out=str(tmp_path / "s"), sampler=None, steps=None,
                   weights="ema", formats=["png"], batch_size=2, clip=None)
    for i in range(6):
        assert np.array_equal(np.array(Image.open(tmp_path / "s" / f"{i:06d}.png")),
                              np.array(Image.open(tmp_path / "kept" / f"{i:06d}.png")))
    folder = F.fid(str(tmp_path / "kept"), batch_size=4, **kw)
    npz = F.fid(str(tmp_path / "kept" / "samples.npz"), batch_size=3, **kw)
    assert set(live["metrics"]) == {"fid", "sfid", "is_mean", "is_std", "precision", "recall", "f_score"}
    for other in (folder, npz):
        for k, v in live["metrics"].items():
            assert rel(other["metrics"][k], v) < 1e-9, (k, other["metrics"][k], v)
    assert live["protocol"]["metric_protocol"] == "adm" and live["reference"]["features"].startswith("Inception pool3")


def test_checkpoints_all_each_and_best_vae_loaded_once(lat, monkeypatch):
    from ddaepp_cli.data import vae as V

    calls = []
    real = V.load_vae
    monkeypatch.setattr(V, "load_vae", lambda *a, **k: (calls.append(a), real(*a, **k))[1])
    r = F.fid(str(lat["run"]), checkpoints="all", n=4, metrics="fid,sfid", ref=lat["ref"], inception_weights=lat["w"],
              extractor_dtype="float32", cfg_scale=1.0)
    assert len(calls) == 1  # one VAE for every checkpoint
    steps = [c["protocol"]["step"] for c in r["checkpoints"]]
    assert steps == [1, 2]
    fids = [c["metrics"]["fid"] for c in r["checkpoints"]]
    assert fids[0] != fids[1]
    assert r["best"]["step"] == steps[int(np.argmin(fids))] and r["best"]["by"] == "fid"
    assert all(c["eval_record"] for c in r["checkpoints"])
    one = F.fid(str(lat["run"]), checkpoints="1", n=4, metrics="fid,sfid", ref=lat["ref"], inception_weights=lat["w"],
                extractor_dtype="float32", cfg_scale=1.0)
    assert one["protocol"]["step"] == 1 and rel(one["metrics"]["fid"], fids[0]) < 1e-9


def test_spatial_features_are_mixed6d_branch1x1_in_hwc_order(lat):
    ex = inception.load_extractor(Path(lat["w"]), ["2048"], device=torch.device("cpu"), dtype="float32")
    full = {}
    h = ex.get_submodule("Mixed_6d.branch1x1").register_forward_hook(lambda m, i, o: full.setdefault("x", o.clone()))
    x = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    try:
        feats = inception.features(ex, x, ["2048"], spatial=F.SPATIAL)
    finally:
        h.remove()
    ref = full["x"]  # (2, 192, 17, 17)
    assert ref.shape == (2, 192, 17, 17) and feats[F.SPATIAL].shape == (2, 2023)
    s = feats[F.SPATIAL].reshape(2, 17, 17, 7)  # TensorFlow's NHWC, as ADM's `spatial[..., :7]` reshaped
    assert torch.equal(s[:, 3, 5, :], ref[:, :7, 3, 5]) and torch.equal(s[:, 16, 0, 6], ref[:, 6, 16, 0])
    assert torch.equal(feats["2048"], ex(x)[0])  # the hook changes nothing else
    assert not ex.get_submodule("Mixed_6d.branch1x1")._forward_hooks  # and is removed


def test_adm_inception_score_splits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12000, 1008, generator=g) * 3
    mean, std, k = F.inception_score_adm(logits)
    p = torch.softmax(logits.double(), 1).numpy()
    scores = []
    for i in range(0, len(p), 5000):  # ADM: consecutive splits of 5000 (here 5000, 5000, 2000)
        part = p[i:i + 5000]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    assert k == 3 and abs(mean - np.mean(scores)) < 1e-9 * np.mean(scores) and abs(std - np.std(scores)) < 1e-9


def test_bad_input_exit_2_and_missing_weights_exit_3(lat, tmp_path):
    w = ["--inception-weights", lat["w"]]
    run, ref = lat["run"], lat["ref"]
    np.savez(tmp_path / "edm.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    cases = [
        ([run, "--n", 4, "--ref", ref, "--cfg-scale", -1, *w], "--cfg-scale must be >= 0"),
        ([run, "--n", 4, "--ref", ref, "--cfg-interval", "0.5,0.2", *w], "LO <= HI"),
        ([run, "--n", 4, "--ref", ref, "--checkpoints", "7", *w], "no checkpoint at step 7"),
        ([run, "--n", 4, "--ref", ref, "--checkpoints", "all", "--save-stats", tmp_path / "s.npz", *w],
         "take one checkpoint"),
        ([run, "--n", 4, "--ref", ref, "--protocol", "tf", *w], "adm, torch-fidelity"),
        ([run, "--n", 4, "--ref", tmp_path / "edm.npz", "--metrics", "sfid", *w], "mu_s, sigma_s"),
        ([lat["base"] / "ref-images", "--ref", ref, "--cfg-scale", 2, *w], "apply to a run"),
    ]
    for args, fragment in cases:
        code, lines, out = cli(["fid", *args, "--json"])
        assert code == 2 and len(lines) == 1 and fragment in lines[0], (args, code, lines)
        assert out == ""
    # no --ref on a latent run: ADM's reference batch at its documented place, or exit 3 naming it
    env = {"DDAEPP_CACHE": str(tmp_path / "empty-cache")}
    code, lines, _ = cli(["fid", run, "--n", 4, *w], env=env)
    assert code == 3 and len(lines) == 1 and "VIRTUAL_imagenet256_labeled.npz" in lines[0], lines
    assert str(tmp_path / "empty-cache" / "refs") in lines[0] and "openaipublic" in lines[0]
    code, lines, _ = cli(["fid", run, "--n", 4, "--ref", ref], env={**env, "TORCH_HOME": str(tmp_path / "th")})
    assert code == 3 and len(lines) == 1 and inception.WEIGHTS_NAME in lines[0], lines
    vae, moved = lat["vae"], tmp_path / "moved.safetensors"
    vae.rename(moved)
    try:
        code, lines, _ = cli(["fid", run, "--n", 4, "--ref", ref, *w], env={"DDAEPP_CACHE": str(tmp_path / "c2")})
        assert code == 3 and len(lines) == 1 and vae.name in lines[0], lines
    finally:
        moved.rename(vae)


def test_sfid_on_a_pixel_run_equals_its_saved_folder(lat, tmp_path):
    """sFID is not tied to latent runs: a pixel run against an image folder (reference features computed and
    cached with their spatial statistics), and the PNGs it saved, give the same FID and sFID."""
    from test_fid import TINY_RGB, write_images

    import yaml

    from ddaepp_cli.build import build_backbone
    from ddaepp_cli.checkpoint import save_checkpoint
    from ddaepp_cli.recipe import recipe_from_dict

    rec = recipe_from_dict(yaml.safe_load(TINY_RGB))
    torch.manual_seed(0)
    net = build_backbone(rec)
    save_checkpoint(tmp_path / "run", 2, recipe=rec, model=net, ema=net, state={})
    write_images(tmp_path / "B", seed=2, n=4, shift=50)
    kw = dict(ref=str(tmp_path / "B"), inception_weights=lat["w"], extractor_dtype="float32", metrics="fid,sfid")
    live = F.fid(str(tmp_path / "run"), n=4, batch_size=2, save_samples=str(tmp_path / "kept"), **kw)
    disk = F.fid(str(tmp_path / "kept"), batch_size=3, **kw)  # the reference's statistics from the cache now
    assert live["reference"]["cache"] == "miss" and disk["reference"]["cache"] == "hit"
    assert live["protocol"]["metric_protocol"] == "torch-fidelity" and live["metrics"]["sfid"] > 0
    for k in ("fid", "sfid"):
        assert rel(disk["metrics"][k], live["metrics"][k]) < 1e-9, k
