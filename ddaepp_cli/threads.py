"""CPU threads per process: each of this machine's processes gets its share of the cores, never more.

torch's default is one intra-op thread per physical core of the whole machine, whatever the process may
use and however many processes run beside it. Two processes on 2 cores then run 4 spinning OpenMP
threads, and a CPU quickstart that shares its machine with one other job trains ~6x slower than with one
thread each. So, unless the user said otherwise (`--threads N`, or `OMP_NUM_THREADS`, which torch, NumPy
and every OpenMP library read at start-up), a process uses

    physical cores it may run on (affinity mask, cgroup CPU quota) // processes of this launch on the node

(`LOCAL_WORLD_SIZE`, set by torchrun and `accelerate launch`). Nothing here imports torch: the choice is
written to `OMP_NUM_THREADS` before torch is first imported, and torch reads it from there.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import MutableMapping

from .errors import UsageError

ENV = "OMP_NUM_THREADS"


def cgroup_cpu_limit(cpu_max: str) -> int | None:
    """Whole CPUs of a cgroup v2 `cpu.max` line ("200000 100000" → 2; "max 100000" → None: no quota)."""
    fields = cpu_max.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return max(1, math.floor(quota / period)) if quota > 0 and period > 0 else None


def usable_cores() -> int:
    """Physical cores this process may run on: CPUs of its affinity mask with hyper-thread siblings counted
    once (Linux sysfs topology; one per CPU elsewhere), capped by a cgroup v2 CPU quota (containers)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    n = max(1, len(cores))
    try:
        limit = cgroup_cpu_limit(Path("/sys/fs/cgroup/cpu.max").read_text())
    except OSError:
        limit = None
    return min(n, limit) if limit else n


def default_threads(cores: int, environ: MutableMapping[str, str] = os.environ) -> int:
    """One share of `cores` per process of this launch on this node (at least one thread)."""
    try:
        local = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, cores // local)


def set_default(environ: MutableMapping[str, str] = os.environ) -> int | None:
    """At start-up, before torch is imported: `OMP_NUM_THREADS` = `default_threads`, unless it is set
    already (the user's or the launcher's choice wins). Returns what it set, or None."""
    if environ.get(ENV, "").strip():
        return None
    n = default_threads(usable_cores(), environ)
    environ[ENV] = str(n)
    return n


def use_threads(n: int | None, environ: MutableMapping[str, str] = os.environ) -> None:
    """`--threads N`: this process computes with N intra-op threads (also when torch is loaded already)."""
    if n is None:
        return
    if n < 1:
        raise UsageError(f"--threads must be 1 or more, got {n}")
    environ[ENV] = str(n)
    if "torch" in sys.modules:  # imported already (a notebook, the tests): the variable is read only once
        sys.modules["torch"].set_num_threads(n)


def busy_hint(threads: int, *, load: float | None = None, cores: int | None = None) -> str | None:
    """A line for a CPU run about to compute with several threads on cores other jobs already keep busy
    (1-minute load average ≥ the usable cores), else None. Measured on 2 cores shared with other jobs:
    the quickstart ran 0.17 step/s with 2 threads and 2.38 step/s with 1."""
    if threads <= 1:
        return None
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # not on every platform
            return None
    cores = usable_cores() if cores is None else cores
    if load < cores:
        return None
    return (f"note: this machine is busy (load average {load:.1f} on {cores} cores) and this process computes "
            f"with {threads} threads; with other jobs on the same cores one thread is often several times "
            f"faster: --threads 1 (or OMP_NUM_THREADS=1)")
