"""Datasets and the deterministic, resumable batch stream that feeds training (SPEC §3, §6).

Datasets (`load_dataset(name, split=..., root=...)`), all yielding uint8 (C, H, W) images:
- `digits`: scikit-learn's bundled 8×8 digits (1,797 images, 10 classes), upsampled. Needs no files.
- `cifar10`, `cifar100`: the official python-version batches, read by ddaepp's own reader through
  a restricted unpickler, from `<root>/cifar-10-batches-py/` and `<root>/cifar-100-python/`.
- `imagefolder`: `<root>` (or `<root>/<split>` when that folder exists) in the ImageNet layout,
  one subfolder per class, or a flat folder of images (all label 0).
`root` defaults to `$DDAEPP_DATA`, else `./data`. Nothing is downloaded unless `download=True`.

Pixels reach the model through `to_model_range` ([-1, 1]) and leave through `from_model_range`.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import pickle
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .errors import DdaeppError, UnavailableError, UsageError, choices
from .imageio import image_size_of, list_image_folder, read_rgb

Tensor = torch.Tensor


def default_root() -> str:
    """Where datasets live when no root is given: `$DDAEPP_DATA`, else `./data`."""
    return os.environ.get("DDAEPP_DATA", "./data")


# ==========================================================================================
# Datasets
# ==========================================================================================


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


CIFAR = {
    "cifar10": CifarSpec(
        title="CIFAR-10", folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
        splits={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        meta="batches.meta", label_key="labels", names_key="label_names", num_classes=10,
        expected="data_batch_1..5, test_batch, batches.meta",
        official={
            "data_batch_1": (31035704, "c99cafc152244af753f735de768cd75f"),
            "data_batch_2": (31035320, "d4bba439e000b95fd0a9bffe97cbabec"),
            "data_batch_3": (31035999, "54ebc095f3ab1f0389bbae665268c751"),
            "data_batch_4": (31035696, "634d18415352ddfa80567beed471001a"),
            "data_batch_5": (31035623, "482c414d41f54cd18b22e5b47cb7c3cb"),
            "test_batch": (31035526, "40351d587109b95175f43aff81a1287e"),
            "batches.meta": (158, "5ff9c542aee3614f3951f8cda6e48888"),
        },
    ),
    "cifar100": CifarSpec(
        title="CIFAR-100", folder="cifar-100-python", archive="cifar-100-python.tar.gz",
        splits={"train": ("train",), "test": ("test",)},
        meta="meta", label_key="fine_labels", names_key="fine_label_names", num_classes=100,
        expected="train, test, meta",
        official={
            "train": (155249918, "16019d7e3df5f24257cddd939b257f8d"),
            "test": (31049707, "f0ef6b0ae62326f3e7ffdfab6717acfc"),
            "meta": (1473, "7973b15100ade9c7d40fb424638fde48"),
        },
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


# ==========================================================================================
# Batch stream
# ==========================================================================================


class _Failure:
    """A user-facing error raised inside a DataLoader worker, carried to the main process intact
    (DataLoader would re-raise it with a multi-line traceback as its message)."""

    def __init__(self, error: DdaeppError):
        self.error = error


class _CatchErrors(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.dataset[i]
        except DdaeppError as e:
            return _Failure(e)


def _collate(samples: list) -> Union[tuple[Tensor, Tensor], _Failure]:
    for s in samples:
        if isinstance(s, _Failure):
            return s
    images = torch.stack([s[0] for s in samples])  # (b, C, H, W) uint8
    return images, torch.tensor([s[1] for s in samples], dtype=torch.int64)


class _StepBatches:
    """batch_sampler for DataLoader: this rank's indices for steps start, start+1, … (forever)."""

    def __init__(self, indices: Callable[[int], Tensor], start: int):
        self.indices, self.start = indices, start

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            yield self.indices(step).tolist()
            step += 1


class BatchStream:
    """Deterministic, resumable, multi-process batches: an infinite iterator of this rank's
    `(images uint8 (b, C, H, W), labels int64 (b,))`, b = global_batch / world_size.

    Order rule: epoch e is `torch.randperm(N)` under a CPU generator seeded with
    `(seed * 1_000_003 + e) mod 2**63`; steps_per_epoch = N // global_batch (drop_last; the tail
    of each permutation is skipped); global step s takes slice `[(s % spe) * G, +G)` of epoch
    `s // spe`'s permutation, and rank r its r-th contiguous share. The union over ranks is thus
    the same for any world size, and a stream started at `start_step` (or restored with
    `load_state_dict`) yields exactly the batches an uninterrupted run would — also after a
    change of world size. Gradient accumulation splits the rank's share; that is the caller's job.

    In-memory datasets are indexed as tensors (optionally kept on `device` so each step is one
    `index_select` there); other datasets go through a DataLoader driven by the same rule.
    With `drop_last=False` the last, partial batch of each epoch is kept (ranks' shares may
    then differ by one sample).
    """

    def __init__(self, dataset: ImageDataset, *, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start_step: int = 0, num_workers: int = 0, pin_memory: bool = False,
                 drop_last: bool = True, device: Optional[Union[str, torch.device]] = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is not in 0..{world_size - 1} (world size {world_size})")
        if global_batch < 1 or global_batch % world_size:
            raise UsageError(f"global batch {global_batch} must be a positive multiple of the number of "
                             f"processes ({world_size})")
        if start_step < 0 or num_workers < 0:
            raise UsageError(f"start_step and num_workers must be >= 0, got {start_step} and {num_workers}")
        n = len(dataset)
        if n == 0 or (drop_last and n < global_batch):
            raise UsageError(f"dataset {getattr(dataset, 'name', '?')} has {n} images, fewer than one global "
                             f"batch of {global_batch}; lower the batch size")
        self.dataset, self.num_samples = dataset, n
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.local_batch = global_batch // world_size
        self.seed, self.step = seed, start_step
        self.num_workers, self.drop_last = num_workers, drop_last
        self.pin_memory = pin_memory and torch.cuda.is_available()  # pinning needs an accelerator
        self.device = torch.device(device) if device is not None else None
        self.steps_per_epoch = n // global_batch if drop_last else math.ceil(n / global_batch)
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)
        self._loader_iter = None
        self.in_memory = bool(getattr(dataset, "in_memory", False))
        if self.in_memory:
            self._images, self._labels = dataset.images, dataset.labels
            if self.device is not None:  # whole dataset on the device once (CIFAR: 150 MB)
                self._images, self._labels = self._images.to(self.device), self._labels.to(self.device)

    # --- the order rule ---------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self.step // self.steps_per_epoch

    def permutation(self, epoch: int) -> Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (1 << 63))
            self._perm, self._perm_epoch = torch.randperm(self.num_samples, generator=g), epoch
        return self._perm

    def global_indices(self, step: int) -> Tensor:
        """Dataset indices of global step `step`, all ranks together: (global_batch,) int64."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[pos * self.global_batch:(pos + 1) * self.global_batch]

    def indices(self, step: int) -> Tensor:
        """This rank's contiguous share of `global_indices(step)`."""
        return torch.tensor_split(self.global_indices(step), self.world_size)[self.rank]

    # --- iteration --------------------------------------------------------------------------
    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self.in_memory:
            idx = self.indices(self.step)
            if self.device is not None:
                idx = idx.to(self.device)
            images, labels = self._images.index_select(0, idx), self._labels.index_select(0, idx)  # (b, C, H, W), (b,)
            if self.pin_memory and images.device.type == "cpu":
                images, labels = images.pin_memory(), labels.pin_memory()
        else:
            if self._loader_iter is None:
                loader = DataLoader(_CatchErrors(self.dataset), batch_sampler=_StepBatches(self.indices, self.step),
                                    num_workers=self.num_workers, collate_fn=_collate, pin_memory=self.pin_memory,
                                    persistent_workers=self.num_workers > 0)
                self._loader_iter = iter(loader)
            batch = next(self._loader_iter)
            if isinstance(batch, _Failure):
                self.close()
                raise batch.error
            images, labels = batch
            if self.device is not None:
                images = images.to(self.device, non_blocking=self.pin_memory)
                labels = labels.to(self.device, non_blocking=self.pin_memory)
        self.step += 1
        return images, labels

    def close(self) -> None:
        """Stop DataLoader workers (they also stop when the stream is garbage-collected)."""
        it, self._loader_iter = self._loader_iter, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    # --- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step, "global_batch": self.global_batch,
                "world_size": self.world_size, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position. The world size may differ (the global order does not
        depend on it); the global batch and dataset size may not (they define the order)."""
        for key in ("global_batch", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise UsageError(f"cannot resume the data stream: saved {key} {state[key]} differs from the "
                                 f"current {getattr(self, key)}")
        self.close()
        self.seed, self.step = int(state["seed"]), int(state["step"])


# ==========================================================================================
# Pixel helpers
# ==========================================================================================


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
