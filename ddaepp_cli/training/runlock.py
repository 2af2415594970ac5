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


@contextmanager
def run_lock(run_dir: str | os.PathLike, *, rank: int | None = None) -> Iterator[None]:
    """Hold the run folder's lock for the body (creates the folder; removes it again if the body
    leaves it empty). UsageError (exit 2) when another process holds it or the path is unusable."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if rank != 0:
        yield
        return
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise UsageError(f"run directory {run_dir} exists and is not a folder")
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir, os.O_RDONLY)
    except OSError as e:
        raise UsageError(f"--run-dir {run_dir}: {e.strerror or e}") from None
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock, as before
            pass
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # e.g. a network file system without flock: say so and run unlocked
                print(f"warning: cannot lock {run_dir} ({e.strerror}); make sure no other train writes there",
                      file=sys.stderr)
            else:
                pid = lock_holder(fd)
                who = f"PID {pid}" if pid else "another process"
                raise UsageError(f"{run_dir} is in use: another `ddaepp train` ({who}) is writing to it; "
                                 f"wait for it to finish or stop it, or choose another --run-dir") from None
        yield
    finally:
        os.close(fd)  # releases the lock
        if created:
            try:
                run_dir.rmdir()  # only succeeds if nothing was written (a refusal before training)
            except OSError:
                pass
