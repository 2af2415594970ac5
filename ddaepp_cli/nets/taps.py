"""The one feature-tap API of every ddaepp backbone (cf. timm `forward_intermediates`).

Every consumer of intermediate features — linear/segmentation probes, CKA, self-conditioning,
contrastive self-distillation, SRA — goes through this contract; nothing registers hooks.

Contract (implemented once here, on top of each backbone's single `_forward`):

* `model(x, t, **cond) -> Tensor` — the plain network output, same shape as `x`. `t` is a float (B,)
  tensor already mapped by the formulation (t/T, ln σ / 4, raw t, …); the backbone only embeds it.
* `model.forward_features(x, t, layers, **cond) -> dict[name, Tensor]` — the raw, unpooled features
  of the requested layers (UNet: (B, C, H, W); DiT: (B, N, D)), keyed by name in the requested order.
  Runs only as far as the deepest requested layer (early exit): a probe at `out_7` never pays for
  the rest of the decoder.
* `model.forward_with_features(x, t, layers, **cond) -> (out, dict)` — the full forward plus the
  requested features (contrastive training reads a feature and the loss from one pass).
* `layers` is a spec string (`"out_6-9"`, `"7,9,12"`, `"mid"`) or a sequence of names/specs; see
  `expand_layer_spec`. An unknown name raises `UsageError` listing the valid names.
* `model.layer_names` — every tappable name in execution order; `model.feature_dims` — channels (or
  token width) of each. Names follow the papers: UNet `out_k` (DDAE hooks), DiT blocks `"1".."N"`.
* Return types never change with a flag. Taps cost nothing when unused: the backbone's `_forward` does
  one `if name in taps` set look-up per block and a dict insert for tapped ones.

A backbone subclasses `TapModule`, calls `self._register_taps(...)` at the end of `__init__`, and
implements

    _forward(x, t, *, taps: frozenset[str], stop_after: str | None, **cond) -> (out | None, dict)

which stores `feats[name] = h` for every `name in taps` and returns `(None, feats)` right after storing
`stop_after` (`None` = run to the end and return the output).
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import nn

from ddaepp_cli.errors import UsageError, choices

LayerSpec = str | Sequence[str]

# "out_6-9", "out_6-out_9", "8-11": optional name prefix, first index, optional repeated prefix, last index
_RANGE = re.compile(r"^(?P<prefix>[A-Za-z_]*?)(?P<lo>\d+)-(?P<prefix2>[A-Za-z_]*?)(?P<hi>\d+)$")


def _unknown(name: str, valid: Sequence[str], backbone: str | None) -> UsageError:
    where = f" for {backbone}" if backbone else ""
    return UsageError(f"unknown layer {name!r}{where}; valid: {choices(valid)}")


def expand_layer_spec(spec: LayerSpec, valid: Sequence[str], *, backbone: str | None = None) -> list[str]:
    """Parse a layer spec into a list of valid names: duplicates dropped, first-seen order kept.

    Items are separated by commas (a sequence's elements are items too, and may hold commas); an item is
    a name (`mid`, `in_3`, `9`) or an inclusive range `<prefix>a-b` (`out_6-9` → out_6…out_9, `8-11` →
    "8"…"11", also `out_6-out_9`). Empty specs or items, inverted ranges and unknown names raise a
    one-line `UsageError` naming the valid layers.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    pieces = [p.strip() for item in items for p in str(item).split(",")]
    if not pieces or all(not p for p in pieces):
        raise UsageError(f"empty layer spec; valid: {choices(valid)}")
    valid_set = frozenset(valid)
    out: dict[str, None] = {}  # ordered set
    for piece in pieces:
        if not piece:
            raise UsageError(f"empty item in layer spec {spec!r}; valid: {choices(valid)}")
        if piece in valid_set:
            out[piece] = None
            continue
        m = _RANGE.match(piece)
        if m is None:
            raise _unknown(piece, valid, backbone)
        prefix, lo, hi = m["prefix"], int(m["lo"]), int(m["hi"])
        if m["prefix2"] not in ("", prefix):
            raise UsageError(f"layer range {piece!r} mixes prefixes; write e.g. {prefix}{lo}-{hi}")
        if lo > hi:
            raise UsageError(f"inverted layer range {piece!r}; write {prefix}{hi}-{lo}")
        for k in range(lo, hi + 1):
            name = f"{prefix}{k}"
            if name not in valid_set:
                raise _unknown(name, valid, backbone)
            out[name] = None
    return list(out)


def validate_layers(names: Sequence[str], valid: Sequence[str], backbone_name: str | None = None) -> None:
    """Raise `UsageError` for the first name not in `valid` (exact names only, no ranges)."""
    valid_set = frozenset(valid)
    for name in names:
        if name not in valid_set:
            raise _unknown(name, valid, backbone_name)


class TapModule(nn.Module):
    """Base class giving a backbone `forward`, `forward_features` and `forward_with_features` (see module doc)."""

    backbone_name: str  # set by `_register_taps`: used in messages and as the registry key
    layer_names: tuple[str, ...]  # every tappable name, execution order
    feature_dims: dict[str, int]  # channels (UNet) or token width (DiT) per name

    def _register_taps(self, backbone_name: str, layer_names: Sequence[str], feature_dims: dict[str, int]) -> None:
        if list(feature_dims) != list(layer_names):
            raise ValueError("feature_dims must list exactly layer_names, in order")
        self.backbone_name = backbone_name
        self.layer_names = tuple(layer_names)
        self.feature_dims = dict(feature_dims)
        self._layer_set = frozenset(layer_names)
        self._layer_order = {name: i for i, name in enumerate(layer_names)}

    def _forward(self, x, t, *, taps: frozenset[str], stop_after: str | None, **cond):
        raise NotImplementedError

    def resolve_layers(self, layers: LayerSpec) -> list[str]:
        """Expand a spec into this backbone's layer names; raises `UsageError` on unknown names."""
        if not isinstance(layers, str) and self._layer_set.issuperset(layers):
            names = list(dict.fromkeys(layers))  # fast path: exact names, once per call
            if names:
                return names
        return expand_layer_spec(layers, self.layer_names, backbone=self.backbone_name)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        out, _ = self._forward(x, t, taps=frozenset(), stop_after=None, **cond)
        return out

    def forward_features(self, x: torch.Tensor, t: torch.Tensor, layers: LayerSpec, **cond) -> dict[str, torch.Tensor]:
        names = self.resolve_layers(layers)
        deepest = max(names, key=self._layer_order.__getitem__)
        _, feats = self._forward(x, t, taps=frozenset(names), stop_after=deepest, **cond)
        return {name: feats[name] for name in names}

    def forward_with_features(
        self, x: torch.Tensor, t: torch.Tensor, layers: LayerSpec, **cond
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        names = self.resolve_layers(layers)
        out, feats = self._forward(x, t, taps=frozenset(names), stop_after=None, **cond)
        return out, {name: feats[name] for name in names}
