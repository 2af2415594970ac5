"""Classifier-free guidance with a guidance interval, as a denoiser wrapper (Ho & Salimans, 2022; Kynkäänniemi
et al., 2024; DDAE++ §5.2, Tab. 7; hustvl/LightningDiT `models/lightningdit.py` `forward_with_cfg`).

    out = u + w·(c − u)    for paper t in [lo, hi];     out = c    elsewhere

c is the network output for the class labels, u for the null class; guidance acts on the raw network
output (velocity for RF), then the formulation turns it into (x̂0, ε̂) — for RF, DDPM-ε and EDM alike
the map is affine in the output, so this equals guiding x̂0 and ε̂. DDAE++ guides all latent channels
(w 2.0 for DiT-B, 1.4 for DiT-L, interval [0, 0.89] = LightningDiT's `cfg_interval_start` 0.11 in its
mirrored time). `channels="first3"` reproduces DiT/LightningDiT's `forward_with_cfg`, which guides
channels [:3] only and passes the conditional output for the rest. With a learned variance (2C outputs)
"all" guides the C ε channels and keeps the conditional variance channels.

Cost: outside the interval only the conditional branch runs (one forward of B); inside, one forward of
the stacked batch [x; x] with labels [y; null] (2B), as the reference code does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UsageError
from .base import Denoiser, Formulation, Prediction

CFG_CHANNELS = ("all", "first3")


def guided_denoiser(formulation: Formulation, net, class_labels: Tensor, *, null_label: int, scale: float,
                    interval: tuple[float, float] = (0.0, 1.0), channels: str = "all",
                    clip: bool = False) -> Denoiser:
    """(x_t, t) → Prediction with CFG of scale `scale` for paper times in `interval` (inclusive; DDPM: t/T)."""
    if channels not in CFG_CHANNELS:
        raise UsageError(f"unknown CFG channel mode {channels!r}; valid: all, first3")
    lo, hi = float(interval[0]), float(interval[1])
    if not (scale >= 0 and 0.0 <= lo <= hi <= 1.0):
        raise UsageError(f"CFG needs scale >= 0 and an interval lo <= hi within [0, 1], got {scale}, [{lo}, {hi}]")

    def denoise(x_t: Tensor, t: Tensor) -> Prediction:
        t = formulation._time(t, x_t)
        y = class_labels.to(x_t.device)
        unit = t / formulation.T if formulation.name == "ddpm" else t  # DDPM steps 1..T → (0, 1]
        inside = (unit >= lo) & (unit <= hi)  # (B,) paper time as a fraction of the schedule
        if scale == 1.0 or not bool(inside.any()):  # conditional branch only
            out, _ = formulation._forward(net, x_t, t, (), None, y)
        else:
            null = torch.full_like(y, null_label)
            both, _ = formulation._forward(net, torch.cat((x_t, x_t)), torch.cat((t, t)), (), None,
                                           torch.cat((y, null)))  # (2B, C, H, W)
            cond, uncond = both.chunk(2)
            guided = uncond + scale * (cond - uncond)
            if channels == "first3":  # DiT's `eps, rest = model_out[:, :3], model_out[:, 3:]`
                guided = torch.cat((guided[:, :3], cond[:, 3:]), dim=1)
            elif guided.shape[1] > x_t.shape[1]:  # learned variance: guide ε̂ only, v from the conditional
                c = x_t.shape[1]  # (DiT's "standard approach", `model_out[:, :self.in_channels]`)
                guided = torch.cat((guided[:, :c], cond[:, c:]), dim=1)
            out = torch.where(inside.reshape(-1, *([1] * (x_t.ndim - 1))), guided, cond)
        pred = formulation._prediction(out.to(x_t.dtype), x_t, t)
        return formulation.clip_prediction(pred, x_t, t) if clip else pred

    return denoise
