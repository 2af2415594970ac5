"""Latents as SRA trains on them (issue 20, item 5): `cache-latents --moments` stores each posterior's mean
and std (vvvvvjdy/SRA `preprocessing/encoders.py`), and `data.latent_posterior: per_step` draws a fresh
sample every training step (SRA `train.py` `sample_posterior`) from each image's own generator keyed by
(seed, step): the same on any process count, and again after a resume. Also: a resume refuses a data set
of another size or another global batch (issue 21, item 4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ddaepp_cli.errors import UsageError
from test_latents import make_image_folder, write_tiny_vae

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (8, 8, 8)  # tiny VAE: 8 latent channels, f = 4 on 32×32 crops


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """The same 8 images as a sample cache and as a moments cache."""
    from ddaepp_cli.data import latents as L

    base = tmp_path_factory.mktemp("posterior")
    vae = base / "tiny-vae.safetensors"
    ref = write_tiny_vae(vae)
    images = make_image_folder(base / "images")
    kw = dict(image_size=32, batch_size=3, shard_size=5, num_workers=0)
    L.cache_latents(images, vae, base / "sample", **kw)
    summary = L.cache_latents(images, vae, base / "moments", moments=True, **kw)
    assert summary["posterior"] == "moments" and summary["count"] == 8
    return base, images, vae, ref


def test_moments_cache_stores_the_posterior_and_reads_as_the_sample_cache(caches):
    from ddaepp_cli.data import latents as L
    from ddaepp_cli.data.imageio import center_crop_resize
    from PIL import Image

    base, images, vae, ref = caches
    m = json.loads((base / "moments" / L.MANIFEST).read_text())
    assert m["moments"] is True and m["settings"]["posterior"] == "moments"
    shards = [L.mmap_safetensors(base / "moments" / s["file"]) for s in m["shards"]]
    assert set(shards[0]) == {"mean", "std", "mean_flip", "std_flip", "labels"}
    mean = np.concatenate([np.array(s["mean"]) for s in shards])
    std = np.concatenate([np.array(s["std"]) for s in shards])
    mean_flip = np.concatenate([np.array(s["mean_flip"]) for s in shards])
    assert mean.dtype == np.float32 and mean.shape == (8, *SHAPE)

    # the stored moments are the reference encoder's posterior, unscaled: mean and exp(½·logvar)
    x = torch.from_numpy(np.array(center_crop_resize(Image.open(sorted((images / "dog").glob("*.png"))[2])
                                                      .convert("RGB"), 32))).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        mu, logvar = ref.encode(torch.cat((x, x.flip(-1))))
    torch.testing.assert_close(torch.from_numpy(mean[6]), mu[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(mean_flip[6]), mu[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(std[6]), torch.exp(0.5 * logvar[0]), atol=1e-4, rtol=1e-4)

    # read by index (evaluation), a moments cache gives the sample cache's latents bit for bit, and both
    # have the same statistics file
    samples, moments = L.LatentDataset(base / "sample"), L.LatentDataset(base / "moments")
    for i in range(8):
        (a, ya), (b, yb) = samples[i], moments[i]
        assert ya == yb and torch.equal(a, b), i
    assert (base / "sample" / L.STATS).read_bytes() == (base / "moments" / L.STATS).read_bytes()
    assert moments.info()["stored"] == "moments" and samples.info()["stored"] == "sample"


def test_the_kind_of_cache_is_checked(caches, tmp_path):
    from ddaepp_cli.data import latents as L

    base, images, vae, _ = caches
    with pytest.raises(UsageError, match="holds one fixed sample per image.*--moments"):
        L.LatentDataset(base / "sample", posterior="per_step")
    with pytest.raises(UsageError, match="latent_posterior must be one of"):
        L.LatentDataset(base / "moments", posterior="sometimes")
    # re-running into a folder of the other kind is refused, the same kind resumes (nothing to encode)
    kw = dict(image_size=32, batch_size=3, shard_size=5, num_workers=0)
    with pytest.raises(UsageError, match="other settings.*posterior"):
        L.cache_latents(images, vae, base / "sample", moments=True, **kw)
    with pytest.raises(UsageError, match="other settings.*posterior"):
        L.cache_latents(images, vae, base / "moments", **kw)
    assert L.cache_latents(images, vae, base / "moments", moments=True, **kw)["encoded_shards"] == 0
    # the CLI option
    r = CliRunner().invoke(__import__("ddaepp_cli.cli", fromlist=["app"]).app, [
        "cache-latents", "--data", str(images), "--vae", str(vae), "--out", str(tmp_path / "c"), "--image-size", "32",
        "--shard-size", "5", "--num-workers", "0", "--moments"])
    assert r.exit_code == 0, r.output
    for f in ("manifest.json", "latents_stats.safetensors", "shard-00000.safetensors", "shard-00001.safetensors"):
        assert (tmp_path / "c" / f).read_bytes() == (base / "moments" / f).read_bytes(), f


def test_per_step_draws_are_fresh_posterior_samples_keyed_by_sample_seed_and_step(caches):
    from ddaepp_cli.data import latents as L
    from ddaepp_cli.seeding import per_sample_randn

    base = caches[0]
    ds = L.LatentDataset(base / "moments", posterior="per_step", scale=0.18215)
    shard = L.mmap_safetensors(base / "moments" / "shard-00001.safetensors")  # images 5..9
    mean = torch.from_numpy(np.stack((shard["mean"][1], shard["mean_flip"][1])))  # image 6
    std = torch.from_numpy(np.stack((shard["std"][1], shard["std_flip"][1])))

    # SRA's formula: (mean + std·ε)·0.18215, ε from image 6's own generator on the stream of (seed, step)
    z, y = ds.draw(6, 0, 3)
    eps = torch.stack([per_sample_randn([6], SHAPE, stream=L.draw_stream(0, 3, v))[0] for v in (0, 1)])
    assert y == 1
    torch.testing.assert_close(z, (mean + std * eps) * 0.18215, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(eps, L.posterior_noise(6, SHAPE, seed=0, step=3))

    # a function of (sample, seed, step) only: equal when called again, different for another step, seed
    # or sample, and never the cache's fixed sample (streams 0/1)
    assert torch.equal(ds.draw(6, 0, 3)[0], z)
    for other in (ds.draw(6, 0, 4)[0], ds.draw(6, 1, 3)[0], ds.draw(5, 0, 3)[0], ds[6][0]):
        assert not torch.allclose(other, z)
    streams = {L.draw_stream(s, t, v) for s in (0, 1, 2**32 - 1) for t in range(50) for v in (0, 1)}
    assert len(streams) == 300 and min(streams) >= 2 and max(streams) <= 2**32 - 1

    # the draws spread as the posterior: over 300 steps, mean ≈ stored mean, std ≈ stored std
    draws = torch.stack([ds.draw(6, 0, t)[0] for t in range(300)]) / 0.18215  # (300, 2, C, h, w)
    assert (draws.mean(0) - mean).abs().div(std).mean() < 0.1
    assert (draws.std(0) / std).mean().item() == pytest.approx(1.0, abs=0.05)
    # fixed posterior: the same sample whatever the step
    fixed = L.LatentDataset(base / "moments")
    assert torch.equal(fixed.draw(6, 0, 3)[0], fixed.draw(6, 0, 4)[0]) and torch.equal(fixed.draw(6, 0, 3)[0], fixed[6][0])


def test_the_batch_stream_draws_per_step_independent_of_processes_and_resume(caches):
    """Global batch 4 of 8 images: 2 steps per epoch. Over 3 epochs every image comes back with new latents;
    two ranks together give one rank's batches, a stream started at step 3 gives steps 3… of a full run,
    and DataLoader workers give what the main process gives."""
    from ddaepp_cli.data import BatchStream
    from ddaepp_cli.data import latents as L

    ds = L.LatentDataset(caches[0] / "moments", posterior="per_step")

    def take(n, **kw):
        s = BatchStream(ds, global_batch=4, seed=7, **kw)
        try:
            return [next(s) for _ in range(n)], s
        finally:
            s.close()

    full, stream = take(6)
    idx = [stream.global_indices(t) for t in range(6)]
    seen: dict[int, list[torch.Tensor]] = {}
    for t, (x, y) in enumerate(full):
        assert x.shape == (4, 2, *SHAPE)
        for row, i in enumerate(idx[t].tolist()):
            torch.testing.assert_close(x[row], ds.draw(i, 7, t)[0], rtol=0, atol=0)
            seen.setdefault(i, []).append(x[row])
    assert sorted(seen) == list(range(8)) and all(len(v) == 3 for v in seen.values())
    assert all(not torch.allclose(v[a], v[b]) for v in seen.values() for a, b in ((0, 1), (1, 2), (0, 2)))

    r0, _ = take(6, rank=0, world_size=2)
    r1, _ = take(6, rank=1, world_size=2)
    for (x, y), (a, ya), (b, yb) in zip(full, r0, r1):
        assert torch.equal(x, torch.cat((a, b))) and torch.equal(y, torch.cat((ya, yb)))
    resumed, _ = take(3, start_step=3)
    workers, _ = take(6, num_workers=1)
    for (x, _), (z, _) in zip(full[3:], resumed):
        assert torch.equal(x, z)
    for (x, _), (z, _) in zip(full, workers):
        assert torch.equal(x, z)


# ------------------------------------------------------------------------------------------------
# Resume: the saved data-stream state is loaded and checked (issue 21, item 4)
# ------------------------------------------------------------------------------------------------


def test_resume_refuses_another_data_set_size_or_global_batch(caches, tmp_path, monkeypatch):
    """Before: state["data"] was written and never read, so a cache rebuilt with another image count
    resumed silently with another data order."""
    from ddaepp_cli.cli import app
    from ddaepp_cli.data import latents as L

    _, _, vae, _ = caches
    monkeypatch.setenv("DDAEPP_CACHE", str(tmp_path / "ddaepp-cache"))
    cache = tmp_path / "cache"
    L.cache_latents(make_image_folder(tmp_path / "img8", per_class=4), vae, cache, image_size=32, batch_size=8,
                    shard_size=8, num_workers=0)
    recipe = ROOT / "recipes" / "imagenet256_rf_ditb_cond.yaml"
    sets = [f"data.root={cache}", "data.num_workers=0", "model.width=32", "model.depth=2", "model.heads=2",
            "model.num_classes=2", "train.global_batch=4", "train.batch_per_process=null", "train.precision=fp32",
            "train.log_every=1", "train.checkpoint_every=2", "train.milestones=[]", "train.sample_every=0"]
    runner = CliRunner()

    def train(steps, *extra):
        args = ["train", str(recipe), "--run-dir", str(tmp_path / "run"), "--max-steps", str(steps)]
        for s in sets + list(extra):
            args += ["--set", s]
        return runner.invoke(app, args)

    r = train(2)
    assert r.exit_code == 0, r.output
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-0000002" / "state.pt", weights_only=True)
    assert state["data"]["num_samples"] == 8 and state["data"]["step"] == 2

    # another global batch (a recipe change, allowed explicitly): refused, naming both
    args = ["train", str(recipe), "--run-dir", str(tmp_path / "run"), "--max-steps", "4", "--allow-recipe-change"]
    for s in [s for s in sets if not s.startswith("train.global_batch")] + ["train.global_batch=8"]:
        args += ["--set", s]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "global batch 4" in r.output and "train.global_batch is now 8" in r.output, r.output

    # the cache rebuilt from 12 images at the same path: refused with one line naming both sizes
    for f in cache.iterdir():
        f.unlink()
    cache.rmdir()
    L.cache_latents(make_image_folder(tmp_path / "img12", per_class=6), vae, cache, image_size=32, batch_size=8,
                    shard_size=8, num_workers=0)
    r = train(4)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2, r.output
    assert "data set of 8 images" in lines[-1] and "now holds 12" in lines[-1] and "Traceback" not in r.output
    assert not (tmp_path / "run" / "checkpoints" / "step-0000004").exists()
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["resumed_from"] is None  # refused before the run folder was touched


def test_an_sra_recipe_trains_on_per_step_draws_and_resumes_exactly(caches, tmp_path, monkeypatch):
    """The shipped SRA recipe (data.latent_posterior: per_step) on a tiny moments cache: 4 steps in one go
    equal 2 steps plus a resume to 4 bitwise, and differ from training on the fixed sample."""
    from ddaepp_cli.recipe import load_recipe
    from ddaepp_cli.training.train import train

    monkeypatch.setenv("DDAEPP_CACHE", str(tmp_path / "ddaepp-cache"))
    sets = [f"data.root={caches[0] / 'moments'}", "data.num_workers=0", "model.width=32", "model.depth=4",
            "model.heads=2", "model.num_classes=2", "sra.student_layer=1", "sra.teacher_layer=3",
            "train.global_batch=4", "train.batch_per_process=null", "train.precision=fp32", "train.log_every=1",
            "train.checkpoint_every=1000", "train.milestones=[]", "train.sample_every=0", "train.lr=1e-3"]
    recipe = ROOT / "recipes" / "imagenet256_sra_sitb.yaml"
    assert load_recipe(recipe).data.latent_posterior == "per_step"

    def losses(run):
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]

    train(load_recipe(recipe, sets), tmp_path / "straight", max_steps=4)
    train(load_recipe(recipe, sets), tmp_path / "resumed", max_steps=2)
    train(load_recipe(recipe, sets), tmp_path / "resumed", max_steps=4)
    train(load_recipe(recipe, sets + ["data.latent_posterior=fixed"]), tmp_path / "fixed", max_steps=4)
    straight = losses(tmp_path / "straight")
    assert len(straight) == 4 and losses(tmp_path / "resumed") == straight  # bitwise: JSON floats round-trip
    assert all(a != b for a, b in zip(losses(tmp_path / "fixed"), straight))
