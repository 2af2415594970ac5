"""Per-sample randomness: row i depends only on (seeds[i], stream), never on batch size or rank.

The same idea as EDM's `StackedRandomGenerator` (edm:generate.py): one `torch.Generator` per sample,
so `ddaepp sample --seeds 0-49999` gives the same images on 1 or 64 GPUs and at any `--batch-size`.
`stream` separates independent draws for the same sample: 0 is the initial noise x_T, a stochastic
sampler uses one stream per step (e.g. the DDPM step index), and a class-conditional sample's label
comes from `LABEL_STREAM` (`per_sample_randint`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .seedlist import MAX_SEED, parse_seeds  # noqa: F401  (torch-free: the CLI parses --seeds before torch)

_MASK64 = (1 << 64) - 1
# The stream of a sample's class label: far from the sampler's per-step streams (step indices < 2**16).
LABEL_STREAM = MAX_SEED


def _splitmix64(z: int) -> int:
    """SplitMix64 finaliser (Steele et al., 2014): a bijective 64-bit mix, so nearby keys look unrelated."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def generator_seed(seed: int, stream: int = 0) -> int:
    """The torch.Generator seed of one (sample seed, stream) pair.

    Stream 0 is the seed itself, so the initial noise matches EDM's StackedRandomGenerator exactly;
    other streams mix (seed, stream) into 64 bits whose low 32 bits are well spread.
    """
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed {seed} outside 0..{MAX_SEED}")
    if not 0 <= stream <= MAX_SEED:
        raise ValueError(f"stream {stream} outside 0..{MAX_SEED}")
    if stream == 0:
        return seed
    return _splitmix64((seed << 32) | stream)


def per_sample_randn(
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    stream: int = 0,
) -> Tensor:
    """Standard normal noise of shape (len(seeds), *shape); row i drawn from its own generator."""
    shape = tuple(shape)
    if len(seeds) == 0:
        return torch.empty((0, *shape), device=device, dtype=dtype)
    rows = []
    # A Python loop over the batch, one generator per sample: this is what makes a row independent
    # of its neighbours. Cost ~8 µs per row on CPU (one generator + one small randn); on a GPU it is
    # one kernel launch per row, noticeable only for 1000-step ancestral sampling.
    for seed in seeds:
        gen = torch.Generator(device=device).manual_seed(generator_seed(int(seed), stream))
        rows.append(torch.randn(shape, generator=gen, device=device, dtype=dtype))
    return torch.stack(rows)  # (B, *shape)


def per_sample_randint(seeds: Sequence[int], high: int, *, stream: int = LABEL_STREAM) -> list[int]:
    """One integer uniform in [0, high) per seed, `torch.randint` from that seed's own CPU generator on
    `stream`: entry i depends only on seeds[i] (not on the batch, the rank or the device)."""
    if high <= 0:
        raise ValueError(f"high must be positive, got {high}")
    out = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(generator_seed(int(seed), stream))
        out.append(int(torch.randint(high, (1,), generator=gen)))
    return out
