"""DDAE's CIFAR checkpoints (FutureXiang/ddae `train.py`): `{'MODEL', 'EMA', 'opt'}` saved with torch.save.

* `MODEL` is the DistributedDataParallel state dict of the DDPM / EDM wrapper: `module.nn_model.<unet>`.
* `EMA` is the `ema_pytorch.EMA` state dict: `ema_model.nn_model.<unet>`, the buffers `initted` and
  `step`, and (ema_pytorch versions that register it) `online_model.nn_model.<unet>` — a copy of the
  raw weights, dropped here in favour of `MODEL`.
* `opt` is the optimizer state: dropped.

UNet layout (ddae:model/unet.py, model/block.py) → ddaepp (nets/unet.py): `down.{i}` / `up.{i}` are the
i-th encoder / decoder modules in construction order, which is the order of ddaepp's `enc` / `dec`
ModuleDicts; inside a block `res.time_emb.1` → `res.emb_proj`, `res.conv2.1` → `res.conv2`,
`attn.projection` → `attn.qkv`, `attn.output` → `attn.out`; BigGAN resamplers `op.<res block>` →
the block itself; `middle` → `mid`, `time_emb.aug_emb` → `time_emb.aug_proj`, `norm` → `out_norm`,
`final` → `out_conv`. Attention's q/k/v layout per head is [q | k | v] in both.

Conventions: none to convert. ddaepp's `ddpm` formulation feeds the UNet t/T and predicts ε, and its
`edm` formulation feeds c_noise = ln(σ)/4 with c_in, c_skip, c_out of EDM Table 1, exactly as
ddae:model/DDPM.py (`self.nn_model(x_noised, t / self.n_T)`) and model/EDM.py (`D_x`) do.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import UsageError
from .common import Mapped, Source, rename, require_state_dict, split_by_prefix, strip_prefix, swap_prefix

NAME = "ddae"
BACKBONES = ("ddpm", "ddpmpp")
FORMULATIONS = ("ddpm", "edm")
PUBLISHED = "github.com/FutureXiang/ddae (checkpoints linked from its README)"
CONVENTIONS = ["network time: t/T under DDPM and c_noise = ln(σ)/4 under EDM, as DDAE (nothing to convert)"]
WRAPPER = "nn_model."


def extract(obj, path: Path, weights: str) -> Source:
    if not isinstance(obj, dict) or "EMA" not in obj and "MODEL" not in obj:
        keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise UsageError(f"{path} is not a DDAE checkpoint: expected the keys MODEL, EMA, opt of ddae train.py, "
                         f"found {keys}")
    dropped: dict[str, list[str]] = {}
    raw = ema = None
    if "MODEL" in obj:
        sd = strip_prefix(require_state_dict(obj["MODEL"], "MODEL", path), ("module.",))
        raw, rest = split_by_prefix(sd, (WRAPPER,))
        raw = {k[len(WRAPPER):]: v for k, v in raw.items()}
        if rest:
            dropped["MODEL: not the network (diffusion wrapper buffers)"] = [f"MODEL/{k}" for k in rest]
    if "EMA" in obj:
        sd = require_state_dict(obj["EMA"], "EMA", path)
        ema, rest = split_by_prefix(sd, ("ema_model." + WRAPPER,))
        ema = {k[len("ema_model." + WRAPPER):]: v for k, v in ema.items()}
        online, rest = split_by_prefix(rest, ("online_model.",))
        if online:
            dropped["EMA: ema_pytorch's copy of the online (raw) weights"] = [f"EMA/{k}" for k in online]
        if rest:
            dropped["EMA: ema_pytorch bookkeeping (initted, step)"] = [f"EMA/{k}" for k in rest]
    if "opt" in obj:
        dropped["optimizer state"] = ["opt"]
    others = [k for k in obj if k not in ("MODEL", "EMA", "opt")]
    if others:
        raise UsageError(f"{path}: unexpected entry {others[0]!r} in a DDAE checkpoint (expected MODEL, EMA, opt)")
    if not ema and not raw:
        raise UsageError(f"{path}: neither MODEL nor EMA holds {WRAPPER}* network weights")
    return Source(ema=ema or None, raw=raw or None, dropped=dropped)


_BLOCK_RENAMES = (("time_emb.1.", "emb_proj."), ("conv2.1.", "conv2."))
_ATTN_RENAMES = (("projection.", "qkv."), ("output.", "out."))


def _res(rest: str) -> str:
    for old, new in _BLOCK_RENAMES:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _attn(rest: str) -> str:
    for old, new in _ATTN_RENAMES:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _block(rest: str) -> str:
    """Inside an encoder/decoder module: ResAttBlock, conv resampler or BigGAN `op.` resampler."""
    if rest.startswith("res."):
        return "res." + _res(rest[4:])
    if rest.startswith("attn."):
        return "attn." + _attn(rest[5:])
    if rest.startswith("op."):
        return _res(rest[3:])
    return rest  # conv resampler: conv.weight / conv.bias


def convert(sd, model: torch.nn.Module, path: Path) -> Mapped:
    enc, dec = list(model.enc.keys()), list(model.dec.keys())
    rx = re.compile(r"^(down|up)\.(\d+)\.(.+)$")

    def key(k: str) -> str:
        m = rx.match(k)
        if m:
            side, i, rest = m.group(1), int(m.group(2)), m.group(3)
            names = enc if side == "down" else dec
            if i >= len(names):
                raise UsageError(f"{path}: {k} is beyond the {len(names)} {side} modules of the recipe's network; "
                                 f"the recipe's model section must match the checkpoint")
            return f"{'enc' if side == 'down' else 'dec'}.{names[i]}.{_block(rest)}"
        if k.startswith("middle."):
            rest = k[len("middle."):]
            if rest.startswith("attn."):
                return "mid.attn." + _attn(rest[5:])
            part, _, tail = rest.partition(".")
            return f"mid.{part}.{_res(tail)}"
        # image_proj.*, time_emb.lin1/lin2.* keep their names
        return swap_prefix(k, {"time_emb.aug_emb.": "time_emb.aug_proj.", "norm.": "out_norm.", "final.": "out_conv."})

    return rename(sd, key)


def recipe_overrides(recipe) -> list[str]:
    return []
