"""Terminal output: results (tables, `--json`) go to stdout; progress, logs and errors to stderr.

`progress(total, desc)` is a rich progress bar with rate and ETA on a TTY and plain,
throttled lines otherwise (logs, CI, pipes). Only rank 0 shows anything.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)  # results tables: `ddaepp probe RUN > out.txt` keeps the table


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def info(msg: str) -> None:
    if is_main_process():
        err.print(msg, markup=False)


class _Plain:
    """Progress as plain lines every `every` seconds (and at the end)."""

    def __init__(self, total: int, desc: str, unit: str, every: float = 10.0):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done, self.t0, self.last = 0, time.perf_counter(), 0.0
        self.extra = ""

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        self.extra = extra or self.extra
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            el = now - self.t0
            rate = self.done / el if el > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            print(f"{self.desc}: {self.done}/{self.total} {self.unit} "
                  f"({rate:.2f} {self.unit}/s, eta {eta:.0f}s) {self.extra}".rstrip(),
                  file=sys.stderr, flush=True)


class _Rich:
    def __init__(self, prog, task):
        self.prog, self.task = prog, task

    def update(self, n: int = 1, extra: str = "") -> None:
        self.prog.update(self.task, advance=n, extra=extra)


class _Silent:
    def update(self, n: int = 1, extra: str = "") -> None:
        pass


@contextmanager
def progress(total: int, desc: str, unit: str = "it", *, start: int = 0) -> Iterator:
    if not is_main_process():
        yield _Silent()
        return
    if not err.is_terminal:
        bar = _Plain(total, desc, unit)
        bar.done = start
        yield bar
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn,
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn)

    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TaskProgressColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[extra]}"),
                    console=err, transient=False)
    with prog:
        task = prog.add_task(desc, total=total, completed=start, extra="")
        yield _Rich(prog, task)
