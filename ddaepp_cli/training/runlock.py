"""One writer per run folder: an exclusive `flock` on the run folder itself while `train` runs.

Two `ddaepp train … --run-dir X` at once would interleave checkpoints and metrics lines. The first
takes an exclusive lock on the folder X (flock(2) on a descriptor of the directory, so nothing is
written into the folder for it); a second one exits 2 naming the holder's PID (read from
/proc/locks on Linux). The kernel releases the lock when the holder exits, however it exits — a
SIGKILLed run leaves no stale lock, and re-running the command resumes at once.

In a multi-process launch only global rank 0 takes the lock (the launch is one writer); when it
exits on refusal, the launcher stops the other ranks.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import UsageError


def lock_holder(fd: int) -> int | None:
    """PID of the process holding a flock on the file behind `fd` (Linux /proc/locks), else None."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:  # "1: FLOCK  ADVISORY  WRITE 6599 fe:00:2147620 0 EOF" ("->" marks waiters)
        parts = line.split()
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        pid, where = parts[4], parts[5]
        if where == dev:
            return int(pid)
        if where.rsplit(":", 1)[-1] == str(st.st_ino):  # overlay file systems may report another device
            candidates.append(int(pid))
    return candidates[0] if len(candidates) == 1 else None


def _same_folder(fd: int, run_dir: Path) -> bool:
    """Whether `run_dir` still names the folder open as `fd` (not removed, nor replaced by another)."""
    try:
        st, now = os.fstat(fd), os.stat(run_dir)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


@contextmanager
def run_lock(run_dir: str | os.PathLike, *, rank: int | None = None) -> Iterator[None]:
    """Hold the run folder's lock for the body (creates the folder; the holder removes it again, still
    holding the lock, if the body leaves it empty). UsageError (exit 2) when another process holds it or
    the path is unusable.

    A lock is only as good as the folder it is on. A refused process never removes the folder (it is the
    holder's), and a process that gets the lock checks that the path still names the folder it locked: one
    removed (by a holder that left it empty) or replaced in between is locked afresh, so two processes can
    never both hold "the" lock of one path."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if rank != 0:
        yield
        return
    run_dir = Path(run_dir)
    while True:
        created, fd = _open_folder(run_dir)
        try:
            locked = _lock(fd, run_dir)
        except BaseException:
            os.close(fd)
            raise
        if not locked or _same_folder(fd, run_dir):
            break
        os.close(fd)  # the folder went away before we held its lock: lock the one the path names now
    try:
        yield
    finally:
        if created and locked:
            try:
                run_dir.rmdir()  # still locked: only succeeds if nothing was written (a refusal before training)
            except OSError:
                pass
        os.close(fd)  # releases the lock


def _open_folder(run_dir: Path) -> tuple[bool, int]:
    """(whether this call created it, a descriptor of the folder)."""
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise UsageError(f"run directory {run_dir} exists and is not a folder")
        # Test hook: DDAEPP_TEST_LOCK_DELAY=SECONDS widens the window between looking and locking, so that
        # racing `train`s interleave there (tests/test_agreement.py).
        time.sleep(float(os.environ.get("DDAEPP_TEST_LOCK_DELAY", "0")))
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            run_dir.mkdir()
            created = True
        except FileExistsError:
            created = False
        return created, os.open(run_dir, os.O_RDONLY)
    except OSError as e:
        raise UsageError(f"--run-dir {run_dir}: {e.strerror or e}") from None


def _lock(fd: int, run_dir: Path) -> bool:
    """Take the exclusive lock (True), or go on unlocked where the file system has none (False, with a
    warning); UsageError naming the holder when another process has it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            # e.g. a network file system without flock: say so and run unlocked
            print(f"warning: cannot lock {run_dir} ({e.strerror}); make sure no other train writes there",
                  file=sys.stderr)
            return False
        pid = lock_holder(fd)
        who = f"PID {pid}" if pid else "another process"
        raise UsageError(f"{run_dir} is in use: another `ddaepp train` ({who}) is writing to it; "
                         f"wait for it to finish or stop it, or choose another --run-dir") from None
