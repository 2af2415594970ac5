"""Self-conditioning (DDAE++ §4.1, Fig. 1; design pinned by parameter counts in docs/design.md §3).

    e' = e + s(t) ⊙ P(pool(h_ℓ))        used by every layer after ℓ

P = Linear(C_feat → D_emb) with bias; s(t) = an independent time MLP of the backbone's own form,
sinusoid(t) (width F) → Linear(F→D) → SiLU → Linear(D→D). For the UNets (C 256, D 512, F 128) that is
131,584 + 328,704 = +460,288 parameters, DDAE++'s "+0.46M"; mode "addition" (Tab. 6a ablation) drops
s(t): +131,584. Backbone-agnostic: it sees only the pooled vector, the time sinusoid and the embedding,
so DiT reuses it (C = D = 768, F = 256 → +1,378,560, the paper's +1.38M for DiT-B).

Initialisation (open in the paper; our choice): P's weight AND bias are zero, s(t) keeps PyTorch's
default init. Then P(pool) = +0.0 exactly, s(t) ⊙ 0 = ±0.0 and e + ±0.0 == e bit for bit (IEEE: x + 0 = x
for every x ≠ 0, and ±0 stays a zero), so a self-conditioned net starts as its baseline, bit for bit.
Why P and not s(t)'s last layer: the two factors gate each other's gradient —
dL/dP ∝ s(t) and dL/ds ∝ P(pool). With P = 0 and s(t) ≠ 0, P learns from the first step and s(t) from
the second (once P ≠ 0); zero-initialising both would freeze the module for good. Zero-initialising P is
also the only choice that works for mode "addition", so both modes share one scheme.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddaepp_cli.errors import UsageError, choices

SELFCOND_MODES = ("adaptive", "addition")  # DDAE++ Tab. 6a


class SelfCond(nn.Module):
    """Adds a projected, time-scaled summary of one layer's features to the conditioning embedding."""

    def __init__(self, feat_dim: int, emb_dim: int, sinusoid_dim: int, mode: str = "adaptive"):
        super().__init__()
        if mode not in SELFCOND_MODES:
            raise UsageError(f"unknown self-conditioning mode {mode!r}; valid: {choices(SELFCOND_MODES)}")
        self.mode = mode
        self.proj = nn.Linear(feat_dim, emb_dim)  # P
        nn.init.zeros_(self.proj.weight)  # zero P ⇒ exact no-op at init (see module doc)
        nn.init.zeros_(self.proj.bias)
        if mode == "adaptive":  # s(t): same form as the backbone's time embedder, default init
            self.scale_lin1 = nn.Linear(sinusoid_dim, emb_dim)
            self.scale_lin2 = nn.Linear(emb_dim, emb_dim)

    def forward(self, pooled: torch.Tensor, t_sin: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """pooled (B, C_feat), t_sin (B, F) the sinusoid of the backbone's t, emb (B, D) → e' (B, D)."""
        h = self.proj(pooled)  # (B, D)
        if self.mode == "adaptive":
            h = h * self.scale_lin2(F.silu(self.scale_lin1(t_sin)))  # (B, D) time-adaptive scale
        return emb + h.to(emb.dtype)  # (B, D)
