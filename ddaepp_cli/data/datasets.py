"""The named datasets: `load_dataset(name, split=..., root=...)`.

- `digits`: scikit-learn's bundled 8×8 digits (1,797 images, 10 classes), upsampled. Needs no files.
- `cifar10`, `cifar100`: the official python-version batches, read by ddaepp's own reader through
  a restricted unpickler, from `<root>/cifar-10-batches-py/` and `<root>/cifar-100-python/`.
- `imagefolder`: `<root>` (or `<root>/<split>` when that folder exists) in the ImageNet layout,
  one subfolder per class, or a flat folder of images (all label 0).
`root` defaults to `$DDAEPP_DATA`, else `./data`. Nothing is downloaded unless `download=True`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DdaeppError, UnavailableError, UsageError, choices
from .imageio import list_image_folder
from .images import FolderImages, ImageDataset, InMemoryImages, default_root

Tensor = torch.Tensor


DIGITS_SIZE = 16  # default upsampled size: 8×8 is too small for a UNet's downsampling path


def digits_split_indices(target: np.ndarray, split: str) -> np.ndarray:
    """Fixed stratified ~80/20 split with no RNG, identical on every machine: within each class,
    in dataset order, every 5th image (class positions 4, 9, 14, …) is test. 1,442 train / 355 test."""
    test = np.zeros(len(target), dtype=bool)
    for c in np.unique(target):
        test[np.flatnonzero(target == c)[4::5]] = True
    return np.flatnonzero(test if split == "test" else ~test)


def _load_digits(split: str, root: str, image_size: Optional[int], download: bool) -> ImageDataset:
    from sklearn.datasets import load_digits

    _check_split("digits", split, ("train", "test"))
    size = DIGITS_SIZE if image_size is None else image_size
    if size < 8:
        raise UsageError(f"digits are 8x8; image_size must be at least 8, got {size}")
    bunch = load_digits()
    idx = digits_split_indices(bunch.target, split)
    x = torch.from_numpy(bunch.images[idx]).to(torch.float64)[:, None] * (255 / 16)  # (N, 1, 8, 8) in [0, 255]
    if size != 8:
        # float64, antialias off: exact (no rounding before the final one) for power-of-two scales
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    images = x.round().clamp(0, 255).to(torch.uint8)  # (N, 1, S, S)
    labels = torch.from_numpy(bunch.target[idx]).to(torch.int64)
    return InMemoryImages(images, labels, name="digits", split=split, root=None, num_classes=10,
                          class_names=[str(d) for d in range(10)])


# ------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python-version batches)
# ------------------------------------------------------------------------------------------

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class CifarSpec:
    title: str
    folder: str
    archive: str
    splits: dict[str, tuple[str, ...]]
    meta: str
    label_key: str
    names_key: str
    num_classes: int
    expected: str  # the files, for messages
    # (size in bytes, MD5) of the official files; MD5s as in torchvision's CIFAR10/CIFAR100.
    # The MD5 is checked only for a file of exactly the official size: tests write tiny batches.
    official: dict[str, tuple[int, str]]


# The official python-version files: name, size in bytes and MD5 (the MD5s torchvision's CIFAR10 / CIFAR100 check).
CIFAR10_FILES = """
data_batch_1 31035704 c99cafc152244af753f735de768cd75f
data_batch_2 31035320 d4bba439e000b95fd0a9bffe97cbabec
data_batch_3 31035999 54ebc095f3ab1f0389bbae665268c751
data_batch_4 31035696 634d18415352ddfa80567beed471001a
data_batch_5 31035623 482c414d41f54cd18b22e5b47cb7c3cb
test_batch 31035526 40351d587109b95175f43aff81a1287e
batches.meta 158 5ff9c542aee3614f3951f8cda6e48888
"""
CIFAR100_FILES = """
train 155249918 16019d7e3df5f24257cddd939b257f8d
test 31049707 f0ef6b0ae62326f3e7ffdfab6717acfc
meta 1473 7973b15100ade9c7d40fb424638fde48
"""


def _official(table: str) -> dict[str, tuple[int, str]]:
    return {name: (int(size), md5) for name, size, md5 in (line.split() for line in table.strip().splitlines())}


CIFAR = {
    "cifar10": CifarSpec(
        title="CIFAR-10", folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
        splits={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        meta="batches.meta", label_key="labels", names_key="label_names", num_classes=10,
        expected="data_batch_1..5, test_batch, batches.meta",
        official=_official(CIFAR10_FILES),
    ),
    "cifar100": CifarSpec(
        title="CIFAR-100", folder="cifar-100-python", archive="cifar-100-python.tar.gz",
        splits={"train": ("train",), "test": ("test",)},
        meta="meta", label_key="fine_labels", names_key="fine_label_names", num_classes=100,
        expected="train, test, meta",
        official=_official(CIFAR100_FILES),
    ),
}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 writes bytes at pickle protocol <= 2 as `_codecs.encode(text, "latin1")`.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"unexpected _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _safe_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    found: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                            ("_codecs", "encode"): _latin1_bytes}
    for pkg in ("numpy.core", "numpy._core"):  # python-2 era files name numpy.core; numpy 2 writes numpy._core
        found[(f"{pkg}.multiarray", "_reconstruct")] = multiarray._reconstruct  # array from (type, shape, dtype)
        found[(f"{pkg}.multiarray", "scalar")] = multiarray.scalar  # numpy scalar from (dtype, bytes)
        found[(f"{pkg}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol-5 arrays
    return found


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits numpy arrays, dtypes and scalars plus plain containers; no other global is resolvable,
    so no code named by the file can run (lists, dicts, str, bytes, ints need no global)."""

    SAFE = _safe_globals()

    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")  # py2 str → str, byte-for-byte (as torchvision)
        self.path = path

    def find_class(self, module: str, name: str):
        try:
            return self.SAFE[(module, name)]
        except KeyError:
            raise UsageError(f"refusing to unpickle {module}.{name} from {self.path}: CIFAR files hold only "
                             "numpy arrays, lists, dicts and strings") from None


def read_pickle_restricted(path: str) -> dict:
    """Load one CIFAR-style pickle (a dict); keys come back as str whether stored as str or bytes."""
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, path).load()
    except DdaeppError:
        raise
    except Exception as e:  # malformed data: any failure of the (global-free) load is the file's fault
        raise UsageError(f"cannot read {path}: not a CIFAR python batch ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"cannot read {path}: expected a pickled dict, found {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _md5(path: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_official(spec: CifarSpec, path: str) -> None:
    size, md5 = spec.official[os.path.basename(path)]
    if os.path.getsize(path) == size and (found := _md5(path)) != md5:
        raise UsageError(f"{path} is corrupt (MD5 {found}, official {md5}); delete {os.path.dirname(path)} and "
                         f"extract {spec.archive} from {CIFAR_URL} again")


def _cifar_missing_message(spec: CifarSpec, root: str, folder: str, missing: list[str]) -> str:
    return (f"{spec.title} not found under {folder} (missing {', '.join(missing)}; expected {spec.expected}). "
            f"Download {spec.archive} from {CIFAR_URL} and extract it into {os.path.normpath(root)}/, "
            "or run with data.download=true when online.")


def _download_cifar(name: str, spec: CifarSpec, root: str, folder: str, missing: list[str]) -> None:
    manual = _cifar_missing_message(spec, root, folder, missing)
    try:
        import torchvision.datasets as tvd
    except Exception as e:
        raise UnavailableError(f"cannot download {spec.title}: torchvision does not import ({type(e).__name__}). {manual}") from None
    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    try:
        with contextlib.redirect_stdout(sys.stderr):  # torchvision prints progress; stdout is for --json
            cls(root, train=True, download=True)
    except Exception as e:  # URLError, timeouts, HTTP errors, failed checksum of a partial archive
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UnavailableError(f"downloading {spec.title} failed ({reason}). {manual}") from None


def _load_cifar(name: str, split: str, root: str, image_size: Optional[int], download: bool) -> ImageDataset:
    spec = CIFAR[name]
    _check_split(name, split, tuple(spec.splits))
    if image_size not in (None, 32):
        raise UsageError(f"{spec.title} images are 32x32; image_size {image_size} is not supported (leave it unset or 32)")
    folder = os.path.normpath(os.path.join(root, spec.folder))
    files = spec.splits[split]
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing and download:
        _download_cifar(name, spec, root, folder, missing)
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise UnavailableError(_cifar_missing_message(spec, root, folder, missing))

    images, labels = [], []
    for f in files:
        path = os.path.join(folder, f)
        _check_official(spec, path)
        batch = read_pickle_restricted(path)
        data, target = batch.get("data"), batch.get(spec.label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise UsageError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), found {found}")
        target = np.asarray(target if target is not None else [])
        if target.shape != (data.shape[0],) or not np.issubdtype(target.dtype, np.integer):
            raise UsageError(f"{path}: '{spec.label_key}' must hold {data.shape[0]} integer labels")
        if data.shape[0] and not (0 <= target.min() and target.max() < spec.num_classes):
            raise UsageError(f"{path}: labels must lie in 0..{spec.num_classes - 1}")
        data = np.require(data, requirements=["C", "W"])
        images.append(torch.from_numpy(data).view(-1, 3, 32, 32))  # rows are R | G | B planes, row-major
        labels.append(torch.from_numpy(target.astype(np.int64)))

    class_names = CIFAR10_CLASSES if name == "cifar10" else None
    meta_path = os.path.join(folder, spec.meta)
    if os.path.isfile(meta_path):  # optional: only the class names come from it
        _check_official(spec, meta_path)
        names = read_pickle_restricted(meta_path).get(spec.names_key)
        if not isinstance(names, list) or len(names) != spec.num_classes:
            raise UsageError(f"{meta_path}: '{spec.names_key}' must list {spec.num_classes} class names")
        class_names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    return InMemoryImages(torch.cat(images), torch.cat(labels), name=name, split=split, root=folder,
                          num_classes=spec.num_classes, class_names=class_names)


# ------------------------------------------------------------------------------------------
# image folders
# ------------------------------------------------------------------------------------------


def _load_imagefolder(split: str, root: str, image_size: Optional[int], download: bool) -> ImageDataset:
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        if split != "train":
            raise UsageError(f"no {split} folder under {root}: expected {folder}/<class>/<images>")
        folder = root  # a folder without split subfolders is the training set
    files, labels, class_names = list_image_folder(folder)
    return FolderImages(files, labels, resize=image_size, class_names=class_names, name="imagefolder",
                        split=split, root=os.path.normpath(folder))


# ------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------

DATASETS: dict[str, Callable[[str, str, Optional[int], bool], ImageDataset]] = {
    "digits": _load_digits,
    "cifar10": lambda *a: _load_cifar("cifar10", *a),
    "cifar100": lambda *a: _load_cifar("cifar100", *a),
    "imagefolder": _load_imagefolder,
}


def _check_split(name: str, split: str, valid: tuple[str, ...]) -> None:
    if split not in valid:
        raise UsageError(f"unknown split {split!r} for {name}; valid: {choices(valid)}")


def load_dataset(name: str, *, split: str = "train", root: Optional[str] = None,
                 image_size: Optional[int] = None, download: bool = False) -> ImageDataset:
    """Load a dataset by name (`DATASETS`). `root=None` means `default_root()`; `image_size=None`
    the native size (digits: 16). `download` only matters for CIFAR."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; valid: {choices(DATASETS)}")
    if image_size is not None and (not isinstance(image_size, int) or image_size <= 0):
        raise UsageError(f"image_size must be a positive integer, got {image_size!r}")
    return DATASETS[name](split, default_root() if root is None else root, image_size, download)
