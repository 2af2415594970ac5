"""Semantic-segmentation datasets for `ddaepp segprobe`: ADE20K (SceneParsing, ADEChallengeData2016)
and PASCAL VOC 2012, as square images with aligned label maps (DDAE++ §5.2: "256² versions").

Layouts (what the official archives unpack to):

    ADEChallengeData2016/images/{training,validation}/ADE_*.jpg
    ADEChallengeData2016/annotations/{training,validation}/ADE_*.png     (L, 0 = other, 1..150)
    VOC2012/JPEGImages/<id>.jpg
    VOC2012/SegmentationClass/<id>.png                                    (P palette, 0..20, 255 = border)
    VOC2012/ImageSets/Segmentation/{train,val}.txt

Labels come out as uint8 class indices with 255 = ignore: ADE20K's 0 ("other") becomes 255 and
1..150 become 0..149 (the mmsegmentation `reduce_zero_label` convention); VOC keeps 0..20 and its
255 border. Palette PNGs are read as indices, never converted to colours.

Resize policy (one geometry for image and labels, so they stay aligned): the central square of
side min(W, H) is cropped, then the image is resized to image_size × image_size with bilinear
filtering (PIL, antialiased when shrinking) and the label map to label_size × label_size with
nearest neighbour (no invented classes). The paper's setting is 256 for both.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UnavailableError, UsageError, choices

IGNORE = 255


@dataclass(frozen=True)
class SegSpec:
    name: str
    title: str
    num_classes: int
    folder: str  # the archive's top folder, looked for under the data root
    archive: str
    url: str
    splits: dict  # ddaepp split name → the dataset's own


SPECS = {
    "ade20k": SegSpec("ade20k", "ADE20K (SceneParsing)", 150, "ADEChallengeData2016", "ADEChallengeData2016.zip",
                      "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
                      {"train": "training", "val": "validation"}),
    "voc": SegSpec("voc", "PASCAL VOC 2012", 21, "VOCdevkit/VOC2012", "VOCtrainval_11-May-2012.tar",
                   "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                   {"train": "train", "val": "val"}),
}

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map (256, 3) uint8 (bit-interleaved class index; 255 → (224, 224, 192))."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def _is_root(spec: SegSpec, p: Path) -> bool:
    if spec.name == "ade20k":
        return (p / "images").is_dir() and (p / "annotations").is_dir()
    return (p / "JPEGImages").is_dir() and (p / "SegmentationClass").is_dir()


def find_root(name: str, root: str | os.PathLike | None) -> Path:
    """The dataset folder: `root` itself, or the archive's folder below it (default $DDAEPP_DATA)."""
    from ..data import default_root

    spec = SPECS[name]
    base = Path(root if root is not None else default_root()).expanduser()
    candidates = [base, base / spec.folder, base / Path(spec.folder).name]
    for p in candidates:
        if _is_root(spec, p):
            return p
    raise UnavailableError(
        f"{spec.title} not found under {base} (expected {base / spec.folder}). Download {spec.archive} from "
        f"{spec.url} and unpack it into {base}/, or pass --data-root DIR")


def list_pairs(name: str, root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label) files of a split, sorted; a missing label file is a UsageError naming it."""
    spec = SPECS[name]
    if split not in spec.splits:
        raise UsageError(f"unknown split {split!r} for {name}; valid: {choices(spec.splits)}")
    own = spec.splits[split]
    pairs = []
    if name == "ade20k":
        img_dir, ann_dir = root / "images" / own, root / "annotations" / own
        if not img_dir.is_dir():
            raise UsageError(f"{img_dir} does not exist: {spec.title} has images/{{training,validation}}/")
        for img in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")
                          and not p.name.startswith(".")):
            ann = ann_dir / f"{img.stem}.png"
            if not ann.is_file():
                raise UsageError(f"missing annotation {ann} for {img}")
            pairs.append((img, ann))
    else:
        ids_file = root / "ImageSets" / "Segmentation" / f"{own}.txt"
        if not ids_file.is_file():
            raise UsageError(f"missing {ids_file}: {spec.title} lists its segmentation splits there")
        for line in ids_file.read_text(encoding="utf-8").splitlines():
            i = line.strip()
            if not i:
                continue
            img, ann = root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png"
            for f in (img, ann):
                if not f.is_file():
                    raise UsageError(f"missing {f} (listed in {ids_file})")
            pairs.append((img, ann))
    if not pairs:
        raise UsageError(f"the {split} split of {spec.title} under {root} holds no images")
    return pairs


def _center_square(size: tuple[int, int]) -> tuple[int, int, int, int]:
    w, h = size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return left, top, left + s, top + s


def read_label(name: str, path: Path) -> Image.Image:
    """The label map as an 'L' image of class indices (uint8, 255 = ignore), before any resize."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise UsageError(f"{path} is a {im.mode} image; {SPECS[name].title} labels are single-channel "
                                 "class indices (palette or greyscale PNG), not colours")
            arr = np.array(im)  # (H, W) indices; a palette image gives its indices, not colours
    except UsageError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise UsageError(f"cannot read label map {path}: {' '.join(str(e).split()) or type(e).__name__}") from None
    arr = arr.astype(np.int32)
    if name == "ade20k":
        if arr.max(initial=0) > 150:
            raise UsageError(f"{path}: ADE20K labels lie in 0..150, found {arr.max()}")
        arr = np.where(arr == 0, IGNORE, arr - 1)  # 0 ("other") → ignore, 1..150 → 0..149
    else:
        bad = (arr > 20) & (arr != IGNORE)
        if bad.any():
            raise UsageError(f"{path}: VOC labels are 0..20 or 255, found {arr[bad][0]}")
    return Image.fromarray(arr.astype(np.uint8))  # mode L


class SegmentationSet(Dataset):
    """`ds[i] -> (image uint8 (C, S, S), label uint8 (L, L))`, C = 3, or 1 for greyscale models."""

    def __init__(self, name: str, split: str, root: str | os.PathLike | None, *, image_size: int, label_size: int,
                 channels: int = 3):
        if name not in SPECS:
            raise UsageError(f"unknown segmentation dataset {name!r}; valid: {choices(SPECS)}")
        for what, v in (("--image-size", image_size), ("--label-size", label_size)):
            if v <= 0:
                raise UsageError(f"{what} must be positive, got {v}")
        self.spec = SPECS[name]
        self.name, self.split = name, split
        self.root = find_root(name, root)
        self.pairs = list_pairs(name, self.root, split)
        self.image_size, self.label_size, self.channels = image_size, label_size, channels
        self.num_classes = self.spec.num_classes
        self.class_names = list(VOC_CLASSES) if name == "voc" else None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img_path, ann_path = self.pairs[i]
        try:
            with Image.open(img_path) as im:
                image = im.convert("RGB" if self.channels == 3 else "L")
        except (OSError, SyntaxError, ValueError) as e:
            raise UsageError(f"cannot read image {img_path}: {' '.join(str(e).split()) or type(e).__name__}") from None
        label = read_label(self.name, ann_path)
        if image.size != label.size:
            raise UsageError(f"{img_path} is {image.size[0]}x{image.size[1]} but its labels {ann_path} are "
                             f"{label.size[0]}x{label.size[1]}")
        box = _center_square(image.size)
        image = image.crop(box).resize((self.image_size,) * 2, resample=Image.BILINEAR)
        label = label.crop(box).resize((self.label_size,) * 2, resample=Image.NEAREST)
        x = torch.from_numpy(np.array(image, dtype=np.uint8))
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)  # (C, S, S)
        return x.contiguous(), torch.from_numpy(np.array(label, dtype=np.uint8))  # (L, L)

    def label(self, i: int) -> torch.Tensor:
        """The label map (L, L) alone (the image's central square, nearest neighbour): latent runs read
        their images as cached VAE encodings (seglatent.py)."""
        _, ann_path = self.pairs[i]
        label = read_label(self.name, ann_path)
        label = label.crop(_center_square(label.size)).resize((self.label_size,) * 2, resample=Image.NEAREST)
        return torch.from_numpy(np.array(label, dtype=np.uint8))

    def fingerprint(self) -> str:
        """sha256 of the relative file list and sizes (what a protocol record names; no pixel reads)."""
        h = hashlib.sha256()
        for img, ann in self.pairs:
            for f in (img, ann):
                h.update(f"{f.relative_to(self.root)}\t{f.stat().st_size}\n".encode())
        return h.hexdigest()[:16]

    def info(self) -> dict:
        return {"name": self.name, "split": self.split, "root": str(self.root), "num_images": len(self),
                "num_classes": self.num_classes, "ignore_index": IGNORE, "image_size": self.image_size,
                "label_size": self.label_size, "channels": self.channels, "fingerprint": self.fingerprint(),
                "resize": "central square crop; image bilinear, labels nearest"}
