"""The naive reference attention: explicit softmax(Q·Kᵀ/√d)·V in place of the fused SDPA kernel.

Every ddaepp backbone calls `torch.nn.functional.scaled_dot_product_attention` through the module
attribute (`F.scaled_dot_product_attention`), so patching that attribute inside `naive_attention()`
switches all of them to the textbook layout for as long as the context lasts.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


def naive_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
               enable_gqa: bool = False) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask)·v with the (…, N, N) logits materialised; same contract as SDPA."""
    if enable_gqa and q.shape[-3] != k.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (q @ k.transpose(-2, -1)) * scale  # (…, N, M)
    if is_causal:
        n, m = logits.shape[-2:]
        keep = torch.ones(n, m, dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    w = logits.softmax(dim=-1)
    if dropout_p > 0.0:
        w = F.dropout(w, p=dropout_p)
    return w @ v  # (…, N, D)


@contextlib.contextmanager
def naive_attention():
    """Within the block, `F.scaled_dot_product_attention` is `naive_sdpa`."""
    saved = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = naive_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = saved
