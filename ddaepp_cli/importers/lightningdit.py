"""LightningDiT checkpoints (hustvl/LightningDiT `train.py`, `models/lightningdit.py`).

File: `{'model', 'ema', 'opt', 'config'}` from its train.py (the EMA copy is a deepcopy of the bare
network; `model` may carry DDP's `module.` prefix) or, for released files, the EMA state dict alone.
`opt` and `config` are dropped (listed).

Keys → ddaepp (nets/dit.py, built to the same layout): timm `PatchEmbed` `x_embedder.proj` →
`x_embedder`; `t_embedder.mlp.{0,2}` → `t_embedder.{0,2}`; `y_embedder.embedding_table` → `y_embedder`;
blocks (`norm1`, `attn.qkv`, `attn.q_norm`, `attn.k_norm`, `attn.proj`, `norm2`, `mlp.w12`, `mlp.w3`,
`adaLN_modulation.1`), `final_layer.*` and the frozen `pos_embed` keep their names. EVA's RoPE tables
`feat_rope.freqs_cos` / `freqs_sin` are persistent buffers there and computed by ddaepp: they are
checked equal to ddaepp's tables, then dropped (listed).

Conventions (LightningDiT:transport/path.py `ICPlan`, transport/transport.py): x_t = t·x1 + (1 − t)·x0
with x1 = data, x0 = noise, the network gets that t and predicts x1 − x0. ddaepp's latent RF is
x_t = (1 − t)·x0 + t·ε with velocity ε − x0, so LightningDiT's network sees 1 − t and predicts −v: the
import sets `diffusion.net_convention: sit` (diffusion/rf.py), which converts at the formulation's
boundary. Latents: LightningDiT normalises with `latents_stats.pt` (per-channel mean / std,
`latent_multiplier` 1.0 for VA-VAE) and decodes z·std + mean — what ddaepp's latent cache does; give
`--latent-stats` and `--vae` so that the run decodes with those exact statistics and VAE.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UsageError
from .common import (DIT_EMBEDDER_PREFIXES, Mapped, Source, check_derived, is_state_dict, rename,
                     require_state_dict, strip_prefix, swap_prefix)

NAME = "lightningdit"
BACKBONES = ("dit",)
FORMULATIONS = ("rf",)
PUBLISHED = ("github.com/hustvl/LightningDiT (README: Hugging Face hustvl/lightningdit-xl-imagenet256-800ep, "
             "hustvl/vavae-imagenet256-f16d32-dinov2; latents_stats.pt ships with the checkpoint)")
CONVENTIONS = [
    "time direction: LightningDiT's network gets t_LDiT = 1 − t (t_LDiT = 1 is data); "
    "diffusion.net_convention = sit feeds 1 − t",
    "velocity sign: LightningDiT predicts data − noise = −(ε − x0); net_convention = sit negates it",
    "latents: z·std + mean with LightningDiT's latents_stats (latent_multiplier 1.0 for VA-VAE)",
]
WRAPPERS = ("module.", "_orig_mod.")
METADATA = ("config", "args", "steps", "step", "epoch", "train_steps")


def extract(obj, path: Path, weights: str) -> Source:
    if is_state_dict(obj):  # a released file: the EMA network alone
        sd = strip_prefix(obj, WRAPPERS)
        return Source(ema=sd, raw=None) if weights == "ema" else Source(ema=None, raw=sd)
    if not isinstance(obj, dict) or not ({"ema", "model"} & set(obj)):
        keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise UsageError(f"{path} is not a {NAME} checkpoint: expected a state dict or the keys model, ema, opt "
                         f"of its train.py, found {keys}")
    return extract_dict(obj, path, NAME)


def extract_dict(obj: dict, path: Path, family: str, heads: tuple[str, ...] = (), head_reason: str = "") -> Source:
    """`{'model', 'ema', 'opt', …}` (LightningDiT, SiT, DiT, REPA, SRA train.py): the networks, drops listed."""
    dropped: dict[str, list[str]] = {}
    nets = {}
    for name in ("ema", "model"):
        if name in obj:
            sd = strip_prefix(require_state_dict(obj[name], name, path), WRAPPERS)
            if heads:
                head_keys = [k for k in sd if k.startswith(heads)]
                if head_keys:
                    dropped.setdefault(head_reason, []).extend(f"{name}/{k}" for k in head_keys)
                sd = {k: v for k, v in sd.items() if not k.startswith(heads)}
            nets[name] = sd
    step = None
    for k, v in obj.items():
        if k in ("ema", "model"):
            continue
        if k == "opt":
            dropped.setdefault("optimizer state", []).append("opt")
        elif k in METADATA:
            dropped.setdefault("training metadata", []).append(k)
            if k in ("steps", "step", "train_steps") and isinstance(v, int):
                step = v
        else:
            raise UsageError(f"{path}: unexpected entry {k!r} in a {family} checkpoint (expected model, ema, opt, "
                             f"{', '.join(METADATA)})")
    return Source(ema=nets.get("ema"), raw=nets.get("model"), dropped=dropped, step=step)


def convert(sd, model: torch.nn.Module, path: Path) -> Mapped:
    from ..nets.dit import rope_tables

    cfg = model.config
    tables = rope_tables(cfg["width"] // cfg["heads"], cfg["image_size"] // cfg["patch_size"]) if model.use_rope \
        else (None, None)  # computed here, on the CPU, whatever device the model was built on
    for key, table in zip(("feat_rope.freqs_cos", "feat_rope.freqs_sin"), tables):
        if key in sd:
            if table is None:
                raise UsageError(f"{path} was trained with RoPE ({key}); set model.rope: true in the recipe")
            check_derived(sd, key, table, path)
    if model.use_rope and "feat_rope.freqs_cos" not in sd:
        raise UsageError(f"{path} has no RoPE tables (feat_rope.*): it was trained without RoPE; "
                         f"set model.rope: false in the recipe")

    def key(k: str) -> str | None:
        if k.startswith("feat_rope."):
            return None
        return swap_prefix(k, {"x_embedder.proj.": "x_embedder.", **DIT_EMBEDDER_PREFIXES})

    return rename(sd, key, drop_reason="RoPE tables (computed by ddaepp; checked equal)")


def recipe_overrides(recipe) -> list[str]:
    return ["diffusion.net_convention=sit"]
