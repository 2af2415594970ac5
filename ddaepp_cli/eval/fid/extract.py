"""Inception features of every image of a source, sharded over processes, gathered on rank 0 only.

Each rank reads its share — contiguous blocks for files (sequential reads), every world-th index
for seeds (`strided`, as `ddaepp sample`) — and sends it to rank 0, which orders the rows by index.
The other ranks keep nothing: 50k×(2048 + 2023 + 1008) float32 features are ~1 GB, and 50k 256²
images ~9.8 GB, which used to be copied to every rank.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch

from .. import inception
from ...console import progress
from ...distributed import Dist
from .constants import SPATIAL, SPATIAL_CHANNELS
from .sources import ImageSource, _rgb


@contextmanager
def _no_tf32(device: torch.device):
    """float32 Inception on an NVIDIA GPU must not silently use TF32 convolutions/matmuls."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def my_indices(n: int, dist: Dist, strided: bool) -> list[int]:
    return (list(range(dist.rank, n, dist.world)) if strided
            else list(range(dist.rank * n // dist.world, (dist.rank + 1) * n // dist.world)))


@torch.no_grad()
def extract(source: ImageSource, extractor, layers: Sequence[str], dist: Dist, *, batch_size: int, desc: str,
            keep_images: bool = False, strided: bool = False,
            ) -> tuple[dict[str, torch.Tensor] | None, torch.Tensor | None]:
    """Features {layer: (N, D) float32} of every image of `source`, in index order, on the CPU of rank 0
    (`layers`: the extractor's own outputs, plus `SPATIAL` for sFID); (None, None) on the other ranks.
    With `keep_images`, also the uint8 images (N, 3, H, W) on rank 0."""
    n = len(source)
    mine = my_indices(n, dist, strided)
    spatial = SPATIAL if SPATIAL in layers else None
    out: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    kept = []
    with _no_tf32(dist.device), progress(len(mine), desc, "img") as bar:
        for i in range(0, len(mine), batch_size):
            chunk = mine[i:i + batch_size]
            images = _rgb(source.read(chunk))  # (b, 3, H, W) uint8
            feats = inception.features(extractor, images.to(dist.device), list(layers), spatial=spatial,
                                       channels=SPATIAL_CHANNELS)
            for name in layers:
                out[name].append(feats[name].cpu())
            if keep_images:
                kept.append(images.cpu())
            bar.update(len(chunk))
    mine_feats = {name: torch.cat(v) if v else torch.zeros(0, 1) for name, v in out.items()}
    mine_images = torch.cat(kept) if kept else None
    if dist.world == 1:
        return mine_feats, mine_images
    parts = dist.gather_to_main((mine, mine_feats, mine_images))
    del mine_feats, mine_images, out, kept
    if parts is None:  # not rank 0: nothing is kept here
        return None, None
    index = torch.cat([torch.as_tensor(p[0], dtype=torch.int64) for p in parts])
    order = torch.argsort(index)
    feats = {name: torch.cat([p[1][name] for p in parts if len(p[0])])[order] for name in layers}
    images = torch.cat([p[2] for p in parts if p[2] is not None])[order] if keep_images else None
    return feats, images
