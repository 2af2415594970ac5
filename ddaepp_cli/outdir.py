"""Output folders that commands create, and the only ones `--force` may replace.

A command that writes a folder of results (`sample --out`, `fid --save-samples`) builds it in a
temporary sibling and renames it into place. An existing folder is left alone unless it is empty,
or `--force` is given AND the folder is one this package wrote as a sample folder: its
`protocol.json` says `"command": "sample"` and it holds nothing but what `sample` writes
(`NNNNNN.png`, `samples.npz`, `grid.png`, `protocol.json`). Everything else — a file, the current
directory or one of its ancestors, a run folder or a folder holding one, any folder with a file
this package did not write — is refused with one line (exit 2), so `--force` never deletes what
it did not write.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import UsageError

SAMPLE_FILES = re.compile(r"^(\d{6,}\.png|samples\.npz|grid\.png|protocol\.json)$")


def _is_sample_folder(folder: Path) -> tuple[bool, str]:
    """(True, "") for a folder written by `sample`; else (False, why it is not)."""
    try:
        record = json.loads((folder / "protocol.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False, "it has no ddaepp protocol.json (not a folder written by `ddaepp sample`)"
    if not isinstance(record, dict) or record.get("command") != "sample":
        return False, "its protocol.json does not describe a ddaepp sample folder"
    foreign = sorted(p.name for p in folder.iterdir() if not (SAMPLE_FILES.match(p.name) and p.is_file()))
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        return False, f"it holds {foreign[0]!r}{more}, which ddaepp sample did not write"
    return True, ""


def check_output_folder(out: str | os.PathLike, *, force: bool = False, flag: str = "--out") -> None:
    """Refuse (UsageError) an output folder that may not be written or replaced; see the module doc.

    Read-only: safe to call on every rank of a multi-process launch before any work starts."""
    out = Path(out)
    try:
        if not out.exists():
            for parent in out.absolute().parents:  # `--out notes.txt/x`: a file where a folder must go
                if parent.exists():
                    if not parent.is_dir():
                        raise UsageError(f"{flag} {out}: {parent} is a file, not a folder")
                    break
            return
        if not out.is_dir():
            raise UsageError(f"{flag} {out} is a file; give a new folder name (a file is never replaced)")
        here, target = Path.cwd().resolve(), out.resolve()
        if target == here or target in here.parents:
            raise UsageError(f"{flag} {out} is the current directory or one of its parents; give a new folder")
        if not any(out.iterdir()):
            return  # empty: replaced by the new folder
        if (out / "recipe.yaml").is_file() or (out / "checkpoints").is_dir() or (out / "model.safetensors").exists():
            raise UsageError(f"{flag} {out} is a ddaepp run or checkpoint folder; it is never replaced "
                             f"(choose another folder)")
        if not force:
            raise UsageError(f"{flag} {out} exists and is not empty; choose another folder "
                             f"(--force replaces only a folder that ddaepp sample wrote)")
        ok, why = _is_sample_folder(out)
        if not ok:
            raise UsageError(f"{flag} {out} is not replaced by --force: {why}; choose another folder")
    except OSError as e:
        raise UsageError(f"{flag} {out}: {e.strerror or e}") from None


def replace_folder(tmp: Path, out: Path, *, flag: str = "--out") -> None:
    """Move the finished folder `tmp` to `out`. An existing `out` must pass `check_output_folder`
    with force (checked again here, just before it is replaced); it is renamed aside first, so a
    failure keeps the old folder."""
    if not out.exists():
        os.rename(tmp, out)
        return
    check_output_folder(out, force=True, flag=flag)
    if not any(out.iterdir()):
        out.rmdir()
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    for p in old.iterdir():  # only the files `_is_sample_folder` accepted
        if SAMPLE_FILES.match(p.name) and p.is_file():
            p.unlink()
    try:
        old.rmdir()
    except OSError:  # something appeared meanwhile: keep it rather than delete it
        pass

