"""Feature sources of `ddaepp probe` (probe.py): pooled frozen features of every (layer, time) per batch.

`LiveFeatures` recomputes them for every batch (fresh flips and noise: DDAE §3.2) with one forward per
time stopping after the deepest requested layer; `CachedFeatures` computes them once per flip state
(`--cache-features`); `RawLatentFeatures` is DDAE++ Tab. 4's flattened clean VAE latent. Inputs are
loader batches: uint8 images, or cached latent pairs (B, 2, C, h, w) whose second entry is the mirror's
own encoding (features.model_input / model_views / augmented_input). With several processes each rank
runs the backbone on its share of the batch and the features are all-gathered (probe.py's module doc).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..console import info, progress
from ..data import hflip_mask
from ..distributed import Dist
from .features import (Time, augmented_input, dataset_labels, model_input, model_views, noised_features,
                       ordered_batches, per_batch_generator)

# Generator streams of the per-batch draws: training step s uses TRAIN + s, evaluation batch b EVAL + b.
TRAIN_STREAM, CACHE_STREAM, VAL_STREAM, TEST_STREAM = 1, 1 << 30, 1 << 31, 3 << 30


RAW_LAYER = "latent"  # `--layers latent`: the raw-latent baseline (RawLatentFeatures)
RAW_TIME = Time("clean", 0.0)


def key_of(layer: str, t: Time) -> str:
    return f"{layer}@{t.text}"


class LiveFeatures:
    """Features recomputed for every batch: fresh augmentation and noise each time (DDAE §3.2).

    One backbone forward per time per batch, stopping after the deepest requested layer; the keys
    are ordered time-major (`out_6@1, out_7@1, …, out_6@11, …`). With several processes (`dist`)
    each rank runs the backbone on its share of the batch and the features are gathered (module doc).
    """

    needs_images = True

    def __init__(self, model, formulation, layers: Sequence[str], times: Sequence[Time], *, device, precision: str,
                 hflip: bool, crop_pad: int, seed: int, dist: Dist | None = None):
        self.model, self.formulation = model, formulation
        self.layers, self.times = list(layers), list(times)
        self.device, self.precision = device, precision
        self.hflip, self.crop_pad, self.seed = hflip, crop_pad, seed
        self.dist = dist if dist is not None and dist.world > 1 else None
        self.keys = [key_of(layer, t) for t in self.times for layer in self.layers]
        self.dims = [model.feature_dims[layer] for _ in self.times for layer in self.layers] if model is not None else []

    def features(self, x0: Tensor, noise: Tensor) -> list[Tensor]:
        """Pooled features (B, C) of every key for the batch x0 noised with `noise` (the whole batch on
        every rank; with several processes the backbone sees only this rank's share)."""
        n = x0.shape[0]
        if self.dist is not None:
            part = self.dist.share(n)
            x0, noise = x0[part], noise[part]
        if x0.shape[0] == 0:  # more ranks than images in this batch
            out = [x0.new_zeros((0, c), dtype=torch.float32) for c in self.dims]
        else:
            out = self._compute(x0, noise)
        if self.dist is None:
            return out
        flat = self.dist.all_gather_rows(torch.cat(out, 1), n)  # one collective for every key: (B, ΣC)
        return list(flat.split(self.dims, 1))

    def _compute(self, x0: Tensor, noise: Tensor) -> list[Tensor]:
        out = []
        for t in self.times:
            f = noised_features(self.model, self.formulation, x0, t.value, self.layers, noise=noise,
                                precision=self.precision)
            out += [f[layer] for layer in self.layers]  # (b, C) each
        return out

    def train_batch(self, images: Tensor, step: int) -> list[Tensor]:
        g = per_batch_generator(self.device, self.seed, TRAIN_STREAM + step)
        x0 = augmented_input(images, hflip=self.hflip, crop_pad=self.crop_pad, generator=g)
        return self.features(x0, torch.randn(x0.shape, generator=g, device=self.device))

    def eval_batch(self, images: Tensor, stream: int) -> list[Tensor]:
        g = per_batch_generator(self.device, self.seed, stream)
        x0 = model_input(images)
        return self.features(x0, torch.randn(x0.shape, generator=g, device=self.device))


class RawLatentFeatures(LiveFeatures):
    """DDAE++ Tab. 4's "flattened, clean VAE latent" baseline: the normalised cached latent (or its
    mirror), flattened to C·h·w, with no noise and no network (`--layers latent`)."""

    def __init__(self, shape: Sequence[int], **kw):
        super().__init__(None, None, [], [RAW_TIME], **kw)
        self.layers = [RAW_LAYER]
        self.keys = [key_of(RAW_LAYER, RAW_TIME)]
        self.dims = [int(math.prod(shape))]

    def _compute(self, x0: Tensor, noise: Tensor) -> list[Tensor]:
        return [x0.flatten(1).float()]


class CachedFeatures:
    """`--cache-features`: every training image's features computed once per flip state with one
    fixed noise draw, then looked up (flip chosen per sample and batch). Backbone cost: 2 (1 without
    flip) passes per time instead of one per epoch; memory: 2 · N · Σ C floats per time. DDAE found
    no obvious difference between random and fixed noise (§3.2), but this is not the paper protocol."""

    needs_images = False

    def __init__(self, live: LiveFeatures, ds, batch_size: int, num_workers: int = 0):
        self.live, self.keys, self.dims = live, live.keys, live.dims
        self.labels = dataset_labels(ds).to(live.device)
        flips = (False, True) if live.hflip else (False,)
        parts: list[list[list[Tensor]]] = [[[] for _ in flips] for _ in self.keys]
        n_batches = math.ceil(len(ds) / batch_size)
        with progress(n_batches * len(flips), "cache features", "batch") as bar:
            for b, (images, _) in enumerate(ordered_batches(ds, batch_size, live.device, num_workers=num_workers)):
                g = per_batch_generator(live.device, live.seed, CACHE_STREAM + b)
                x0, mirror = model_views(images)
                noise = torch.randn(x0.shape, generator=g, device=live.device)
                for fi, flip in enumerate(flips):
                    feats = live.features(mirror if flip else x0, noise.flip(-1) if flip else noise)
                    for k, f in enumerate(feats):
                        parts[k][fi].append(f)
                    bar.update(1)
        self.cache = [torch.stack([torch.cat(p) for p in per_flip]) for per_flip in parts]  # (F, N, C) each
        size = sum(c.numel() for c in self.cache) * 4
        info(f"cached {len(self.keys)} feature sets of {len(ds)} images × {len(flips)} flips ({size / 2**20:.0f} MiB)")

    def train_batch(self, idx: Tensor, step: int) -> list[Tensor]:
        g = per_batch_generator(self.live.device, self.live.seed, TRAIN_STREAM + step)
        idx = idx.to(self.live.device)
        if self.live.hflip:
            flip = hflip_mask(idx.numel(), generator=g, device=self.live.device).long()
        else:
            flip = torch.zeros_like(idx)
        return [c[flip, idx] for c in self.cache]  # (B, C) each

    def eval_batch(self, images: Tensor, stream: int) -> list[Tensor]:
        return self.live.eval_batch(images, stream)


# ------------------------------------------------------------------------------------------------
