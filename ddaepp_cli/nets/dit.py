"""LightningDiT (Yao et al., 2025; `LightningDiT:models/lightningdit.py`) for latents, as DDAE++ uses it
(§5.2, Tab. 8; hustvl/LightningDiT `models/lightningdit.py`), with DDAE++ self-conditioning (§4.1) and
the feature-tap API.

Layout per block (adaLN-Zero, DiT): c = t_emb(t) + y_emb(y) → SiLU → Linear(D→6D) gives shift/scale/gate
for attention and MLP; x += gate·Attn(modulate(RMSNorm(x))); x += gate·SwiGLU(modulate(RMSNorm(x))).
Attention: qkv with bias, optional q/k RMSNorm, 2-D RoPE (EVA-02 `VisionRotaryEmbeddingFast`), fused
SDPA. Input: Conv patch embed + a frozen 2-D sin-cos positional embedding (added even with RoPE).
Final layer: RMSNorm → adaLN (shift, scale) → Linear(D → p²·C), zero-initialised.

Parameter counts (all parameters, frozen positional embedding included; 32×16×16 latents, patch 1),
pinned by tests: B/1 1000-class 130,556,192, L/1 458,152,960, XL/1 675,256,736. Unconditional models
(`num_classes=0`) keep LightningDiT's 2-row label table (one "unconditional" row + the null row), so
B/1 129,788,960 and L/1 457,129,984 — the counts behind the paper's 129.8M / 457.1M (docs/design.md
§4). Every sample of an unconditional model uses row 0; the table costs 2·D parameters and keeps
checkpoints interchangeable with LightningDiT's layout.

Labels: `class_labels=None` means the null class (row `num_classes`) for a conditional model — what
CFG's unconditional branch and DDAE's DiT probe feed — and row 0 for an unconditional one. Label
dropout for CFG (p = 0.1) is applied by the training objective, which draws the drop bits from the
shared generator (train.py), not inside the network.

Self-conditioning (DDAE++ §4.1, docs/design.md §3): after block ℓ the tokens are mean-pooled and
`SelfCond` adds s(t) ⊙ P(pool) to c for blocks ℓ+1…N and the final layer: +1,378,560 (B),
+2,362,368 (L), +2,952,576 (XL); P is zero-initialised, so the model starts as its baseline bit for bit.

Taps: `"1"`…`"depth"` = the output tokens of that block, (B, N, D) (1-indexed, DDAE++ Tab. 9 / SRA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ddaepp_cli.errors import UsageError
from ddaepp_cli.nets.common import (FREQ_DIM, AdaLNTrunk, FinalLayer, batch_time, build_preset, check_token_grid,
    class_labels_or_null, init_config, modulate, patch_tokens, sincos_pos_embed_2d, timestep_embedding)  # fmt: skip

# LightningDiT_B_1 / XL_1; L/1 is not registered there: LightningDiT(depth=24, hidden 1024, 16 heads,
# patch 1) as DDAE++ Tab. 8 (hustvl/LightningDiT `models/lightningdit.py`). Options = LightningDiT defaults
# (`use_swiglu`, `use_rmsnorm`, `use_rope` on, `use_qknorm` off).
DIT_PRESETS: dict[str, dict] = {
    "B": dict(width=768, depth=12, heads=12),
    "L": dict(width=1024, depth=24, heads=16),
    "XL": dict(width=1152, depth=28, heads=16),
}


# ------------------------------------------------------------------------------------------------
# Embeddings
# ------------------------------------------------------------------------------------------------


def rope_tables(head_dim: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA-02 `VisionRotaryEmbeddingFast(dim=head_dim/2, pt_seq_len=grid)`: (N, head_dim) cos and sin.

    Per axis head_dim/4 frequencies 10000^(−2j/(head_dim/2)), each repeated for an interleaved pair; the
    first half of the head rotates with the row index, the second with the column
    (hustvl/LightningDiT `models/pos_embed.py`).
    """
    d = head_dim // 2
    freqs = 1.0 / 10_000 ** (torch.arange(0, d, 2, dtype=torch.float64)[: d // 2] / d)  # (d/2,)
    f = torch.arange(grid, dtype=torch.float64)[:, None] * freqs[None]  # (grid, d/2)
    f = f.repeat_interleave(2, dim=-1)  # (grid, d) pairs (n r)
    rows = f[:, None, :].expand(grid, grid, d)  # rotated by the row index
    cols = f[None, :, :].expand(grid, grid, d)  # rotated by the column index
    f = torch.cat((rows, cols), dim=-1).reshape(grid * grid, head_dim)  # (N, head_dim)
    return f.cos().float(), f.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs (a, b) → (−b, a) (EVA-02 `rotate_half`)."""
    x = x.unflatten(-1, (-1, 2))  # (..., d/2, 2)
    a, b = x.unbind(-1)
    return torch.stack((-b, a), dim=-1).flatten(-2)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable weight, computed in float32 (LightningDiT `models/rmsnorm.py`, eps 1e-6)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


# ------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """qkv (bias) → optional q/k RMSNorm → RoPE → fused SDPA → proj."""

    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        hd = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(hd) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(hd) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)  # (B, H, N, D/H)
        if rope is not None:
            cos, sin = (r.to(q.dtype) for r in rope)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D/H)
        return self.proj(rearrange(a, "b h n d -> b n (h d)"))


class SwiGLU(nn.Module):
    """LightningDiT `SwiGLUFFN`: w12 = Linear(D→2h), SiLU(x1)·x2, w3 = Linear(h→D); h = int(2/3·4D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads, qk_norm)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, int(2 / 3 * mlp_ratio * dim))  # 2048 (B), 2730 (L), 3072 (XL)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # each (B, D)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1), rope)
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))  # (B, N, D)


# ------------------------------------------------------------------------------------------------
# DiT
# ------------------------------------------------------------------------------------------------


class DiT(AdaLNTrunk):
    """LightningDiT velocity/noise predictor with the tap API; see the module docstring."""

    def __init__(
        self, *, in_channels: int = 32, image_size: int = 16, patch_size: int = 1, width: int = 768, depth: int = 12,
        heads: int = 12, mlp_ratio: float = 4.0, qk_norm: bool = False, rope: bool = True, num_classes: int = 0,
        selfcond_layer: str | None = None, selfcond_mode: str = "adaptive", name: str = "dit",
    ):  # fmt: skip
        super().__init__()
        self.config = init_config(DiT, locals())
        check_token_grid(name, image_size, patch_size, width, heads, head_multiple=4)  # 2-D RoPE: 4 | head width
        if width % 4:
            raise UsageError(f"{name}: width {width} must be a multiple of 4 (2-D sin-cos embedding)")
        if depth < 1 or num_classes < 0:
            raise UsageError(f"{name}: depth must be >= 1 and num_classes >= 0, got {depth}, {num_classes}")
        self.in_channels, self.patch_size, self.width = in_channels, patch_size, width
        self.num_classes = num_classes
        grid = image_size // patch_size

        self.x_embedder = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = nn.Sequential(nn.Linear(FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))
        # LightningDiT: num_classes + 1 rows (the last = null class); unconditional: 1 + null (module doc)
        self.y_embedder = nn.Embedding(max(num_classes, 1) + 1, width)
        pos = torch.from_numpy(sincos_pos_embed_2d(width, grid)).float()[None]  # (1, N, D)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)  # frozen, counted (docs/design.md §4)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.final_layer = FinalLayer(width, patch_size, in_channels, RMSNorm(width), adaln_first=True)
        if rope:
            cos, sin = rope_tables(width // heads, grid)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.use_rope = rope
        self._init_adaln_weights(self.x_embedder)
        self._selfcond_and_taps(name, depth, width, selfcond_layer, selfcond_mode)

    def _forward(self, x, t, *, taps: frozenset[str], stop_after: str | None, class_labels=None, aug_label=None):
        """TapModule's `_forward` (taps.py); `class_labels` (B,) or None for the null row (module doc)."""
        B, C, H, W = x.shape
        t = batch_time(t, B)
        class_labels = class_labels_or_null(self, class_labels, aug_label, B, x.device)  # module doc
        h = patch_tokens(self.x_embedder(x)) + self.pos_embed  # (B, N, D)
        t_sin = timestep_embedding(t, FREQ_DIM)  # (B, 256), raw t as LightningDiT
        c = self.t_embedder(t_sin.to(h.dtype)) + self.y_embedder(class_labels.long())  # (B, D)
        rope = (self.rope_cos, self.rope_sin) if self.use_rope else None
        return self._blocks_and_head(h, c, t_sin, taps, stop_after, (H, W), rope)  # (B, C, H, W), taps


def build_dit(size: str = "B", **overrides) -> DiT:
    """`DiT` from a size preset (B, L, XL) with recipe overrides (None = the preset's value)."""
    return build_preset(DiT, DIT_PRESETS, size, overrides, what="DiT size", name="dit", none_is_preset=True)
