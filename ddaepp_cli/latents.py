"""Cached VAE latents (LightningDiT `extract_features.py`, `datasets/img_latent_dataset.py`; architecture.md §10):
`ddaepp cache-latents` writes them, the `latents` dataset memory-maps them.

Cache folder layout (`--out`):

    manifest.json                 counts, shards with sha256, VAE identity, latent shape, statistics
    shard-00000.safetensors       {"latents": (n, C, h, w) f32, "latents_flip": (n, C, h, w) f32, "labels": (n,) i64}
    latents_stats.safetensors     {"mean": (C,), "std": (C,)} per-channel over every unflipped latent

Shard k holds images [k·S, (k+1)·S) of the folder's sorted order (S = `--shard-size`). Each shard is
written atomically (temporary file, then rename) followed by its record `shard-NNNNN.json` (count,
sha256, partial statistics), so a shard is finished or absent: re-running the same command skips every
shard whose record and checksum match (resumable) and encodes only the rest. Processes started with
`accelerate launch` split the shards (shard k on rank k mod world); rank 0 writes the manifest after
a barrier. The statistics are exact over the whole set, accumulated in float64 (LightningDiT estimates
them from 10,000 random latents).

Encoding (architecture.md §10.1): ADM centre crop to `--image-size`, [−1, 1], the VAE encoder's posterior
for the image and its mirror, one posterior *sample* each (mean + std·ε) with ε drawn from a generator
seeded by the image's index (stream 0 unflipped, stream 1 mirrored; drawn on the CPU), so a re-run —
at any batch size, on any device count — reproduces the same noise.

The dataset returns, per index, the normalised pair (2, C, h, w) = (latent, latent of the mirrored
image) and the label; the training loop picks one of the two with a flip bit drawn from its shared
generator (train.py), so the choice is reproducible and resumable rather than an RNG call inside the
dataset. Normalisation: z ← (z − mean) / std (LightningDiT `latent_norm`, multiplier 1), or z ← z·scale with
`data.latent_scale` (DiT/SiT/SRA: 0.18215 for SD-VAE).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .errors import UnavailableError, UsageError

MANIFEST = "manifest.json"
STATS = "latents_stats.safetensors"
IMAGENET_TRAIN = 1_281_167  # images in ImageNet-1k train: the plan of a `--dry-run` without the cache at hand


def read_manifest(root: str | os.PathLike) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise UnavailableError(f"no latent cache at {root}: {path} is missing; create it with "
                               f"`ddaepp cache-latents --data <image folder> --vae <vae file> --out {root}`")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not a ddaepp latent manifest (not JSON: {e})") from None
    missing = [k for k in ("num_shards", "shards", "latent_shape", "shard_size", "count") if k not in m] \
        if isinstance(m, dict) else ["(not a JSON object)"]
    if missing:
        raise UsageError(f"{path} is not a ddaepp latent manifest: missing {', '.join(missing)}")
    # a manifest names only its own shard files (in order once complete): nothing it says can make
    # ddaepp read outside the cache folder
    files = [e.get("file") if isinstance(e, dict) else e for e in m["shards"]]
    bad = [f for k, f in enumerate(files)
           if not (isinstance(f, str) and re.fullmatch(r"shard-\d{5}\.safetensors", f))
           or (m.get("complete") and f != shard_file(k))]
    if bad:
        raise UsageError(f"{path} names unexpected shard files {bad[:3]}; a cache holds shard-00000.safetensors, "
                         "shard-00001.safetensors, … in order (re-create it with `ddaepp cache-latents`)")
    return m


def latent_geometry(data) -> tuple[int, int, Optional[int]]:
    """(channels, spatial size, number of images) from the cache's manifest, else from the recipe."""
    if data.root and (Path(data.root) / MANIFEST).is_file():
        m = read_manifest(data.root)
        c, h, _ = m["latent_shape"]
        if data.image_size not in (None, h):
            raise UsageError(f"data.image_size {data.image_size} does not match the cached latents' {h}")
        return c, h, m["complete"] and m["count"] or None
    size = data.image_size or (16 if data.latent_channels == 32 else 32)  # VA-VAE f16 / SD-VAE f8 on 256²
    return data.latent_channels, size, IMAGENET_TRAIN


# ------------------------------------------------------------------------------------------------
# safetensors memory mapping
# ------------------------------------------------------------------------------------------------

_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def mmap_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read-only numpy memory maps of every tensor in a safetensors file (8-byte header length,
    JSON header, raw little-endian data): nothing is read until indexed."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        lo, hi = spec["data_offsets"]
        dtype = _DTYPES[spec["dtype"]]
        count = (hi - lo) // np.dtype(dtype).itemsize
        arr = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + lo, shape=(count,))
        out[name] = arr.reshape(spec["shape"])
    return out


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------------


class LatentDataset(torch.utils.data.Dataset):
    """Memory-mapped cached latents: item i → ((2, C, h, w) normalised float32 pair, label)."""

    in_memory = False

    def __init__(self, root: str | os.PathLike | None, image_size: Optional[int] = None,
                 scale: Optional[float] = None):
        if root is None:
            raise UsageError("data.root is required for data.dataset=latents (the `cache-latents --out` folder)")
        self.root = Path(root)
        m = read_manifest(self.root)
        if not m.get("complete"):
            raise UnavailableError(f"latent cache {root} is incomplete ({m.get('done', 0)}/{m['num_shards']} shards); "
                                   f"re-run the same `ddaepp cache-latents` command to finish it")
        self.manifest = m
        self.channels, self.image_size, _ = m["latent_shape"]
        if image_size not in (None, self.image_size):
            raise UsageError(f"data.image_size {image_size} does not match the cached latents' {self.image_size}")
        self.name, self.split = "latents", "train"
        self.num_classes = m.get("num_classes")
        self.class_names = m.get("class_names")
        self.shard_size = m["shard_size"]
        self.count = m["count"]
        self.mean, self.std = latent_norm(self.root, scale, self.channels)  # (C, 1, 1) each
        self.mean, self.std = self.mean.reshape(-1, 1, 1), self.std.reshape(-1, 1, 1)
        self._maps: dict[int, dict[str, np.ndarray]] = {}  # opened lazily, per process (workers)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}  # memory maps are re-opened in each DataLoader worker
        return state

    def __len__(self) -> int:
        return self.count

    def info(self) -> dict:
        return {"name": self.name, "split": self.split, "root": str(self.root), "size": len(self),
                "image_size": self.image_size, "channels": self.channels, "num_classes": self.num_classes}

    def _shard(self, k: int) -> dict[str, np.ndarray]:
        if k not in self._maps:
            self._maps[k] = mmap_safetensors(self.root / self.manifest["shards"][k]["file"])
        return self._maps[k]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if not 0 <= i < self.count:
            raise IndexError(i)
        s = self._shard(i // self.shard_size)
        j = i % self.shard_size
        pair = torch.from_numpy(np.stack((s["latents"][j], s["latents_flip"][j])).astype(np.float32))  # (2, C, h, w)
        return (pair - self.mean) / self.std, int(s["labels"][j])

    def denormalise(self, z: Tensor) -> Tensor:
        """Model-space latents (B, C, h, w) → VAE latents (LightningDiT: z·std + mean)."""
        return z * self.std.to(z.device, z.dtype) + self.mean.to(z.device, z.dtype)


def resolve_vae_path(manifest: dict, vae: str | os.PathLike | None = None) -> Path:
    """The VAE weights of a cache: `vae` (recipe `data.vae`) if given, else the file recorded at caching
    time if it still exists, else `$DDAEPP_CACHE/weights/<file name>`."""
    from .vae import cache_dir, missing_message

    ident = manifest.get("vae") or {}
    if vae is not None:
        path = Path(vae).expanduser()
        if not path.is_file():
            raise UnavailableError(missing_message(path, ident.get("kind")) + " (recipe key data.vae)")
        return path
    candidates = [Path(p) for p in (ident.get("file"),) if p]
    if ident.get("file_name"):
        candidates.append(cache_dir() / "weights" / ident["file_name"])
    for path in candidates:
        if path.is_file():
            return path
    where = " or ".join(str(p) for p in candidates) or "(the manifest names no VAE)"
    raise UnavailableError(f"VAE weights of the latent cache not found at {where}; put {ident.get('file_name', 'the VAE file')} "
                           f"(sha256 {str(ident.get('sha256', '?'))[:16]}…) at {cache_dir() / 'weights'}/, or set the "
                           f"recipe key data.vae to its path")


def latent_norm(root: str | os.PathLike, scale: Optional[float], channels: int) -> tuple[Tensor, Tensor]:
    """(mean, std) (C,) of model space: the cache's per-channel statistics (LightningDiT), or for a fixed
    `scale` mean 0 and std 1/scale, i.e. z·scale (DiT/SiT/SRA scale SD-VAE latents by 0.18215)."""
    if scale is not None:
        return torch.zeros(channels), torch.full((channels,), 1.0 / scale)  # float32, as the stored statistics
    stats = mmap_safetensors(Path(root) / STATS)
    return torch.from_numpy(np.array(stats["mean"])), torch.from_numpy(np.array(stats["std"]))


def load_decoder(root: str | os.PathLike | None, device: torch.device | str = "cpu",
                 vae: str | os.PathLike | None = None, scale: Optional[float] = None):
    """latents (B, C, h, w) in model space → images in [−1, 1] through the cache's VAE.

    z·std + mean (the cache's statistics; z/scale with `data.latent_scale`) → VAE decoder → clamp to [−1, 1] (the caller rounds to uint8,
    as LightningDiT's clamp(127.5·x + 128)). The weights must be the ones the cache was made with
    (sha256 in the manifest); where they are looked for: `resolve_vae_path`."""
    from .vae import load_vae

    if root is None:
        raise UsageError("data.root is required to decode latents (the `cache-latents --out` folder)")
    manifest = read_manifest(root)
    ident = manifest.get("vae") or {}
    path = resolve_vae_path(manifest, vae)
    model = load_vae(path, device=device, expected_sha256=ident.get("sha256"))
    mean, std = latent_norm(root, scale, manifest["latent_shape"][0])
    mean, std = (v.float().reshape(1, -1, 1, 1).to(device) for v in (mean, std))

    @torch.no_grad()
    def decode(z: Tensor) -> Tensor:
        z = z.to(device=device, dtype=torch.float32) * std + mean
        return model.decode(z).float().clamp(-1.0, 1.0)

    return decode


# ------------------------------------------------------------------------------------------------
# `ddaepp cache-latents`
# ------------------------------------------------------------------------------------------------

CACHE_VERSION = 1


def shard_file(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _record_file(k: int) -> str:
    return f"shard-{k:05d}.json"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _canonical_safetensors(payload: bytes) -> bytes:
    """`payload` with its JSON header's keys sorted: safetensors writes the metadata map in hash order,
    which changes from process to process, so equal tensors would not give equal bytes (nor checksums)."""
    n = int.from_bytes(payload[:8], "little")
    text = json.dumps(json.loads(payload[8:8 + n]), sort_keys=True, separators=(",", ":")).encode("utf-8")
    if len(text) > n:  # never for safetensors' own compact header; keep the file as written
        return payload
    return payload[:8] + text + b" " * (n - len(text)) + payload[8 + n:]


def _write_json(path: Path, obj: dict) -> None:
    _write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


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
              vae_ident: dict, latent_shape: list[int]) -> dict:
    listing = hashlib.sha256()
    for f, y in zip(files, labels):
        listing.update(f"{y}\t{os.path.relpath(f, data)}\n".encode("utf-8"))
    return {"version": CACHE_VERSION, "data": str(data.resolve()), "count": len(files),
            "files_sha256": listing.hexdigest(), "image_size": image_size, "shard_size": shard_size,
            "latent_shape": latent_shape, "vae_sha256": vae_ident["sha256"], "vae_config": vae_ident["config"],
            "class_names": classes}


_SAME = ("version", "count", "files_sha256", "image_size", "shard_size", "latent_shape", "vae_sha256", "vae_config",
         "class_names")


def _check_out_folder(out: Path, settings: dict) -> None:
    """Refuse a folder that is not this cache: another cache (different settings) or something else."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if (out / MANIFEST).is_file():
        old = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("settings", {})
        diff = [k for k in _SAME if old.get(k) != settings[k]]
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
            "posterior": "sample (mean + std·eps), eps seeded by the image index; stream 0 image, 1 mirror",
            "stats": STATS if complete else None,
            "shards": [{"file": r["file"], "first": r["first"], "count": r["count"], "sha256": r["sha256"],
                        "bytes": r["bytes"]} for r in done] if complete else
                      [{"file": r["file"], "sha256": r["sha256"]} for r in done],
            "settings": settings}


def cache_latents(data: str | os.PathLike, vae: str | os.PathLike, out: str | os.PathLike, *,
                  image_size: int = 256, batch_size: int = 32, shard_size: int = 10_000,
                  vae_kind: Optional[str] = None, num_workers: int = 4) -> dict:
    """Encode an image folder into a latent cache (module doc); returns a summary."""
    from safetensors.torch import save as st_save

    from .console import info, progress
    from .data import _CatchErrors, _collate, _Failure
    from .distributed import Dist
    from .imageio import list_image_folder
    from .seeding import per_sample_randn
    from .vae import load_vae

    for name, v in (("--image-size", image_size), ("--batch-size", batch_size), ("--shard-size", shard_size)):
        if v <= 0:
            raise UsageError(f"{name} must be positive, got {v}")
    if num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, got {num_workers}")
    data, out = Path(data), Path(out)
    files, labels, classes = list_image_folder(str(data))
    dist = Dist()
    rank, world, device = dist.rank, dist.world, dist.device
    model = load_vae(vae, vae_kind, device=device)
    f = model.downsample
    if image_size % f:
        raise UsageError(f"--image-size {image_size} is not a multiple of the VAE's downsampling factor {f}")
    ident = model.identity()
    latent_shape = [model.latent_channels, image_size // f, image_size // f]
    settings = _settings(data, files, labels, classes, image_size, shard_size, ident, latent_shape)
    fingerprint = hashlib.sha256(json.dumps({k: settings[k] for k in _SAME}, sort_keys=True).encode()).hexdigest()
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
            plain, mirror = [], []
            for batch in loader:
                if isinstance(batch, _Failure):
                    raise batch.error
                images, idx = batch
                x = images.to(device).float() / 127.5 - 1
                mean, std = model.encode_moments(torch.cat((x, x.flip(-1))))
                seeds = idx.tolist()
                eps = torch.cat((per_sample_randn(seeds, latent_shape, stream=0),
                                 per_sample_randn(seeds, latent_shape, stream=1))).to(device)
                z = (mean.float() + std.float() * eps).cpu()
                plain.append(z[:len(seeds)])
                mirror.append(z[len(seeds):])
                bar.update(len(seeds))
            z, z_flip = torch.cat(plain).contiguous(), torch.cat(mirror).contiguous()
            payload = _canonical_safetensors(st_save(
                {"latents": z, "latents_flip": z_flip, "labels": torch.tensor(labels[lo:hi], dtype=torch.int64)},
                metadata={"first": str(lo), "count": str(hi - lo), "fingerprint": fingerprint}))
            _write_atomic(out / shard_file(k), payload)
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
        _write_atomic(out / STATS, _canonical_safetensors(st_save(
            {"mean": torch.from_numpy(mean).float(), "std": torch.from_numpy(std).float()},
            metadata={"over": "every unflipped latent, per channel (float64 accumulation)", "count": str(n)})))
        manifest = _manifest(settings, records, ident, complete=True)
        manifest["stats_values"] = {"mean": mean.tolist(), "std": std.tolist()}
        _write_json(out / MANIFEST, manifest)
    dist.barrier()
    return {"out": str(out), "count": n, "num_shards": num_shards, "encoded_shards": encoded,
            "skipped_shards": skipped, "latent_shape": latent_shape, "image_size": image_size,
            "num_classes": len(classes) if classes else None, "vae": {k: ident[k] for k in ("kind", "file", "sha256")},
            "stats": str(out / STATS), "world_size": world}
