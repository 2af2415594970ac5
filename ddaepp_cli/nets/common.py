"""What the backbones (unet.py, uvit.py, dit.py, dit_orig.py) share: time sinusoids, the 2-D sin-cos
position table, adaLN modulation, patch tokens and unpatchify, config capture, the `build_*` preset +
override check, and the checks of the conditioning inputs every `_forward` starts with.

Two timestep sinusoids, kept apart because they differ in value, not just in name:

* `sinusoidal_embedding` — DDAE's UNet (FutureXiang/ddae `model/block.py` `TimeEmbedding`): [sin, cos],
  frequencies exp(−k·ln(max_period)/(dim/2 − 1)), i.e. endpoint-inclusive from 1 down to 1/max_period.
* `timestep_embedding` — DiT/SiT (facebookresearch/DiT `models.py` `TimestepEmbedder`), LightningDiT and
  U-ViT (baofff/U-ViT `libs/uvit.py` `timestep_embedding`), one function in all three: [cos, sin],
  frequencies exp(−k·ln(max_period)/(dim/2)), the lowest 1/max_period^(1 − 2/dim).

Swapping one for the other would change every trained or imported network's output, so each backbone
keeps its reference's. Both compute in float32 whatever the input dtype.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch
from einops import rearrange
from torch import nn

from ddaepp_cli.errors import UsageError, choices
from ddaepp_cli.nets.selfcond import SelfCond
from ddaepp_cli.nets.taps import TapModule

# ------------------------------------------------------------------------------------------------
# Time and position embeddings
# ------------------------------------------------------------------------------------------------


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """DDAE's sinusoid of a (B,) time: [sin(t·f_k), cos(t·f_k)], f_k = exp(−k·ln(max_period)/(dim/2 − 1))."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(k * (-math.log(max_period) / (half - 1)))  # (D/2,)
    args = t.float()[:, None] * freqs[None, :]  # (B, D/2)
    return torch.cat((args.sin(), args.cos()), dim=1)  # (B, D)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0, freq_shift: int = 0) -> torch.Tensor:
    """DiT / U-ViT `timestep_embedding` of a (B,) time: [cos(t·f_k), sin(t·f_k)],
    f_k = exp(−ln(max_period)·k/(dim/2 − freq_shift)). freq_shift 1 is diffusers' `get_timestep_embedding`
    with `downscale_freq_shift=1`, as its DiTTransformer2DModel embeds time (CombinedTimestepLabelEmbeddings)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]  # (B, D/2)
    return torch.cat((args.cos(), args.sin()), dim=1)  # (B, D)


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """MAE/DiT `get_2d_sincos_pos_embed` (grid×grid, dim) float64: first dim/2 channels encode the
    column, last dim/2 the row (its `meshgrid(grid_w, grid_h)`), each [sin, cos] over dim/4 frequencies."""
    coords = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))  # (w, h) grids

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10_000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))  # (d/2,)
        out = pos.reshape(-1)[:, None] * omega[None]  # (N, d/2)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (N, d)

    return np.concatenate([one_d(dim // 2, coords[0]), one_d(dim // 2, coords[1])], axis=1)  # (N, dim)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of DiT `models.py`: x·(1 + scale) + shift, (B, N, D) with (B, D) shift/scale."""
    return x * (1 + scale[:, None]) + shift[:, None]  # (B, N, D)


# ------------------------------------------------------------------------------------------------
# Patches
# ------------------------------------------------------------------------------------------------


class FinalLayer(nn.Module):
    """adaLN-modulated norm → Linear to p·p·C_out per token, shared by both DiTs. `norm` is DiT's affine-free
    LayerNorm or LightningDiT's RMSNorm. The two references register their modules in different orders
    (DiT `models.py`: norm, linear, modulation; LightningDiT: norm, modulation, linear); `adaln_first` keeps
    each one's order, so seeded initialisation and state-dict order match the reference's."""

    def __init__(self, dim: int, patch: int, out_channels: int, norm: nn.Module, *, adaln_first: bool):
        super().__init__()
        self.norm_final = norm

        def adaln() -> None:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

        def linear() -> None:
            self.linear = nn.Linear(dim, patch * patch * out_channels)

        for make in ((adaln, linear) if adaln_first else (linear, adaln)):
            make()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p·p·C_out)


def patch_tokens(x: torch.Tensor) -> torch.Tensor:
    """A patch-embedding conv's output (B, D, h, w) → tokens (B, h·w, D), row-major."""
    return rearrange(x, "b d h w -> b (h w) d")


def unpatchify(h: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """Tokens (B, N, p·p·C), patch-internal order (p1, p2, C) as DiT and U-ViT → image (B, C, H, W)."""
    return rearrange(h, "b (hp wp) (p1 p2 c) -> b c (hp p1) (wp p2)", hp=height // patch, p1=patch, p2=patch)


# ------------------------------------------------------------------------------------------------
# Construction
# ------------------------------------------------------------------------------------------------


def init_options(cls: type) -> list[str]:
    """The keyword options of a backbone class (its `__init__` parameters less `self` and `name`)."""
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "name")]


def init_config(cls: type, values: dict) -> dict:
    """The `config` a backbone saves in checkpoints: its options' values, taken from `locals()`."""
    return {key: values[key] for key in init_options(cls)}


def check_token_grid(name: str, image_size: int, patch_size: int, width: int, heads: int, head_multiple: int) -> None:
    """A transformer's patch grid and heads: patches tile the image; each head's width is a multiple of
    `head_multiple` (UViT 2; LightningDiT 4, for its 2-D RoPE over half-heads)."""
    if patch_size < 1 or image_size % patch_size:
        raise UsageError(f"{name}: image_size {image_size} is not divisible by patch_size {patch_size}")
    if width % heads or (width // heads) % head_multiple:
        raise UsageError(f"{name}: width {width} must split into {heads} heads whose width is a multiple of "
                         f"{head_multiple}")


def build_preset(cls: type, presets: dict[str, dict], preset: str, overrides: dict, *, what: str, name: str,
                 none_is_preset: bool = False):
    """`cls(**presets[preset], **overrides, name=name)`; an unknown preset or option fails naming the valid ones.
    `none_is_preset`: an override of None keeps the preset's value (the DiT recipes leave sizes unset), except
    `selfcond_layer`, where None means no self-conditioning."""
    if none_is_preset:
        overrides = {k: v for k, v in overrides.items() if v is not None or k == "selfcond_layer"}
    if preset not in presets:
        raise UsageError(f"unknown {what} {preset!r}; valid: {choices(presets)}")
    valid = init_options(cls)
    for key in overrides:
        if key not in valid:
            raise UsageError(f"unknown option {key!r} for {name}; valid: {choices(valid)}")
    return cls(**{**presets[preset], **overrides, "name": name})


# ------------------------------------------------------------------------------------------------
# Conditioning inputs of `_forward`
# ------------------------------------------------------------------------------------------------


def batch_time(t: torch.Tensor, batch: int) -> torch.Tensor:
    """A scalar time broadcast to (B,); a (B,) time unchanged."""
    return t.expand(batch) if t.ndim == 0 else t


def check_unconditional(model, class_labels: torch.Tensor | None, aug_label: torch.Tensor | None) -> None:
    """Unconditional backbones with an optional augmentation label (UNet, UViT: `model.augment_dim`)."""
    if class_labels is not None:
        raise UsageError(f"{model.backbone_name} is unconditional: class_labels must be None")
    if aug_label is not None and model.augment_dim == 0:
        raise UsageError(f"{model.backbone_name} got aug_label but was built with augment_dim=0")


def class_labels_or_null(
    model, class_labels: torch.Tensor | None, aug_label: torch.Tensor | None, batch: int, device: torch.device
) -> torch.Tensor:
    """Label-conditional backbones (DiTs, `model.num_classes`, no augmentation label): `class_labels=None`
    means the null row `num_classes` for a conditional model and row 0 for an unconditional one."""
    if aug_label is not None:
        raise UsageError(f"{model.backbone_name} takes no augmentation label")
    if class_labels is None:
        return torch.full((batch,), model.num_classes, device=device)
    if model.num_classes == 0:
        raise UsageError(f"{model.backbone_name} is unconditional (num_classes 0): class_labels must be None")
    return class_labels


# ------------------------------------------------------------------------------------------------
# The adaLN-Zero transformer trunk of both DiTs (dit.py: LightningDiT, dit_orig.py: DiT/SiT)
# ------------------------------------------------------------------------------------------------

FREQ_DIM = 256  # t-embedder sinusoid width (DiT `frequency_embedding_size`)


class AdaLNTrunk(TapModule):
    """What LightningDiT and the original DiT/SiT share once their layers exist: `x_embedder` (a patch
    conv), `t_embedder`, `y_embedder`, `pos_embed`, `blocks` (adaLN-Zero) and `final_layer`.

    Taps `"1"`…`"depth"` are the blocks' output tokens; self-conditioning (DDAE++ §4.1) may follow any
    block but the last, and its pooled tokens condition the later blocks and the final layer.
    """

    def _init_adaln_weights(self, patch_conv: nn.Conv2d) -> None:
        """DiT `models.py` `initialize_weights` (LightningDiT keeps it), rule by rule."""
        for m in self.modules():  # xavier-uniform Linear weights, zero biases (timm's layers included)
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = patch_conv.weight  # patch embed: xavier over the flattened kernel, zero bias
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(patch_conv.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _selfcond_and_taps(self, name: str, depth: int, width: int, selfcond_layer, selfcond_mode: str) -> None:
        """Build self-conditioning after the weight init (so P stays 0) and register the block taps."""
        names = [str(k) for k in range(1, depth + 1)]
        self.selfcond_layer, self.selfcond = None, None
        if selfcond_layer is not None:
            selfcond_layer = str(selfcond_layer)
            if selfcond_layer not in names[:-1]:  # after the last block only the final layer would see it
                raise UsageError(f"invalid selfcond_layer {selfcond_layer!r} for {name} (depth {depth}); "
                                 f"valid: {choices(names[:-1])}")
            self.selfcond_layer = selfcond_layer
            self.selfcond = SelfCond(width, width, FREQ_DIM, mode=selfcond_mode)
        self._register_taps(name, names, {n: width for n in names})

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}  # frozen anyway; listed so AdamW never sees it with decay

    def _blocks_and_head(self, h, c, t_sin, taps: frozenset[str], stop_after: str | None, size: tuple[int, int],
                         *block_args):
        """The blocks on tokens h (B, N, D) with conditioning c (B, D), then the final layer on c as
        self-conditioning left it → (output (B, C_out, H, W), or None after `stop_after`; {tap: (B, N, D)})."""
        feats: dict[str, torch.Tensor] = {}
        for k, block in enumerate(self.blocks, start=1):
            h = block(h, c, *block_args)
            name = str(k)
            if name in taps:
                feats[name] = h
            if stop_after == name:
                return None, feats
            if name == self.selfcond_layer:
                c = self.selfcond(h.mean(dim=1), t_sin, c)  # (B, D) → used by blocks ℓ+1…N and the head
        return unpatchify(self.final_layer(h, c), self.patch_size, *size), feats
