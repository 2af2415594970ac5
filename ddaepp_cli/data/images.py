"""Image datasets in memory or on disk, the pixel range, and horizontal flips.

All datasets yield uint8 (C, H, W) images; pixels reach the model through `to_model_range` ([-1, 1]) and
leave through `from_model_range`. Datasets live under `default_root()` unless a root is given.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch.utils.data import Dataset

from ..errors import UsageError
from .imageio import image_size_of, read_rgb

Tensor = torch.Tensor


def default_root() -> str:
    """Where datasets live when no root is given: `$DDAEPP_DATA`, else `./data`."""
    return os.environ.get("DDAEPP_DATA", "./data")


class ImageDataset(Dataset):
    """Labelled images: `ds[i] -> (uint8 (C, H, W), int)`.

    In-memory datasets (`in_memory=True`: digits, CIFAR) also hold `images` uint8 (N, C, H, W) and
    `labels` int64 (N,), which `BatchStream` indexes directly: no per-sample Python work per step.
    """

    in_memory = False

    def __init__(self, *, name: str, split: str, root: Optional[str], channels: int, image_size: int,
                 num_classes: int, class_names: Optional[list[str]]):
        self.name, self.split, self.root = name, split, root
        self.channels, self.image_size = channels, image_size
        self.num_classes, self.class_names = num_classes, class_names

    def info(self) -> dict:
        """What a protocol record needs to name this dataset."""
        return {"name": self.name, "split": self.split, "root": self.root, "num_samples": len(self),
                "image_size": self.image_size, "channels": self.channels, "num_classes": self.num_classes}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.info().items())})"


class InMemoryImages(ImageDataset):
    in_memory = True

    def __init__(self, images: Tensor, labels: Tensor, **kw):
        assert images.dtype == torch.uint8 and images.ndim == 4, images.shape
        super().__init__(channels=images.shape[1], image_size=images.shape[-1], **kw)
        self.images = images.contiguous()  # (N, C, H, W) uint8
        self.labels = labels.to(torch.int64)  # (N,)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])


# Scanning every header costs ~0.1 ms a file: done at construction up to this many files (a few
# seconds); beyond it (ImageNet) only the first file is read and the rest is checked as decoded.
VERIFY_LIMIT = 20_000


class FolderImages(ImageDataset):
    """Images decoded from files at access time (RGB, 3 channels); not in memory.

    With `resize` set, each image is centre-cropped and resized to resize×resize (ADM's rule,
    `imageio.center_crop_resize`). Without it every image must have the same square size; a file
    of another size is a `UsageError` naming it and a reference file — at construction for
    folders of up to `VERIFY_LIMIT` files (`verify()`), otherwise when it is read.
    """

    def __init__(self, files: list[str], labels: list[int], *, resize: Optional[int],
                 class_names: Optional[list[str]], **kw):
        self.files, self.file_labels, self.resize = files, labels, resize
        self._reference = (files[0], image_size_of(files[0]))  # (path, (W, H))
        size = resize
        if size is None:
            w, h = self._reference[1]
            if w != h:
                raise UsageError(f"{files[0]} is {w}x{h}, not square; set data.image_size to centre-crop and resize")
            size = w
        num_classes = len(class_names) if class_names else 1
        super().__init__(channels=3, image_size=size, num_classes=num_classes, class_names=class_names, **kw)
        if len(files) <= VERIFY_LIMIT:
            self.verify()

    def verify(self) -> None:
        """Read every file's header: unreadable files (and, without resize, size mismatches) fail now."""
        for path in self.files:
            self._check_size(path, image_size_of(path))

    def _check_size(self, path: str, size: tuple[int, int]) -> None:
        ref_path, ref = self._reference
        if self.resize is None and size != ref:
            raise UsageError(
                f"images differ in size: {path} is {size[0]}x{size[1]} but {ref_path} is {ref[0]}x{ref[1]}; "
                "set data.image_size to centre-crop and resize them all"
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path = self.files[i]
        pixels = read_rgb(path, self.resize)  # (H, W, 3)
        self._check_size(path, (pixels.shape[1], pixels.shape[0]))
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), self.file_labels[i]  # (3, H, W)


# ------------------------------------------------------------------------------------------
# digits (scikit-learn, bundled)
# ------------------------------------------------------------------------------------------


def to_model_range(x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 [0, 255] → [-1, 1]: x / 127.5 - 1."""
    return x.to(dtype) / 127.5 - 1


def from_model_range(x: Tensor) -> Tensor:
    """[-1, 1] → uint8 with the torch-fidelity/ADM rounding: ((x + 1) * 127.5).round().clamp(0, 255)."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def hflip_mask(batch: int, *, generator: Optional[torch.Generator] = None,
               device: Optional[Union[str, torch.device]] = None) -> Tensor:
    """One fair coin per sample: (B,) bool. `generator` must live on `device`."""
    return torch.rand(batch, generator=generator, device=device) < 0.5


def apply_hflip(x: Tensor, mask: Tensor) -> Tensor:
    """Mirror the samples of x (B, C, H, W) where mask (B,) is true; no Python loop."""
    return torch.where(mask.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)


def random_hflip(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Flip each sample of a batch (B, C, H, W) with probability 1/2, on x's device."""
    return apply_hflip(x, hflip_mask(x.shape[0], generator=generator, device=x.device))
