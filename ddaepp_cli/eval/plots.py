"""Figures of the analysis commands (matplotlib, non-interactive Agg backend), written atomically.

probe heatmap (layer × timestep, DDAE Fig. 2), CKA heatmap (DDAE++ Fig. 7), alignment vs
uniformity scatter (DDAE Fig. 3), accuracy vs noise curve (DDAE Fig. 6), and the training curves of a
run's metrics.jsonl (`ddaepp info RUN --plot`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..atomic import atomic_path
from ..errors import UsageError  # noqa: E402


def check_png(path: str | os.PathLike | None) -> None:
    """Fail before any work when --plot does not name a PNG file."""
    if path is not None and Path(path).suffix.lower() != ".png":
        raise UsageError(f"--plot {path}: give a .png file name")


def _save(fig, path: str | os.PathLike) -> str:
    path = Path(path)
    check_png(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, durable=False) as tmp:
            fig.savefig(tmp, dpi=150, bbox_inches="tight")
    except OSError as e:
        raise UsageError(f"cannot write plot {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return str(path)


def _annotate(ax, values: np.ndarray, fmt: str, threshold: float) -> None:
    if values.size > 400:  # unreadable beyond ~20 × 20
        return
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                    color="white" if v < threshold else "black")


def probe_heatmap(cells: Sequence[dict], layers: Sequence[str], times: Sequence[str], path, *, title: str,
                  best: tuple[str, str] | None = None) -> str:
    """Accuracy (%) with timesteps as rows and layers as columns, the best cell boxed (DDAE Fig. 2)."""
    acc = {(c["layer"], c["timestep"]): 100 * c["accuracy"] for c in cells}
    grid = np.array([[acc[(layer, t)] for layer in layers] for t in times])  # (K, L)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(layers) + 2), max(2.5, 0.5 * len(times) + 1.5)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right")
    ax.set_yticks(range(len(times)), [f"t={t}" for t in times])
    ax.set_xlabel("layer")
    ax.set_ylabel("timestep")
    ax.set_title(title)
    _annotate(ax, grid, "{:.1f}", float(np.nanmean(grid)))
    if best is not None:
        j, i = list(layers).index(best[0]), list(times).index(best[1])
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    return _save(fig, path)


def cka_heatmap(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], path, *, title: str,
                xlabel: str = "layer", ylabel: str = "layer") -> str:
    """CKA in [0, 1], rows × columns (DDAE++ Fig. 7)."""
    matrix = np.asarray(matrix, dtype=float)
    size = max(4.0, 0.35 * max(len(rows), len(cols)) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(matrix, cmap="magma", vmin=0.0, vmax=1.0, origin="lower")
    ax.set_xticks(range(len(cols)), cols, rotation=90)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _annotate(ax, matrix, "{:.2f}", 0.5)
    fig.colorbar(im, ax=ax, label="linear CKA")
    return _save(fig, path)


def align_scatter(series: dict[str, list[tuple[float, float]]], path, *, title: str,
                  labels: Sequence[str] | None = None) -> str:
    """Alignment (y) vs uniformity (x) per layer; several checkpoints are joined in order (DDAE Fig. 3).
    Lower-left is better on both."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    cmap = plt.get_cmap("tab20" if len(series) > 10 else "tab10")
    for k, (layer, points) in enumerate(series.items()):
        xs, ys = [p[1] for p in points], [p[0] for p in points]  # (align, uniform) → x uniform, y align
        color = cmap(k % cmap.N)
        ax.plot(xs, ys, "-o", color=color, markersize=3, linewidth=1, alpha=0.8)
        ax.plot(xs[-1:], ys[-1:], "o", color=color, markersize=7)  # the last checkpoint
        ax.annotate(layer, (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 3), fontsize=7, color=color)
    ax.set_xlabel(r"$\mathcal{L}_{uniform}$ (lower: more uniform)")
    ax.set_ylabel(r"$\mathcal{L}_{align}$ (lower: better aligned)")
    ax.set_title(title if labels is None or len(labels) < 2 else f"{title}\n{labels[0]} → {labels[-1]}")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def accuracy_curve(xs: Sequence[float], accs: Sequence[float], path, *, title: str, xlabel: str,
                   log_x: bool = False, chance: float | None = None) -> str:
    """Test accuracy (%) against the noise level (DDAE Fig. 6)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(list(xs), [100 * a for a in accs], "-o", markersize=3)
    if chance is not None:
        ax.axhline(100 * chance, color="gray", linestyle="--", linewidth=1, label="chance")
        ax.legend()
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def layer_curve(layers: Sequence[str], accuracy: Sequence[float], path, *, title: str, ylabel: str,
                chance: float | None = None) -> str:
    """Accuracy (%) per layer, shallow to deep (DDAE++ Fig. 5's layer-wise linear separability)."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(layers) + 2), 3.2))
    ax.plot(range(len(layers)), [100 * a for a in accuracy], marker="o")
    if chance is not None:
        ax.axhline(100 * chance, color="grey", linestyle=":", label="chance")
        ax.legend(loc="lower right", fontsize=7)
    ax.set_xticks(range(len(layers)), layers, rotation=45 if len(layers) > 12 else 0)
    ax.set_xlabel("block")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def training_curves(records: Sequence[dict], path, *, title: str) -> str:
    """A run's metrics.jsonl against the step: the loss and its parts (loss_diff, loss_moco, loss_sra, …),
    the learning rate, the gradient norm and the throughput, one panel each."""
    steps = np.array([r["step"] for r in records], dtype=float)

    def series(key: str) -> np.ndarray:  # null (a skipped step) or a non-finite value: a gap in the line
        a = np.array([np.nan if r.get(key) is None else float(r[key]) for r in records], dtype=float)
        return np.where(np.isfinite(a), a, np.nan)

    parts = sorted({k for r in records for k in r if k.startswith("loss_")})
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex=True)
    (ax_loss, ax_lr), (ax_grad, ax_speed) = axes
    k_avg = len(records) // 50  # long runs: the logged losses faint, a moving average over 2 % of them on top
    for i, k in enumerate(("loss", *parts)):
        y = series(k)
        color = f"C{i}"
        ax_loss.plot(steps, y, color=color, linewidth=0.8 if k_avg > 1 else 1.2, alpha=0.3 if k_avg > 1 else 1,
                     label=None if k_avg > 1 else k)
        if k_avg > 1:
            valid = np.isfinite(y)
            smooth = np.convolve(y[valid], np.ones(k_avg) / k_avg, mode="valid")
            ax_loss.plot(steps[valid][k_avg - 1:], smooth, color=color, linewidth=1.2, label=f"{k} (mean of {k_avg})")
    loss_values = np.concatenate([series(k) for k in ("loss", *parts)])
    if np.nanmin(loss_values, initial=np.inf) > 0:  # losses span decades early in training
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("training loss")
    if parts or k_avg > 1:
        ax_loss.legend(fontsize=7)
    ax_lr.plot(steps, series("lr"), color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    grad = series("grad_norm")
    ax_grad.plot(steps, grad, color="tab:red", linewidth=1)
    if np.nanmin(grad, initial=np.inf) > 0:
        ax_grad.set_yscale("log")
    ax_grad.set_ylabel("gradient norm (before clipping)")
    ax_speed.plot(steps, series("img_per_s"), color="tab:purple", linewidth=1)
    ax_speed.set_ylabel("images / s")
    ax_speed.set_ylim(bottom=0)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
