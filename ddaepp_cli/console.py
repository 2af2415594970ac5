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
    """Progress as plain lines every `every` seconds (and at the end). Rates count only the units done by
    this process: a run resumed at step 9990 of 10000 must not credit itself with the first 9990."""

    def __init__(self, total: int, desc: str, unit: str, every: float = 10.0, *, start: int = 0,
                 clock=time.perf_counter):
        self.total, self.desc, self.unit, self.every, self.clock = total, desc, unit, every, clock
        self.start = self.done = start
        self.t0, self.last = clock(), None
        self.extra = ""

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        self.extra = extra or self.extra
        now = self.clock()
        if self.last is None or now - self.last >= self.every or self.done >= self.total:
            self.last = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        el, ran = now - self.t0, self.done - self.start
        rate = ran / el if el > 0 else 0.0
        if self.done >= self.total:  # the summary: this session's units over its wall time
            units = self.unit if ran == 1 else self.unit + ("es" if self.unit.endswith("ch") else "s")
            timing = f"{ran} {units} in {el:.1f}s, {rate:.2f} {self.unit}/s"
        elif ran > 0:
            timing = f"{rate:.2f} {self.unit}/s, eta {(self.total - self.done) / rate:.0f}s"
        else:
            timing = "eta ?"
        return f"{self.desc}: {self.done}/{self.total} {self.unit} ({timing}) {self.extra}".rstrip()


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
        yield _Plain(total, desc, unit, start=start)
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn,
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn)

    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TaskProgressColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[extra]}"),
                    console=err, transient=False)
    with prog:
        task = prog.add_task(desc, total=total, completed=start, extra="")
        yield _Rich(prog, task)
