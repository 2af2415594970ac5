"""torch.compile of every backbone entry point the training step calls.

`torch.compile(model)` compiles `forward` only; a contrastive or SRA step calls the student's
`forward_with_features` and the EMA teacher's `forward_features` (taps.py), which would run eager.
`CompiledNet` compiles all three on the same parameters and forwards everything else (layer names,
feature dims, `resolve_layers`) to the wrapped backbone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ENTRY_POINTS = ("forward", "forward_features", "forward_with_features")


class CompiledNet(nn.Module):
    def __init__(self, net: nn.Module, **compile_kw: Any):
        super().__init__()
        self.net = net  # registered: parameters are the backbone's own (DDP, optimiser and EMA see them)
        self._compiled = {name: torch.compile(getattr(net, name), **compile_kw) for name in ENTRY_POINTS}

    def forward(self, *args, **kwargs):
        return self._compiled["forward"](*args, **kwargs)

    def forward_features(self, *args, **kwargs):
        return self._compiled["forward_features"](*args, **kwargs)

    def forward_with_features(self, *args, **kwargs):
        return self._compiled["forward_with_features"](*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules of this wrapper
        except AttributeError:
            return getattr(self._modules["net"], name)  # layer_names, feature_dims, num_classes, …


def maybe_compile(net: nn.Module, enabled: bool, **compile_kw: Any) -> nn.Module:
    return CompiledNet(net, **compile_kw) if enabled else net
