"""Backbone registry: name → factory(**overrides) -> TapModule. A new backbone is one file plus one line here."""

from __future__ import annotations

from functools import partial
from typing import Callable

from torch import nn

from ddaepp_cli.errors import UsageError, choices
from ddaepp_cli.nets.dit import build_dit
from ddaepp_cli.nets.dit_orig import build_dit_orig
from ddaepp_cli.nets.unet import build_unet
from ddaepp_cli.nets.uvit import build_uvit

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "ddpm": partial(build_unet, "ddpm"),  # DDAE UNet, 35.7M (DDAE++ Tab. 8)
    "ddpmpp": partial(build_unet, "ddpmpp"),  # simplified DDPM++, 56.5M
    "uvit": partial(build_uvit, "S"),  # U-ViT small for CIFAR, 44.3M (DDAE++ Tab. 8)
    "dit": build_dit,  # LightningDiT B/L/XL for latents (`size=`), 129.8M / 457.1M (DDAE++ Tab. 8)
    "dit_orig": build_dit_orig,  # original DiT/SiT S/B/L/XL, patch 2/4/8 (SRA paper); DiT-XL/2 675.1M
}


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone from its preset, with `kwargs` overriding preset values."""
    if name not in BACKBONES:
        raise UsageError(f"unknown backbone {name!r}; valid: {choices(BACKBONES)}")
    return BACKBONES[name](**kwargs)
