"""`metrics.jsonl`: one JSON line per logging step (loss, grad norm, lr, img/s, skipped steps).

Losses are means over the interval's applied steps and over processes. On (re)start the file is cut to
the lines at or before the step training resumes from — step 0 included: a run killed before its first
checkpoint starts again at step 0 and must not append to the lines it logged before — so after any
restart each step appears once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..atomic import write_text_atomic


def read_metrics(file: Path) -> list[dict]:
    """The logged lines of a `metrics.jsonl`, oldest first; a line cut by a kill is skipped."""
    if not file.is_file():
        return []
    records = []
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    return records


def truncate_metrics(file: Path, step: int) -> None:
    """Drop metric lines logged after `step` (they will be logged again)."""
    if not file.is_file():
        return
    keep = []
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    write_text_atomic(file, "".join(k + "\n" for k in keep))


class MetricsLog:
    """Running sums between logging steps; `write` appends one line (rank 0) and resets them."""

    def __init__(self, file: Path, *, device: torch.device, global_batch: int, reduce_mean, main: bool):
        self.file, self.global_batch, self.reduce_mean, self.main = file, global_batch, reduce_mean, main
        self.loss_sum = torch.zeros((), device=device)
        self.part_sums: dict[str, torch.Tensor] = {}
        self.steps = self.good = 0
        self.t0 = time.perf_counter()

    def add(self, result) -> None:
        self.steps += 1
        if result.applied:  # skipped steps are not in the mean; they are counted in nonfinite_skipped
            self.loss_sum += result.loss
            for k, v in result.parts.items():
                self.part_sums[k] = self.part_sums.get(k, 0.0) + v
            self.good += 1

    def write(self, *, step: int, epoch: float, grad_norm: float, lr: float, nonfinite: int) -> dict:
        def mean(v):
            return self.reduce_mean(v).item() / self.good if self.good else None

        now = time.perf_counter()
        rec = {"step": step, "epoch": epoch, "loss": mean(self.loss_sum), "grad_norm": grad_norm, "lr": lr,
               "img_per_s": self.steps * self.global_batch / max(now - self.t0, 1e-9), "nonfinite_skipped": nonfinite}
        rec.update({k: mean(v) for k, v in self.part_sums.items()})
        if self.main:
            with open(self.file, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        self.loss_sum.zero_()
        self.part_sums.clear()
        self.steps = self.good = 0
        self.t0 = now
        return rec
