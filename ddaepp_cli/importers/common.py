"""What every importer shares: safe reading of a foreign checkpoint, key bookkeeping, the strict check.

A family module turns the file's object into `Source` (the state dicts it holds, what it dropped and
why) and maps one state dict onto ddaepp keys (`Mapped`). `check_against` then demands that every
ddaepp tensor is filled with the right shape and that every source tensor was either mapped or
dropped with a reason; anything else is a UsageError naming the key.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from ..errors import UsageError

# Harmless containers that training scripts store next to the weights and that torch's weights-only
# unpickler does not know: REPA and SRA save their argparse `args` (REPA:train.py, SRA:SiT-SRA/train.py).
SAFE_GLOBALS = (argparse.Namespace,)


@dataclass
class Source:
    """State dicts found in a checkpoint file: `ema` and/or `raw` (flat {key: tensor}), plus drops."""

    ema: dict[str, Tensor] | None
    raw: dict[str, Tensor] | None
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason → source keys (or entries)
    step: int | None = None  # the training step, where the file records it


@dataclass
class Mapped:
    tensors: dict[str, Tensor]  # ddaepp key → tensor
    dropped: dict[str, list[str]] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # ddaepp key → source key


def read_source(path: Path) -> Any:
    """The object stored in `path`: safetensors as a dict, pickles only through the weights-only loader."""
    if not path.is_file():
        raise UsageError(f"no such checkpoint file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UsageError(f"cannot read {path}: not a safetensors file ({_first_line(e)})") from None
    import zipfile

    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):  # zip files are memory-mapped, not copied
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # foreign pickle refused by the weights-only unpickler, truncated zip, not a file of torch
        text = " ".join(str(e).split())
        marker = "Unsupported global: GLOBAL "
        if marker in text:  # name the class the file wants to build
            what = text.split(marker, 1)[1].split(" ")[0]
            raise UsageError(f"refusing {path}: it needs arbitrary unpickling (it stores a {what} object); "
                             f"ddaepp reads checkpoints with torch.load(weights_only=True) only; if you trust the file, "
                             f"re-save its state dicts, e.g. torch.save(torch.load(F, weights_only=False)['ema'], "
                             f"'ema.pt')") from None
        raise UsageError(f"cannot read {path} with torch.load(weights_only=True): {text[:200]}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, Tensor)
                                                      for k, v in obj.items())


def require_state_dict(obj: Any, where: str, path: Path) -> dict[str, Tensor]:
    if not is_state_dict(obj):
        kind = type(obj).__name__
        raise UsageError(f"{path}: {where} is not a state dict of tensors (got {kind})")
    return obj


def strip_prefix(sd: dict[str, Tensor], prefixes: Iterable[str]) -> dict[str, Tensor]:
    """Remove wrapper prefixes (DDP `module.`, torch.compile `_orig_mod.`) shared by every key."""
    for prefix in prefixes:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


# DiT / SiT / LightningDiT `TimestepEmbedder.mlp` and `LabelEmbedder.embedding_table` → ddaepp's flat modules
DIT_EMBEDDER_PREFIXES = {"t_embedder.mlp.": "t_embedder.", "y_embedder.embedding_table.": "y_embedder."}


def swap_prefix(key: str, table: dict[str, str]) -> str:
    """`key` with the first of `table`'s old prefixes it starts with replaced by the new one; else unchanged."""
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def split_by_prefix(sd: dict[str, Tensor], prefixes: Iterable[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(keys starting with any of `prefixes`, the rest)."""
    prefixes = tuple(prefixes)
    hit = {k: v for k, v in sd.items() if k.startswith(prefixes)}
    return hit, {k: v for k, v in sd.items() if k not in hit}


def rename(sd: dict[str, Tensor], fn: Callable[[str], str | None], *, drop_reason: str = "") -> Mapped:
    """Apply `fn` to every key (None = not a weight of ddaepp's network: dropped with `drop_reason`)."""
    out = Mapped({})
    for k, v in sd.items():
        new = fn(k)
        if new is None:
            out.dropped.setdefault(drop_reason or "not part of the network", []).append(k)
            continue
        if new in out.tensors:
            raise UsageError(f"two source keys map onto {new}: {out.origin[new]} and {k}")
        out.tensors[new] = v
        out.origin[new] = k
    return out


def check_against(model: torch.nn.Module, mapped: Mapped, path: Path, what: str) -> dict[str, Tensor]:
    """Every ddaepp tensor filled with the right shape, nothing left over; the state dict to save."""
    own = model.state_dict()
    missing = [k for k in own if k not in mapped.tensors]
    extra = [k for k in mapped.tensors if k not in own]
    if extra:
        k = extra[0]
        raise UsageError(f"{path}: the {what} hold a tensor the ddaepp network does not have: "
                         f"{mapped.origin.get(k, k)} (→ {k}; {len(extra)} such key(s)); the recipe's model section "
                         f"must match the checkpoint")
    if missing:
        k = missing[0]
        raise UsageError(f"{path}: the {what} lack the ddaepp network's {k} ({len(missing)} missing): the file is "
                         f"incomplete, or the recipe's model section does not match the checkpoint")
    for k, ref in own.items():
        v = mapped.tensors[k]
        if tuple(v.shape) != tuple(ref.shape):
            raise UsageError(f"{path}: the {what} key {mapped.origin.get(k, k)} has shape {tuple(v.shape)}, the ddaepp "
                             f"network expects {tuple(ref.shape)} for {k}; the recipe's model section must match")
        if not (v.is_floating_point() or v.dtype == ref.dtype):
            raise UsageError(f"{path}: the {what} key {mapped.origin.get(k, k)} holds {v.dtype}, expected {ref.dtype}")
    return {k: mapped.tensors[k].detach().to(own[k].dtype).contiguous().clone() for k in own}


def check_derived(sd: dict[str, Tensor], key: str, expected: Tensor, path: Path, atol: float = 1e-4) -> None:
    """A table the network computes itself (frozen sin-cos positions, RoPE): must equal ddaepp's."""
    v = sd[key].float().reshape(expected.shape) if sd[key].numel() == expected.numel() else None
    if v is None or not torch.allclose(v, expected.float(), atol=atol, rtol=0):
        raise UsageError(f"{path}: {key} differs from the table ddaepp computes for this geometry; the "
                         f"recipe's model section (size, patch, image size) must match the checkpoint")


def merge_drops(*drops: dict[str, list[str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for d in drops:
        for reason, keys in d.items():
            out.setdefault(reason, []).extend(keys)
    return out


def sha256(path: str | os.PathLike) -> str:
    from ..data.latents import sha256_file

    return sha256_file(path)
