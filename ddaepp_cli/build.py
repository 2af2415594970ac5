"""Recipe → objects: the one place that maps recipe sections onto constructors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .errors import UsageError
from .recipe import DataConfig, Recipe, UViTConfig

# Native geometry of the datasets, known without loading them (so `--dry-run` works offline).
# CIFAR: 50,000 training images of 3×32×32; digits: see data.py (8×8 upsampled, 1 channel).
NATIVE = {"cifar10": (3, 32, 50_000), "cifar100": (3, 32, 50_000)}
DIGITS_DEFAULT_SIZE = 16
# The value a DDPM backbone embeds (diffusion/ddpm.py `time_input`): DiT feeds the integer step 0…T−1
# (DiT:diffusion/gaussian_diffusion.py; SRA:DiT-SRA), the DDAE UNets t/T (ddae:model/DDPM.py); U-ViT
# multiplies t/T by its `time_scale` (nets/uvit.py).
DDPM_TIME_INPUT = {"dit": "index", "dit_orig": "index"}


def dataset_geometry(data: DataConfig) -> tuple[int, int, int | None]:
    """(channels, image_size, training-set size or None if unknown without reading the data)."""
    if data.dataset in NATIVE:
        c, s, n = NATIVE[data.dataset]
        if data.image_size not in (None, s):
            raise UsageError(f"data.image_size: {data.dataset} images are {s}×{s}, got {data.image_size}")
        return c, s, n
    if data.dataset == "digits":
        from .data import load_dataset

        ds = load_dataset("digits", split="train", image_size=data.image_size or DIGITS_DEFAULT_SIZE)
        return ds.channels, ds.image_size, len(ds)
    if data.dataset == "latents":  # cached VAE latents (latents.py): geometry from the manifest
        from .data.latents import latent_geometry

        return latent_geometry(data)
    if data.dataset == "imagefolder":
        if data.image_size is None:
            raise UsageError("data.image_size is required for data.dataset=imagefolder (e.g. 32, 64, 256)")
        n = None
        if data.root and Path(data.root).is_dir():
            from .data import load_dataset

            n = len(load_dataset("imagefolder", split="train", root=data.root, image_size=data.image_size))
        return 3, data.image_size, n
    raise UsageError(f"unknown dataset {data.dataset!r}")


def load_training_data(recipe: Recipe):
    from .data import load_dataset

    d = recipe.data
    if d.dataset == "latents":
        from .data.latents import LatentDataset

        return LatentDataset(d.root, image_size=d.image_size, scale=d.latent_scale, posterior=d.latent_posterior)
    size = d.image_size or (DIGITS_DEFAULT_SIZE if d.dataset == "digits" else None)
    return load_dataset(d.dataset, split="train", root=d.root, image_size=size, download=d.download)


def backbone_kwargs(recipe: Recipe) -> dict:
    channels, size, _ = dataset_geometry(recipe.data)
    m = recipe.model
    kw = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)}
    name = kw.pop("backbone")
    sc = kw.pop("selfcond")
    kw.pop("label_dropout", None)  # DiT: applied by the objective (losses/__init__.py)
    kw.update(in_channels=channels, image_size=size)
    if isinstance(m, UViTConfig):  # [CLS] self-conditioning is a token, not a module
        kw.update(cls_token=sc.layer == "cls")
    else:
        kw.update(selfcond_layer=sc.layer, selfcond_mode=sc.mode)
    return {"name": name, **kw}


def build_backbone(recipe: Recipe, device: torch.device | str | None = None) -> torch.nn.Module:
    """The recipe's network. `device='meta'` builds it without memory (for counting)."""
    from .nets import build_backbone as _build

    kw = backbone_kwargs(recipe)
    name = kw.pop("name")
    if device is not None:
        with torch.device(device):
            return _build(name, **kw)
    return _build(name, **kw)


def build_formulation(recipe: Recipe):
    from .diffusion import build_formulation as _build

    kw = dataclasses.asdict(recipe.diffusion)
    name = kw.pop("formulation")
    if "timesteps" in kw:  # recipe key `timesteps` is the paper's T
        kw["T"] = kw.pop("timesteps")
    if name == "ddpm":  # what each backbone's paper feeds its time embedding, and DiT's learned Σ
        kw["time_input"] = DDPM_TIME_INPUT.get(recipe.model.backbone, "fraction")
        kw["learn_sigma"] = getattr(recipe.model, "learn_sigma", False)
    formulation = _build(name, **kw)
    if recipe.data.dataset == "latents":
        # Clipping follows the data space, not the formulation: x̂0 ∈ [−1, 1] holds for pixels only. Cached
        # latents are normalised to unit variance (latents.py), and DiT-SRA / LightningDiT sample them
        # unclipped (`clip_denoised=False`); every sampler reads this default.
        formulation.clip_x0 = False
    return formulation


def build_augment(recipe: Recipe):
    """The EDM augmentation pipe of `recipe.augment`, or None when it is off."""
    from .diffusion.augment import AugmentPipe

    a = dataclasses.asdict(recipe.augment)
    return AugmentPipe(**{k: v for k, v in a.items() if k != "enabled"}) if a["enabled"] else None


def build_objective(recipe: Recipe, model: torch.nn.Module, formulation, net: torch.nn.Module | None = None):
    """The training objective (losses/__init__.py) of `model` with every auxiliary loss the recipe turns on
    (`losses.AUX_LOSSES`); `net` is what runs it (e.g. compiled)."""
    from .losses import AUX_LOSSES, Objective

    m = recipe.model
    aux = tuple(a for cls in AUX_LOSSES if (a := cls.from_recipe(recipe, model, formulation)) is not None)
    return Objective(net if net is not None else model, formulation, augment=build_augment(recipe), aux_losses=aux,
                     num_classes=getattr(m, "num_classes", 0), label_dropout=getattr(m, "label_dropout", 0.0))


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
