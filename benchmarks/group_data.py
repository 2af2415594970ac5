"""Group f: data loading throughput against what a training step consumes (ratio must be ≫ 1).

* CIFAR-10: a small set of python-pickle batches in the real on-disk format (cifar-10-batches-py/
  data_batch_1..5, test_batch, batches.meta) is read by `data.load_dataset` (restricted unpickler),
  then served by `BatchStream` (in-memory: one index_select per step) plus the per-step preparation
  train.py does (uint8 → [−1, 1], batched horizontal flip). Compared with the fastest CIFAR backbone's
  training step (images/s) measured in group a of the same run.
* Latents: a shard set in the `cache-latents` layout (manifest.json, shard-*.safetensors, stats) read
  through `LatentDataset` (memory maps) and `BatchStream`'s DataLoader path in the main process
  (num_workers 0, the worst case), plus the cached-mirror flip choice. Compared with DiT-B/1's step.
"""

from __future__ import annotations

import json
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ddaepp_cli.data import CIFAR10_CLASSES, BatchStream, load_dataset, random_hflip, to_model_range
from ddaepp_cli.data.latents import MANIFEST, STATS, LatentDataset, shard_file
from report import Row
from timing import time_interleaved


def write_cifar10(root: Path, per_batch: int, seed: int = 0) -> int:
    """CIFAR-10's python pickles (protocol 2, bytes keys, (N, 3072) uint8 R|G|B planes). Returns N train."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)

    def dump(obj, name):
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))

    for i in range(1, 6):
        dump({b"batch_label": b"training batch %d of 5" % i,
              b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
              b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
              b"filenames": [b"img_%d_%d.png" % (i, j) for j in range(per_batch)]}, f"data_batch_{i}")
    dump({b"data": rng.integers(0, 256, (16, 3072), dtype=np.uint8), b"labels": list(range(10)) + [0] * 6},
         "test_batch")
    dump({b"label_names": [n.encode() for n in CIFAR10_CLASSES], b"num_cases_per_batch": per_batch,
          b"num_vis": 3072}, "batches.meta")
    return 5 * per_batch


def write_latents(root: Path, n: int, channels: int, size: int, shard_size: int, seed: int = 0) -> None:
    """A complete latent cache as `ddaepp cache-latents` lays it out (only what the reader needs)."""
    from safetensors.torch import save_file

    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    shards = []
    for k, lo in enumerate(range(0, n, shard_size)):
        m = min(shard_size, n - lo)
        save_file({"latents": torch.randn(m, channels, size, size, generator=g),
                   "latents_flip": torch.randn(m, channels, size, size, generator=g),
                   "labels": torch.randint(0, 1000, (m,), generator=g)}, str(root / shard_file(k)))
        shards.append({"file": shard_file(k), "first": lo, "count": m})
    save_file({"mean": torch.zeros(channels), "std": torch.ones(channels)}, str(root / STATS))
    manifest = {"format": "ddaepp latent cache", "complete": True, "count": n, "num_shards": len(shards),
                "done": len(shards), "shard_size": shard_size, "latent_shape": [channels, size, size],
                "image_size": 256, "num_classes": 1000, "class_names": None, "stats": STATS, "shards": shards}
    (root / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")


def _consumption(ctx, key: str) -> float:
    """Training images/s of backbone `key` from group a of this run, else measured here."""
    if key in ctx.train_rate:
        return ctx.train_rate[key]
    from backbones import SPECS, load
    from trainstep import TrainBench

    spec = SPECS[key]
    ctx.log(f"[f] measuring a {key} training step (group a did not run)")
    bench = TrainBench(load(spec.recipe, spec.overrides(ctx.quick)), device=ctx.device, batch=ctx.batch)
    t = time_interleaved({"ours": bench.step_fn()}, 2, 1, device=ctx.device)
    ctx.train_rate[key] = ctx.batch / t.median["ours"]
    return ctx.train_rate[key]


def run(ctx) -> list[Row]:
    quick = ctx.quick
    per_batch, cifar_batch = (64, 32) if quick else (512, 128)  # 128: the ddpm recipe's per-GPU batch
    n_lat, lat_batch = (64, 16) if quick else (512, 64)
    reps = 5 if quick else 20
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_train = write_cifar10(tmp / "cifar", per_batch)
        t0 = time.perf_counter()
        ds = load_dataset("cifar10", split="train", root=str(tmp / "cifar"))
        load_s = time.perf_counter() - t0
        assert len(ds) == n_train and ds.images.shape[1:] == (3, 32, 32)
        cifar = iter(BatchStream(ds, global_batch=cifar_batch, seed=0, device=ctx.device))

        write_latents(tmp / "latents", n_lat, 32, 16, shard_size=max(1, n_lat // 2))
        lds = LatentDataset(tmp / "latents")
        lat_stream = BatchStream(lds, global_batch=lat_batch, seed=0, num_workers=0)
        latents = iter(lat_stream)
        gen = torch.Generator(device=ctx.device).manual_seed(0)

        def cifar_step():
            images, labels = next(cifar)
            x = random_hflip(to_model_range(images.to(ctx.device, non_blocking=True)), generator=gen)
            return x, labels

        def latent_step():
            pairs, labels = next(latents)  # (b, 2, C, h, w): the latent and its mirror's
            pairs = pairs.to(ctx.device, non_blocking=True)
            flip = torch.rand(pairs.shape[0], device=ctx.device, generator=gen) < 0.5
            return torch.where(flip[:, None, None, None, None], pairs[:, 1:], pairs[:, :1])[:, 0], labels

        ctx.log("[f] loaders")
        t = time_interleaved({"cifar": cifar_step, "latents": latent_step}, reps, 2, device=ctx.device)
        lat_stream.close()
    med = t.median
    cifar_rate, lat_rate = cifar_batch / med["cifar"], lat_batch / med["latents"]
    cifar_keys = [k for k in ("ddpm", "ddpmpp", "uvit") if k in ctx.train_rate] or ["ddpm"]
    train_cifar = max(_consumption(ctx, k) for k in cifar_keys)
    fastest = max(cifar_keys, key=lambda k: ctx.train_rate[k])
    train_lat = _consumption(ctx, "dit-B/1")
    return [
        Row("f", "CIFAR-10 pickles", "load into memory (images/s)", n_train / load_s, "img/s",
            note=f"{n_train} images, real on-disk format", extra={"seconds": load_s, "images": n_train}),
        Row("f", "CIFAR-10 BatchStream", f"loader img/s ÷ {fastest} training img/s", cifar_rate / train_cifar, "×",
            (">=", 10.0),
            note=f"loader {cifar_rate:,.0f} img/s (batch {cifar_batch}); training {train_cifar:.2f} img/s",
            extra={"loader_img_s": cifar_rate, "train_img_s": train_cifar, "batch": cifar_batch,
                   "samples_s": t.samples["cifar"]}),
        Row("f", "latent shards", "loader img/s ÷ dit-B/1 training img/s", lat_rate / train_lat, "×", (">=", 10.0),
            note=f"loader {lat_rate:,.0f} img/s (batch {lat_batch}, 32×16×16 pairs, 0 workers); "
                 f"training {train_lat:.2f} img/s",
            extra={"loader_img_s": lat_rate, "train_img_s": train_lat, "batch": lat_batch,
                   "samples_s": t.samples["latents"]}),
    ]
