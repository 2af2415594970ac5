"""Frozen-backbone features of noised images (DDAE §3.2, DDAE++ App. B): the one place where the
probe, CKA, alignment/uniformity and the noise-conditional classifier noise an image at a paper
time and read the feature-tap API.

An image x0 in [-1, 1] is noised exactly as in training — x_t = α(t)·x0 + σ(t)·ε through
`formulation.perturb`, scaled by the network input factor (EDM's c_in), the time mapped by
`formulation.net_time` — and the requested layers come from one `forward_features` call that
stops after the deepest of them. Features are global-average pooled: over H×W for UNet maps
(B, C, H, W), over tokens for transformer outputs (B, N, D; a `[CLS]` tap is its own layer, e.g.
UViT's `cls`). Extraction runs in inference mode, in bf16 autocast on a GPU and fp32 on a CPU; the
pooled features may feed trainable heads directly (no op that saves them for backward needs them). tests/test_analysis.py checks that these features equal the
ones the training loss sees for the same t and noise.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import ImageDataset, apply_hflip, hflip_mask, load_dataset, to_model_range
from ..diffusion.base import expand_like
from ..errors import UsageError, choices

# Default probe time per formulation, CLI convention: DDAE++ Tab. 9 (DDPM t = 11, EDM σ ≈ 0.06 =
# index 4 of the reversed 18-step schedule, pixel RF t = 0.06).
DEFAULT_TIME = {"ddpm": "11", "edm": "idx:4", "rf": "0.06"}
# Default timestep grids: DDAE's `linear.py --grid` ({1, 11, 21} DDPM, indices {3, 4, 5} EDM,
# FutureXiang/ddae `linear.py`). DDAE has no RF; ours brackets Tab. 9's 0.06 with noise-to-signal ratios
# (0.02, 0.064, 0.11) close to DDPM's grid (0.01, 0.047, 0.067).
DEFAULT_GRID = {"ddpm": ("1", "11", "21"), "edm": ("idx:3", "idx:4", "idx:5"), "rf": ("0.02", "0.06", "0.1")}
# Latent (DiT) runs: DDAE++ Tab. 9, ImageNet — RF t = 0.25 for every DiT. A latent run trained under
# another formulation (DDPM: DiT, DiT-SRA and their imports) probes at the time with the same
# noise-to-signal ratio σ/α (`rf_time_in`), as `segprobe` does for its RF times.
LATENT_TIME = 0.25


def rf_time_in(formulation, t: float) -> str:
    """The time of `formulation` (CLI syntax) with the noise-to-signal ratio σ/α of RF at `t`.

    RF: x_t = (1 − t)·x0 + t·ε, so σ/α = t / (1 − t); EDM: x_t = x0 + σ·ε, σ itself; DDPM: the step
    1…T whose √(1 − ᾱ)/√ᾱ is nearest in log space."""
    if formulation.name == "rf":
        return f"{t:g}"
    ratio = t / (1 - t)
    if formulation.name == "edm":
        return f"{ratio:.4g}"
    if formulation.name == "ddpm":
        steps = torch.arange(1, formulation.T + 1)
        r = (formulation.sigma(steps) / formulation.alpha(steps)).double()
        return str(int(steps[torch.argmin((r.log() - math.log(ratio)).abs())]))
    raise UsageError(f"no time of {formulation.name} matches RF t = {t:g}: give the time explicitly")


def default_time(recipe, formulation) -> str:
    """The paper's probe time of a run: Tab. 9's ImageNet RF 0.25 (converted) for latent runs, else DEFAULT_TIME."""
    if recipe.data.dataset == "latents":
        return rf_time_in(formulation, LATENT_TIME)
    return DEFAULT_TIME[formulation.name]


def default_grid(recipe, formulation) -> tuple[str, ...]:
    if recipe.data.dataset == "latents":
        return (rf_time_in(formulation, LATENT_TIME),)
    return DEFAULT_GRID[formulation.name]


# DDAE++ Tab. 9 probe layers on CIFAR-10 / CIFAR-100, for the paper-size UNets (12 / 15 decoder blocks).
PAPER_LAYER = {
    ("ddpm", "ddpm"): ("out_6", "out_6"), ("ddpm", "edm"): ("out_7", "out_6"), ("ddpm", "rf"): ("out_7", "out_7"),
    ("ddpmpp", "ddpm"): ("out_7", "out_8"), ("ddpmpp", "edm"): ("out_9", "out_8"), ("ddpmpp", "rf"): ("out_8", "out_8"),
    ("uvit", "ddpm"): ("out_2", "out_2"),
}
PAPER_DEPTH = {"ddpm": 12, "ddpmpp": 15, "uvit": 6}


# ------------------------------------------------------------------------------------------------
# Times and layers from the command line
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Time:
    """A time as typed on the command line (`idx:4`) and its value in paper convention (σ = 0.0599)."""

    text: str
    value: float

    def as_dict(self) -> dict:
        return {"text": self.text, "value": self.value}


def parse_times(formulation, spec: str | Sequence[str] | None, *, default: Sequence[str]) -> list[Time]:
    """`"1,11,21"` → [Time]; every item goes through `formulation.parse_time` (outside → UsageError)."""
    items = default if spec is None else ([p for p in spec.split(",")] if isinstance(spec, str) else list(spec))
    items = [str(p).strip() for p in items]
    if not items or any(not p for p in items):
        raise UsageError(f"empty item in time list {spec!r}; e.g. {','.join(DEFAULT_GRID[formulation.name])}")
    out: dict[float, Time] = {}
    for p in items:
        value = float(formulation.parse_time(p))
        out.setdefault(value, Time(p, value))  # `0.06` and `idx:4` may name the same σ: keep the first
    return list(out.values())


def decoder_layers(model) -> list[str]:
    """The layers DDAE grid-searches: every decoder block `out_k` (all layers for backbones without them)."""
    outs = [n for n in model.layer_names if n.startswith("out_")]
    return outs or list(model.layer_names)


def resolve_layers(model, spec: str | None, default: Sequence[str]) -> list[str]:
    return list(default) if spec is None else model.resolve_layers(spec)


def default_layer(recipe, model, dataset: str) -> str:
    """One layer when one is needed: DDAE++ Tab. 9's for a paper-size UNet, else the recipe's
    self-conditioning layer, else the middle decoder block."""
    outs = decoder_layers(model)
    key = (recipe.model.backbone, recipe.diffusion.formulation)
    if key in PAPER_LAYER and len(outs) == PAPER_DEPTH.get(recipe.model.backbone):
        return PAPER_LAYER[key][1 if dataset == "cifar100" else 0]
    if recipe.model.selfcond.layer:
        return recipe.model.selfcond.layer
    return outs[(len(outs) - 1) // 2]


def layer_order(model, names: Sequence[str]) -> list[str]:
    order = {n: i for i, n in enumerate(model.layer_names)}
    return sorted(names, key=order.__getitem__)


# ------------------------------------------------------------------------------------------------
# Device and precision
# ------------------------------------------------------------------------------------------------


def pick_device(device: str | None = None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device: {device!r} is not a torch device (cpu, cuda, cuda:1)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return d


def precision_for(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" else "fp32"  # issue 4: extraction in bf16 on a GPU


def autocast(device: torch.device, precision: str):
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def per_batch_generator(device: torch.device, seed: int, stream: int) -> torch.Generator:
    """A generator on `device` for one batch's draws (flip, crop, noise), keyed by (seed, stream)."""
    from ..seeding import generator_seed

    return torch.Generator(device=device).manual_seed(generator_seed(seed % (1 << 32), stream % (1 << 32)))


# ------------------------------------------------------------------------------------------------
# Noising and extraction
# ------------------------------------------------------------------------------------------------


def network_inputs(formulation, x0: Tensor, t: Tensor | float, noise: Tensor) -> tuple[Tensor, Tensor]:
    """(network input, network time) for x0 noised at paper time t — what `Formulation.loss` feeds
    the network: x_t = α·x0 + σ·ε, times EDM's c_in, and `net_time(t)` (t/T, ln σ / 4, t)."""
    t = torch.as_tensor(t, device=x0.device)
    t = t.expand(x0.shape[0]) if t.ndim == 0 else t  # (B,)
    x_t = formulation.perturb(x0, t, noise)
    scale = formulation.net_input_scale(t)
    x_in = x_t if isinstance(scale, float) and scale == 1.0 else expand_like(scale, x_t) * x_t
    return x_in, formulation.net_time(t)


def model_input(batch: Tensor) -> Tensor:
    """What the network reads from a loader batch: uint8 images → [-1, 1]; cached latent pairs
    (B, 2, C, h, w) → the unflipped latent (already normalised, latentstore.py)."""
    if batch.ndim == 5:
        return batch[:, 0].float()
    return to_model_range(batch)


def model_views(batch: Tensor) -> tuple[Tensor, Tensor]:
    """(input, its mirror): pixels are flipped; a cached latent pair holds the mirror's own encoding."""
    if batch.ndim == 5:
        return batch[:, 0].float(), batch[:, 1].float()
    x = to_model_range(batch)
    return x, x.flip(-1)


def augmented_input(batch: Tensor, *, hflip: bool, crop_pad: int, generator: torch.Generator | None) -> Tensor:
    """The probe's training view: random crop and flip of pixels; for latent pairs the flip picks the
    cached mirror latent (as training does) and cropping is not available."""
    if batch.ndim == 5:
        if crop_pad:
            raise UsageError("random crops are not available on cached latents; use --protocol ddae++")
        x = batch[:, 0].float()
        if hflip:
            m = hflip_mask(x.shape[0], generator=generator, device=x.device)
            x = torch.where(m[:, None, None, None], batch[:, 1].float(), x)
        return x
    return augment(to_model_range(batch), hflip=hflip, crop_pad=crop_pad, generator=generator)


def pool(feature: Tensor) -> Tensor:
    """Global average pool to (B, C): over H×W of (B, C, H, W), over the tokens of (B, N, D); float32."""
    if feature.ndim == 4:
        return feature.float().mean(dim=(2, 3))
    if feature.ndim == 3:
        return feature.float().mean(dim=1)
    return feature.float()


@torch.inference_mode()
def noised_features(model, formulation, x0: Tensor, t: Tensor | float, layers: Sequence[str], *,
                    noise: Tensor | None = None, generator: torch.Generator | None = None,
                    pooled: bool = True, precision: str = "fp32") -> dict[str, Tensor]:
    """Features of `layers` for x0 (B, C, H, W) in [-1, 1] noised at paper time `t` (scalar or (B,)).

    One forward that stops after the deepest requested layer. `noise` defaults to a fresh N(0, I)
    draw from `generator`. Pooled features are float32 (B, C); unpooled ones are the raw maps.
    """
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_in, t_net = network_inputs(formulation, x0, t, noise)
    with autocast(x0.device, precision):
        feats = model.forward_features(x_in, t_net, list(layers))
    return {name: pool(f) if pooled else f.float() for name, f in feats.items()}


# ------------------------------------------------------------------------------------------------
# Augmentation (the probe's; training augmentation lives in train.py)
# ------------------------------------------------------------------------------------------------


def random_crop(x: Tensor, pad: int, generator: torch.Generator | None = None) -> Tensor:
    """torchvision RandomCrop(size, padding=pad) per sample, batched: zero-pixel padding (−1 in model
    range, as DDAE's ToTensor-then-rescale pipeline pads black), one offset pair per image."""
    if pad <= 0:
        return x
    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), value=-1.0)  # (B, C, H+2p, W+2p)
    oy = torch.randint(0, 2 * pad + 1, (B,), generator=generator, device=x.device)
    ox = torch.randint(0, 2 * pad + 1, (B,), generator=generator, device=x.device)
    rows = (oy[:, None] + torch.arange(H, device=x.device))[:, None, :, None].expand(B, C, H, W + 2 * pad)
    xr = xp.gather(2, rows)  # (B, C, H, W+2p)
    cols = (ox[:, None] + torch.arange(W, device=x.device))[:, None, None, :].expand(B, C, H, W)
    return xr.gather(3, cols)  # (B, C, H, W)


def augment(x: Tensor, *, hflip: bool, crop_pad: int, generator: torch.Generator | None) -> Tensor:
    if crop_pad:
        x = random_crop(x, crop_pad, generator)
    if hflip:
        x = apply_hflip(x, hflip_mask(x.shape[0], generator=generator, device=x.device))
    return x


# ------------------------------------------------------------------------------------------------
# Datasets for evaluation
# ------------------------------------------------------------------------------------------------


class Subset(ImageDataset):
    """Some images of a dataset; in-memory sets stay in memory (BatchStream indexes them directly)."""

    def __init__(self, parent: ImageDataset, indices: Tensor, split: str):
        super().__init__(name=parent.name, split=split, root=parent.root, channels=parent.channels,
                         image_size=parent.image_size, num_classes=parent.num_classes,
                         class_names=parent.class_names)
        self.parent, self.indices = parent, indices.to(torch.int64)
        self.in_memory = bool(getattr(parent, "in_memory", False))
        if self.in_memory:
            self.images, self.labels = parent.images[self.indices], parent.labels[self.indices]

    def __len__(self) -> int:
        return int(self.indices.numel())

    def __getitem__(self, i: int):
        return self.parent[int(self.indices[i])]


def dataset_labels(ds) -> Tensor:
    if getattr(ds, "in_memory", False):
        return ds.labels
    if isinstance(ds, Subset):
        return dataset_labels(ds.parent)[ds.indices]
    return torch.as_tensor(ds.file_labels, dtype=torch.int64)


def stratified_split(ds, fraction: float, seed: int = 0) -> tuple[Subset, Subset]:
    """(train, val): round(fraction·n_c) random images of every class c go to val, under a fixed seed
    so the split is a property of the dataset, not of the run."""
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"--val-fraction must lie in [0, 1), got {fraction}")
    labels = dataset_labels(ds)
    g = torch.Generator().manual_seed(seed)
    val = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        k = int(round(fraction * idx.numel()))
        val.append(idx[torch.randperm(idx.numel(), generator=g)[:k]])
    val_idx = torch.cat(val).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val_idx] = False
    train_idx = torch.nonzero(keep).flatten()
    if val_idx.numel() == 0 or train_idx.numel() == 0:
        raise UsageError(f"--val-fraction {fraction} leaves an empty split of {len(labels)} images")
    return Subset(ds, train_idx, f"{ds.split}[train]"), Subset(ds, val_idx, f"{ds.split}[val]")


def held_out_root(train_root: str) -> str:
    """Where the validation latent cache of a training cache lives by default: `<train cache>_val`."""
    return str(train_root).rstrip("/\\") + "_val"


def load_latent_split(recipe, *, split: str, root: str | None, held_out: str | None = None):
    """The training latent cache (`root`, default the recipe's data.root) or, for split test, the labelled
    validation cache (`held_out`, default `<train cache>_val`), normalised with the training cache's
    statistics — the ones the model was trained on (or the recipe's fixed `data.latent_scale`)."""
    from ..errors import UnavailableError
    from ..data.latentstore import MANIFEST, LatentDataset

    train_root = root or recipe.data.root
    if train_root is None:
        raise UsageError("this latent run's recipe names no data.root; give --data-root <training latent cache>")
    if split == "train":
        ds = LatentDataset(train_root, split="train", scale=recipe.data.latent_scale)
    else:
        val_root = held_out or held_out_root(train_root)
        if not (Path(val_root) / MANIFEST).is_file():
            raise UnavailableError(f"no validation latent cache at {val_root}; write it with `ddaepp cache-latents "
                                   f"--data <imagenet>/val --labels LOC_val_solution.csv --classes {train_root} "
                                   f"--out {val_root}` (or give --test-root)")
        ds = LatentDataset(val_root, split="val", stats_root=train_root, scale=recipe.data.latent_scale)
    if not ds.num_classes:
        raise UsageError(f"the latent cache {ds.root} has no labels (made from a flat folder without --labels); "
                         "probing needs class labels")
    return ds


def load_eval_dataset(recipe, *, dataset: str | None, split: str, root: str | None, held_out: str | None = None,
                      latent: bool = False, command: str = "this command") -> ImageDataset:
    """A dataset the model can read: `dataset` (default the recipe's) at the model's geometry.

    Digits and image folders are resized to the model's size; CIFAR must match it. Latent runs
    (`latent=True` for the commands that read latents) get their cached latents (`load_latent_split`).
    Unavailable data raises the loader's UnavailableError (exit 3); a geometry mismatch a UsageError.
    """
    from ..build import dataset_geometry

    name = dataset or recipe.data.dataset
    if (name == "latents") != (recipe.data.dataset == "latents"):
        kind = "latent (DiT on VAE latents)" if recipe.data.dataset == "latents" else "pixel"
        raise UsageError(f"--dataset {name}: this is a {kind} model; give the dataset it reads "
                         f"({recipe.data.dataset}) or leave --dataset unset")
    if name == "latents":
        if not latent:
            raise UsageError(f"{command} reads images and does not support latent (DiT) runs; on latent runs use "
                             "probe, segprobe or cka")
        ds = load_latent_split(recipe, split=split, root=root, held_out=held_out)
        channels, size, _ = dataset_geometry(recipe.data)
        if (ds.channels, ds.image_size) != (channels, size):
            raise UsageError(f"the model reads {channels}×{size}×{size} latents but {ds.root} holds "
                             f"{ds.channels}×{ds.image_size}×{ds.image_size}")
        return ds
    channels, size, _ = dataset_geometry(recipe.data)
    if root is None and name == recipe.data.dataset:
        root = recipe.data.root
    image_size = None if name in ("cifar10", "cifar100") else size
    if name == "imagefolder":
        if root is None:
            raise UsageError("--dataset imagefolder needs --data-root DIR (class subfolders, ImageNet layout)")
        if split == "test":  # the ImageNet layout calls its held-out split val/
            held_out = [s for s in ("val", "test") if os.path.isdir(os.path.join(root, s))]
            if not held_out:
                raise UsageError(f"--dataset imagefolder: no held-out split under {root}; expected "
                                 f"{os.path.join(root, 'val')}/<class>/<images> (or test/)")
            split = held_out[0]
    ds = load_dataset(name, split=split, root=root, image_size=image_size)
    if (ds.channels, ds.image_size) != (channels, size):
        raise UsageError(f"the model reads {channels}×{size}×{size} images but {name} gives "
                         f"{ds.channels}×{ds.image_size}×{ds.image_size}; choose a matching --dataset")
    return ds


def check_same_classes(train, test) -> None:
    if train.num_classes != test.num_classes or train.class_names != test.class_names:
        raise UsageError(f"the {train.name} splits name different classes ({train.num_classes} in {train.split}, "
                         f"{test.num_classes} in {test.split}); both need the same class subfolders")


def ordered_batches(ds, batch_size: int, device: torch.device, *, limit: int | None = None,
                    num_workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """(uint8 images (b, C, H, W), labels (b,)) on `device` in dataset order, the first `limit` images."""
    n = len(ds) if limit is None else min(limit, len(ds))
    if getattr(ds, "in_memory", False):
        for i in range(0, n, batch_size):
            yield ds.images[i:i + batch_size].to(device), ds.labels[i:i + batch_size].to(device)
        return
    from torch.utils.data import DataLoader, Subset as TorchSubset

    loader = DataLoader(TorchSubset(ds, range(n)), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    for images, labels in loader:
        yield images.to(device, non_blocking=True), torch.as_tensor(labels).to(device)


@torch.no_grad()
def extract_pooled(model, formulation, ds, layers: Sequence[str], t: float, *, n: int | None, batch_size: int,
                   seed: int, device: torch.device, precision: str, stream: int = 0,
                   progress_desc: str | None = None, hflip: bool = False) -> tuple[dict[str, Tensor], Tensor]:
    """Pooled features (N, C) per layer (CPU float32) and labels (N,) of the first n images, noised
    at t with per-batch seeded noise (batch b draws from stream `stream + b`)."""
    from ..console import progress

    total = len(ds) if n is None else min(n, len(ds))
    out: dict[str, list[Tensor]] = {name: [] for name in layers}
    labels = []
    with progress(math.ceil(total / batch_size), progress_desc or "features", "batch") as bar:
        for b, (images, y) in enumerate(ordered_batches(ds, batch_size, device, limit=total)):
            g = per_batch_generator(device, seed, stream + b)
            x0, mirror = model_views(images)
            if hflip:
                x0 = mirror
            feats = noised_features(model, formulation, x0, t, layers, generator=g, precision=precision)
            for name in layers:
                out[name].append(feats[name].cpu())
            labels.append(y.cpu())
            bar.update(1)
    return {name: torch.cat(v) for name, v in out.items()}, torch.cat(labels)


def check_choice(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise UsageError(f"{name}: {value!r} is not valid; choose from {choices(valid)}")
