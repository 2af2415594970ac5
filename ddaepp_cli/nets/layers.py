"""Building blocks of the DDAE UNets (FutureXiang/ddae `model/block.py`, `model/unet.py`).

Shapes use B, C, H, W (image) and D (embedding width). Every block is plain PyTorch with default
initialisation (the DDAE UNet zero-inits nothing), works on channels_last inputs and under bf16 autocast
(no `.view` on tensors that may be non-contiguous; the sinusoid is computed in float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32  # GroupNorm groups in blocks; the UNet's final norm uses 8 (FutureXiang/ddae `model/unet.py`)


def group_norm(channels: int, groups: int = GROUPS) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels)  # eps 1e-5, affine: PyTorch defaults, as in DDAE


# ------------------------------------------------------------------------------------------------
# Time embedding
# ------------------------------------------------------------------------------------------------


class TimeEmbedding(nn.Module):
    """sinusoid (B, F) [+ bias-free Linear(aug)] → Linear(F→D) → SiLU → Linear(D→D) (FutureXiang/ddae
    `model/block.py` `TimeEmbedding`; the sinusoid is common.sinusoidal_embedding).

    No SiLU after the last Linear: every ResidualBlock applies its own. The augmentation projection has
    no bias, so `aug_label=None` and an all-zero label give the same bits — what makes the EDM
    augmentation non-leaky at sampling/probing time (label None).
    """

    def __init__(self, sinusoid_dim: int, emb_dim: int, augment_dim: int = 0):
        super().__init__()
        self.sinusoid_dim = sinusoid_dim
        self.augment_dim = augment_dim
        self.aug_proj = nn.Linear(augment_dim, sinusoid_dim, bias=False) if augment_dim > 0 else None
        self.lin1 = nn.Linear(sinusoid_dim, emb_dim)
        self.lin2 = nn.Linear(emb_dim, emb_dim)

    def forward(self, t_sin: torch.Tensor, aug_label: torch.Tensor | None = None) -> torch.Tensor:
        h = t_sin  # (B, F)
        if aug_label is not None and self.aug_proj is not None:
            h = h + self.aug_proj(aug_label.to(h.dtype))  # (B, F); x + 0.0 == x bit for bit
        return self.lin2(F.silu(self.lin1(h)))  # (B, D)


# ------------------------------------------------------------------------------------------------
# Residual, attention and resampling blocks
# ------------------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """GN→SiLU→Conv3 (+ Linear(SiLU(emb)) added per channel) → GN→SiLU→Dropout→Conv3, plus shortcut.

    The time injection is a plain add, not scale/shift (FutureXiang/ddae
    `model/block.py` `ResidualBlock`, despite its "adaptive group norm" comment). No skip
    rescaling. `resample="up"|"down"` makes it the BigGAN-style up/down block of `ddpmpp`: nearest ×2 or
    2×2 average pooling applied to both paths right before conv1 (no conv in the resampler itself).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        dropout: float = 0.1,
        resample: str | None = None,
    ):
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        self.resample = resample
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.shortcut = nn.Identity()

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")  # (B, C, 2H, 2W)
        if self.resample == "down":
            return F.avg_pool2d(x, 2)  # (B, C, H/2, W/2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self._resample(F.silu(self.norm1(x))))  # (B, C_out, H', W')
        x = self._resample(x)
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, C_out, 1, 1) broadcast over H', W'
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Self-attention over the H·W positions: GN32 → Linear(C→3C) → SDPA → Linear(C→C) → residual.

    DDAE uses one head of width C (FutureXiang/ddae `model/block.py`). Its logits are (q/C^¼)·(k/C^¼), i.e. the usual
    1/√d_head scale, which is SDPA's default. The qkv layout per head is [q | k | v] like DDAE's.
    """

    def __init__(self, channels: int, n_heads: int = 1):
        super().__init__()
        if channels % n_heads:
            raise ValueError(f"channels {channels} not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        qkv = self.qkv(h).reshape(B, H * W, self.n_heads, 3 * C // self.n_heads)  # (B, HW, heads, 3·C/heads)
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=-1)  # each (B, heads, HW, C/heads)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        a = self.out(a.transpose(1, 2).reshape(B, H * W, C))  # (B, HW, C)
        return x + a.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


class Upsample(nn.Module):
    """Nearest ×2 then Conv3×3 (the `ddpm` preset's resampler). `emb` is unused: uniform call signature."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))  # (B, C, 2H, 2W)


class Downsample(nn.Module):
    """Conv3×3 stride 2 (the `ddpm` preset's resampler). `emb` is unused: uniform call signature."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)  # (B, C, H/2, W/2)
