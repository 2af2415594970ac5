"""Exponential moving average of the weights, updated with fused foreach ops.

Two decay rules (lucidrains/ema-pytorch `get_current_decay`, as DDAE's `train.py` uses it; constant decay as in
LightningDiT, SRA and U-ViT):
* constant decay (LightningDiT, SRA, U-ViT);
* `inverse` warm-up as in ema-pytorch, which DDAE uses:
  decay_k = min(β, 1 − (1 + k/inv_gamma)^(−power)), k = updates so far − 1, and a plain copy at the
  first update — so "0.9999" is reached only after ~10⁶ updates.
The update counter is part of the training state (resuming without it changes the decay).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, *, decay: float, warmup: str = "none",
                 inv_gamma: float = 1.0, power: float = 2.0 / 3.0):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup
        self.inv_gamma, self.power = inv_gamma, power
        self.num_updates = 0

    def current_decay(self) -> float:
        """Decay used by the next update."""
        if self.warmup == "none":
            return self.decay
        k = self.num_updates  # ema-pytorch: epoch = step − update_after_step − 1, copy at k = 0
        if k <= 0:
            return 0.0
        return min(self.decay, 1.0 - (1.0 + k / self.inv_gamma) ** (-self.power))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        ema_p = [p for p in self.module.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        if decay == 0.0:
            torch._foreach_copy_(ema_p, src_p)
        else:
            # ema ← ema + (1 − decay)·(p − ema): one fused kernel per dtype group.
            torch._foreach_lerp_(ema_p, src_p, 1.0 - decay)
        for e, s in zip(self.module.buffers(), model.buffers()):
            e.copy_(s)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
