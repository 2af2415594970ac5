"""What `ddaepp fid` measures: N uint8 images (3, H, W), read by index.

Folders of images, `.npz` files with `arr_0` (the ADM format, streamed), registered datasets, and a
checkpoint whose samples are generated on the fly (`ModelSource`): per-sample seeds, class labels (random
per seed, or balanced; sample.py) and
classifier-free guidance as `ddaepp sample` draws them, latents decoded through the run's VAE, and
converted exactly as `ddaepp sample` writes PNGs, so a run, its PNG folder and its npz read the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ...errors import UnavailableError, UsageError
from ...data.imageio import image_size_of, list_image_folder, read_rgb
from .constants import REGISTERED


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
            from ...data import load_dataset

            dataset, split = REGISTERED[name]
            self.ds = load_dataset(dataset, split=split, root=data_root, download=download)  # exit 3 when missing
            self.root = self.ds.root
            self.images = self.ds.images  # (N, 3, 32, 32) uint8
        else:
            from torch_fidelity.registry import DATASETS_REGISTRY

            from ...data import default_root

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
    """Samples of a checkpoint, generated batch by batch from per-sample seeds (never written).

    `options` are `sample.generate`'s keywords from `sample.sampling_options` (class labels of every
    seed, CFG scale / interval / channels, the VAE decoder of a latent run), `labels` their rule
    (`sample.label_mode`, recorded); image i is a function of seed i alone, so any batch size and any
    sharding over processes give the same images."""

    kind = "run"

    def __init__(self, model, formulation, seeds: list[int], *, shape: tuple[int, int, int], sampler: str,
                 steps: int | None, clip: bool, device: torch.device, options: dict[str, Any] | None = None,
                 labels: str | None = None):
        self.model, self.formulation, self.seeds, self.labels = model, formulation, seeds, labels
        self.shape, self.sampler, self.steps, self.clip, self.device = shape, sampler, steps, clip, device
        self.options = dict(options or {})

    def __len__(self) -> int:
        return len(self.seeds)

    def read(self, idx: Sequence[int]) -> torch.Tensor:
        from ...sample import generate

        seeds = [self.seeds[i] for i in idx]
        opts = dict(self.options)
        if opts.get("class_labels") is not None:
            opts["class_labels"] = [opts["class_labels"][i] for i in idx]
        images = generate(self.model, self.formulation, seeds, shape=self.shape, sampler=self.sampler,
                          steps=self.steps, clip=self.clip, batch_size=len(seeds), device=self.device, **opts)
        return images  # (b, C, H, W) uint8 (C may be 1; see _rgb)

    def fingerprint(self) -> str:  # a model is never a cached reference
        raise NotImplementedError

    def describe(self) -> dict:
        o = self.options
        d = {"kind": self.kind, "n": len(self), "seeds": [self.seeds[0], self.seeds[-1]],
             "seed_list": "contiguous" if self.seeds == list(range(self.seeds[0], self.seeds[-1] + 1)) else "custom",
             "sampler": self.sampler, "steps": self.steps, "clip_x0": self.clip,
             "conversion": "((x + 1) * 127.5).round().clamp(0, 255).to(uint8)", "written": False}
        if o.get("class_labels") is not None:
            from ...sample import describe_labels

            d.update(labels=self.labels, class_labels=describe_labels(self.labels), cfg_scale=o.get("cfg_scale"),
                     cfg_interval=list(o.get("cfg_interval") or ()), cfg_channels=o.get("cfg_channels"))
        if o.get("decode") is not None:
            d["decoded"] = "latents → the run's VAE decoder, clamped to [−1, 1]"
        return d
