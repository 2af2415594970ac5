"""What `ddaepp fid` compares with (`--ref`), and the cache of reference statistics and features.

A reference is a registered name (`cifar10-train`, …), a folder, an `.npz` of images, or statistics
`{mu, sigma}` (ADM and EDM reference files, ddaepp's own `--save-stats` files). ADM's reference
batches (`VIRTUAL_imagenet256_labeled.npz`) hold both: their statistics (`mu, sigma` for FID, `mu_s,
sigma_s` for sFID) win, as in ADM's evaluator, and their 10,000 images `arr_0` give the features of
precision/recall (and KID).

Statistics (and features, when KID/PRC need them) of images are cached in `$DDAEPP_CACHE/fid/` under
a key of the reference's *content* (sha256 of every file, or of the pixels), the resize policy, the
extractor, its weights' sha256 and dtype — never under a name alone.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import inception
from ...atomic import atomic_path
from ...console import info
from ...distributed import Dist
from ...errors import UsageError, choices
from .constants import CACHE_FORMAT, DIM, FEATURES, REGISTERED, RESIZE_POLICY, SPATIAL, TORCH_FIDELITY_ONLY
from .extract import extract
from .sources import DatasetSource, FolderSource, ImageSource, NpzSource, _hash_file
from .stats import Stats, load_stats, npz_keys, stats_from_features, write_stats


@dataclass
class Reference:
    kind: str  # registered | folder | npz | stats
    text: str
    source: ImageSource | None = None  # images (for a statistics file: ADM's arr_0, when present)
    stats: Stats | None = None  # from a statistics file
    description: dict = field(default_factory=dict)


def resolve_reference(text: str, *, data_root: str | None, download: bool) -> Reference:
    if text in REGISTERED or text in TORCH_FIDELITY_ONLY:
        src = DatasetSource(text, data_root, download)
        return Reference("registered", text, source=src, description=src.describe())
    p = Path(text)
    if p.is_dir():
        src = FolderSource(p)
        return Reference("folder", text, source=src, description=src.describe())
    if p.is_file() and p.suffix == ".npz":
        keys = npz_keys(p)
        if "mu" in keys and "sigma" in keys:  # ADM reference batches hold both: their statistics win, as in ADM
            st = load_stats(p)
            h = hashlib.sha256()
            _hash_file(str(p), h)
            images = NpzSource(p) if "arr_0" in keys else None
            desc = {"kind": "stats", "path": str(p), "n": st.n, "fingerprint": h.hexdigest(), "meta": st.meta,
                    "spatial_statistics": st.spatial is not None,
                    "images": images.describe() if images is not None else None}
            return Reference("stats", text, source=images, stats=st, description=desc)
        src = NpzSource(p)
        return Reference("npz", text, source=src, description=src.describe())
    if p.exists():
        raise UsageError(f"--ref {text}: give an image folder, an .npz (images arr_0, or statistics mu/sigma) "
                         "or a registered name")
    raise UsageError(f"--ref {text}: no such file or folder, and not a registered set; registered: "
                     f"{choices([*REGISTERED, *TORCH_FIDELITY_ONLY])}")


def cache_key(fingerprint: str, extractor: dict) -> str:
    parts = {"format": CACHE_FORMAT, "content": fingerprint, "resize": RESIZE_POLICY,
             "extractor": extractor["name"], "layer": FEATURES, "weights_sha256": extractor["weights_sha256"],
             "internal_dtype": extractor["internal_dtype"],
             "torch_fidelity": ".".join(extractor["torch_fidelity"].split(".")[:2])}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def fid_cache_dir() -> Path:
    return inception.cache_dir() / "fid"


def _atomic_np_save(path: Path, arr: np.ndarray) -> None:
    try:
        with atomic_path(path, durable=False) as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
    except OSError as e:
        info(f"warning: could not write the FID cache {path}: {e.strerror or e}")


def reference_data(ref: Reference, extractor, extractor_info: dict, dist: Dist, *, need_features: bool,
                   use_cache: bool, batch_size: int, need_spatial: bool = False,
                   ) -> tuple[Stats | None, torch.Tensor | None, dict]:
    """Statistics (with `.spatial` for sFID) and, when KID/PRC need them, pool features of the reference.

    Rank 0 gets them; the other ranks take part in the extraction and get (None, None, info)."""
    if ref.stats is not None:
        if need_spatial and ref.stats.spatial is None:
            raise UsageError(f"sFID needs spatial statistics (mu_s, sigma_s, as in ADM's reference batches); "
                             f"{ref.text} holds mu and sigma only: give reference images, or drop sfid")
        feats, cinfo = None, {"cache": "n/a (statistics file)"}
        if need_features:  # ADM: precision/recall against the features of the batch's own images
            _, feats, cinfo = _image_data(ref, extractor, extractor_info, dist, need_features=True,
                                          need_spatial=False, use_cache=use_cache, batch_size=batch_size)
            cinfo = {**cinfo, "statistics": "from the file (mu, sigma[, mu_s, sigma_s])",
                     "features": "Inception pool3 of the file's arr_0 images"}
        return ref.stats, feats, cinfo
    return _image_data(ref, extractor, extractor_info, dist, need_features=need_features, need_spatial=need_spatial,
                       use_cache=use_cache, batch_size=batch_size)


def _image_data(ref: Reference, extractor, extractor_info: dict, dist: Dist, *, need_features: bool,
                need_spatial: bool, use_cache: bool, batch_size: int) -> tuple[Stats | None, torch.Tensor | None, dict]:
    t0 = time.perf_counter()
    fingerprint = ref.source.fingerprint()
    key = cache_key(fingerprint, extractor_info)
    stats_path, feats_path = fid_cache_dir() / f"{key}.npz", fid_cache_dir() / f"{key}-features.npy"
    ref.description.setdefault("fingerprint", fingerprint)  # a statistics file keeps its own file hash
    cinfo = {"cache_key": key, "fingerprint_s": round(time.perf_counter() - t0, 3)}
    hit = None
    if use_cache and stats_path.is_file() and (not need_features or feats_path.is_file()):
        try:
            stats = load_stats(stats_path)
            # memory-mapped: every rank checks the entry, only rank 0 reads the features
            feats = np.load(feats_path, mmap_mode="r", allow_pickle=False) if need_features else None
            if (feats is None or feats.shape == (stats.n, DIM)) and (not need_spatial or stats.spatial is not None):
                hit = stats, feats
        except (UsageError, OSError, ValueError):
            pass  # a damaged (or sFID-less) cache entry is recomputed and replaced
    if all(dist.gather(hit is not None)):  # every rank must agree, or the sharded extraction would hang
        if not dist.main:
            return None, None, {**cinfo, "cache": "hit"}
        feats = torch.from_numpy(np.array(hit[1])) if hit[1] is not None else None
        return hit[0], feats, {**cinfo, "cache": "hit", "cache_file": str(stats_path)}
    layers = [FEATURES] + ([SPATIAL] if need_spatial else [])
    feats, _ = extract(ref.source, extractor, layers, dist, batch_size=batch_size, desc="fid: reference")
    result_info = {**cinfo, "cache": "miss" if use_cache else "off",
                   "cache_file": str(stats_path) if use_cache else None}
    if feats is None:  # not rank 0
        return None, None, result_info
    stats = stats_from_features(feats[FEATURES], feats.get(SPATIAL))
    if use_cache:
        fid_cache_dir().mkdir(parents=True, exist_ok=True)
        meta = {"reference": ref.description, "extractor": extractor_info, "resize": RESIZE_POLICY}
        try:
            write_stats(stats_path, stats, meta)
        except UsageError as e:
            info(f"warning: {e}")
        if need_features:
            _atomic_np_save(feats_path, feats[FEATURES].numpy())
    return stats, feats[FEATURES] if need_features else None, result_info


# ADM's ImageNet 256² reference batch (guided-diffusion evaluations/README.md): 10,000 images arr_0
# plus mu, sigma (pool_3) and mu_s, sigma_s (mixed_6/conv) of the whole training set.
ADM_REFERENCE = "VIRTUAL_imagenet256_labeled.npz"
ADM_REFERENCE_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
                     + ADM_REFERENCE)


def default_adm_reference() -> Path:
    """Where `ddaepp fid` looks for ADM's reference batch when a latent (ImageNet) run gets no --ref."""
    return inception.cache_dir() / "refs" / ADM_REFERENCE


def is_adm_batch(ref: Reference | None) -> bool:
    """A statistics file with spatial statistics and images: an ADM reference batch."""
    return ref is not None and ref.stats is not None and ref.stats.spatial is not None and ref.source is not None
