"""Reading a latent cache (the folder `ddaepp cache-latents` writes; latents.py documents the layout and
the encoding): its manifest, memory-mapped shards, the `latents` dataset, and the VAE that decodes it.

The dataset returns, per index, the normalised pair (2, C, h, w) = (latent, latent of the mirrored
image) and the label; the training loop picks one of the two with a flip bit drawn from its shared
generator (train.py), so the choice is reproducible and resumable rather than an RNG call inside the
dataset. Normalisation: z ← (z − mean) / std (LightningDiT `latent_norm`, multiplier 1), with the
statistics of the cache itself or, for a held-out cache, of the training cache the model saw
(`stats_root`); or z ← z·scale with `data.latent_scale` (DiT/SiT/SRA: 0.18215 for SD-VAE).

A `--moments` cache stores each posterior's mean and std. Read by index it gives the fixed sample
mean + std·ε₀ (ε₀: the per-image streams 0/1 of `cache-latents`), bit for bit what a sample cache of the
same folder holds, so evaluation reads both alike. With `posterior="per_step"` (recipe key
`data.latent_posterior`) training reads `draw(i, seed, step)` instead: a fresh sample per training step
(SRA/REPA `train.py` `sample_posterior`: mean + std·randn, then the 0.18215 scale), whose ε comes from
image i's own generator keyed by (train seed, global step) — the same on any number of processes, at
any batch split, and again after a resume (stream.py passes the step).
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

from ..errors import UnavailableError, UsageError
from ..seeding import MAX_SEED, generator_seed, per_sample_randn

MANIFEST = "manifest.json"
STATS = "latents_stats.safetensors"
IMAGENET_TRAIN = 1_281_167  # images in ImageNet-1k train: the plan of a `--dry-run` without the cache at hand


def shard_file(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


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
# Posterior samples
# ------------------------------------------------------------------------------------------------

POSTERIORS = ("fixed", "per_step")


def fixed_sample(mean: Tensor, std: Tensor, eps: Tensor) -> Tensor:
    """One posterior sample z = mean + std·ε (SRA `sample_posterior` before its ·0.18215, which is the
    dataset's normalisation here). Computed on the CPU both when caching and when reading back."""
    return mean + std * eps


def draw_stream(seed: int, step: int, view: int) -> int:
    """The generator stream (seeding.py) of training step `step`'s posterior draw under train seed `seed`,
    view 0 the image, 1 its mirror: a 64-bit mix of (seed, step), one 32-bit half per view, in
    2 … 2³²−1 (streams 0 and 1 are the cache's fixed sample)."""
    key = generator_seed(seed & MAX_SEED, step % MAX_SEED + 1)
    return 2 + ((key >> (32 * view)) & MAX_SEED) % (MAX_SEED - 1)


def posterior_noise(index: int, shape: tuple[int, ...], *, seed: int, step: int) -> Tensor:
    """ε (2, C, h, w) of image `index` (its latent and its mirror's) at training step `step`: a function of
    (index, seed, step) only."""
    return torch.stack([per_sample_randn([index], shape, stream=draw_stream(seed, step, v))[0] for v in (0, 1)])


# ------------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------------


class LatentDataset(torch.utils.data.Dataset):
    """Memory-mapped cached latents: item i → ((2, C, h, w) normalised float32 pair, label). `posterior`:
    `fixed` (the cache's one sample per image) or `per_step` (a `--moments` cache; `draw`)."""

    in_memory = False

    def __init__(self, root: str | os.PathLike | None, image_size: Optional[int] = None, *, split: str = "train",
                 stats_root: str | os.PathLike | None = None, scale: Optional[float] = None,
                 posterior: str = "fixed"):
        if root is None:
            raise UsageError("data.root is required for data.dataset=latents (the `cache-latents --out` folder)")
        self.root = Path(root)
        m = read_manifest(self.root)
        if not m.get("complete"):
            raise UnavailableError(f"latent cache {root} is incomplete ({m.get('done', 0)}/{m['num_shards']} shards); "
                                   f"re-run the same `ddaepp cache-latents` command to finish it")
        self.manifest = m
        self.moments = bool(m.get("moments"))  # mean/std per image (`cache-latents --moments`), else one sample
        if posterior not in POSTERIORS:
            raise UsageError(f"data.latent_posterior must be one of {', '.join(POSTERIORS)}, got {posterior!r}")
        if posterior == "per_step" and not self.moments:
            raise UsageError(f"data.latent_posterior=per_step needs the posterior's mean and std, but the latent cache "
                             f"{root} holds one fixed sample per image: re-create it with `ddaepp cache-latents "
                             f"--moments`, or set data.latent_posterior=fixed")
        self.posterior = posterior
        self.channels, self.image_size, _ = m["latent_shape"]
        if image_size not in (None, self.image_size):
            raise UsageError(f"data.image_size {image_size} does not match the cached latents' {self.image_size}")
        self.name, self.split = "latents", split
        self.num_classes = m.get("num_classes")
        self.class_names = m.get("class_names")
        self.shard_size = m["shard_size"]
        self.count = m["count"]
        # a held-out cache is normalised with the statistics of the training cache the model saw
        self.stats_root = Path(stats_root) if stats_root is not None else self.root
        if stats_root is not None:
            read_manifest(self.stats_root)
        self.mean, self.std = latent_norm(self.stats_root, scale, self.channels)  # (C,) each
        self.mean, self.std = self.mean.reshape(-1, 1, 1), self.std.reshape(-1, 1, 1)
        self._maps: dict[int, dict[str, np.ndarray]] = {}  # opened lazily, per process (workers)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}  # memory maps are re-opened in each DataLoader worker
        state["_labels"] = None
        return state

    def __len__(self) -> int:
        return self.count

    def info(self) -> dict:
        return {"name": self.name, "split": self.split, "root": str(self.root), "size": len(self),
                "image_size": self.image_size, "channels": self.channels, "num_classes": self.num_classes,
                "stats_root": str(self.stats_root), "source_image_size": self.manifest.get("image_size"),
                "labels": self.manifest.get("labels_source"), "stored": "moments" if self.moments else "sample",
                "posterior": self.posterior}

    @property
    def draws_per_step(self) -> bool:
        """Training reads `draw(i, seed, step)` rather than item i (stream.py)."""
        return self.posterior == "per_step"

    @property
    def file_labels(self) -> np.ndarray:
        """Every label (N,) int64, read from the shards (8 bytes per image) once."""
        if getattr(self, "_labels", None) is None:
            self._labels = np.concatenate([np.array(self._shard(k)["labels"])
                                           for k in range(len(self.manifest["shards"]))])[:self.count]
        return self._labels

    def fingerprint(self) -> str:
        """The shards' sha256 (from the manifest) and the statistics file: what an evaluation read."""
        h = hashlib.sha256()
        for e in self.manifest["shards"]:
            h.update(f"{e['file']}\t{e['sha256']}\n".encode())
        h.update(sha256_file(self.stats_root / STATS).encode())
        return h.hexdigest()[:16]

    def _shard(self, k: int) -> dict[str, np.ndarray]:
        if k not in self._maps:
            self._maps[k] = mmap_safetensors(self.root / self.manifest["shards"][k]["file"])
        return self._maps[k]

    def _read(self, i: int, eps: Optional[Tensor]) -> tuple[Tensor, int]:
        """Image i's normalised pair: the stored sample, or for a moments cache mean + std·eps
        (eps None: the fixed sample's noise, streams 0/1 seeded by i as `cache-latents` draws it)."""
        if not 0 <= i < self.count:
            raise IndexError(i)
        s = self._shard(i // self.shard_size)
        j = i % self.shard_size

        def pair(key: str) -> Tensor:  # (2, C, h, w): the image's, then its mirror's
            return torch.from_numpy(np.stack((s[key][j], s[f"{key}_flip"][j])).astype(np.float32))

        if not self.moments:
            z = pair("latents")
        else:
            if eps is None:
                shape = tuple(self.manifest["latent_shape"])
                eps = torch.cat((per_sample_randn([i], shape, stream=0), per_sample_randn([i], shape, stream=1)))
            z = fixed_sample(pair("mean"), pair("std"), eps)
        return (z - self.mean) / self.std, int(s["labels"][j])

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self._read(i, None)

    def draw(self, i: int, seed: int, step: int) -> tuple[Tensor, int]:
        """Training step `step`'s view of image i: a fresh posterior sample (per_step), else item i."""
        if not self.draws_per_step:
            return self._read(i, None)
        return self._read(i, posterior_noise(i, tuple(self.manifest["latent_shape"]), seed=seed, step=step))

    def denormalise(self, z: Tensor) -> Tensor:
        """Model-space latents (B, C, h, w) → VAE latents (LightningDiT: z·std + mean)."""
        return z * self.std.to(z.device, z.dtype) + self.mean.to(z.device, z.dtype)


def resolve_vae_path(manifest: dict, vae: str | os.PathLike | None = None) -> Path:
    """The VAE weights of a cache: `vae` (recipe `data.vae`: a path, or a name / hf:// address of hub.py's
    table, resolved offline) if given, else the file recorded at caching time if it still exists, else
    `$DDAEPP_CACHE/weights/<file name>`, else the table's file with the recorded sha256 (ddaepp's or the
    Hugging Face cache)."""
    from .. import hub
    from .vae import cache_dir, missing_message

    ident = manifest.get("vae") or {}
    if hub.is_reference(vae):
        return hub.resolve(hub.weight_for(str(vae)), option="a path as data.vae")
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
    for weight in hub.WEIGHTS.values():  # a table file, wherever hub.py finds it (never downloaded here)
        if weight.vae_kind and weight.sha256 and weight.sha256 == ident.get("sha256"):
            return hub.resolve(weight, option="the recipe key data.vae")
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
