"""Interleaved timing: variants run round-robin so that drifts in machine load hit every variant alike
(the order is shuffled each round, so no variant always follows the same one).

Only ratios of variants measured in the same `time_interleaved` call mean anything on a shared machine.
Besides per-variant medians it keeps every round's samples, so a ratio can also be read *paired*
(variant A ÷ variant B within each round), whose spread says how noisy the machine was.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work (a no-op on the CPU)."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


@dataclass
class Timings:
    """Seconds per call of each variant: every round's sample and the median."""

    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def median(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.samples.items()}

    @property
    def rounds(self) -> int:
        return min((len(v) for v in self.samples.values()), default=0)

    def ratio(self, num: str, den: str) -> float:
        """The headline ratio num/den: the median of the per-round (paired) ratios. Rounds are
        interleaved, so a load change between rounds cancels out of each round's ratio."""
        return self.paired(num, den)["median"]

    def ratio_of_medians(self, num: str, den: str) -> float:
        m = self.median
        return m[num] / m[den]

    def paired(self, num: str, den: str) -> dict[str, float]:
        """Per-round ratios num/den: their median and half the inter-quartile range (noise)."""
        r = sorted(a / b for a, b in zip(self.samples[num], self.samples[den]))
        if len(r) < 4:
            spread = (r[-1] - r[0]) / 2 if r else math.nan
        else:
            q = statistics.quantiles(r, n=4)
            spread = (q[2] - q[0]) / 2
        return {"median": statistics.median(r), "half_iqr": spread, "min": r[0], "max": r[-1], "n": len(r),
                "ratio_of_medians": self.ratio_of_medians(num, den)}


def time_interleaved(steps: dict[str, Callable[[], object]], reps: int, warmup: int = 1, *,
                     warm: list[Callable[[], object]] | None = None, budget_s: float | None = None,
                     min_reps: int = 3, device: torch.device | str | None = None) -> Timings:
    """Median seconds per call of each variant, measured round-robin.

    First `warmup` untimed rounds of every variant (allocator, Adam state, first-touch of memory), or,
    when `warm` is given, one untimed call of each of those callables instead (variants sharing one
    model and optimiser need a single warm-up between them). Then up to `reps` timed rounds; with
    `budget_s`, rounds stop once that many seconds have passed since the first timed round, but never
    before `min_reps` rounds (medians need a few samples).
    """
    for fn in warm if warm is not None else [f for _ in range(warmup) for f in steps.values()]:
        fn()
        sync(device)
    out = Timings({k: [] for k in steps})
    keys = list(steps)
    rng = random.Random(0)
    start = time.perf_counter()
    for i in range(reps):
        if budget_s is not None and i >= min_reps and time.perf_counter() - start > budget_s:
            break
        # a fresh order each round (seeded): no variant always runs right after the same one, whose
        # memory traffic would otherwise bias it consistently (caches, allocator, page faults)
        order = keys[:] if i == 0 else rng.sample(keys, len(keys))
        for k in order:
            fn = steps[k]
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            out.samples[k].append(time.perf_counter() - t0)
    return out
