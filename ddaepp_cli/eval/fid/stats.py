"""Statistics of Inception features and the Fréchet distance, in float64; statistics files.

The Fréchet distance uses tr((Σ1 Σ2)^½) = Σ √λ(F Σ2 Fᵀ) for any F with FᵀF = Σ1 — an exact,
symmetric eigenproblem (real by construction, no complex/NaN square roots). F is the centred
features / √(n−1) when there are fewer samples than dimensions, else Σ1^½ from `eigh`.
`frechet_distance(..., method="sqrtm")` is the ADM / pytorch-fid formula (scipy.linalg.sqrtm with
their guards); both agree to ~1e-9 relative (tests/test_fid.py) and the eigh form is ~5× faster.
The same code serves FID (pool3, 2048 dimensions) and sFID (mixed_6/conv, 2023 dimensions).

Files: `{mu, sigma}` as ADM's and EDM's reference statistics, plus `{mu_s, sigma_s}` (spatial, as
ADM's reference batches), `n` and a JSON `meta` (read without pickle).
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...atomic import atomic_path
from ...errors import UsageError
from .constants import DIM, SPATIAL_DIM


@dataclass
class Stats:
    """Mean (D,) and covariance (D, D) in float64 of n feature vectors; `factor` (k, D) with
    factorᵀ·factor = sigma when known cheaply (k = n < D: centred features / √(n−1))."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None
    factor: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    spatial: "Stats | None" = None  # sFID statistics of the same images (mixed_6/conv), when known


def stats_from_features(features: torch.Tensor, spatial: torch.Tensor | None = None) -> Stats:
    """Mean and covariance (n − 1) of (n, D) features; `spatial` (n, 2023) gives `.spatial` too."""
    x = features.double().numpy()  # (n, D)
    n = x.shape[0]
    if n < 2:
        raise UsageError(f"FID needs at least 2 images for a covariance, got {n}")
    mu = x.mean(axis=0)
    xc = (x - mu) / math.sqrt(n - 1)  # (n, D)
    sigma = xc.T @ xc  # (D, D), = np.cov(x, rowvar=False)
    return Stats(mu, sigma, n, factor=xc if n < x.shape[1] else None,
                 spatial=stats_from_features(spatial) if spatial is not None else None)


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
    """ADM/EDM-compatible `{mu, sigma}` (+ `{mu_s, sigma_s}` when known) .npz plus `n` and a JSON `meta`."""
    path = Path(path)
    if path.suffix != ".npz":
        raise UsageError(f"--save-stats {path}: give a .npz file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"mu_s": stats.spatial.mu, "sigma_s": stats.spatial.sigma} if stats.spatial is not None else {}
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, mu=stats.mu, sigma=stats.sigma, **extra, n=np.int64(stats.n or 0),
                     meta=np.array(json.dumps(meta, default=str)))
    except OSError as e:
        raise UsageError(f"cannot write statistics {path}: {e.strerror or e}") from None
    return str(path)


def npz_keys(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return [n.removesuffix(".npy") for n in zf.namelist()]
    except (zipfile.BadZipFile, OSError) as e:
        raise UsageError(f"cannot read {path}: not an .npz file ({' '.join(str(e).split()) or type(e).__name__})") from None


def _checked(path: Path, mu: np.ndarray, sigma: np.ndarray, dim: int, what: str, keys: str) -> None:
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise UsageError(f"{path}: {keys} {mu.shape} / {sigma.shape} are not {what} statistics "
                         f"(expected ({dim},) and ({dim}, {dim}))")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UsageError(f"{path}: the statistics contain NaN or inf")


def load_stats(path: str | os.PathLike) -> Stats:
    """`{mu, sigma}` (and `{mu_s, sigma_s}`) from ADM reference batches (VIRTUAL_imagenet256_labeled.npz
    holds arr_0, mu, sigma, mu_s, sigma_s), EDM's `fid-refs/*.npz`, or ddaepp's own files."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            mu, sigma = np.asarray(z["mu"], dtype=np.float64), np.asarray(z["sigma"], dtype=np.float64)
            spatial = None
            if "mu_s" in z.files and "sigma_s" in z.files:
                spatial = (np.asarray(z["mu_s"], dtype=np.float64), np.asarray(z["sigma_s"], dtype=np.float64))
            n = int(z["n"]) if "n" in z.files and int(z["n"]) > 0 else None
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read statistics {path}: {' '.join(str(e).split()) or type(e).__name__}") from None
    _checked(path, mu, sigma, DIM, "Inception pool3", "mu / sigma")
    if spatial is not None:
        _checked(path, *spatial, SPATIAL_DIM, "Inception mixed_6/conv (sFID)", "mu_s / sigma_s")
    return Stats(mu, sigma, n, meta=meta, spatial=Stats(*spatial, n) if spatial is not None else None)
