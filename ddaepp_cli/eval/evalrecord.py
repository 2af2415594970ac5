"""Evaluation results on disk: `<run>/eval/<command>-<timestamp>.json` with the protocol record.

Every evaluation command (probe, cka, align, noisy-classifier, …) writes its full result — the same
object `--json` prints — next to the checkpoint it evaluated, so a number found later in a run
folder says how it was measured: checkpoint and its weights hash, EMA or raw, dataset and its
fingerprint, layers, timesteps, seeds, protocol settings and package versions. Files are written
atomically (temporary file in the same folder, fsync, rename): a crash never leaves half a record.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_text_atomic, write_text_new
from ..checkpoint import checkpoint_step
from ..console import info


def run_folder(ckpt: Path) -> Path:
    """The run folder of a checkpoint (`runs/x/checkpoints/step-N` → `runs/x`); a loose checkpoint
    folder's parent otherwise (the same rule as `ddaepp sample`'s default output)."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent




def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dataset_fingerprint(dataset) -> str:
    """sha256 of what the evaluation reads: pixels and labels of in-memory sets (CIFAR: ~0.3 s), the
    relative file list, sizes and labels of image folders (reading every pixel of ImageNet is not worth it)."""
    if hasattr(dataset, "fingerprint") and callable(dataset.fingerprint):  # a latent cache: its shards' checksums
        return dataset.fingerprint()
    h = hashlib.sha256()
    if getattr(dataset, "in_memory", False):
        h.update(dataset.images.contiguous().numpy().tobytes())
        h.update(dataset.labels.contiguous().numpy().tobytes())
    elif hasattr(dataset, "files"):
        root = os.path.commonpath(dataset.files) if dataset.files else ""
        for path, label in zip(dataset.files, dataset.file_labels):
            h.update(f"{os.path.relpath(path, root)}\t{os.path.getsize(path)}\t{label}\n".encode())
    else:  # a subset wrapper (features.Subset) exposes its parent and indices
        h.update(dataset_fingerprint(dataset.parent).encode())
        h.update(dataset.indices.numpy().tobytes())
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    import numpy as np

    from .. import __version__

    return {"ddaepp": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def checkpoint_record(ckpt: Path, weights: str, recipe) -> dict[str, Any]:
    """What identifies the evaluated network: checkpoint, step, EMA or raw, the weights' sha256."""
    ckpt = Path(ckpt)
    file = ckpt / ("ema.safetensors" if weights == "ema" else "model.safetensors")
    return {"checkpoint": str(ckpt), "step": checkpoint_step(ckpt), "weights": weights,
            "weights_sha256": file_sha256(file) if file.is_file() else None,
            "recipe": recipe.name, "backbone": recipe.model.backbone,
            "formulation": recipe.diffusion.formulation, "selfcond_layer": recipe.model.selfcond.layer}


def new_record_path(ckpt: Path, command: str) -> Path:
    """A fresh `eval/<command>-<UTC timestamp>-<pid>.json` path in the checkpoint's run folder.

    The process id keeps two evaluations started in the same second apart (two `ddaepp cka` at
    once); `save_record` never replaces an existing record either."""
    folder = run_folder(ckpt) / "eval"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = f"{command}-{stamp}-{os.getpid()}"
    path, k = folder / f"{base}.json", 1
    while path.exists() or path.with_suffix(".png").exists():  # the same process, the same second
        k += 1
        path = folder / f"{base}-{k}.json"
    return path


def write_json_atomic(path: Path, obj: Any, *, exclusive: bool = False) -> Path:
    """Write `obj` as JSON through the atomic helper (atomic.py). With `exclusive`, an existing `path` is
    never replaced: the record goes to `<stem>-2.json`, … instead. Returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2, default=str) + "\n"
    if exclusive:
        return write_text_new(path, text)
    write_text_atomic(path, text)
    return path


def save_record(path: Path, result: dict[str, Any]) -> Path | None:
    """Write `result` to `path` (or `<stem>-2.json` if another process took that name meanwhile);
    a read-only run folder costs a warning, not the evaluation."""
    try:
        return write_json_atomic(path, result, exclusive=True)
    except OSError as e:
        info(f"warning: could not write the evaluation record {path}: {e.strerror or e}")
        return None


def timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def device_record(device: torch.device, precision: str) -> dict[str, Any]:
    d = {"device": str(device), "precision": precision, "argv": sys.argv[1:]}
    if device.type == "cuda":
        d["gpu"] = torch.cuda.get_device_name(device)
    return d
