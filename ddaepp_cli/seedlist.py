"""`--seeds` lists, parsed without torch (the CLI checks its arguments before importing it; seeding.py
re-exports both names)."""

from __future__ import annotations

import re
from collections import Counter

from .errors import UsageError

# Seeds are kept below 2**32: torch's CPU generator (mt19937) only uses the low 32 bits of its seed,
# so larger seeds would silently collide with smaller ones; EDM takes `seed % 2**32` for the same reason.
MAX_SEED = (1 << 32) - 1

_ITEM = re.compile(r"(\d+)(?:-(\d+))?")


def parse_seeds(text: str) -> list[int]:
    """`"0-99"` → [0, ..., 99]; `"3,5,9"` → [3, 5, 9]; ranges and single seeds may be mixed (`"0-3,7"`)."""
    seeds: list[int] = []
    for item in str(text).split(","):
        item = item.strip()
        match = _ITEM.fullmatch(item)
        if match is None:
            raise UsageError(
                f"bad seeds '{text}': give non-negative integers as a range (0-99) or a list (3,5,9)"
            )
        first = int(match[1])
        last = int(match[2]) if match[2] is not None else first
        if last < first:
            raise UsageError(f"seed range '{item}' is inverted: write {last}-{first}")
        if last > MAX_SEED:
            raise UsageError(f"seed {last} is too large: seeds go from 0 to {MAX_SEED}")
        seeds.extend(range(first, last + 1))
    if len(set(seeds)) != len(seeds):
        repeated = sorted(s for s, n in Counter(seeds).items() if n > 1)[:5]
        raise UsageError(f"seeds '{text}' repeat {repeated}: each seed gives one image, list it once")
    return seeds
