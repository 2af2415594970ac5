"""The original DiT / SiT network (Peebles & Xie, 2023, `facebookresearch/DiT:models.py`; Ma et al., 2024,
`willisma/SiT:models.py`), as the SRA paper trains it (`vvvvvjdy/SRA:DiT-SRA/models/dit.py`,
`SiT-SRA/models/sit.py`), with the feature-tap API and optional DDAE++ self-conditioning.

Layout (DiT and SiT share it; SiT differs only in the objective and in `learn_sigma` off):
  x → timm `PatchEmbed` (Conv p×p, bias) + frozen 2-D sin-cos positions (a non-trainable parameter, so
  it is counted and saved as in DiT) → N blocks → final layer → unpatchify.
  c = t_emb(t) + y_emb(y): t_emb = Linear(256→D) → SiLU → Linear(D→D) over DiT's 256-d sinusoid;
  y_emb = a (num_classes + 1)-row table, the last row the null class for CFG.
  Block (adaLN-Zero): SiLU → Linear(D→6D) gives shift/scale/gate; x += gate·Attn(modulate(LN(x)));
  x += gate·Mlp(modulate(LN(x))). LN = LayerNorm without affine parameters (eps 1e-6); Attn = timm
  `Attention` (qkv bias, fused SDPA); Mlp = timm `Mlp` (D→4D→D, tanh-GELU).
  Final layer: LN → adaLN (shift, scale) → Linear(D → p²·C_out), zero-initialised; C_out = 2C with
  `learn_sigma` (ε and the variance interpolation v of improved DDPM), else C.

Parameter counts (1000 classes, 4×32×32 SD-VAE latents, frozen positions included; pinned by tests):
DiT-XL/2 with learned Σ 675,129,632, DiT-B/2 with learned Σ 130,512,416, SiT-XL/2 without 675,111,184.

Time sinusoid: DiT's frequencies 10000^(−k/128), k < 128; `time_freq_shift: 1` uses 10000^(−k/127), which is
what diffusers' `DiTTransformer2DModel` computes (`CombinedTimestepLabelEmbeddings`, `downscale_freq_shift=1`),
so that a network imported from or exported to diffusers computes the same function there and here.

Time input: whatever the formulation's `net_time` hands over, embedded as is — DDPM gives DiT its
integer step 0…999 and rectified flow gives SiT (as SRA/REPA train it) the raw t ∈ [0, 1]
(diffusion/ddpm.py, diffusion/rf.py).

Labels: `class_labels=None` means the null class (row `num_classes`) for a conditional model and row 0
of a one-row table for an unconditional one (`num_classes=0`). Label dropout for CFG is applied by the
training objective (losses/__init__.py), not here.

Taps: `"1"`…`"depth"` = the output tokens of that block, (B, N, D), 1-indexed as SRA's `block_out_*`.
Self-conditioning (DDAE++ §4.1) works as in nets/dit.py: after block ℓ the pooled tokens, scaled by s(t),
are added to c for the later blocks and the final layer (P zero-initialised).
"""

from __future__ import annotations

import functools

import torch
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed
from torch import nn

from ddaepp_cli.errors import UsageError
from ddaepp_cli.nets.common import (FREQ_DIM, AdaLNTrunk, FinalLayer, batch_time, build_preset, class_labels_or_null,
    init_config, modulate, sincos_pos_embed_2d, timestep_embedding)  # fmt: skip

# DiT:models.py `DiT_{S,B,L,XL}_{2,4,8}` (SiT:models.py uses the same table)
DIT_ORIG_PRESETS: dict[str, dict] = {
    "S": dict(width=384, depth=12, heads=6),
    "B": dict(width=768, depth=12, heads=12),
    "L": dict(width=1024, depth=24, heads=16),
    "XL": dict(width=1152, depth=28, heads=16),
}
PATCH_SIZES = (2, 4, 8)  # the DiT/SiT model zoo


class DiTBlock(nn.Module):
    """DiT:models.py `DiTBlock` with timm's Attention and Mlp."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads=heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        tanh_gelu = functools.partial(nn.GELU, approximate="tanh")
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=tanh_gelu, drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # each (B, D)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))  # (B, N, D)


class DiTOrig(AdaLNTrunk):
    """The original DiT/SiT noise or velocity predictor with the tap API; see the module docstring."""

    def __init__(
        self, *, in_channels: int = 4, image_size: int = 32, patch_size: int = 2, width: int = 768, depth: int = 12,
        heads: int = 12, mlp_ratio: float = 4.0, qk_norm: bool = False, learn_sigma: bool = False,
        num_classes: int = 0, selfcond_layer: str | None = None, selfcond_mode: str = "adaptive",
        time_freq_shift: int = 0, name: str = "dit_orig",
    ):  # fmt: skip
        super().__init__()
        self.config = init_config(DiTOrig, locals())
        if patch_size < 1 or image_size % patch_size:
            raise UsageError(f"{name}: image_size {image_size} is not divisible by patch_size {patch_size} "
                             f"(DiT/SiT use {', '.join(map(str, PATCH_SIZES))})")
        if width % heads or width % 4:
            raise UsageError(f"{name}: width {width} must be a multiple of 4 and split into {heads} heads")
        if depth < 1 or num_classes < 0:
            raise UsageError(f"{name}: depth must be >= 1 and num_classes >= 0, got {depth}, {num_classes}")
        if time_freq_shift not in (0, 1):
            raise UsageError(f"{name}: time_freq_shift must be 0 (DiT) or 1 (diffusers), got {time_freq_shift}")
        self.time_freq_shift = int(time_freq_shift)
        self.in_channels, self.patch_size, self.width = in_channels, patch_size, width
        self.num_classes, self.learn_sigma = num_classes, bool(learn_sigma)
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        grid = image_size // patch_size

        self.x_embedder = PatchEmbed(image_size, patch_size, in_channels, width, bias=True)
        self.t_embedder = nn.Sequential(nn.Linear(FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))
        # DiT `LabelEmbedder`: num_classes + 1 rows (the last = null class); unconditional: one row
        self.y_embedder = nn.Embedding(num_classes + 1 if num_classes else 1, width)
        pos = torch.from_numpy(sincos_pos_embed_2d(width, grid)).float()[None]  # (1, N, D), MAE/DiT layout
        self.pos_embed = nn.Parameter(pos, requires_grad=False)  # frozen; a parameter as in DiT (counted)
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.final_layer = FinalLayer(width, patch_size, self.out_channels,
                                      nn.LayerNorm(width, elementwise_affine=False, eps=1e-6), adaln_first=False)
        self._init_adaln_weights(self.x_embedder.proj)  # DiT `initialize_weights`
        self._selfcond_and_taps(name, depth, width, selfcond_layer, selfcond_mode)

    def _forward(self, x, t, *, taps: frozenset[str], stop_after: str | None, class_labels=None, aug_label=None):
        """TapModule's `_forward` (taps.py); `class_labels` (B,) or None for the null row (module doc)."""
        B, C, H, W = x.shape
        t = batch_time(t, B)
        class_labels = class_labels_or_null(self, class_labels, aug_label, B, x.device)  # null class / the one row
        h = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        t_sin = timestep_embedding(t, FREQ_DIM, freq_shift=self.time_freq_shift)  # (B, 256) of the net_time
        c = self.t_embedder(t_sin.to(h.dtype)) + self.y_embedder(class_labels.long())  # (B, D)
        return self._blocks_and_head(h, c, t_sin, taps, stop_after, (H, W))  # (B, C_out, H, W), taps


def build_dit_orig(size: str = "B", **overrides) -> DiTOrig:
    """`DiTOrig` from a size preset (S, B, L, XL) with recipe overrides (None = the preset's value)."""
    return build_preset(DiTOrig, DIT_ORIG_PRESETS, size, overrides, what="DiT/SiT size", name="dit_orig",
                        none_is_preset=True)
