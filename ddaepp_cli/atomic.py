"""Atomic writes: the one helper every writer of ddaepp uses.

A file is written under a temporary name in its own folder, flushed to disk and renamed over the
final name, so a reader (or a crash) sees the old file or the new one, never half of one:

    with atomic_path(run / "eval" / "probe.json") as tmp:   # tmp keeps the suffix: libraries that
        tmp.write_text(text)                                 # pick a format by extension still work
    write_text_atomic(path, text)

A folder (a checkpoint) is written under a temporary name and swapped in with `replace_dir`. Replacing
an existing folder takes two renames (POSIX has no atomic folder exchange); the displaced copy is
kept as `.old-<name>-<pid>` until the new one is in place, and `recover_dirs` puts it back if a crash
fell between the two renames, so a complete copy of every folder exists at every instant.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (best effort: some file systems refuse it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def temp_name(path: Path) -> Path:
    """`.name.tmp-<pid>.suffix` beside `path`: hidden, unique per process, same extension."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`, else removed."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str, *, durable: bool = True) -> None:
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)


def write_text_new(path: str | os.PathLike, text: str) -> Path:
    """Write `text` at `path` unless the name is taken: an existing file is never replaced, the text goes to
    `<stem>-2<suffix>`, `-3`, … instead. Returns where it went.

    The complete text is written and flushed under a temporary name first. A hard link then gives it the
    free name atomically (a link fails when the name exists). Where the file system has no hard links,
    the name is claimed by an exclusive create (O_CREAT | O_EXCL: of several writers racing for one name
    exactly one gets it) and the text is renamed over that claim, which is its own empty file."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        fsync_file(tmp)
        target, k, linked = path, 1, True
        while True:
            try:
                if linked:
                    os.link(tmp, target)
                else:
                    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                    os.replace(tmp, target)  # over our own claim: never another writer's file
                break
            except FileExistsError:
                k += 1
                target = path.with_name(f"{path.stem}-{k}{path.suffix}")
            except OSError:
                if not linked:
                    raise
                linked = False  # no hard links on this file system: claim the name, then rename over it
        fsync_dir(path.parent)
        return target
    finally:
        tmp.unlink(missing_ok=True)


def file_mode() -> int:
    """The mode a new file gets under the current umask (0644 under umask 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def old_name(final: Path) -> Path:
    return final.with_name(f".old-{final.name}-{os.getpid()}")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder `tmp` to `final`, replacing a folder already there.

    Both are in the same parent. Every file in `tmp` must already be flushed (`fsync_file`)."""
    fsync_dir(tmp)
    if final.exists():
        old = old_name(final)
        os.rename(final, old)  # a crash here leaves `old` complete: recover_dirs renames it back
        os.rename(tmp, final)
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
        fsync_dir(final.parent)


_OLD = re.compile(r"^\.old-(?P<name>.+)-\d+$")


def recover_dirs(parent: Path) -> list[str]:
    """After a crash: restore each `.old-<name>-<pid>` whose `<name>` is missing, drop the others.

    Returns the names restored. Temporary folders of interrupted writes are left to the caller,
    which knows whose they are."""
    restored = []
    if not parent.is_dir():
        return restored
    for p in sorted(parent.iterdir()):
        m = _OLD.match(p.name)
        if not m or not p.is_dir():
            continue
        final = parent / m.group("name")
        if final.exists():
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.rename(p, final)
            restored.append(final.name)
    if restored:
        fsync_dir(parent)
    return restored
