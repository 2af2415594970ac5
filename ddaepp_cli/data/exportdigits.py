"""`ddaepp export-digits DIR`: scikit-learn's bundled digits written as an ImageNet-style image folder,
so the ImageNet (latent) pipeline can be tried end to end on a CPU with real images:

    DIR/train/<digit>/<index>.png      1,442 images (the `digits` dataset's train split)
    DIR/val/<digit>/<index>.png        355 images   (its test split)
    DIR/val_flat/<index>.png + DIR/val_labels.txt   the same validation images as ImageNet ships val/:
                                       one flat folder and a `<file> <class index>` label file

Images are RGB PNGs (the grey digit on all three channels) upsampled from 8×8 exactly as the `digits`
dataset does (bilinear, float64), to `--image-size` (default 32). <index> is the image's index in
scikit-learn's array, so the files are identical on every machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import UsageError


def export_digits(out: str | os.PathLike, image_size: int = 32, flat_val: bool = True) -> dict:
    from PIL import Image

    from . import digits_split_indices, load_dataset

    if image_size < 8:
        raise UsageError(f"--image-size must be at least 8 (digits are 8×8), got {image_size}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty folder; choose a new folder")
    from sklearn.datasets import load_digits

    target = load_digits().target
    counts = {}
    for split, folder in (("train", "train"), ("test", "val")):
        ds = load_dataset("digits", split=split, image_size=image_size)
        idx = digits_split_indices(target, split)
        images = ds.images[:, 0].numpy()  # (N, S, S) uint8
        labels = ds.labels.numpy()
        for d in range(10):
            (out / folder / str(d)).mkdir(parents=True, exist_ok=True)
        for img, y, i in zip(images, labels, idx):
            Image.fromarray(np.repeat(img[:, :, None], 3, axis=2)).save(out / folder / str(int(y)) / f"{int(i):04d}.png")
        counts[folder] = len(idx)
        if folder == "val" and flat_val:
            (out / "val_flat").mkdir(parents=True, exist_ok=True)
            lines = []
            for img, y, i in zip(images, labels, idx):
                Image.fromarray(np.repeat(img[:, :, None], 3, axis=2)).save(out / "val_flat" / f"{int(i):04d}.png")
                lines.append(f"{int(i):04d}.png {int(y)}")
            (out / "val_labels.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"out": str(out), "image_size": image_size, "train": counts["train"], "val": counts["val"],
            "classes": [str(d) for d in range(10)],
            "val_flat": str(out / "val_flat") if flat_val else None,
            "val_labels": str(out / "val_labels.txt") if flat_val else None}
