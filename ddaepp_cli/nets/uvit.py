"""UViT-S for CIFAR (official U-ViT `libs/uvit.py` + `configs/cifar10_uvit_small.py`),
with DDAE++'s [CLS] self-conditioning and augmentation token (DDAE++ §4.1–4.2, Fig. 2).

Everything is a token (B, N, D): the raw sinusoid of the time (no MLP), the optional augmentation
token, the optional [CLS] token and the 16×16 = 256 patch tokens of 2×2 patches. 13 pre-LN transformer
blocks — 6 `in`, 1 `mid`, 6 `out` — where `out_k` first maps concat(x, skip) through Linear(2D→D), the
skip being the output of in-block 7−k (LIFO, every token included). Head: LN → Linear(D → p·p·C) →
drop the extra tokens → unpatchify → Conv3×3. UViT-S: 44,255,328 parameters (docs/design.md §4).

Sequence layout:   [CLS]? | time | aug? | patches…        (extras = tokens before the patches)

* Positional embedding: learned, one row per time / aug / patch token. [CLS] has no row of its own:
  it is a learned vector already, and a second learned copy would escape the weight decay that
  DDAE++ App. B puts on [CLS] (but not on the positional embedding). Counts: +512 for [CLS];
  +4,608 (bias-free Linear(9→512)) + 512 (its row) for the augmentation token;
  both: 44,260,960.
* Augmentation token = Linear(9→D, bias=False)(aug_label): `aug_label=None` gives a zero token, bit
  for bit the same as an all-zero label — "no augmentation" at sampling and probing (EDM non-leaky).
* [CLS]↔aug masking (DDAE++ Fig. 2b): in every block the two logits (CLS→aug) and (aug→CLS) are −∞;
  every other pair attends. `mask_cls_aug=False` keeps full attention (the ablation of §4.2).
* Attention runs in float32 as in U-ViT (its `.float()` before SDPA) — stabler under bf16 autocast.

Time input (open in DDAE++; docs/design.md §2): the formulation hands every backbone its `net_time`
(DDPM: t/T ∈ (0, 1], as the DDAE UNets need). The MLP-free token cannot stretch that narrow range, so
the UViT multiplies by `time_scale` before the sinusoid: 1000 makes the DDPM token the sinusoid of the
integer step t ∈ {1..1000} (U-ViT itself feeds 999·t for t ∈ (0, 1]). DDAE++ trains UViT with DDPM only
(EDM and RF were unstable, Tab. 2 footnote).

Feature taps (taps.py): `in_1..in_6`, `mid`, `out_1..out_6` return the block's output patch tokens,
(B, 256, D) — the raw residual stream, extra tokens dropped (a probe averages over the 256). `cls`
(models with [CLS] only) is the [CLS] token, (B, 1, D), at the output of block `cls_tap` (default
`out_2`, the Tab. 9 probing layer of UViT-S); it sits right after that block in `layer_names`, so
`forward_features(..., "cls")` stops there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ddaepp_cli.errors import UsageError, choices
from ddaepp_cli.nets.common import (batch_time, build_preset, check_token_grid, check_unconditional, init_config,
    patch_tokens, timestep_embedding, unpatchify)  # fmt: skip
from ddaepp_cli.nets.taps import TapModule

# U-ViT `configs/cifar10_uvit_small.py` (DDAE++ Tab. 8: patch 2, hidden 512, 13 layers, 8 heads, 44.3M).
UVIT_PRESETS: dict[str, dict] = {
    "S": dict(patch_size=2, width=512, depth=12, heads=8, mlp_ratio=4.0, qkv_bias=False),
}


# ------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with fused SDPA; qkv laid out (3, heads, D/heads) like U-ViT's."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q, k, v = qkv.float().unbind(0)  # each (B, H, N, D/H), float32 as U-ViT
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, D/H)
        return self.proj(rearrange(a, "b h n d -> b n (h d)").to(x.dtype))  # (B, N, D)


class Block(nn.Module):
    """Pre-LN transformer block; with `skip`, concat(x, skip) → Linear(2D→D) first (U-ViT long skip)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool = False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))  # timm Mlp, exact GELU

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat((x, skip), dim=-1))  # (B, N, 2D) → (B, N, D)
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))  # (B, N, D)


# ------------------------------------------------------------------------------------------------
# UViT
# ------------------------------------------------------------------------------------------------


class UViT(TapModule):
    """U-ViT noise predictor with the feature-tap API; see the module docstring for layout and taps.

    `depth` counts in- plus out-blocks as U-ViT does (12 → 6 + 1 mid + 6 = 13 blocks). `class_labels`
    must be None (unconditional); `aug_label` needs `augment_dim > 0`.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        image_size: int = 32,
        patch_size: int = 2,
        width: int = 512,
        depth: int = 12,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        time_scale: float = 1000.0,
        augment_dim: int = 0,
        cls_token: bool = False,
        cls_tap: str = "out_2",
        mask_cls_aug: bool = True,
        name: str = "uvit",
    ):
        super().__init__()
        self.config = init_config(UViT, locals())
        check_token_grid(name, image_size, patch_size, width, heads, head_multiple=2)
        if depth < 0 or depth % 2:
            raise UsageError(f"{name}: depth {depth} must be even (in + out blocks; 12 for UViT-S)")
        self.in_channels, self.patch_size, self.width = in_channels, patch_size, width
        self.time_scale = float(time_scale)  # net_time × time_scale feeds the sinusoid (module doc)
        self.augment_dim = augment_dim
        n_patches = (image_size // patch_size) ** 2
        half = depth // 2

        # Token layout: [CLS]? | time | aug? | patches (module doc). pos_embed rows: time, aug?, patches.
        self.cls_index = 0 if cls_token else None
        self.time_index = int(cls_token)
        self.aug_index = self.time_index + 1 if augment_dim > 0 else None
        self.extras = self.time_index + 1 + int(augment_dim > 0)

        self.patch_embed = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.aug_embed = nn.Linear(augment_dim, width, bias=False) if augment_dim > 0 else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if cls_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras - int(cls_token) + n_patches, width))
        self.in_blocks = nn.ModuleList(Block(width, heads, mlp_ratio, qkv_bias) for _ in range(half))
        self.mid_block = Block(width, heads, mlp_ratio, qkv_bias)
        self.out_blocks = nn.ModuleList(Block(width, heads, mlp_ratio, qkv_bias, skip=True) for _ in range(half))
        self.norm = nn.LayerNorm(width)
        self.decoder_pred = nn.Linear(width, patch_size**2 * in_channels)
        self.final_layer = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)

        # DDAE++ Fig. 2b: no direct attention between [CLS] and the augmentation token, in every block.
        mask = None
        if mask_cls_aug and cls_token and augment_dim > 0:
            n = self.extras + n_patches
            mask = torch.ones(n, n, dtype=torch.bool)  # True = may attend (SDPA convention)
            mask[self.cls_index, self.aug_index] = mask[self.aug_index, self.cls_index] = False
        self.register_buffer("attn_mask", mask, persistent=False)

        # U-ViT init: trunc-normal(0.02) pos-embed and Linear weights, zero biases, LayerNorm (1, 0);
        # convs keep PyTorch's default. [CLS]: trunc-normal(0.02) too, like U-ViT's other tokens (`libs/uvit.py`).
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

        names = [f"in_{k}" for k in range(1, half + 1)] + ["mid"] + [f"out_{k}" for k in range(1, half + 1)]
        self.cls_tap = None
        if cls_token:
            if cls_tap not in names:
                raise UsageError(f"{name}: unknown cls_tap {cls_tap!r}; valid: {choices(names)}")
            self.cls_tap = cls_tap
            names.insert(names.index(cls_tap) + 1, "cls")
        self._register_taps(name, names, {n: width for n in names})

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """DDAE++ App. B: no decay on the positional embedding (nor biases/norms, which have ndim 1);
        [CLS] (1, 1, D) is decayed. `training.state.param_groups` reads this."""
        return {"pos_embed"}

    def _tokens(self, x: torch.Tensor, t: torch.Tensor, aug_label: torch.Tensor | None) -> torch.Tensor:
        B = x.shape[0]
        patches = patch_tokens(self.patch_embed(x))  # (B, N_p, D)
        time = timestep_embedding(t * self.time_scale, self.width).to(patches.dtype)[:, None]  # (B, 1, D)
        seq = [time]
        if self.aug_embed is not None:
            if aug_label is None:  # zero token == Linear(0) bit for bit: "no augmentation"
                seq.append(patches.new_zeros(B, 1, self.width))
            else:
                seq.append(self.aug_embed(aug_label.to(patches.dtype))[:, None])  # (B, 1, D)
        x = torch.cat((*seq, patches), dim=1) + self.pos_embed  # (B, extras', D)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(B, -1, -1).to(x.dtype), x), dim=1)  # (B, extras + N_p, D)
        return x

    def _forward(self, x, t, *, taps: frozenset[str], stop_after: str | None, aug_label=None, class_labels=None):
        """TapModule's `_forward` (taps.py); `aug_label` (B, augment_dim) or None, `class_labels` None."""
        check_unconditional(self, class_labels, aug_label)
        B, C, H, W = x.shape
        t = batch_time(t, B)
        feats: dict[str, torch.Tensor] = {}
        e, mask = self.extras, self.attn_mask

        def tap(name: str, h: torch.Tensor) -> bool:  # store a tapped layer; True = stop here
            if name in taps:
                feats[name] = h[:, e:]  # (B, N_p, D) patch tokens
            if self.cls_tap == name and "cls" in taps:
                feats["cls"] = h[:, self.cls_index : self.cls_index + 1]  # (B, 1, D)
                return stop_after in (name, "cls")
            return stop_after == name

        h = self._tokens(x, t, aug_label)  # (B, N, D)
        skips = []
        for k, block in enumerate(self.in_blocks, start=1):
            h = block(h, mask=mask)
            skips.append(h)
            if tap(f"in_{k}", h):
                return None, feats
        h = self.mid_block(h, mask=mask)
        if tap("mid", h):
            return None, feats
        for k, block in enumerate(self.out_blocks, start=1):
            h = block(h, skips.pop(), mask=mask)
            if tap(f"out_{k}", h):
                return None, feats

        h = self.decoder_pred(self.norm(h))[:, e:]  # (B, N_p, p·p·C)
        return self.final_layer(unpatchify(h, self.patch_size, H, W)), feats  # (B, C, H, W)  # (B, C, H, W)


def build_uvit(preset: str = "S", **overrides) -> UViT:
    """`UViT` from a named preset with recipe overrides; an unknown option fails listing the valid ones."""
    return build_preset(UViT, UVIT_PRESETS, preset, overrides, what="UViT preset", name="uvit")
