"""Self-describing, atomically written checkpoints.

    checkpoints/step-0001000/
      model.safetensors   raw weights      (metadata: recipe YAML, step, kind)
      ema.safetensors     EMA weights      (same metadata)
      state.pt            optimizer, scheduler, scaler, EMA counter, step, data position,
                          the shared batch generator and every rank's RNG state
                          (tensors and plain Python values only: loaded with weights_only=True)
      recipe.yaml         the resolved recipe that made it

A checkpoint is written into `checkpoints/.tmp-step-…` and renamed into place (atomic.replace_dir), so
a crash or a kill during a save never leaves a half-written `step-*` folder; the previous one stays
intact. Re-saving a step that already has a folder keeps the old copy as `.old-step-…` until the new one
is in place; a crash between the two renames is repaired by `recover_checkpoints` on the next start.

A checkpoint damaged after it was written (a truncated copy, a full disk while copying a run, a file
removed) is found before anything is loaded: `checkpoint_problem` checks each file's structure without
reading a tensor. Resuming from an earlier step (`ddaepp train --resume-from STEP`) moves the newer
checkpoint folders aside as `set-aside-step-N` (`set_aside_checkpoints`): a name no reader takes for a
checkpoint, that `keep_last` never counts or prunes, and that a later save of step N never touches.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import file_mode, fsync_dir, fsync_file, recover_dirs, replace_dir
from .errors import UsageError
from .recipe import Recipe, recipe_from_dict, recipe_to_yaml

STEP_DIR = re.compile(r"^step-(\d{7,})$")
OLD_STEP_DIR = re.compile(r"^\.old-step-(\d{7,})-\d+$")
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "state.pt")  # what resuming reads
SET_ASIDE_PREFIX = "set-aside-"  # + step-N[-K]: matches none of the patterns above, nor `.tmp-step-*`


class CorruptCheckpoint(UsageError):
    """A checkpoint file that is missing, truncated or not what ddaepp wrote (exit 2)."""


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def checkpoint_step(ckpt: str | os.PathLike) -> int | None:
    """The step of a checkpoint folder: `step-N`, or `.old-step-N-PID` (a copy displaced by a re-save that
    crashed, see `list_checkpoints`); None for any other name."""
    name = Path(ckpt).name
    m = STEP_DIR.match(name) or OLD_STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    displaced: dict[int, Path] = {}  # `.old-step-N-pid`: the only copy if a re-save crashed mid-swap
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            found[int(m.group(1))] = p
        m = OLD_STEP_DIR.match(p.name)
        if m and p.is_dir():
            displaced[int(m.group(1))] = p
    for step, p in displaced.items():
        found.setdefault(step, p)
    return sorted(found.items())


def recover_checkpoints(run_dir: str | os.PathLike) -> list[str]:
    """Writer only (train, at start): put back checkpoints displaced by a re-save that crashed."""
    return recover_dirs(Path(run_dir) / "checkpoints")


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def _safetensors_problem(file: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensor bytes up to the largest
    end offset the header names: its size is known without reading a tensor."""
    size = file.stat().st_size
    if size < 10:
        return f"is truncated ({size} bytes)"
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        first = fh.read(1)
        if first != b"{" or n < 2:
            return "is not a safetensors file"
        if n > size - 8:
            return f"is truncated ({size:,} bytes, its header alone needs {n + 8:,})"
        try:
            header = json.loads(first + fh.read(n - 1))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "is not a safetensors file (unreadable header)"
    want = 8 + n + end
    if size < want:
        return f"is truncated ({size:,} of {want:,} bytes)"
    if size > want:
        return f"has {size - want:,} bytes past its end (not as ddaepp wrote it)"
    return None


def _state_problem(file: Path) -> str | None:
    """torch.save writes a zip archive whose directory is at the end of the file: a cut file has none."""
    try:
        with zipfile.ZipFile(file) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        with open(file, "rb") as fh:
            magic = fh.read(4)
        if magic == b"PK\x03\x04":
            return f"is truncated ({file.stat().st_size:,} bytes, the end of the archive is missing)"
        return "is not a training state written by ddaepp (not a torch.save archive)"
    if not any(n.endswith("/data.pkl") for n in names):
        return "is not a training state written by ddaepp (no data.pkl in the archive)"
    return None


def checkpoint_problem(ckpt: str | os.PathLike) -> str | None:
    """Why checkpoint folder `ckpt` cannot be resumed from, as a phrase naming each damaged file
    ("ema.safetensors is truncated (…), state.pt is missing"), or None when every file it needs is there and
    complete. Structure only, no tensor is read: cheap enough for every checkpoint of a run. Damage inside a
    complete file is found when it is loaded."""
    ckpt = Path(ckpt)
    problems = []
    for name in CHECKPOINT_FILES:
        f = ckpt / name
        if not f.is_file():
            problems.append(f"{name} is missing")
            continue
        try:
            why = _safetensors_problem(f) if name.endswith(".safetensors") else _state_problem(f)
        except OSError as e:
            why = f"cannot be read ({e.strerror or type(e).__name__})"
        if why:
            problems.append(f"{name} {why}")
    return ", ".join(problems) or None


def set_aside_name(ckpt: Path) -> Path:
    """`checkpoints/set-aside-step-N`, or `…-2`, `-3`, … when taken: never read as a checkpoint."""
    target = ckpt.with_name(SET_ASIDE_PREFIX + ckpt.name)
    k = 1
    while target.exists():
        k += 1
        target = ckpt.with_name(f"{SET_ASIDE_PREFIX}{ckpt.name}-{k}")
    return target


def set_aside_checkpoints(ckpts: list[Path]) -> list[Path]:
    """Writer only: rename checkpoint folders to `set_aside_name` (nothing is deleted); returns the new paths."""
    out = []
    for ckpt in ckpts:
        target = set_aside_name(ckpt)
        os.rename(ckpt, target)
        out.append(target)
    if ckpts:
        fsync_dir(ckpts[0].parent)
    return out


def _state_dict_for_save(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous tensors: clone what needs it.
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    recipe: Recipe,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    state: dict[str, Any],
    keep_last: int = 3,
    milestones: tuple[int, ...] = (),
) -> Path:
    """Write checkpoint `step` atomically, then prune old ones (keep-last-K plus milestones)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    recipe_yaml = recipe_to_yaml(recipe)
    meta = {"recipe": recipe_yaml, "step": str(step), "format": "ddaepp-1"}
    try:
        tmp.mkdir()
        save_file(_state_dict_for_save(model), str(tmp / "model.safetensors"), metadata={**meta, "kind": "raw"})
        # Test hook: DDAEPP_TEST_SAVE_DELAY=SECONDS pauses mid-save so fault tests can kill the writer there.
        time.sleep(float(os.environ.get("DDAEPP_TEST_SAVE_DELAY", "0")))
        save_file(_state_dict_for_save(ema), str(tmp / "ema.safetensors"), metadata={**meta, "kind": "ema"})
        torch.save(state, tmp / "state.pt")
        (tmp / "recipe.yaml").write_text(recipe_yaml, encoding="utf-8")
        mode = file_mode()
        for f in tmp.iterdir():
            os.chmod(f, mode)  # safetensors creates its files 0600; make them like every other file
            fsync_file(f)
        replace_dir(tmp, final)  # re-saving a step (e.g. a resumed run that saves its start step) is safe
    except (OSError, SafetensorError, RuntimeError) as e:  # safetensors/torch.save wrap I/O errors (full disk)
        shutil.rmtree(tmp, ignore_errors=True)
        why = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise UsageError(f"could not write checkpoint {final}: {why}; earlier checkpoints are kept") from None
    prune_checkpoints(run_dir, keep_last=keep_last, milestones=milestones)
    return final


def prune_checkpoints(run_dir: str | os.PathLike, *, keep_last: int, milestones: tuple[int, ...] = ()) -> None:
    recover_checkpoints(run_dir)  # never count (or delete) a displaced copy as a leftover
    ckpts = list_checkpoints(run_dir)
    keep = {s for s, _ in ckpts[-keep_last:]} | set(milestones)
    for s, p in ckpts:
        if s not in keep:
            shutil.rmtree(p, ignore_errors=True)
    # Leftovers of interrupted saves by earlier processes.
    root = Path(run_dir) / "checkpoints"
    for p in root.glob(".tmp-step-*"):
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """RUN_OR_CKPT → a checkpoint folder: a run folder gives its latest checkpoint (with several processes,
    rank 0's answer: distributed.from_rank0)."""
    from .distributed import from_rank0

    return from_rank0(lambda: _resolve_checkpoint(path))


def _resolve_checkpoint(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"no such run or checkpoint: {p}")
    if p.is_file():
        if p.suffix == ".safetensors":
            return p.parent
        raise UsageError(f"{p} is not a run folder, checkpoint folder or .safetensors file")
    if (p / "model.safetensors").exists() or (p / "ema.safetensors").exists():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise UsageError(f"{p} holds no checkpoint (expected {p}/checkpoints/step-*/ or model.safetensors)")
    return latest


def select_checkpoints(path: str | os.PathLike, spec: str | None = None) -> list[Path]:
    """RUN_OR_CKPT plus `--checkpoints WHICH` → checkpoint folders, oldest first.

    spec None / "latest": the latest (or the given checkpoint); "all": every complete checkpoint of
    the run; "100000,200000" or "step-0100000,…": those steps. DDAE++ Tab. 2 reports the best of
    several checkpoints, so evaluation commands take more than one. With several processes, rank 0's
    list (distributed.from_rank0).
    """
    from .distributed import from_rank0

    return from_rank0(lambda: _select_checkpoints(path, spec))


def _select_checkpoints(path: str | os.PathLike, spec: str | None) -> list[Path]:
    if spec is None or spec.strip() in ("", "latest"):
        return [_resolve_checkpoint(path)]
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"--checkpoints needs a run folder, got {p}")
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise UsageError(f"{p} holds no checkpoint (expected {p}/checkpoints/step-*/)")
    if spec.strip() == "all":
        return [c for _, c in ckpts]
    by_step = dict(ckpts)
    out = []
    for item in spec.split(","):
        item = item.strip()
        m = STEP_DIR.match(item)
        try:
            step = int(m.group(1)) if m else int(item)
        except ValueError:
            raise UsageError(f"--checkpoints: {item!r} is not a step number; use all, latest or a list "
                             f"such as 100000,200000") from None
        if step not in by_step:
            have = ", ".join(str(s) for s in sorted(by_step))
            raise UsageError(f"--checkpoints: {p} has no checkpoint at step {step}; it has: {have}")
        if by_step[step] not in out:
            out.append(by_step[step])
    return sorted(out)


def read_weights(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; truncated/foreign files are a UsageError."""
    if not file.is_file():
        raise CorruptCheckpoint(f"missing weights file {file}")
    try:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CorruptCheckpoint(f"cannot read {file} (truncated or not a safetensors file): {first}") from None
    return tensors, metadata


def checkpoint_recipe(ckpt: Path) -> Recipe:
    """The recipe stored with a checkpoint (recipe.yaml, else the weights' metadata)."""
    import yaml

    text = None
    if (ckpt / "recipe.yaml").is_file():
        text = (ckpt / "recipe.yaml").read_text(encoding="utf-8")
    else:
        for name in ("ema.safetensors", "model.safetensors"):
            if (ckpt / name).is_file():
                _, meta = read_weights(ckpt / name)
                text = meta.get("recipe")
                if text:
                    break
    if not text:
        raise UsageError(f"{ckpt} carries no recipe (not written by ddaepp?)")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        raise UsageError(f"{ckpt}: stored recipe is not valid YAML") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{ckpt}: stored recipe is not a mapping")
    return recipe_from_dict(raw)


def layout_mismatch(found: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]]) -> str | None:
    """One phrase naming how a state dict's {key: shape} differs from the expected one; None if it does not."""
    missing = [k for k in want if k not in found]
    unexpected = [k for k in found if k not in want]
    shape = [k for k in want if k in found and tuple(found[k]) != tuple(want[k])]
    parts = []
    if missing:
        parts.append(f"{len(missing)} keys missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if shape:
        k = shape[0]
        parts.append(f"{len(shape)} with other shapes (e.g. {k}: {tuple(found[k])}, expected {tuple(want[k])})")
    return ", ".join(parts) or None


def load_weights_into(module: torch.nn.Module, file: Path, what: str) -> dict[str, str]:
    """Strictly load a safetensors file into `module`, explaining any mismatch in one line."""
    tensors, meta = read_weights(file)
    own = module.state_dict()
    problem = layout_mismatch({k: v.shape for k, v in tensors.items()}, {k: v.shape for k, v in own.items()})
    if problem:
        raise UsageError(f"{file} does not match the {what}: {problem}")
    module.load_state_dict(tensors, strict=True)
    return meta


def load_training_state(ckpt: Path) -> dict[str, Any]:
    """state.pt of a checkpoint; a missing, truncated or foreign file is one line (CorruptCheckpoint) saying
    so — not torch's message, whose advice (weights_only=False) would run whatever the file holds."""
    file = ckpt / "state.pt"
    if not file.is_file():
        raise CorruptCheckpoint(f"checkpoint {ckpt} is incomplete: state.pt is missing")
    why = _state_problem(file)
    if why is None:
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # damage inside a complete archive, a pickle refused by weights_only, …
            why = f"cannot be loaded ({type(e).__name__}: the file is damaged or not written by ddaepp)"
    raise CorruptCheckpoint(f"checkpoint {ckpt} is corrupt: state.pt {why}")
