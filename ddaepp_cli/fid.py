"""`ddaepp fid`: FID (and IS, KID, precision/recall) with torch-fidelity's Inception (ecosystem.md §2.1, §5).

What goes in: a folder of images, an `.npz` with `arr_0` (uint8 N×H×W×C, the ADM format), or a
run / checkpoint, whose samples are generated on the fly with per-sample seeds (`sample.generate`,
converted exactly as `ddaepp sample` writes PNGs: `((x+1)·127.5).round().clamp(0, 255)`) and never
written unless `--save-samples`. What it is compared with (`--ref`): a torch-fidelity registered
name (`cifar10-train`, …), a folder, an `.npz` of images, or precomputed statistics `{mu, sigma}`
(ADM and EDM reference files, or ddaepp's own `--save-stats` files).

How (the pitfalls of ecosystem.md §5, each handled):
- Images enter torch-fidelity's `inception-v3-compat` extractor as uint8 at their native size; the
  extractor does the TF1-compatible bilinear resize to 299 itself. ddaepp never resizes, and a
  folder whose images differ in size is refused (torch-fidelity would crash or need a resize).
- The extractor runs in float64 by default (`--extractor-dtype`), so features do not depend on the
  batch size; mean and covariance are computed here in float64 from the features.
- The Fréchet distance uses tr((Σ1 Σ2)^½) = Σ √λ(F Σ2 Fᵀ) for any F with FᵀF = Σ1 — an exact,
  symmetric eigenproblem (real by construction, no complex/NaN square roots). F is the centred
  features / √(n−1) when there are fewer samples than dimensions, else Σ1^½ from `eigh`.
  `frechet_distance(..., method="sqrtm")` is the ADM / pytorch-fid formula (scipy.linalg.sqrtm with
  their guards); both agree to ~1e-9 relative (tests/test_fid.py) and the eigh form is ~5× faster.
- IS, KID and precision/recall are torch-fidelity's own functions on the same features
  (`isc_features_to_metric`, `kid_features_to_metric`, `prc_features_to_metric`). Precision/recall
  use the Inception pool features with k = 3, as ADM's evaluator (and the DiT/SiT papers) do, not
  torch-fidelity's VGG16 default, which would need a second weights file.
- Reference statistics (and features, when KID/PRC need them) are cached in `$DDAEPP_CACHE/fid/`
  under a key of the reference's *content* (sha256 of every file, or of the pixels), the resize
  policy, the extractor, its weights' sha256 and dtype — never under a name alone.
- Several processes (`accelerate launch` / `torchrun`): seeds or files are sharded over ranks,
  features are gathered and ordered by index, rank 0 computes and writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import inception
from .console import info, progress
from .distributed import Dist
from .errors import UnavailableError, UsageError, choices
from .imageio import image_size_of, list_image_folder, read_rgb

PRESETS = {"fid10k": 10_000, "fid50k": 50_000}
METRICS = ("fid", "is", "kid", "prc")
FEATURES, LOGITS = "2048", "logits_unbiased"  # Inception pool3 (FID, KID, PRC) and logits (IS)
# torch-fidelity names read by ddaepp's own CIFAR reader (same pixels, restricted unpickler, offline).
REGISTERED = {"cifar10-train": ("cifar10", "train"), "cifar10-val": ("cifar10", "test"),
              "cifar100-train": ("cifar100", "train"), "cifar100-val": ("cifar100", "test")}
TORCH_FIDELITY_ONLY = ("stl10-train", "stl10-test", "stl10-unlabeled")  # through torch-fidelity's registry
# torch-fidelity's defaults (defaults.py), recorded with every result.
ISC_SPLITS, KID_SUBSETS, KID_SUBSET_SIZE, PRC_NEIGHBORHOOD, RNG_SEED = 10, 100, 1000, 3, 2020
DIM = 2048
RESIZE_POLICY = "none: native-resolution uint8 into torch-fidelity's TF1-compatible bilinear resize to 299"
CACHE_FORMAT = 1


# ================================================================================================
# Image sources: N uint8 images (3, H, W), read by index
# ================================================================================================


class ImageSource:
    kind: str

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, idx: Sequence[int]) -> torch.Tensor:
        """uint8 (b, 3, H, W) for the given indices."""
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 of the content, for the reference cache key and the protocol record."""
        raise NotImplementedError


def _rgb(x: torch.Tensor) -> torch.Tensor:
    """(b, C, H, W) uint8 with C = 1 or 3 → 3 channels (grey replicated, as PIL's convert("RGB"))."""
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def _hash_file(path: str, h) -> None:
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)


class FolderSource(ImageSource):
    """Images of a folder (flat, or class subfolders), sorted; all must share one size.

    A folder written by `ddaepp sample` (it holds protocol.json) contributes its per-seed images
    `000042.png` only, not grid.png.
    """

    kind = "folder"
    LOSSY = (".jpg", ".jpeg", ".webp")

    def __init__(self, root: str | os.PathLike, limit: int | None = None):
        self.root = Path(root)
        self.sample_protocol = None
        proto = self.root / "protocol.json"
        files = None
        if proto.is_file():
            try:
                meta = json.loads(proto.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                meta = None
            if isinstance(meta, dict) and meta.get("command") == "sample":
                self.sample_protocol = meta
                files = sorted(str(p) for p in self.root.iterdir() if re.fullmatch(r"\d+\.png", p.name))
                if not files:
                    raise UsageError(f"sample folder {self.root} holds no per-seed images (000000.png, …)")
        if files is None:
            files, _, _ = list_image_folder(str(self.root))  # UsageError when empty or mixed
        self.total = len(files)
        if limit is not None:
            if limit > len(files):
                raise UsageError(f"{self.root} holds {len(files)} images; --n {limit} asks for more")
            files = files[:limit]
        self.files = files
        ref = (files[0], image_size_of(files[0]))  # (path, (W, H)); unreadable header → UsageError
        for path in files[1:]:
            size = image_size_of(path)
            if size != ref[1]:
                raise UsageError(
                    f"images differ in size: {path} is {size[0]}x{size[1]} but {ref[0]} is {ref[1][0]}x{ref[1][1]}; "
                    "FID reads every image at its native size, so give a folder of one size")
        self.size = ref[1]
        self.lossy = any(f.lower().endswith(self.LOSSY) for f in files)
        self._pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))  # PIL decodes without the GIL

    def __len__(self) -> int:
        return len(self.files)

    def read(self, idx: Sequence[int]) -> torch.Tensor:
        arrays = list(self._pool.map(lambda i: read_rgb(self.files[i]), idx))  # (H, W, 3) each
        for i, a in zip(idx, arrays):
            if (a.shape[1], a.shape[0]) != self.size:  # the header lied (e.g. EXIF-less odd files)
                raise UsageError(f"images differ in size: {self.files[i]} decodes to {a.shape[1]}x{a.shape[0]}, "
                                 f"expected {self.size[0]}x{self.size[1]}")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (b, 3, H, W)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{os.path.relpath(f, self.root)}\t{os.path.getsize(f)}\n".encode())
            _hash_file(f, h)
        return h.hexdigest()

    def describe(self) -> dict:
        d = {"kind": self.kind, "path": str(self.root), "n": len(self), "available": self.total,
             "image_size": list(self.size), "lossy": self.lossy}
        if self.sample_protocol is not None:
            d["sample_protocol"] = self.sample_protocol
        return d


class NpzSource(ImageSource):
    """`arr_0` of an .npz (uint8 N×H×W×C or N×H×W), streamed from the zip member: a 50k×256² file
    (9.8 GB) is never loaded whole."""

    kind = "npz"

    def __init__(self, path: str | os.PathLike, limit: int | None = None):
        self.path = Path(path)
        try:
            with zipfile.ZipFile(self.path) as zf:
                names = zf.namelist()
                if "arr_0.npy" not in names:
                    keys = ", ".join(n.removesuffix(".npy") for n in names) or "nothing"
                    raise UsageError(f"{self.path} has no arr_0 (it holds {keys}); expected uint8 images N×H×W×C "
                                     "as written by `ddaepp sample` or ADM")
                with zf.open("arr_0.npy") as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(f)
                    self.offset = f.tell()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise UsageError(f"cannot read {self.path}: {' '.join(str(e).split()) or type(e).__name__}") from None
        if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)) or fortran:
            raise UsageError(f"{self.path}: arr_0 is {dtype} {tuple(shape)}; expected uint8 images N×H×W×C "
                             "(C = 1 or 3, C order), as written by `ddaepp sample` or ADM")
        self.total = int(shape[0])
        if self.total == 0:
            raise UsageError(f"{self.path}: arr_0 holds no images")
        if limit is not None and limit > self.total:
            raise UsageError(f"{self.path} holds {self.total} images; --n {limit} asks for more")
        self.n = self.total if limit is None else limit
        self.hwc = (int(shape[1]), int(shape[2]), int(shape[3]) if len(shape) == 4 else 1)
        self.row_bytes = int(np.prod(self.hwc))
        self._zf, self._f, self._pos = None, None, 0

    def __len__(self) -> int:
        return self.n

    def _seek(self, i: int) -> None:
        if self._f is None or i < self._pos:  # (re)open: zip members only stream forward
            if self._zf is None:
                self._zf = zipfile.ZipFile(self.path)
            self._f = self._zf.open("arr_0.npy")
            self._f.seek(self.offset)
            self._pos = 0
        skip = (i - self._pos) * self.row_bytes
        while skip > 0:
            skip -= len(self._f.read(min(skip, 1 << 24)))
        self._pos = i

    def read(self, idx: Sequence[int]) -> torch.Tensor:
        out = []
        for run in _runs(sorted(idx)):
            self._seek(run[0])
            buf = self._f.read(len(run) * self.row_bytes)
            if len(buf) != len(run) * self.row_bytes:
                raise UsageError(f"{self.path} is truncated: arr_0 ends before image {run[-1]}")
            self._pos = run[-1] + 1
            out.append(np.frombuffer(buf, dtype=np.uint8).reshape(len(run), *self.hwc))
        arr = np.concatenate(out)  # sorted order
        order = np.argsort(np.argsort(np.asarray(idx), kind="stable"), kind="stable")
        x = torch.from_numpy(arr[order].copy()).permute(0, 3, 1, 2)  # (b, C, H, W)
        return _rgb(x)

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"npz\t{self.n}\n".encode())
        _hash_file(str(self.path), h)
        return h.hexdigest()

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "n": self.n, "available": self.total,
                "image_size": [self.hwc[1], self.hwc[0]]}


def _runs(idx: list[int]) -> list[list[int]]:
    """[3, 4, 5, 9, 10] → [[3, 4, 5], [9, 10]]."""
    runs: list[list[int]] = []
    for i in idx:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


class DatasetSource(ImageSource):
    """A registered name: CIFAR through ddaepp's reader (in memory), STL-10 through torch-fidelity."""

    kind = "registered"

    def __init__(self, name: str, data_root: str | None, download: bool):
        self.name = name
        if name in REGISTERED:
            from .data import load_dataset

            dataset, split = REGISTERED[name]
            self.ds = load_dataset(dataset, split=split, root=data_root, download=download)  # exit 3 when missing
            self.root = self.ds.root
            self.images = self.ds.images  # (N, 3, 32, 32) uint8
        else:
            from torch_fidelity.registry import DATASETS_REGISTRY

            from .data import default_root

            self.root = data_root or default_root()
            try:
                self.ds = DATASETS_REGISTRY[name](self.root, download)
            except Exception as e:  # torchvision: "Dataset not found or corrupted", URLError
                reason = " ".join(str(e).split()) or type(e).__name__
                raise UnavailableError(f"{name} is not available under {self.root} ({reason}); download STL-10 "
                                       "(stl10_binary.tar.gz from https://ai.stanford.edu/~acoates/stl10/) and extract "
                                       f"it into {self.root}/, or rerun with --download when online") from None
            self.images = None

    def __len__(self) -> int:
        return len(self.ds)

    def read(self, idx: Sequence[int]) -> torch.Tensor:
        if self.images is not None:
            return _rgb(self.images[list(idx)])
        return torch.stack([self.ds[i] for i in idx])

    def fingerprint(self) -> str:
        if self.images is not None:
            h = hashlib.sha256(f"{self.name}\t{tuple(self.images.shape)}\n".encode())
            h.update(self.images.contiguous().numpy().tobytes())
            return h.hexdigest()
        # STL-10: torchvision verifies the official files' MD5s when it opens them
        return hashlib.sha256(f"{self.name}\t{len(self.ds)}\ttorchvision-md5-verified".encode()).hexdigest()

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "root": str(self.root), "n": len(self)}


class ModelSource(ImageSource):
    """Samples of a checkpoint, generated batch by batch from per-sample seeds (never written)."""

    kind = "run"

    def __init__(self, model, formulation, seeds: list[int], *, shape: tuple[int, int, int], sampler: str,
                 steps: int | None, clip: bool, device: torch.device):
        self.model, self.formulation, self.seeds = model, formulation, seeds
        self.shape, self.sampler, self.steps, self.clip, self.device = shape, sampler, steps, clip, device

    def __len__(self) -> int:
        return len(self.seeds)

    def read(self, idx: Sequence[int]) -> torch.Tensor:
        from .sample import generate

        seeds = [self.seeds[i] for i in idx]
        images = generate(self.model, self.formulation, seeds, shape=self.shape, sampler=self.sampler,
                          steps=self.steps, clip=self.clip, batch_size=len(seeds), device=self.device)
        return images  # (b, C, H, W) uint8 (C may be 1; see _rgb)

    def fingerprint(self) -> str:  # a model is never a cached reference
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind, "n": len(self), "seeds": [self.seeds[0], self.seeds[-1]],
                "seed_list": "contiguous" if self.seeds == list(range(self.seeds[0], self.seeds[-1] + 1)) else "custom",
                "sampler": self.sampler, "steps": self.steps, "clip_x0": self.clip,
                "conversion": "((x + 1) * 127.5).round().clamp(0, 255).to(uint8)", "written": False}


# ================================================================================================
# Feature extraction (sharded over processes)
# ================================================================================================


@contextmanager
def _no_tf32(device: torch.device):
    """float32 Inception on an NVIDIA GPU must not silently use TF32 convolutions/matmuls."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.no_grad()
def extract(source: ImageSource, extractor, layers: Sequence[str], dist: Dist, *, batch_size: int, desc: str,
            keep_images: bool = False, strided: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Features {layer: (N, D) float32} of every image of `source`, in index order, on the CPU.

    Each rank reads its share — contiguous blocks for files (sequential reads), every world-th
    index for seeds (`strided`, as `ddaepp sample`) — and the shares are gathered and ordered.
    """
    n = len(source)
    mine = (list(range(dist.rank, n, dist.world)) if strided
            else list(range(dist.rank * n // dist.world, (dist.rank + 1) * n // dist.world)))
    out: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    kept = []
    with _no_tf32(dist.device), progress(len(mine), desc, "img") as bar:
        for i in range(0, len(mine), batch_size):
            chunk = mine[i:i + batch_size]
            images = _rgb(source.read(chunk))  # (b, 3, H, W) uint8
            feats = extractor(images.to(dist.device))  # tuple in `layers` order, float32
            for name, f in zip(layers, feats):
                out[name].append(f.cpu())
            if keep_images:
                kept.append(images.cpu())
            bar.update(len(chunk))
    mine_feats = {name: torch.cat(v) if v else torch.zeros(0, 1) for name, v in out.items()}
    mine_images = torch.cat(kept) if kept else None
    if dist.world == 1:
        return mine_feats, mine_images
    parts = dist.gather((mine, mine_feats, mine_images))
    index = torch.cat([torch.as_tensor(p[0], dtype=torch.int64) for p in parts])
    order = torch.argsort(index)
    feats = {name: torch.cat([p[1][name] for p in parts if len(p[0])])[order] for name in layers}
    images = torch.cat([p[2] for p in parts if p[2] is not None])[order] if keep_images else None
    return feats, images


# ================================================================================================
# Statistics and the Fréchet distance (float64)
# ================================================================================================


@dataclass
class Stats:
    """Mean (D,) and covariance (D, D) in float64 of n feature vectors; `factor` (k, D) with
    factorᵀ·factor = sigma when known cheaply (k = n < D: centred features / √(n−1))."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None
    factor: np.ndarray | None = None
    meta: dict = field(default_factory=dict)


def stats_from_features(features: torch.Tensor) -> Stats:
    x = features.double().numpy()  # (n, D)
    n = x.shape[0]
    if n < 2:
        raise UsageError(f"FID needs at least 2 images for a covariance, got {n}")
    mu = x.mean(axis=0)
    xc = (x - mu) / math.sqrt(n - 1)  # (n, D)
    sigma = xc.T @ xc  # (D, D), = np.cov(x, rowvar=False)
    return Stats(mu, sigma, n, factor=xc if n < x.shape[1] else None)


def trace_sqrt_product(s1: Stats, s2: Stats) -> float:
    """tr((Σ1 Σ2)^½) = Σ √λ(F Σ2 Fᵀ) for any F with FᵀF = Σ1 (the nonzero eigenvalues of FᵀF Σ2 and
    F Σ2 Fᵀ coincide). F Σ2 Fᵀ is symmetric PSD, so its eigenvalues are real and ≥ 0 up to round-off."""
    a, b = (s1, s2) if s1.factor is not None and (s2.factor is None or len(s1.factor) <= len(s2.factor)) else (s2, s1)
    if a.factor is not None:
        factor = a.factor  # (k, D), k < D
    else:
        w, v = np.linalg.eigh(a.sigma)
        factor = (v * np.sqrt(np.clip(w, 0.0, None))).T  # (D, D): diag(√w) Vᵀ
    m = factor @ b.sigma @ factor.T  # (k, k)
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def frechet_distance(s1: Stats, s2: Stats, method: str = "eigh") -> float:
    """‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr((Σ1 Σ2)^½) (Heusel et al. 2017), in float64."""
    for s, what in ((s1, "first"), (s2, "second")):
        if not (np.all(np.isfinite(s.mu)) and np.all(np.isfinite(s.sigma))):
            raise UsageError(f"the {what} statistics contain NaN or inf (non-finite features or a corrupt stats file)")
    if s1.mu.shape != s2.mu.shape or s1.sigma.shape != s2.sigma.shape:
        raise UsageError(f"statistics of different feature sizes: {s1.mu.shape[0]} vs {s2.mu.shape[0]}")
    diff = s1.mu - s2.mu
    if method == "eigh":
        tr_covmean = trace_sqrt_product(s1, s2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrtm(s1.sigma, s2.sigma)
    else:
        raise UsageError(f"unknown Fréchet method {method!r}; valid: eigh, sqrtm")
    return float(diff @ diff + np.trace(s1.sigma) + np.trace(s2.sigma) - 2.0 * tr_covmean)


def _trace_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """ADM evaluator / pytorch-fid: scipy sqrtm of Σ1Σ2; a non-finite result is retried with ε·I added
    to both covariances, and an imaginary part above 1e-3 on the diagonal is an error."""
    from scipy import linalg

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise UsageError(f"the matrix square root has an imaginary part of {np.max(np.abs(covmean.imag)):.3g}: "
                             "the covariances are numerically unusable")
        covmean = covmean.real
    return float(np.trace(covmean))


def write_stats(path: str | os.PathLike, stats: Stats, meta: dict) -> str:
    """ADM/EDM-compatible `{mu, sigma}` .npz plus `n` and a JSON `meta` (read without pickle)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise UsageError(f"--save-stats {path}: give a .npz file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n or 0),
                     meta=np.array(json.dumps(meta, default=str)))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write statistics {path}: {e.strerror or e}") from None
    return str(path)


def npz_keys(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return [n.removesuffix(".npy") for n in zf.namelist()]
    except (zipfile.BadZipFile, OSError) as e:
        raise UsageError(f"cannot read {path}: not an .npz file ({' '.join(str(e).split()) or type(e).__name__})") from None


def load_stats(path: str | os.PathLike) -> Stats:
    """`{mu, sigma}` from ADM reference batches, EDM's `fid-refs/*.npz`, or ddaepp's own files."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            mu, sigma = np.asarray(z["mu"], dtype=np.float64), np.asarray(z["sigma"], dtype=np.float64)
            n = int(z["n"]) if "n" in z.files and int(z["n"]) > 0 else None
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read statistics {path}: {' '.join(str(e).split()) or type(e).__name__}") from None
    if mu.shape != (DIM,) or sigma.shape != (DIM, DIM):
        raise UsageError(f"{path}: mu {mu.shape} / sigma {sigma.shape} are not Inception pool3 statistics "
                         f"(expected ({DIM},) and ({DIM}, {DIM}))")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UsageError(f"{path}: the statistics contain NaN or inf")
    return Stats(mu, sigma, n, meta=meta)


# ================================================================================================
# References and their cache
# ================================================================================================


@dataclass
class Reference:
    kind: str  # registered | folder | npz | stats
    text: str
    source: ImageSource | None = None
    stats: Stats | None = None
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
            return Reference("stats", text, stats=st, description={
                "kind": "stats", "path": str(p), "n": st.n, "fingerprint": h.hexdigest(), "meta": st.meta})
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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        info(f"warning: could not write the FID cache {path}: {e.strerror or e}")


def reference_data(ref: Reference, extractor, extractor_info: dict, dist: Dist, *, need_features: bool,
                   use_cache: bool, batch_size: int) -> tuple[Stats, torch.Tensor | None, dict]:
    """Statistics (and pool features when KID/PRC need them) of the reference, cached by content."""
    if ref.stats is not None:
        return ref.stats, None, {"cache": "n/a (statistics file)"}
    t0 = time.perf_counter()
    fingerprint = ref.source.fingerprint()
    key = cache_key(fingerprint, extractor_info)
    stats_path, feats_path = fid_cache_dir() / f"{key}.npz", fid_cache_dir() / f"{key}-features.npy"
    ref.description["fingerprint"] = fingerprint
    cinfo = {"cache_key": key, "fingerprint_s": round(time.perf_counter() - t0, 3)}
    hit = None
    if use_cache and stats_path.is_file() and (not need_features or feats_path.is_file()):
        try:
            stats = load_stats(stats_path)
            feats = torch.from_numpy(np.load(feats_path, allow_pickle=False)) if need_features else None
            if feats is None or feats.shape == (stats.n, DIM):
                hit = stats, feats
        except (UsageError, OSError, ValueError):
            pass  # a damaged cache entry is recomputed and replaced
    if all(dist.gather(hit is not None)):  # every rank must agree, or the sharded extraction would hang
        return hit[0], hit[1], {**cinfo, "cache": "hit", "cache_file": str(stats_path)}
    feats = extract(ref.source, extractor, [FEATURES], dist, batch_size=batch_size, desc="fid: reference")[0][FEATURES]
    stats = stats_from_features(feats)
    if use_cache and dist.main:
        fid_cache_dir().mkdir(parents=True, exist_ok=True)
        meta = {"reference": ref.description, "extractor": extractor_info, "resize": RESIZE_POLICY}
        try:
            write_stats(stats_path, stats, meta)
        except UsageError as e:
            info(f"warning: {e}")
        if need_features:
            _atomic_np_save(feats_path, feats.numpy())
    return stats, feats if need_features else None, {**cinfo, "cache": "miss" if use_cache else "off",
                                                     "cache_file": str(stats_path) if use_cache else None}


# ================================================================================================
# Metrics
# ================================================================================================


def parse_metrics(text: str) -> list[str]:
    items = [m.strip().lower() for m in text.split(",") if m.strip()]
    items = ["is" if m == "isc" else m for m in items]
    bad = [m for m in items if m not in METRICS]
    if bad or not items:
        raise UsageError(f"--metrics: {', '.join(bad) or 'empty'} not valid; choose from {choices(METRICS)}")
    return list(dict.fromkeys(items))


def compute_metrics(metrics: Sequence[str], feats: dict[str, torch.Tensor], stats: Stats, ref_stats: Stats | None,
                    ref_feats: torch.Tensor | None) -> tuple[dict, dict]:
    """(values, settings) of the requested metrics; IS/KID/PRC through torch-fidelity's functions."""
    values, settings = {}, {}
    n = len(feats[FEATURES])
    if "fid" in metrics:
        values["fid"] = frechet_distance(stats, ref_stats)
        settings["fid"] = {"feature_layer": FEATURES, "statistics": "float64 mean, covariance (n − 1)",
                           "trace_sqrt": "eigh of F·Σ2·Fᵀ (exact; see ddaepp_cli/fid.py)"}
    if "is" in metrics:
        from torch_fidelity.metric_isc import isc_features_to_metric

        splits = min(ISC_SPLITS, n)
        r = isc_features_to_metric(feats[LOGITS], splits=splits, shuffle=True, rng_seed=RNG_SEED)
        values["is_mean"], values["is_std"] = r["inception_score_mean"], r["inception_score_std"]
        settings["is"] = {"feature_layer": LOGITS, "splits": splits, "shuffle": True, "rng_seed": RNG_SEED}
    if "kid" in metrics:
        from torch_fidelity.metric_kid import kid_features_to_metric

        size = min(KID_SUBSET_SIZE, n, len(ref_feats))
        r = kid_features_to_metric(feats[FEATURES], ref_feats, kid_subsets=KID_SUBSETS, kid_subset_size=size,
                                   rng_seed=RNG_SEED, verbose=False)
        values["kid_mean"], values["kid_std"] = r["kernel_inception_distance_mean"], r["kernel_inception_distance_std"]
        settings["kid"] = {"feature_layer": FEATURES, "subsets": KID_SUBSETS, "subset_size": size,
                           "kernel": "poly degree 3, gamma 1/D, coef0 1", "rng_seed": RNG_SEED}
    if "prc" in metrics:
        from torch_fidelity.metric_prc import prc_features_to_metric

        if min(n, len(ref_feats)) <= PRC_NEIGHBORHOOD:
            raise UsageError(f"precision/recall needs more than {PRC_NEIGHBORHOOD} images on each side")
        r = prc_features_to_metric(feats[FEATURES], ref_feats, prc_neighborhood=PRC_NEIGHBORHOOD,
                                   prc_batch_size=10000, save_cpu_ram=False, verbose=False)
        values.update(precision=r["precision"], recall=r["recall"], f_score=r["f_score"])
        settings["prc"] = {"feature_layer": f"{inception.EXTRACTOR}/{FEATURES} (ADM evaluator convention)",
                           "neighborhood": PRC_NEIGHBORHOOD}
    return values, settings


# ================================================================================================
# The command
# ================================================================================================


def _is_run(p: Path) -> bool:
    if p.is_file():
        return p.suffix == ".safetensors"
    return p.is_dir() and any((p / f).exists() for f in ("model.safetensors", "ema.safetensors", "checkpoints",
                                                         "recipe.yaml"))


def _sample_count(n: int | None, preset: str | None, default: int | None) -> tuple[int | None, str | None]:
    if preset is not None and preset not in PRESETS:
        raise UsageError(f"--preset {preset!r} is not known; valid: {choices(PRESETS)}")
    if n is not None:
        if n <= 0:
            raise UsageError(f"--n must be positive, got {n}")
        if preset is not None and n != PRESETS[preset]:
            raise UsageError(f"--n {n} contradicts --preset {preset} ({PRESETS[preset]} images); give one of them")
        return n, preset
    if preset is not None:
        return PRESETS[preset], preset
    return default, None


def fid(samples_or_run: str, *, ref: str | None = None, metrics: str = "fid", n: int | None = None,
        preset: str | None = None, seeds: list[int] | None = None, batch_size: int | None = None,
        inception_weights: str | None = None, download: bool = False, extractor_dtype: str = "float64",
        save_stats: str | None = None, save_samples: str | None = None, sampler: str | None = None,
        steps: int | None = None, weights: str = "ema", clip: bool | None = None, data_root: str | None = None,
        cache: bool = True, device: str | None = None, record: bool = True) -> dict[str, Any]:
    """Library entry of `ddaepp fid` (multi-process aware: rank 0 returns the full result)."""
    from .evalrecord import device_record, timestamp, versions

    t_start = time.perf_counter()
    wanted = parse_metrics(metrics)
    if batch_size is not None and batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    if extractor_dtype not in ("float32", "float64"):
        raise UsageError(f"--extractor-dtype must be float32 or float64, got {extractor_dtype!r}")
    if save_stats is not None and Path(save_stats).suffix != ".npz":
        raise UsageError(f"--save-stats {save_stats}: give a .npz file name")
    needs_ref = any(m in wanted for m in ("fid", "kid", "prc"))
    path = Path(samples_or_run)
    if not path.exists():
        raise UsageError(f"no such folder, .npz or run: {samples_or_run}")
    is_run = _is_run(path)
    if not is_run and (seeds is not None or save_samples or sampler or steps is not None or clip is not None):
        raise UsageError("--seeds, --save-samples, --sampler, --steps and --clip apply to a run or checkpoint, "
                         f"not to {samples_or_run}")

    # ---- what is measured (cheap checks first: scans and headers, no network or model) -----------
    run_info = None
    if is_run:
        from .checkpoint import checkpoint_recipe, resolve_checkpoint

        ckpt = resolve_checkpoint(path)
        recipe = checkpoint_recipe(ckpt)
        if seeds is not None:
            if n is not None or preset is not None:
                raise UsageError("give --seeds, or --n / --preset, not both")
            count, preset_used = len(seeds), None
        else:
            count, preset_used = _sample_count(n, preset, PRESETS["fid50k"])
            preset_used = preset_used or ("fid50k" if n is None else None)
            seeds = list(range(count))
        if save_samples:  # a new or empty folder (fid has no --force; outdir.py)
            from .outdir import check_output_folder

            check_output_folder(save_samples, flag="--save-samples")
        if ref is None and needs_ref:
            default = f"{recipe.data.dataset}-train"  # DDAE/EDM convention: FID against the training set
            if default in REGISTERED:
                ref = default
            elif save_stats is None:
                raise UsageError(f"--ref is needed for a {recipe.data.dataset} model: an image folder, an .npz of "
                                 f"images or statistics, or one of {choices([*REGISTERED, *TORCH_FIDELITY_ONLY])}")
        run_info = (ckpt, recipe)
        source = None
    else:
        count, preset_used = _sample_count(n, preset, None)
        if path.is_dir():
            source = FolderSource(path, limit=count)
        elif path.suffix == ".npz":
            keys = npz_keys(path)
            if "arr_0" not in keys and "mu" in keys:
                raise UsageError(f"{path} holds statistics, not images: pass it as --ref")
            source = NpzSource(path, limit=count)
        else:
            raise UsageError(f"{samples_or_run}: give an image folder, an .npz of images (arr_0) or a run/checkpoint")
    if needs_ref and ref is None and save_stats is None:
        raise UsageError("--ref is needed for fid, kid and prc: a registered name "
                         f"({choices([*REGISTERED, *TORCH_FIDELITY_ONLY])}), an image folder, or a statistics .npz")
    reference = resolve_reference(ref, data_root=data_root, download=download) if ref is not None and needs_ref else None
    if reference is None:  # --save-stats alone: statistics (and IS) only
        wanted = [m for m in wanted if m == "is"]
    if reference is not None and reference.source is None and any(m in wanted for m in ("kid", "prc")):
        raise UsageError(f"KID and precision/recall compare features, not statistics: give reference images "
                         f"instead of {ref}")
    if not needs_ref and ref is not None:
        info("note: --ref is not used by the requested metrics (is)")

    # ---- weights, device, model ---------------------------------------------------------------------
    weights_path = inception.find_weights(inception_weights, download=download)  # exit 3 with instructions
    from .features import pick_device

    dist = Dist(pick_device(device) if device else None)
    layers = [FEATURES] + ([LOGITS] if "is" in wanted else [])
    extractor = inception.load_extractor(weights_path, layers, device=dist.device, dtype=extractor_dtype)
    ext_info = inception.describe(weights_path, extractor_dtype)
    warnings = []
    if not ext_info["official_weights"]:
        warnings.append(f"{weights_path} is not the official {inception.WEIGHTS_NAME} (sha256 "
                        f"{ext_info['weights_sha256'][:12]}…): numbers are not comparable with published FIDs")

    protocol: dict[str, Any] = {}
    if run_info is not None:
        source, protocol, batch_size = _model_source(run_info, seeds, dist.device, weights=weights, sampler=sampler,
                                                     steps=steps, clip=clip, batch_size=batch_size)
    batch_size = batch_size or 100

    # ---- features, statistics, metrics ------------------------------------------------------------
    t0 = time.perf_counter()
    feats, images = extract(source, extractor, layers, dist, batch_size=batch_size,
                            desc="fid: sample + features" if is_run else "fid: features",
                            keep_images=bool(save_samples), strided=is_run)  # seeds: strided, as `sample`
    t_input = time.perf_counter() - t0
    ref_stats, ref_feats, cinfo = None, None, {}
    t0 = time.perf_counter()
    if reference is not None:
        ref_stats, ref_feats, cinfo = reference_data(reference, extractor, ext_info, dist,
                                                     need_features=any(m in wanted for m in ("kid", "prc")),
                                                     use_cache=cache, batch_size=batch_size)
    t_ref = time.perf_counter() - t0
    if not dist.main:
        dist.barrier()
        return {}

    input_desc = source.describe()
    count = len(source)
    stats = stats_from_features(feats[FEATURES]) if "fid" in wanted or save_stats else None
    if count < DIM and ("fid" in wanted or save_stats):
        warnings.append(f"{count} images < {DIM} feature dimensions: the covariance is rank-deficient and the FID "
                        "is biased upwards; papers report FID-10k or FID-50k")
    if isinstance(source, FolderSource) and source.lossy:
        warnings.append(f"{source.root} holds lossy (JPEG/WebP) images: compression changes FID; use PNG")
    if reference is not None and reference.stats is not None:
        m = reference.stats.meta.get("extractor") or {}
        if m.get("weights_sha256") and m["weights_sha256"] != ext_info["weights_sha256"]:
            warnings.append(f"{ref} was computed with other Inception weights (sha256 {m['weights_sha256'][:12]}…)")
    if preset_used and count != PRESETS[preset_used]:
        warnings.append(f"{count} images, not the {PRESETS[preset_used]} of {preset_used}")
    t0 = time.perf_counter()
    values, settings = compute_metrics(wanted, feats, stats, ref_stats, ref_feats)
    t_metrics = time.perf_counter() - t0
    if reference is not None:
        reference.description.update(cinfo)

    stats_file = None
    if save_stats:
        if isinstance(source, ModelSource):
            fingerprint = None
        else:
            fingerprint = source.fingerprint()
            input_desc["fingerprint"] = fingerprint
        stats_file = write_stats(save_stats, stats, {
            "source": input_desc, "fingerprint": fingerprint, "extractor": ext_info, "resize": RESIZE_POLICY,
            **({"checkpoint": protocol.get("checkpoint")} if run_info else {})})
    written = None
    if save_samples and images is not None:
        from .sample import write_outputs

        written = write_outputs(images, source.seeds, Path(save_samples), ["png", "npz", "grid"],
                                {"command": "sample", **protocol, **source.describe(), "written": True})
        input_desc["written"] = written

    result: dict[str, Any] = {
        "command": "fid",
        "metrics": values,
        "n": count,
        "preset": preset_used,
        "input": input_desc,
        "reference": reference.description if reference is not None else None,
        "warnings": warnings,
        "stats_file": stats_file,
        "protocol": {
            **protocol,
            "samples": {"n": count, **({"seeds": input_desc["seeds"], "sampler": input_desc["sampler"],
                                        "steps": input_desc["steps"], "clip_x0": input_desc["clip_x0"]}
                                       if is_run else {})},
            "reference": ref, "reference_fingerprint": (reference.description.get("fingerprint")
                                                        if reference is not None else None),
            "extractor": ext_info, "resize": RESIZE_POLICY, "settings": settings,
            "batch_size": batch_size, "world_size": dist.world,
            **device_record(dist.device, extractor_dtype), "versions": _versions(versions), "time": timestamp(),
        },
        "timing": {"input_s": round(t_input, 3), "reference_s": round(t_ref, 3), "metrics_s": round(t_metrics, 3),
                   "total_s": round(time.perf_counter() - t_start, 3)},
    }
    result["eval_record"] = _write_record(result, run_info, source) if record else None
    dist.barrier()
    return result


def _model_source(run_info, seeds: list[int], device: torch.device, *, weights: str, sampler: str | None,
                  steps: int | None, clip: bool | None, batch_size: int | None) -> tuple[ModelSource, dict, int]:
    """The checkpoint's network as an image source, with `ddaepp sample`'s defaults, and its record."""
    from .build import build_formulation, dataset_geometry
    from .evalrecord import checkpoint_record
    from .sample import load_model, resolve_steps, weights_of

    recipe, model, ckpt = load_model(run_info[0], weights, device)
    weights = weights_of(run_info[0], weights)  # a named .safetensors file decides (sample.py)
    if recipe.data.dataset == "latents":
        # On-the-fly generation here has no VAE decoding, class labels or CFG: `sample` owns those.
        raise UsageError(f"{run_info[0]} is a latent-space run: generate images with `ddaepp sample "
                         f"{run_info[0]} --seeds 0-49999 --format npz [--cfg-scale …]`, then run "
                         f"`ddaepp fid <that folder>/samples.npz --ref …`")
    formulation = build_formulation(recipe)
    sampler = sampler or recipe.sample.sampler or formulation.samplers[0]
    formulation.check_sampler(sampler)
    steps = resolve_steps(formulation, sampler, steps, recipe.sample.steps)  # none for rk45 (sample.py)
    if steps is not None and steps <= 0:
        raise UsageError(f"--steps must be positive, got {steps}")
    clip = recipe.sample.clip_x0 if clip is None else clip
    clip = formulation.clip_x0 if clip is None else clip
    channels, size, _ = dataset_geometry(recipe.data)
    source = ModelSource(model, formulation, seeds, shape=(channels, size, size), sampler=sampler, steps=steps,
                         clip=clip, device=device)
    protocol = {**checkpoint_record(ckpt, weights, recipe), "cfg_scale": None, "cfg_interval": None}
    return source, protocol, batch_size or recipe.sample.batch_size


def _versions(base) -> dict:
    import torch_fidelity
    import scipy

    return {**base(), "torch_fidelity": torch_fidelity.__version__, "scipy": scipy.__version__}


def _write_record(result: dict, run_info, source: ImageSource) -> str | None:
    """eval/fid-<timestamp>.json next to the evaluated run: the run itself, or the run that wrote a
    `ddaepp sample` folder (its protocol.json names the checkpoint)."""
    from .evalrecord import new_record_path, save_record

    ckpt = None
    if run_info is not None:
        ckpt = Path(run_info[0])
    elif isinstance(source, FolderSource) and source.sample_protocol:
        c = source.sample_protocol.get("checkpoint")
        if c and Path(c).is_dir():
            ckpt = Path(c)
    if ckpt is None:
        return None
    saved = save_record(new_record_path(ckpt, "fid"), result)
    return str(saved) if saved else None


def print_fid(result: dict) -> None:
    """Rich table (stderr): one row per metric, then warnings and where the record went."""
    from rich.table import Table

    from .console import err

    names = {"fid": "FID", "is_mean": "IS", "is_std": "IS std", "kid_mean": "KID", "kid_std": "KID std",
             "precision": "precision", "recall": "recall", "f_score": "F-score"}
    ref = result["protocol"]["reference"]
    table = Table("metric", "value", title=f"{result['input'].get('path') or result['protocol'].get('checkpoint')}"
                                           f" ({result['n']} images) vs {ref}")
    for k, v in result["metrics"].items():
        table.add_row(names.get(k, k), f"{v:.6g}")
    err.print(table)
    for w in result["warnings"]:
        err.print(f"warning: {w}", markup=False)
    for key, label in (("stats_file", "statistics"), ("eval_record", "record")):
        if result.get(key):
            err.print(f"{label}: {result[key]}", markup=False)
