"""Image files on disk: find them (ImageNet folder layout), read their size, decode to uint8 RGB.

Shared by `data.py` (image-folder datasets) and anything else that reads a folder of images
(latent caching, FID on sample folders). Every failure the user can fix is a one-line
`UsageError` that names the file.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
from PIL import Image

from ..errors import UsageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # compared case-insensitively

# Everything PIL raises for a file it cannot decode: UnidentifiedImageError and truncated data
# are OSErrors; some plugins raise SyntaxError/ValueError on malformed headers.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _images_under(folder: str) -> list[str]:
    """All image files below `folder` (recursive, links followed), in a machine-independent order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if _visible(f) and is_image_file(f)]
    return found


def list_image_folder(root: str) -> tuple[list[str], list[int], Optional[list[str]]]:
    """Files, labels and class names of an image folder.

    Two layouts are accepted:
    - ImageNet layout: one subfolder per class (`root/<class>/**/<image>`); classes are the sorted
      subfolder names (as torchvision's ImageFolder), labels their index. An empty class folder
      or images lying next to class folders are refused, since either would silently shift labels.
    - Flat: images directly in `root`, no subfolders; every label is 0, class names unknown.
    Hidden files and folders (leading ".") are skipped.
    """
    if not os.path.isdir(root):
        raise UsageError(f"image folder {root} does not exist or is not a directory")
    entries = sorted(e for e in os.listdir(root) if _visible(e))
    classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    loose = [os.path.join(root, e) for e in entries if e not in classes and is_image_file(e)]
    if not classes:
        if not loose:
            raise UsageError(f"image folder {root} holds no images (extensions: {', '.join(IMAGE_EXTENSIONS)})")
        return loose, [0] * len(loose), None
    if loose:
        raise UsageError(
            f"image folder {root} mixes class subfolders with loose images (e.g. {loose[0]}); "
            "put every image inside a class folder, or use a folder without subfolders"
        )
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = _images_under(os.path.join(root, name))
        if not found:
            raise UsageError(f"class folder {os.path.join(root, name)} holds no images; remove it or add images")
        files += found
        labels += [label] * len(found)
    return files, labels, classes


def image_size_of(path: str) -> tuple[int, int]:
    """(width, height) from the file header only: cheap enough to scan a folder of thousands."""
    try:
        with Image.open(path) as im:
            return im.size
    except _PIL_ERRORS as e:
        raise UsageError(f"cannot read image {path}: {_one_line(e)}") from None


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """ADM's `center_crop_arr` (guided-diffusion image_datasets.py), used by DiT/SiT/SRA on ImageNet.

    Halve with a box filter while the short side is at least 2×size (cheap, alias-free), then
    bicubic-resize so the short side equals `size`, then crop the centre square. An image that is
    already size×size passes through unchanged.
    """
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left = (image.size[0] - size) // 2
    top = (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def read_rgb(path: str, size: Optional[int] = None) -> np.ndarray:
    """Decode one image to uint8 RGB (H, W, 3); with `size`, centre-crop and resize to size×size."""
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")  # also forces the full decode, so truncation fails here
    except _PIL_ERRORS as e:
        raise UsageError(f"cannot read image {path}: {_one_line(e)}") from None
    if size is not None:
        image = center_crop_resize(image, size)
    return np.array(image, dtype=np.uint8)  # (H, W, 3), writable


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__
