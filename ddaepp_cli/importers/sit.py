"""The original DiT / SiT family: DiT, SiT, and REPA's and SRA's SiT/DiT checkpoints.

Files (each as its repository's train.py saves it):
* DiT (facebookresearch/DiT) and SiT (willisma/SiT): released files are the EMA state dict alone
  (`DiT-XL-2-256x256.pt`, `SiT-XL-2-256x256.pt`); training checkpoints `{'model', 'ema', 'opt', 'args'}`.
* REPA (sihyun-yu/REPA): `{'model', 'ema', 'opt', 'args', 'steps'}`; the alignment heads
  `projectors.*` (REPA:models/sit.py `build_mlp`) are dropped and listed.
* SRA (vvvvvjdy/SRA): `{'model', 'ema', 'opt', 'args', …}`; the self-alignment head `ap_head.*`
  (SRA:SiT-SRA/models/sit.py `SimpleHead`) is dropped and listed.

These networks are the original DiT blocks (timm PatchEmbed / Attention / tanh-GELU Mlp, LayerNorm
without affine parameters, no RoPE), which ddaepp's `dit` backbone (LightningDiT blocks: RMSNorm,
SwiGLU, RoPE) cannot hold. Reading, unwrapping and dropping the heads work today; the key mapping
waits for the original DiT/SiT backbone (issue 14) and, until it is in ddaepp, the import exits 2
naming it. When it lands, the addition is `convert` below (keys are already timm/DiT names) plus the
conventions: SiT/REPA/SRA get `diffusion.net_convention: sit` as LightningDiT; DiT feeds the integer
step and predicts ε (with learned Σ: the second half of the output channels).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UsageError
from .common import Mapped, Source, is_state_dict, strip_prefix
from .lightningdit import WRAPPERS, extract_dict

FAMILIES = {
    "dit": ("github.com/facebookresearch/DiT (download.py: DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt)", (), ""),
    "sit": ("github.com/willisma/SiT (README: SiT-XL-2-256x256.pt)", (), ""),
    "repa": ("github.com/sihyun-yu/REPA (README: SiT-XL/2 + REPA on Hugging Face / Dropbox)",
             ("projectors.",), "REPA alignment projectors (projectors.*)"),
    "sra": ("github.com/vvvvvjdy/SRA (README: SiT/DiT + SRA checkpoints on Hugging Face)",
            ("ap_head.",), "SRA self-alignment head (ap_head.*)"),
}
BACKBONE_ISSUE = ("the original DiT/SiT backbone of issue 14 (timm PatchEmbed/Attention/Mlp, LayerNorm "
                  "without affine, adaLN-Zero)")


def extract_for(family: str):
    _, heads, reason = FAMILIES[family]

    def extract(obj, path: Path, weights: str) -> Source:
        if is_state_dict(obj):
            sd = strip_prefix(obj, WRAPPERS)
            dropped = {}
            if heads:
                head_keys = [k for k in sd if k.startswith(heads)]
                if head_keys:
                    dropped[reason] = head_keys
                sd = {k: v for k, v in sd.items() if not k.startswith(heads)}
            return Source(ema=sd, raw=None, dropped=dropped) if weights == "ema" else \
                Source(ema=None, raw=sd, dropped=dropped)
        if not isinstance(obj, dict) or not ({"ema", "model"} & set(obj)):
            keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
            raise UsageError(f"{path} is not a {family} checkpoint: expected a state dict or the keys model, ema, "
                             f"opt, args of its train.py, found {keys}")
        return extract_dict(obj, path, family, heads, reason)

    return extract


def backbone_available() -> bool:
    from ..nets import BACKBONES

    return any(name in BACKBONES for name in ("dit_orig", "sit", "dit_original"))


def convert(sd, model: torch.nn.Module, path: Path) -> Mapped:  # pragma: no cover - needs issue 14's backbone
    raise UsageError(f"importing DiT/SiT weights needs {BACKBONE_ISSUE}, which this ddaepp does not have yet")
