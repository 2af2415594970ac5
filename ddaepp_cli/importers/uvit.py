"""U-ViT's CIFAR-10 network (baofff/U-ViT `libs/uvit.py`, `configs/cifar10_uvit.py`): the EMA state dict.

U-ViT's `train.py` saves `nnet_ema.pth` as the bare state dict of the EMA network (the released
`cifar10_uvit_small.pth`). Unconditional, `mlp_time_embed=False` (no time MLP), `conv=True`.

Keys → ddaepp (nets/uvit.py): `patch_embed.proj` → `patch_embed`; timm `Mlp` `mlp.fc1` / `mlp.fc2` →
`mlp.0` / `mlp.2`; everything else (`pos_embed` with its time row first, `in_blocks`, `mid_block`,
`out_blocks.*.skip_linear`, `norm`, `decoder_pred`, `final_layer`) keeps its name and layout.

Conventions: U-ViT trains the continuous VP-SDE (β from 0.1 to 20, `sde.py`) and calls the network with
999·t for t ∈ (0, 1] (`ScoreModel.predict`), predicting ε. ddaepp runs it under its DDPM formulation
(T = 1000, linear β 1e-4…0.02, the discretisation of the same SDE): step k is t = k/T, so the time token
must be the sinusoid of 999·k/1000 — the import sets `model.time_scale: 999` (ddaepp's default 1000
would feed k). The discrete ᾱ_k and the SDE's exp(−0.1·t − 9.95·t²) at t = k/1000 differ slightly
(`ddaepp import` reports the largest gap in σ); that difference is the only approximation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UsageError
from .common import Mapped, Source, is_state_dict, rename, strip_prefix

NAME = "uvit"
BACKBONES = ("uvit",)
FORMULATIONS = ("ddpm",)
PUBLISHED = "github.com/baofff/U-ViT (cifar10_uvit_small.pth, linked from its README)"
TIME_SCALE = 999.0  # U-ViT:sde.py ScoreModel.predict feeds `t * 999`


def extract(obj, path: Path, weights: str) -> Source:
    if not is_state_dict(obj):
        raise UsageError(f"{path} is not a U-ViT network state dict (U-ViT saves nnet_ema.pth as a bare state dict "
                         f"of tensors), got {type(obj).__name__}")
    if weights == "model":  # the file alone does not say which; U-ViT releases the EMA (nnet_ema.pth)
        return Source(ema=None, raw=strip_prefix(obj, ("module.",)))
    return Source(ema=strip_prefix(obj, ("module.",)), raw=None)


def convert(sd, model: torch.nn.Module, path: Path) -> Mapped:
    if "label_emb.weight" in sd:
        raise UsageError(f"{path} is a class-conditional U-ViT (label_emb); ddaepp's uvit is unconditional")

    def key(k: str) -> str | None:
        if k.startswith("patch_embed.proj."):
            return "patch_embed." + k[len("patch_embed.proj."):]
        if k.startswith("time_embed."):
            raise UsageError(f"{path}: {k} — this U-ViT has a time MLP (mlp_time_embed=True); ddaepp's uvit "
                             f"feeds the raw sinusoid as U-ViT's CIFAR-10 config does")
        return k.replace(".mlp.fc1.", ".mlp.0.").replace(".mlp.fc2.", ".mlp.2.")

    return rename(sd, key)


def recipe_overrides(recipe) -> list[str]:
    return [f"model.time_scale={TIME_SCALE:g}"]


def schedule_gap(recipe) -> float:
    """Largest |σ_k(DDPM table) − σ(k/T)(VP-SDE)| over the steps k = 1..T (module doc)."""
    d = recipe.diffusion
    T = d.timesteps
    betas = torch.linspace(d.beta_start, d.beta_end, T, dtype=torch.float64)
    abar = torch.cumprod(1.0 - betas, 0)
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    abar_sde = torch.exp(-(0.1 * t + 0.5 * (20.0 - 0.1) * t * t))  # U-ViT:sde.py VPSDE(0.1, 20)
    return float(((1 - abar).sqrt() - (1 - abar_sde).sqrt()).abs().max())


def conventions(recipe) -> list[str]:
    gap = schedule_gap(recipe)
    return [f"network time: U-ViT feeds 999·t for VP-SDE t ∈ (0, 1]; ddaepp DDPM step k = t·T, so "
            f"model.time_scale = {TIME_SCALE:g} (token = sinusoid of {TIME_SCALE:g}·k/T)",
            f"noise schedule: U-ViT's continuous VP-SDE (β 0.1→20) run as ddaepp's discrete DDPM table; "
            f"largest σ difference over the {recipe.diffusion.timesteps} steps: {gap:.2e}"]
