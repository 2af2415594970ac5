"""Are the quickstart's digits digits? A classifier's verdict on 64 samples, against real digits.

    python benchmarks/quickstart_quality.py runs/quickstart/final     # a `ddaepp sample` folder
    python benchmarks/quickstart_quality.py runs/quickstart           # a run: samples seeds 0..63 first
    python benchmarks/quickstart_quality.py runs/quickstart --json    # one JSON object on stdout
    python benchmarks/quickstart_quality.py runs/quickstart/final --check   # exit 1 when a target is missed

The judge is an RBF SVC (scikit-learn defaults, `probability=True`: Platt-scaled probabilities)
trained on scikit-learn's real 8×8 digits, the `train` split ddaepp trains on
(`ddaepp_cli/data/datasets.py` `digits_split_indices`); its accuracy on the 355 held-out `test`
digits is reported. Samples are brought back to the classifier's input — 8×8, values 0..16 — by
inverting the recipe's data transform exactly: the digits recipe scales 0..16 to 0..255 and
upsamples 8×8 bilinearly (no antialias) to `data.image_size`, a linear map A of rank 64 for any
size ≥ 8, so A's pseudo-inverse recovers the 8×8 image (real digits round-trip to within the
uint8 rounding). Measures:

  confident share   share of the samples labelled with probability ≥ 0.8 (their largest class
                    probability), divided by the same share on the held-out real digits (target ≥ 0.9)
  label entropy     entropy of the samples' predicted labels ÷ log 10 (1: all ten digits equally
                    often; target ≥ 0.9)

and, without a target, what a sampler tuned for legibility could cost:

  spread            the mean distance between two samples given the same label (averaged over the
                    labels), ÷ the same for the held-out real digits: below 1, less varied digits
  nearest train     the median distance from a sample to its nearest `train` digit, ÷ the same for
                    the held-out real digits: near 0, copies of the training set

(distances: Euclidean, in the classifier's 8×8, 0..16 space).

Input: a folder written by `ddaepp sample` (its `samples.npz`, else its `NNNNNN.png` files), an
`.npz` with `arr_0` (N×H×W or N×H×W×1 uint8), or a run folder / checkpoint, which is sampled
first with `ddaepp sample`'s defaults (EMA weights, the recipe's sampler; seeds 0..N-1, `--n`) into
a temporary folder. One rich table on stdout, or `--json`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

CONFIDENCE = 0.8
TARGETS = {"ratio": 0.9, "entropy": 0.9}  # both ≥
DIGITS_MAX = 16.0  # scikit-learn's digits take values 0..16


class InputError(Exception):
    """Bad input: one line, exit 2 (or the library error's code: 3 for unavailable offline files)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


# ------------------------------------------------------------------------------------------------
# Samples → the classifier's 8×8, 0..16 images
# ------------------------------------------------------------------------------------------------


def upsample_matrix(size: int) -> np.ndarray:
    """The digits recipe's upsampling 8×8 → size×size as a (size², 64) matrix: `_load_digits` in
    ddaepp_cli/data/datasets.py applied to the 64 unit images (same call, float64)."""
    import torch
    import torch.nn.functional as F

    basis = torch.eye(64, dtype=torch.float64).reshape(64, 1, 8, 8)
    if size != 8:
        basis = F.interpolate(basis, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return basis.reshape(64, size * size).T.numpy()


def to_digits(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, S, S) in 0..255 from a digits recipe at image_size S → (N, 64) in 0..16:
    least-squares inverse of the upsampling, then the 255/16 scale undone (clipped to 0..16)."""
    n, s = images.shape[0], images.shape[1]
    a = upsample_matrix(s)
    x = images.reshape(n, s * s).astype(np.float64).T  # (S², N)
    x8 = np.linalg.lstsq(a, x, rcond=None)[0].T  # (N, 64)
    return np.clip(x8 * (DIGITS_MAX / 255.0), 0.0, DIGITS_MAX)


def _check_images(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2]:
        raise InputError(f"{where}: expected N square grayscale images (N×S×S or N×S×S×1), got shape "
                         f"{tuple(arr.shape)}")
    if arr.shape[1] < 8:
        raise InputError(f"{where}: images are {arr.shape[1]}x{arr.shape[1]}; digits samples are at least 8x8")
    if arr.dtype != np.uint8:
        raise InputError(f"{where}: expected uint8 images (0..255, as `ddaepp sample` writes), got {arr.dtype}")
    if len(arr) == 0:
        raise InputError(f"{where}: no images")
    return arr


def load_npz(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "arr_0" not in z.files:
                raise InputError(f"{path}: no arr_0 in this .npz (found: {', '.join(z.files) or 'nothing'})")
            arr = z["arr_0"]
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .npz ({e})") from None
    return _check_images(arr, str(path))


def load_png_folder(folder: Path) -> np.ndarray:
    from PIL import Image

    files = sorted(p for p in folder.glob("*.png") if p.stem.isdigit())  # NNNNNN.png, not grid.png
    if not files:
        raise InputError(f"{folder}: no samples.npz and no NNNNNN.png images (write them with `ddaepp sample`)")
    try:
        arr = np.stack([np.asarray(Image.open(p).convert("L")) for p in files])
    except (OSError, ValueError) as e:
        raise InputError(f"{folder}: could not read its PNG images ({e})") from None
    return _check_images(arr, str(folder))


def is_run(path: Path) -> bool:
    return (path / "checkpoints").is_dir() or (path / "ema.safetensors").is_file() or \
        (path / "model.safetensors").is_file()


def sample_run(path: Path, n: int, out: Path) -> np.ndarray:
    """`ddaepp sample RUN --n N --out OUT` through the library (same defaults and outputs)."""
    from ddaepp_cli.errors import DdaeppError
    from ddaepp_cli.sample import sample_command

    try:
        result = sample_command(str(path), seeds=list(range(n)), out=str(out), sampler=None, steps=None,
                                weights="ema", formats=["npz"], batch_size=None, clip=None)
    except DdaeppError as e:
        raise InputError(f"{path}: {e}", e.exit_code if e.exit_code in (2, 3) else 2) from None
    return load_npz(Path(result["written"]["npz"]))


def load_samples(path: Path, n: int) -> tuple[np.ndarray, str]:
    """(images, what they are) from a sample folder, an .npz or a run."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix != ".npz":
            raise InputError(f"{path}: give a `ddaepp sample` folder, an .npz or a run folder")
        return load_npz(path), str(path)
    if is_run(path):
        with tempfile.TemporaryDirectory(prefix="qs-quality-") as tmp:
            return sample_run(path, n, Path(tmp) / "samples"), f"{path} (sampled: seeds 0..{n - 1}, EMA)"
    if (path / "samples.npz").is_file():
        return load_npz(path / "samples.npz"), str(path / "samples.npz")
    return load_png_folder(path), str(path)


# ------------------------------------------------------------------------------------------------
# The judge
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def digits_classifier():
    """(SVC fitted on the digits `train` split, held-out X, held-out y, train X). Deterministic
    (random_state=0)."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    from ddaepp_cli.data.datasets import digits_split_indices

    bunch = load_digits()
    train, test = (digits_split_indices(bunch.target, s) for s in ("train", "test"))
    with warnings.catch_warnings():  # scikit-learn 1.9 deprecates probability=True (Platt scaling), still SVC's
        warnings.simplefilter("ignore", FutureWarning)
        svc = SVC(kernel="rbf", probability=True, random_state=0).fit(bunch.data[train], bunch.target[train])
    return svc, bunch.data[test], bunch.target[test], bunch.data[train]


def verdict(probs: np.ndarray) -> dict:
    """Confident share, predicted-label histogram and its normalised entropy of (N, 10) probabilities."""
    labels = probs.argmax(1)
    counts = np.bincount(labels, minlength=10)
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log(p)).sum() / math.log(10))
    return {"n": int(len(probs)), "confident_share": float((probs.max(1) >= CONFIDENCE).mean()),
            "mean_confidence": float(probs.max(1).mean()), "label_counts": counts.tolist(),
            "label_entropy": entropy}


def spread(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean pairwise distance of the rows of x (N, 64) that share a label, averaged over the labels
    held by at least two rows (nan when none is)."""
    means = []
    for c in np.unique(labels):
        g = x[labels == c]
        if len(g) > 1:
            d = np.sqrt(((g[:, None] - g[None]) ** 2).sum(-1))
            means.append(d.sum() / (len(g) * (len(g) - 1)))
    return float(np.mean(means)) if means else math.nan


def nearest_distance(x: np.ndarray, reference: np.ndarray) -> float:
    """Median over the rows of x of the distance to the nearest row of `reference`."""
    d2 = (x ** 2).sum(1)[:, None] - 2 * x @ reference.T + (reference ** 2).sum(1)[None]
    return float(np.median(np.sqrt(np.maximum(d2.min(1), 0.0))))


def diversity(x: np.ndarray, labels: np.ndarray) -> dict:
    """`spread` and `nearest train` (module docstring) of 8×8 images x (N, 64) with predicted labels."""
    _, _, _, x_train = digits_classifier()
    return {"spread": spread(x, labels), "nearest_train": nearest_distance(x, x_train)}


def measure(images: np.ndarray) -> dict:
    """Every number of the benchmark for uint8 sample images (N, S, S)."""
    svc, x_test, y_test, _ = digits_classifier()
    real_probs = svc.predict_proba(x_test)
    real = verdict(real_probs)
    real["accuracy"] = float((svc.classes_[real_probs.argmax(1)] == y_test).mean())
    real.update(diversity(x_test, real_probs.argmax(1)))
    x = to_digits(images)
    probs = svc.predict_proba(x)
    samples = verdict(probs)
    samples.update(diversity(x, probs.argmax(1)))
    ratio = samples["confident_share"] / real["confident_share"]
    rows = {"ratio": ratio, "entropy": samples["label_entropy"]}
    return {
        "image_size": int(images.shape[1]),
        "classifier": {"model": "sklearn SVC(kernel='rbf', probability=True, random_state=0)",
                       "train": "digits train split (1,442 images)", "held_out_accuracy": real["accuracy"]},
        "confidence": CONFIDENCE,
        "samples": samples,
        "real_held_out": real,
        "ratio": ratio,
        "label_entropy": samples["label_entropy"],
        "spread_ratio": samples["spread"] / real["spread"],
        "nearest_train_ratio": samples["nearest_train"] / real["nearest_train"],
        "targets": {k: {"op": ">=", "value": v, "met": bool(rows[k] >= v)} for k, v in TARGETS.items()},
        "met": all(rows[k] >= v for k, v in TARGETS.items()),
    }


def print_table(res: dict, source: str) -> None:
    from rich.console import Console
    from rich.table import Table

    s, r = res["samples"], res["real_held_out"]
    yes = {True: "[green]yes[/]", False: "[red]NO[/]"}
    table = Table(title=f"quickstart sample quality: {s['n']} samples ({res['image_size']}×{res['image_size']}) "
                        f"from {source}")
    for col, kw in (("measure", {}), ("samples", {"justify": "right"}), ("real held-out", {"justify": "right"}),
                    ("value", {"justify": "right"}), ("target", {}), ("met", {"justify": "center"})):
        table.add_column(col, **kw)
    table.add_row(f"share with p ≥ {CONFIDENCE}", f"{s['confident_share']:.1%}",
                  f"{r['confident_share']:.1%}", f"{res['ratio']:.3f}", f"ratio ≥ {TARGETS['ratio']}",
                  yes[res["targets"]["ratio"]["met"]])
    table.add_row("label entropy ÷ log 10", f"{s['label_entropy']:.3f}", f"{r['label_entropy']:.3f}",
                  f"{s['label_entropy']:.3f}", f"≥ {TARGETS['entropy']}", yes[res["targets"]["entropy"]["met"]])
    table.add_row("mean top probability", f"{s['mean_confidence']:.3f}", f"{r['mean_confidence']:.3f}", "", "", "")
    table.add_row("spread within a label", f"{s['spread']:.1f}", f"{r['spread']:.1f}", f"{res['spread_ratio']:.3f}",
                  "", "")
    table.add_row("nearest train digit", f"{s['nearest_train']:.1f}", f"{r['nearest_train']:.1f}",
                  f"{res['nearest_train_ratio']:.3f}", "", "")
    table.add_row("labels 0..9", " ".join(map(str, s["label_counts"])), " ".join(map(str, r["label_counts"])),
                  "", "", "")
    Console(width=max(120, Console().width)).print(table)
    print(f"classifier: RBF SVC on the digits train split, held-out accuracy {r['accuracy']:.1%}; "
          f"targets {'met' if res['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("samples", type=Path, help="a `ddaepp sample` folder, an .npz (arr_0) or a run folder")
    ap.add_argument("--n", type=int, default=64, help="images to sample from a run (seeds 0..N-1; default 64)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout instead of the table")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    try:
        if args.n <= 0:
            raise InputError(f"--n must be positive, got {args.n}")
        images, source = load_samples(args.samples, args.n)
        res = measure(images)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    res["source"] = source
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_table(res, source)
    return 1 if args.check and not res["met"] else 0


if __name__ == "__main__":
    sys.exit(main())
