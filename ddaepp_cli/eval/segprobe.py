"""`ddaepp segprobe`: dense linear probing of frozen diffusion features — semantic segmentation on
ADE20K / PASCAL VOC 2012, mIoU on the validation split (DDAE++ §5.2, App. B, Tab. 5, Tab. 10).

Protocol (the paper's, following iBOT / DINOv2 linear segmentation):
- every image is noised once at the probe time t (paper convention: RF t = 0.25 on ADE20K, 0.45 on
  VOC; other formulations default to the same noise-to-signal ratio σ/α = t/(1−t)) with noise
  seeded by the image's index, and the frozen backbone's features of two layers are read through
  the feature-tap API (`features.noised_features`, one forward stopping after the deeper layer);
- each layer's map is brought to one grid (default 16×16, the paper's 16² patch tokens): finer maps
  are average-pooled, coarser ones bilinearly upsampled; transformer tokens (B, N, D) are first laid
  out on their √N × √N patch grid. The maps are concatenated along channels;
- head: LayerNorm + Linear at every location (a 1×1 convolution), logits upsampled bilinearly to the
  label map (16× for 16 → 256), cross-entropy with ignore index 255;
- Adam, lr 3e-3, cosine decay per step to 0, 30 epochs, batch 128, no augmentation (Tab. 10);
- mIoU from the confusion matrix over the validation split (classes absent from both prediction and
  ground truth are left out of the mean, as in mmsegmentation).

Default layers — DiT-B's blocks 5 and 7 of 12, at the same relative depth: transformers (UViT, DiT)
take blocks round(5/12·depth) and round(7/12·depth) in execution order (UViT-S: in_5, out_1); the
UNets take the decoder blocks at 5/12 and 7/12 of the decoder (`ddpm` out_5, out_7; `ddpmpp` out_6,
out_9), the decoder being where the DDAE UNets' semantic features live (DDAE++ Tab. 9).

Features are computed once and kept in memory (bf16) when they fit (`--cache-features auto`); with
`off` they are recomputed every epoch from the same per-image noise, so both give the same probe.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..console import info
from ..errors import UsageError, choices
from .segdata import IGNORE, SPECS, SegmentationSet
from .seghead import (CACHE_MODES, STORE_DTYPE, FeatureSource, SegHead, cache_plan, confusion_matrix,  # noqa: F401
                      evaluate, iou_from_confusion, predictions_png, train_head)

EPOCHS, LR, BATCH, GRID = 30, 3e-3, 128, 16  # DDAE++ Tab. 10 (dense probing), 16² patch grid
RF_TIME = {"ade20k": 0.25, "voc": 0.45}  # DDAE++ App. B, searched on DiT (RF, t = 0 is data)
NOISE_STREAM = {"train": 1 << 29, "val": 3 << 29}  # per-image noise: generator_seed(index, stream + seed)


# ------------------------------------------------------------------------------------------------
# Defaults: layers and time
# ------------------------------------------------------------------------------------------------


def default_layers(model) -> list[str]:
    """Two layers at DiT-B's relative depths 5/12 and 7/12 (module doc)."""
    names = [n for n in model.layer_names if n != "cls"]
    outs = [n for n in names if n.startswith("out_")]
    if model.backbone_name in ("ddpm", "ddpmpp") and outs:
        blocks = outs  # UNet decoder
    else:
        blocks = names  # transformer blocks in execution order
    k = len(blocks)
    a = min(max(1, round(k * 5 / 12)), k)
    b = min(max(a + 1, round(k * 7 / 12)), k)
    return list(dict.fromkeys([blocks[a - 1], blocks[b - 1]]))


def default_time(formulation, dataset: str) -> str:
    """The paper's RF time for the dataset, or the time of the same σ/α in another formulation."""
    from .features import rf_time_in

    return rf_time_in(formulation, RF_TIME[dataset])


# ------------------------------------------------------------------------------------------------
# Features on a grid
# ------------------------------------------------------------------------------------------------


def to_grid(feature: Tensor, grid: int, name: str) -> Tensor:
    """(B, C, H, W) map or (B, N, D) tokens → (B, C, grid, grid)."""
    if feature.ndim == 3:
        B, N, D = feature.shape
        side = math.isqrt(N)
        if side * side != N or N == 1:
            raise UsageError(f"layer {name} gives {N} token(s), not a square patch grid; choose spatial layers")
        feature = feature.transpose(1, 2).reshape(B, D, side, side)  # row-major patches
    if feature.ndim != 4:
        raise UsageError(f"layer {name} gives features of shape {tuple(feature.shape)}, not a spatial map")
    H, W = feature.shape[-2:]
    if (H, W) == (grid, grid):
        return feature
    if H >= grid and W >= grid:
        return F.adaptive_avg_pool2d(feature, grid)
    return F.interpolate(feature, size=(grid, grid), mode="bilinear", align_corners=False)


class DenseFeatures:
    """Noised, concatenated, grid-resampled features of images given with their dataset indices."""

    def __init__(self, model, formulation, layers: Sequence[str], t: float, *, grid: int, device: torch.device,
                 precision: str, seed: int):
        self.model, self.formulation, self.layers, self.t = model, formulation, list(layers), t
        self.grid, self.device, self.precision, self.seed = grid, device, precision, seed

    @torch.no_grad()
    def __call__(self, images: Tensor, index: Tensor, split: str) -> Tensor:
        from .features import model_input, noised_features
        from ..seeding import per_sample_randn

        x0 = model_input(images.to(self.device))  # (B, C, S, S): pixels in [-1, 1], or a run's normalised latents
        noise = per_sample_randn(index.tolist(), x0.shape[1:], device=self.device,
                                 stream=NOISE_STREAM[split] + self.seed)
        feats = noised_features(self.model, self.formulation, x0, self.t, self.layers, noise=noise, pooled=False,
                                precision=self.precision)
        maps = [to_grid(feats[name], self.grid, name) for name in self.layers]
        return torch.cat(maps, dim=1).to(STORE_DTYPE)  # (B, C_total, g, g)


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


def segprobe(run_or_ckpt: str, *, dataset: str = "ade20k", data_root: str | None = None, layers: str | None = None,
             timestep: str | None = None, epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH,
             image_size: int | None = None, label_size: int = 256, grid: int = GRID, cache_features: str = "auto",
             weights: str = "ema", seed: int = 0, workers: int | None = None, device: str | None = None,
             plot: str | None = None, record: bool = True) -> dict[str, Any]:
    """Library entry of `ddaepp segprobe`: features, head training, mIoU on the validation split."""
    from ..build import build_formulation, dataset_geometry
    from .evalrecord import (checkpoint_record, device_record, new_record_path, save_record, timestamp,
                             versions)
    from .features import pick_device, precision_for
    from ..sample import load_model, weights_of

    if dataset not in SPECS:
        raise UsageError(f"--dataset {dataset!r} is not known; valid: {choices(SPECS)}")
    for name, v in (("--epochs", epochs), ("--batch-size", batch_size), ("--grid", grid), ("--label-size", label_size)):
        if v <= 0:
            raise UsageError(f"{name} must be positive, got {v}")
    if not lr > 0:
        raise UsageError(f"--lr must be positive, got {lr}")
    if cache_features not in CACHE_MODES:
        raise UsageError(f"--cache-features {cache_features!r} is not valid; choose from {choices(CACHE_MODES)}")
    if plot is not None and not str(plot).lower().endswith(".png"):
        raise UsageError(f"--plot {plot}: give a .png file name")
    t_start = time.perf_counter()
    image_size_arg = image_size
    dev = pick_device(device)
    precision = precision_for(dev)
    recipe, model, ckpt = load_model(run_or_ckpt, weights, dev)
    weights = weights_of(run_or_ckpt, weights)  # a named .safetensors file decides (sample.py)
    formulation = build_formulation(recipe)
    latent = recipe.data.dataset == "latents"
    channels, native, _ = dataset_geometry(recipe.data)
    if image_size is not None and image_size <= 0:
        raise UsageError(f"--image-size must be positive, got {image_size}")
    image_size = native if latent else (image_size or native)
    if image_size != native:
        if recipe.model.backbone not in ("ddpm", "ddpmpp"):
            raise UsageError(f"{recipe.model.backbone} reads {native}×{native} images only; leave --image-size "
                             f"unset or give {native}")
        factor = 2 ** (len(recipe.model.ch_mults) - 1)
        if image_size % factor:
            raise UsageError(f"--image-size {image_size}: this UNet halves the resolution {len(recipe.model.ch_mults) - 1} "
                             f"times, so give a multiple of {factor}")
    layer_list = default_layers(model) if layers is None else model.resolve_layers(layers)
    time_text = timestep if timestep is not None else default_time(formulation, dataset)
    t_value = float(formulation.parse_time(time_text))
    workers = (min(4, os.cpu_count() or 1) if dev.type == "cuda" else 0) if workers is None else workers
    if latent:  # the run's VAE encodes the images once (cached, resumable: seglatent.py)
        from .seglatent import latent_split

        pixel_size = None if image_size_arg is None else image_size_arg
        train_ds, _ = latent_split(recipe, dataset, "train", data_root, label_size=label_size, image_size=pixel_size,
                                   workers=workers)
        val_ds, val_pictures = latent_split(recipe, dataset, "val", data_root, label_size=label_size,
                                            image_size=pixel_size, workers=workers)
    else:
        train_ds = SegmentationSet(dataset, "train", data_root, image_size=image_size, label_size=label_size,
                                   channels=channels)
        val_ds = SegmentationSet(dataset, "val", data_root, image_size=image_size, label_size=label_size,
                                 channels=channels)
        val_pictures = val_ds
    dense = DenseFeatures(model, formulation, layer_list, t_value, grid=grid, device=dev, precision=precision,
                          seed=seed)
    if "cls" in layer_list:
        raise UsageError("layer cls is the [CLS] token, not a spatial map; choose patch-token layers (e.g. in_5,out_1)")
    feat_channels = sum(model.feature_dims[name] for name in layer_list)
    K = train_ds.num_classes
    need = (len(train_ds) + len(val_ds)) * (feat_channels * grid * grid * 2 + label_size * label_size)
    cached, store, cache_why = cache_plan(cache_features, need, dev)
    info(f"segprobe {ckpt} ({weights}) on {dataset}: layers {','.join(layer_list)} at t={time_text} "
         f"({t_value:g}), {feat_channels} channels on a {grid}×{grid} grid, {len(train_ds)} train / {len(val_ds)} val "
         f"{'latents' if latent else 'images'} at {image_size} px, labels {label_size} px, cache {cache_why}")

    t0 = time.perf_counter()
    train = FeatureSource(train_ds, "train", dense, cached=cached, store=store, batch_size=batch_size, workers=workers)
    val = FeatureSource(val_ds, "val", dense, cached=cached, store=store, batch_size=batch_size, workers=workers)
    t_feats = time.perf_counter() - t0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = SegHead(feat_channels, K).to(dev)
    t0 = time.perf_counter()
    losses = train_head(head, train, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, label_size=label_size,
                        num_classes=K)
    t_train = time.perf_counter() - t0
    cm = evaluate(head, val, batch_size=batch_size, label_size=label_size, num_classes=K)
    scores = iou_from_confusion(cm)

    record_path = new_record_path(ckpt, "segprobe")
    result: dict[str, Any] = {
        "command": "segprobe",
        "dataset": dataset,
        "miou": scores["miou"],
        "pixel_accuracy": scores["pixel_accuracy"],
        "per_class_iou": scores["per_class_iou"],
        "classes_evaluated": scores["classes_evaluated"],
        "class_names": train_ds.class_names,
        "train_losses": losses,
        "layers": layer_list,
        "timestep": {"text": time_text, "t": t_value},
        "timing": {"features_s": round(t_feats, 3), "train_s": round(t_train, 3),
                   "total_s": round(time.perf_counter() - t_start, 3)},
        "protocol": {
            **checkpoint_record(ckpt, weights, recipe),
            "layers": layer_list, "timestep": time_text, "t": t_value,
            "default_layers": layers is None, "default_timestep": timestep is None,
            "grid": grid, "feature_channels": feat_channels,
            "grid_resize": "finer maps adaptive-average-pooled, coarser ones bilinear; tokens laid out √N×√N",
            "head": "LayerNorm + Linear per location", "upsampling": f"bilinear {grid} → {label_size}",
            "loss": f"cross-entropy, ignore index {IGNORE}", "optimizer": "adam", "lr": lr,
            "schedule": "cosine per step to 0", "epochs": epochs, "batch_size": batch_size, "augmentation": "none",
            "noise": "fixed per image (seeded by index)", "seed": seed, "feature_cache": cache_why,
            "model_input": ("VAE latents of the images (the run's VAE, cached), normalised with the training "
                            "cache's statistics" if latent else "pixels in [-1, 1]"),
            "train": train_ds.info(), "val": val_ds.info(),
            **device_record(dev, precision), "versions": versions(), "time": timestamp(),
        },
    }
    result["plot"] = predictions_png(head, val, val_pictures, plot or record_path.with_suffix(".png"))
    saved = save_record(record_path, result) if record else None
    result["eval_record"] = str(saved) if saved else None
    return result


def print_segprobe(result: dict) -> None:
    """A short rich table on stdout (paths on stderr): mIoU, pixel accuracy, the protocol's key settings."""
    from rich.table import Table

    from ..console import err, out

    table = Table("", "value", title=f"segprobe on {result['dataset']}")
    table.add_row("mIoU", f"{100 * result['miou']:.2f}")
    table.add_row("pixel accuracy", f"{100 * result['pixel_accuracy']:.2f}")
    table.add_row("layers", ",".join(result["layers"]))
    table.add_row("timestep", f"{result['timestep']['text']} ({result['timestep']['t']:g})")
    table.add_row("classes evaluated", str(result["classes_evaluated"]))
    out.print(table)
    for key, label in (("plot", "predictions"), ("eval_record", "record")):
        if result.get(key):
            err.print(f"{label}: {result[key]}", markup=False)
