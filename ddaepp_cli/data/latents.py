"""Cached VAE latents (LightningDiT `extract_features.py`, `datasets/img_latent_dataset.py`):
`ddaepp cache-latents` writes them, the `latents` dataset memory-maps them.

Cache folder layout (`--out`):

    manifest.json                 counts, shards with sha256, VAE identity, latent shape, statistics
    shard-00000.safetensors       {"latents": (n, C, h, w) f32, "latents_flip": (n, C, h, w) f32, "labels": (n,) i64}
                                  (`--moments`: "mean", "std", "mean_flip", "std_flip" instead of the two latents)
    latents_stats.safetensors     {"mean": (C,), "std": (C,)} per-channel over every unflipped latent

Shard k holds images [k·S, (k+1)·S) of the folder's sorted order (S = `--shard-size`). Each shard is
written atomically (temporary file, then rename) followed by its record `shard-NNNNN.json` (count,
sha256, partial statistics), so a shard is finished or absent: re-running the same command skips every
shard whose record and checksum match (resumable) and encodes only the rest. Processes started with
`accelerate launch` split the shards (shard k on rank k mod world); rank 0 writes the manifest after
a barrier. The statistics are exact over the whole set, accumulated in float64 (LightningDiT estimates
them from 10,000 random latents).

Encoding (hustvl/LightningDiT `extract_features.py`): ADM centre crop to `--image-size`, [−1, 1], the VAE encoder's posterior
for the image and its mirror, one posterior *sample* each (mean + std·ε) with ε drawn from a generator
seeded by the image's index (stream 0 unflipped, stream 1 mirrored; drawn on the CPU), so a re-run —
at any batch size, on any device count — reproduces the same noise.

`--moments` stores the posterior itself instead (vvvvvjdy/SRA and sihyun-yu/REPA `preprocessing/encoders.py`:
`torch.cat([d.mean, d.std])`, float32, before any latent scaling; std = exp(½·logvar), logvar clamped to
[−30, 20]): shard keys `mean`, `std`, `mean_flip`, `std_flip` (twice the disk of a sample cache), so
training can draw a fresh sample every step (recipe key `data.latent_posterior: per_step`; SRA `train.py`
`sample_posterior`: z = mean + std·randn, then ·0.18215). Statistics and everything that reads one
latent per image use the sample with the same stream-0/1 noise, so both kinds of cache of one folder have
equal statistics and read alike (latentstore.py).

Labels (labelfiles.py): a class-folder layout (`train/<class>/…`, ImageNet's train split) gives the
sorted folder names as classes; a flat folder (ImageNet's `val/`) takes its labels from `--labels FILE`
with the class list of `--classes` (the training cache or class folder), so both caches index the same
classes. The manifest records class names, per-class counts and where the labels came from.

Reading a cache (manifest, memory-mapped shards, the `latents` dataset, the decoder): latentstore.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..atomic import write_bytes_atomic
from ..errors import UsageError
from .latentstore import (IMAGENET_TRAIN, MANIFEST, STATS, LatentDataset, latent_geometry,  # noqa: F401 (re-exported)
                          draw_stream, fixed_sample, load_decoder, mmap_safetensors, posterior_noise, read_manifest,
                          resolve_vae_path, sha256_file, shard_file)

# ------------------------------------------------------------------------------------------------
# `ddaepp cache-latents`
# ------------------------------------------------------------------------------------------------

CACHE_VERSION = 1


def _record_file(k: int) -> str:
    return f"shard-{k:05d}.json"


def _canonical_safetensors(payload: bytes) -> bytes:
    """`payload` with its JSON header's keys sorted: safetensors writes the metadata map in hash order,
    which changes from process to process, so equal tensors would not give equal bytes (nor checksums)."""
    n = int.from_bytes(payload[:8], "little")
    text = json.dumps(json.loads(payload[8:8 + n]), sort_keys=True, separators=(",", ":")).encode("utf-8")
    if len(text) > n:  # never for safetensors' own compact header; keep the file as written
        return payload
    return payload[:8] + text + b" " * (n - len(text)) + payload[8 + n:]


def _write_json(path: Path, obj: dict) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


class _FolderImages(torch.utils.data.Dataset):
    """Images `indices` of the folder, centre-cropped: (3, S, S) uint8 and the global index."""

    def __init__(self, files: list[str], indices: list[int], size: int):
        self.files, self.indices, self.size = files, indices, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        from .imageio import read_rgb

        j = self.indices[i]
        return torch.from_numpy(read_rgb(self.files[j], self.size)).permute(2, 0, 1).contiguous(), j


def _shard_stats(z: Tensor) -> dict:
    """Per-channel count, mean and sum of squared deviations (float64) of (n, C, h, w) latents."""
    z = z.double().transpose(0, 1).reshape(z.shape[1], -1)  # (C, n·h·w)
    mean = z.mean(dim=1)
    return {"n": int(z.shape[1]), "mean": mean.tolist(), "m2": ((z - mean[:, None]) ** 2).sum(dim=1).tolist()}


def combine_stats(parts: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Chan et al.'s parallel combination of per-shard (n, mean, M2) → mean and (unbiased) std."""
    n, mean, m2 = 0, None, None
    for p in parts:
        nb, mb, m2b = p["n"], np.asarray(p["mean"], np.float64), np.asarray(p["m2"], np.float64)
        if mean is None:
            n, mean, m2 = nb, mb, m2b
            continue
        delta = mb - mean
        total = n + nb
        mean = mean + delta * nb / total
        m2 = m2 + m2b + delta ** 2 * n * nb / total
        n = total
    return mean, np.sqrt(m2 / max(n - 1, 1))


def _shard_ok(out: Path, k: int, count: int, fingerprint: str) -> Optional[dict]:
    """The record of shard k if the shard is finished and intact (checksum), else None."""
    rec_path, path = out / _record_file(k), out / shard_file(k)
    if not rec_path.is_file() or not path.is_file():
        return None
    try:
        rec = json.loads(rec_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if rec.get("count") != count or rec.get("fingerprint") != fingerprint or path.stat().st_size != rec.get("bytes"):
        return None
    return rec if sha256_file(path) == rec.get("sha256") else None


def _settings(data: Path, files: list[str], labels: list[int], classes, image_size: int, shard_size: int,
              vae_ident: dict, latent_shape: list[int], moments: bool = False) -> dict:
    listing = hashlib.sha256()
    for f, y in zip(files, labels):
        listing.update(f"{y}\t{os.path.relpath(f, data)}\n".encode("utf-8"))
    return {"version": CACHE_VERSION, "data": str(data.resolve()), "count": len(files),
            "files_sha256": listing.hexdigest(), "image_size": image_size, "shard_size": shard_size,
            "latent_shape": latent_shape, "vae_sha256": vae_ident["sha256"], "vae_config": vae_ident["config"],
            "class_names": classes, "posterior": "moments" if moments else "sample"}


_SAME = ("version", "count", "files_sha256", "image_size", "shard_size", "latent_shape", "vae_sha256", "vae_config",
         "class_names", "posterior")


def _old_setting(old: dict, key: str):
    """A setting of an existing manifest; caches from before `--moments` hold a posterior sample."""
    return old.get(key, "sample") if key == "posterior" else old.get(key)


def _fingerprint(settings: dict) -> str:
    """What a finished shard must have been made with (its record); a sample cache's fingerprint is
    the one it had before `--moments` existed, so an interrupted older cache still resumes."""
    keys = [k for k in _SAME if k != "posterior" or settings[k] != "sample"]
    return hashlib.sha256(json.dumps({k: settings[k] for k in keys}, sort_keys=True).encode()).hexdigest()


def _check_out_folder(out: Path, settings: dict) -> None:
    """Refuse a folder that is not this cache: another cache (different settings) or something else."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if (out / MANIFEST).is_file():
        old = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("settings", {})
        diff = [k for k in _SAME if _old_setting(old, k) != settings[k]]
        if diff:
            raise UsageError(f"--out {out} holds a latent cache made with other settings ({', '.join(diff)} differ); "
                             f"use another --out folder or delete it")
        return
    if any(out.iterdir()):
        raise UsageError(f"--out {out} is a non-empty folder that is not a latent cache; choose an empty or new folder")


def _manifest(settings: dict, records: list[Optional[dict]], vae_ident: dict, complete: bool) -> dict:
    done = [r for r in records if r is not None]
    return {"format": "ddaepp latent cache", "complete": complete, "count": settings["count"],
            "num_shards": len(records), "done": len(done), "shard_size": settings["shard_size"],
            "latent_shape": settings["latent_shape"], "image_size": settings["image_size"],
            "num_classes": len(settings["class_names"]) if settings["class_names"] else None,
            "class_names": settings["class_names"], "vae": {k: v for k, v in vae_ident.items()},
            "posterior": "moments (mean, std; float32, unscaled); the fixed sample mean + std·eps, eps seeded by "
                         "the image index (stream 0 image, 1 mirror), for statistics and evaluation"
                         if settings["posterior"] == "moments" else
                         "sample (mean + std·eps), eps seeded by the image index; stream 0 image, 1 mirror",
            "moments": settings["posterior"] == "moments",
            "stats": STATS if complete else None,
            "shards": [{"file": r["file"], "first": r["first"], "count": r["count"], "sha256": r["sha256"],
                        "bytes": r["bytes"]} for r in done] if complete else
                      [{"file": r["file"], "sha256": r["sha256"]} for r in done],
            "settings": settings}


def list_labelled_images(data: str | os.PathLike, labels_file: str | os.PathLike | None = None,
                         classes_from: str | os.PathLike | None = None) -> tuple[list[str], list[int], Optional[list[str]], dict]:
    """Files, labels, class names and a description of where the labels came from (module doc)."""
    from .imageio import list_image_folder
    from .labelfiles import class_list, labels_for

    files, labels, classes = list_image_folder(str(data))
    if classes is not None:
        if labels_file is not None:
            raise UsageError(f"--labels: {data} has one subfolder per class, which already gives the labels; "
                             "--labels is for a flat folder (ImageNet val/)")
        if classes_from is not None and class_list(classes_from) != classes:
            raise UsageError(f"the class folders of {data} are not the classes of --classes {classes_from}")
        return files, labels, classes, {"layout": "class folders", "classes": "sorted subfolder names"}
    if labels_file is None:
        if classes_from is not None:
            raise UsageError("--classes needs --labels FILE for a flat folder (or class subfolders)")
        return files, labels, None, {"layout": "flat, unlabelled (every label 0)"}
    if classes_from is None:
        raise UsageError("--labels needs --classes SRC: the training cache or class folder whose class list the "
                         "labels index (so both splits number the classes alike)")
    classes = class_list(classes_from)
    labels, fmt = labels_for(files, data, labels_file, classes)
    return files, labels, classes, {"layout": "flat + labels file", "labels_file": str(Path(labels_file).resolve()),
                                    "format": fmt, "classes": str(Path(classes_from).resolve())}


def cache_latents(data: str | os.PathLike, vae: str | os.PathLike, out: str | os.PathLike, *,
                  image_size: int = 256, batch_size: int = 32, shard_size: int = 10_000,
                  vae_kind: Optional[str] = None, num_workers: int = 4, labels_file: str | os.PathLike | None = None,
                  classes_from: str | os.PathLike | None = None, moments: bool = False) -> dict:
    """Encode an image folder into a latent cache (module doc); returns a summary."""
    for name, v in (("--image-size", image_size), ("--batch-size", batch_size), ("--shard-size", shard_size)):
        if v <= 0:
            raise UsageError(f"{name} must be positive, got {v}")
    if num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, got {num_workers}")
    files, labels, classes, source = list_labelled_images(data, labels_file, classes_from)
    return write_cache(files, labels, classes, Path(data), vae, out, image_size=image_size, batch_size=batch_size,
                       shard_size=shard_size, vae_kind=vae_kind, num_workers=num_workers, labels_source=source,
                       moments=moments)


def write_cache(files: list[str], labels: list[int], classes: Optional[list[str]], data: Path,
                vae: str | os.PathLike, out: str | os.PathLike, *, image_size: int, batch_size: int, shard_size: int,
                vae_kind: Optional[str] = None, num_workers: int = 4, labels_source: Optional[dict] = None,
                moments: bool = False) -> dict:
    """Encode `files` (labelled `labels`, below `data`) into the cache folder `out` (module doc); `moments`:
    store each posterior's mean and std rather than one sample."""
    from safetensors.torch import save as st_save

    from ..console import info, progress
    from . import _CatchErrors, _collate, _Failure
    from ..distributed import Dist
    from ..seeding import per_sample_randn
    from .vae import load_vae

    out = Path(out)
    dist = Dist()
    rank, world, device = dist.rank, dist.world, dist.device
    model = load_vae(vae, vae_kind, device=device)
    f = model.downsample
    if image_size % f:
        raise UsageError(f"--image-size {image_size} is not a multiple of the VAE's downsampling factor {f}")
    ident = model.identity()
    latent_shape = [model.latent_channels, image_size // f, image_size // f]
    settings = _settings(data, files, labels, classes, image_size, shard_size, ident, latent_shape, moments)
    fingerprint = _fingerprint(settings)
    _check_out_folder(out, settings)
    dist.barrier()  # every rank checks the folder before rank 0 writes there (its temporary file is no cache)
    n = len(files)
    num_shards = (n + shard_size - 1) // shard_size
    bounds = [(k * shard_size, min(n, (k + 1) * shard_size)) for k in range(num_shards)]

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp-*"):  # a killed run's half-written file (never renamed into place)
            stale.unlink(missing_ok=True)
        if not (out / MANIFEST).is_file():  # claims the folder for this cache before anything is encoded
            _write_json(out / MANIFEST, _manifest(settings, [None] * num_shards, ident, complete=False))
    dist.barrier()

    mine = [k for k in range(num_shards) if k % world == rank]
    finished = {k: _shard_ok(out, k, bounds[k][1] - bounds[k][0], fingerprint) for k in mine}
    todo = [k for k in mine if finished[k] is None]
    counts = dist.gather((len(mine) - len(todo), len(todo)))  # over every rank: the summary is the whole cache's
    skipped, encoded = sum(c[0] for c in counts), sum(c[1] for c in counts)
    if skipped:
        info(f"cache-latents: {skipped} finished shard(s) kept, {encoded} to encode")
    total = sum(bounds[k][1] - bounds[k][0] for k in todo)
    with progress(total, "cache-latents", "img") as bar:
        for k in todo:
            lo, hi = bounds[k]
            loader = torch.utils.data.DataLoader(
                _CatchErrors(_FolderImages(files, list(range(lo, hi)), image_size)), batch_size=batch_size,
                shuffle=False, num_workers=num_workers, collate_fn=_collate)
            kept = ("z", "mean", "std") if moments else ("z",)
            plain: dict[str, list[Tensor]] = {key: [] for key in kept}
            mirror: dict[str, list[Tensor]] = {key: [] for key in kept}
            for batch in loader:
                if isinstance(batch, _Failure):
                    raise batch.error
                images, idx = batch
                x = images.to(device).float() / 127.5 - 1
                mean, std = model.encode_moments(torch.cat((x, x.flip(-1))))  # (2b, C, h, w): images, then mirrors
                mean, std = mean.float().cpu(), std.float().cpu()
                seeds = idx.tolist()
                eps = torch.cat((per_sample_randn(seeds, latent_shape, stream=0),
                                 per_sample_randn(seeds, latent_shape, stream=1)))
                # on the CPU: a moments cache gives this sample back bit for bit (latentstore.fixed_sample)
                drawn = {"z": fixed_sample(mean, std, eps), "mean": mean, "std": std}
                for key in kept:
                    plain[key].append(drawn[key][:len(seeds)])
                    mirror[key].append(drawn[key][len(seeds):])
                bar.update(len(seeds))
            z = torch.cat(plain["z"]).contiguous()
            names = {"mean": "mean", "std": "std"} if moments else {"z": "latents"}
            tensors = {"labels": torch.tensor(labels[lo:hi], dtype=torch.int64)}
            for key, name in names.items():
                tensors[name] = z if key == "z" else torch.cat(plain[key]).contiguous()
                tensors[f"{name}_flip"] = torch.cat(mirror[key]).contiguous()
            payload = _canonical_safetensors(st_save(
                tensors, metadata={"first": str(lo), "count": str(hi - lo), "fingerprint": fingerprint}))
            write_bytes_atomic(out / shard_file(k), payload)
            rec = {"file": shard_file(k), "index": k, "first": lo, "count": hi - lo, "bytes": len(payload),
                   "sha256": hashlib.sha256(payload).hexdigest(), "fingerprint": fingerprint, "stats": _shard_stats(z)}
            _write_json(out / _record_file(k), rec)
            finished[k] = rec

    dist.barrier()
    if rank == 0:
        records = []
        for k in range(num_shards):
            rec = finished.get(k)
            if rec is None:  # another rank's shard: trust its record (written after the shard itself)
                rec = json.loads((out / _record_file(k)).read_text(encoding="utf-8"))
            records.append(rec)
        mean, std = combine_stats([r["stats"] for r in records])
        write_bytes_atomic(out / STATS, _canonical_safetensors(st_save(
            {"mean": torch.from_numpy(mean).float(), "std": torch.from_numpy(std).float()},
            metadata={"over": "every unflipped latent, per channel (float64 accumulation)", "count": str(n)})))
        manifest = _manifest(settings, records, ident, complete=True)
        manifest["stats_values"] = {"mean": mean.tolist(), "std": std.tolist()}
        manifest["labels_source"] = labels_source or {}
        if classes:
            manifest["class_counts"] = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes)).tolist()
        _write_json(out / MANIFEST, manifest)
    dist.barrier()
    return {"out": str(out), "count": n, "num_shards": num_shards, "encoded_shards": encoded,
            "skipped_shards": skipped, "latent_shape": latent_shape, "image_size": image_size,
            "num_classes": len(classes) if classes else None, "vae": {k: ident[k] for k in ("kind", "file", "sha256")},
            "stats": str(out / STATS), "world_size": world, "posterior": settings["posterior"]}
