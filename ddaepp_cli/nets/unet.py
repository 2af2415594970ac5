"""The DDAE UNets `ddpm` and `ddpmpp` (FutureXiang/ddae `model/unet.py`; DDAE++ Tab. 8).

Topology (FutureXiang/ddae `model/unet.py` `forward_core`): image_proj → encoder (per level: `n_blocks` ResAtt blocks, then a
down-sampler except at the last level; every output is pushed on the skip stack) → middle
(Res → Attn → Res) → decoder (per level, reversed: `n_blocks + 1` ResAtt blocks each eating
concat(x, skip.pop()), then an up-sampler except at level 0) → GN(8) → SiLU → Conv3×3.

Layer names (the tap API, `taps.py`), in execution order:
* `in_1 … in_K` — the K skip-stack entries in push order: `in_1` is image_proj's output, then every
  encoder ResAtt block and down-sampler output. K equals the number of decoder blocks, and `in_k` is
  exactly the skip that `out_{K+1-k}` concatenates.
* `mid` — the middle block's output.
* `out_1 … out_K` — the decoder ResAtt block outputs (after their attention, before any following
  up-sampler): DDAE's hook names (FutureXiang/ddae `model/unet.py`), 12 for `ddpm` and 15 for `ddpmpp`.

Self-conditioning (DDAE++ §4.1; docs/design.md §3): with `selfcond_layer="out_ℓ"`, the output of
`out_ℓ` is mean-pooled over H, W and `SelfCond` adds its projection to the time embedding used by every
later decoder block (BigGAN up-blocks included); encoder, middle and blocks ≤ ℓ keep the original.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddaepp_cli.errors import UsageError, choices
from ddaepp_cli.nets.layers import (
    AttentionBlock,
    Downsample,
    ResidualBlock,
    TimeEmbedding,
    Upsample,
    group_norm,
)
from ddaepp_cli.nets.common import batch_time, build_preset, check_unconditional, init_config, sinusoidal_embedding
from ddaepp_cli.nets.selfcond import SelfCond
from ddaepp_cli.nets.taps import TapModule

# DDAE `config/*.yaml` and DDAE++ Tab. 8. Counted parameters (augment_dim 0): ddpm 35,746,307,
# ddpmpp 56,524,291 (docs/design.md §4). Recipes pick a preset and override little
# (dropout 0.13 for EDM, augment_dim 9 with non-leaky augmentation).
UNET_PRESETS: dict[str, dict] = {
    "ddpm": dict(
        channels=128, ch_mults=(1, 2, 2, 2), n_blocks=2, attn_resolutions=(16,), dropout=0.1, resample="conv"
    ),
    "ddpmpp": dict(
        channels=128, ch_mults=(2, 2, 2), n_blocks=4, attn_resolutions=(16,), dropout=0.1, resample="biggan"
    ),
}

RESAMPLERS = ("conv", "biggan")


# ------------------------------------------------------------------------------------------------
# UNet-specific composite blocks
# ------------------------------------------------------------------------------------------------


class ResAttBlock(nn.Module):
    """ResidualBlock followed by single-head attention (or nothing)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float, attn: bool):
        super().__init__()
        self.res = ResidualBlock(in_channels, out_channels, emb_dim, dropout)
        self.attn = AttentionBlock(out_channels) if attn else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, emb))


class MiddleBlock(nn.Module):
    """Res → Attention → Res at the lowest resolution (always attends)."""

    def __init__(self, channels: int, emb_dim: int, dropout: float):
        super().__init__()
        self.res1 = ResidualBlock(channels, channels, emb_dim, dropout)
        self.attn = AttentionBlock(channels)
        self.res2 = ResidualBlock(channels, channels, emb_dim, dropout)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x, emb)), emb)


# ------------------------------------------------------------------------------------------------
# UNet
# ------------------------------------------------------------------------------------------------


class UNet(TapModule):
    """DDAE UNet: ε/v/F_θ prediction for pixel diffusion, with the feature-tap API of `taps.py`.

    `model.config` holds the resolved constructor arguments except `name` (= `model.backbone_name`), so
    `build_backbone(model.backbone_name, **model.config)` rebuilds it.
    `class_labels` must be None (the UNets are unconditional; a label would be silently ignored
    otherwise) and `aug_label` needs `augment_dim > 0` (an ignored label would leak the augmentation).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int | None = None,
        image_size: int = 32,
        channels: int = 128,
        ch_mults: Sequence[int] = (1, 2, 2, 2),
        n_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        resample: str = "conv",
        augment_dim: int = 0,
        selfcond_layer: str | None = None,
        selfcond_mode: str = "adaptive",
        name: str = "unet",
    ):
        super().__init__()
        ch_mults, attn_resolutions = tuple(ch_mults), tuple(attn_resolutions)
        out_channels = in_channels if out_channels is None else out_channels
        self.config = init_config(UNet, locals())
        n_levels = len(ch_mults)
        resolutions = [image_size >> level for level in range(n_levels)]
        self._check_config(name, n_levels, image_size, channels, n_blocks, resolutions, attn_resolutions, resample)
        emb_dim = 4 * channels  # DDAE: time_channels = 4·n_channels = 512, sinusoid n_channels = 128
        self.sinusoid_dim = channels
        self.augment_dim = augment_dim

        self.time_emb = TimeEmbedding(channels, emb_dim, augment_dim)
        self.image_proj = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1)
        layer_names, feature_dims = ["in_1"], {"in_1": channels}
        skip_channels = [channels]

        counts = {"in": 1, "out": 0}

        def tap(prefix: str, ch: int) -> str:  # next name in_k / out_k, recorded with its channels
            counts[prefix] += 1
            name_ = f"{prefix}_{counts[prefix]}"
            layer_names.append(name_)
            feature_dims[name_] = ch
            return name_

        # Encoder: keys say where a block sits ("16x16_block2", "16x16_down"), as in EDM2.
        self.enc = nn.ModuleDict()
        enc_taps = []
        ch = channels
        for level, (mult, res) in enumerate(zip(ch_mults, resolutions)):
            attn = res in attn_resolutions
            for i in range(n_blocks):
                self.enc[f"{res}x{res}_block{i + 1}"] = ResAttBlock(ch, channels * mult, emb_dim, dropout, attn)
                ch = channels * mult
                enc_taps.append(tap("in", ch))
                skip_channels.append(ch)
            if level < n_levels - 1:
                if resample == "biggan":
                    self.enc[f"{res}x{res}_down"] = ResidualBlock(ch, ch, emb_dim, dropout, resample="down")
                else:
                    self.enc[f"{res}x{res}_down"] = Downsample(ch)
                enc_taps.append(tap("in", ch))
                skip_channels.append(ch)

        self.mid = MiddleBlock(ch, emb_dim, dropout)
        layer_names.append("mid")
        feature_dims["mid"] = ch

        # Decoder: n_blocks + 1 blocks per level, each consuming one skip.
        self.dec = nn.ModuleDict()
        dec_taps: list[str | None] = []  # None for up-samplers (not tappable: DDAE hooks ResAtt blocks only)
        for level in reversed(range(n_levels)):
            res, out_ch = resolutions[level], channels * ch_mults[level]
            attn = res in attn_resolutions
            for i in range(n_blocks + 1):
                self.dec[f"{res}x{res}_block{i + 1}"] = ResAttBlock(
                    ch + skip_channels.pop(), out_ch, emb_dim, dropout, attn
                )
                ch = out_ch
                dec_taps.append(tap("out", ch))
            if level > 0:
                if resample == "biggan":
                    self.dec[f"{res}x{res}_up"] = ResidualBlock(ch, ch, emb_dim, dropout, resample="up")
                else:
                    self.dec[f"{res}x{res}_up"] = Upsample(ch)
                dec_taps.append(None)
        assert not skip_channels, "every skip must be consumed"

        self.out_norm = group_norm(ch, groups=8)  # DDAE's final norm has 8 groups (FutureXiang/ddae `model/unet.py`)
        self.out_conv = nn.Conv2d(ch, out_channels, kernel_size=3, padding=1)

        self._enc_taps, self._dec_taps = tuple(enc_taps), tuple(dec_taps)
        self._register_taps(name, layer_names, feature_dims)

        # Self-conditioning: any decoder block that has a later one to condition.
        self.selfcond_layer = selfcond_layer
        self.selfcond = None
        if selfcond_layer is not None:
            valid = [n for n in dec_taps if n is not None][:-1]
            if selfcond_layer not in valid:
                raise UsageError(
                    f"invalid selfcond_layer {selfcond_layer!r} for {name}; valid: {choices(valid)}"
                )
            self.selfcond = SelfCond(feature_dims[selfcond_layer], emb_dim, channels, mode=selfcond_mode)

    @staticmethod
    def _check_config(name, n_levels, image_size, channels, n_blocks, resolutions, attn_resolutions, resample):
        if n_levels < 1 or n_blocks < 1:
            raise UsageError(f"{name}: ch_mults must be non-empty and n_blocks >= 1")
        if image_size % 2 ** (n_levels - 1):
            raise UsageError(
                f"{name}: image_size {image_size} must be divisible by 2**(levels-1) = {2 ** (n_levels - 1)}"
            )
        if channels % 32:
            raise UsageError(f"{name}: channels {channels} must be a multiple of 32 (GroupNorm with 32 groups)")
        if resample not in RESAMPLERS:
            raise UsageError(f"{name}: unknown resample {resample!r}; valid: {choices(RESAMPLERS)}")
        bad = [r for r in attn_resolutions if r not in resolutions]
        if bad:
            raise UsageError(
                f"{name}: attention resolution {bad[0]} is not a level resolution; valid: {choices(resolutions)}"
            )

    def _forward(self, x, t, *, taps: frozenset[str], stop_after: str | None, aug_label=None, class_labels=None):
        """TapModule's `_forward` (taps.py); `aug_label` (B, augment_dim) or None, `class_labels` None."""
        check_unconditional(self, class_labels, aug_label)
        t = batch_time(t, x.shape[0])
        feats: dict[str, torch.Tensor] = {}

        t_sin = sinusoidal_embedding(t, self.sinusoid_dim)  # (B, F)
        emb = self.time_emb(t_sin, aug_label)  # (B, D)

        x = self.image_proj(x)  # (B, C, H, W)
        skips = [x]
        if "in_1" in taps:
            feats["in_1"] = x
            if stop_after == "in_1":
                return None, feats
        for name, block in zip(self._enc_taps, self.enc.values()):
            x = block(x, emb)  # (B, C_l, H_l, W_l)
            skips.append(x)
            if name in taps:
                feats[name] = x
                if name == stop_after:
                    return None, feats

        x = self.mid(x, emb)
        if "mid" in taps:
            feats["mid"] = x
            if stop_after == "mid":
                return None, feats

        for name, block in zip(self._dec_taps, self.dec.values()):
            if name is None:  # up-sampler
                x = block(x, emb)  # (B, C, 2H, 2W)
                continue
            x = block(torch.cat((x, skips.pop()), dim=1), emb)  # (B, C_l, H_l, W_l)
            if name in taps:
                feats[name] = x
                if name == stop_after:
                    return None, feats
            if name == self.selfcond_layer:
                emb = self.selfcond(x.mean(dim=(2, 3)), t_sin, emb)  # (B, C_l) pooled → (B, D)

        return self.out_conv(F.silu(self.out_norm(x))), feats  # (B, C_out, H, W)


def build_unet(preset: str, **overrides) -> UNet:
    """`UNet` from a named preset with recipe overrides; an unknown option fails listing the valid ones."""
    return build_preset(UNet, UNET_PRESETS, preset, overrides, what="UNet preset", name=preset)
