"""KL autoencoders saved in diffusers' own layout (`AutoencoderKL.save_pretrained`, Hugging Face repos).

A diffusers-format VAE is a folder with `config.json` and `diffusion_pytorch_model.safetensors` (or a
`.bin`), or that weights file alone. Its keys are already the ones of the model class ddaepp uses
(`encoder.down_blocks.{i}.resnets.{j}…`), so nothing is converted: the architecture comes from
`config.json` when it sits beside the weights, else from the tensors' shapes (as vae.py does for the
LDM layout), and the weights load strictly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UsageError

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
ARCH_KEYS = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "down_block_types",
             "up_block_types", "layers_per_block", "norm_num_groups", "act_fn", "use_quant_conv",
             "use_post_quant_conv", "mid_block_add_attention")


def is_diffusers_layout(sd: dict) -> bool:
    return any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd)


def weights_file(path: Path) -> Path:
    """A diffusers folder → its weights file; a file stays itself."""
    if path.is_dir():
        for name in WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name
        raise UsageError(f"{path} is a folder without {' or '.join(WEIGHT_NAMES)} (a diffusers AutoencoderKL folder)")
    return path


def _indices(sd: dict, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def diffusers_config(sd: dict[str, Tensor], path: Path) -> dict:
    """The AutoencoderKL config: `config.json` beside the weights, else inferred from the shapes."""
    from .vae import _config

    cfg_file = path.parent / "config.json"
    if cfg_file.is_file():
        try:
            raw = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{cfg_file} is not valid JSON: {e}") from None
        if raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise UsageError(f"{cfg_file} describes a {raw.get('_class_name')}, not an AutoencoderKL")
        cfg = {k: raw[k] for k in ARCH_KEYS if k in raw}
        for k in ("block_out_channels", "down_block_types", "up_block_types"):
            if k in cfg:
                cfg[k] = list(cfg[k])
        return cfg
    try:
        levels = _indices(sd, r"encoder\.down_blocks\.(\d+)\.")
        channels = [int(sd[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0]) for i in levels]
        layers = len(_indices(sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))
        n = len(levels)
        enc_attn = tuple(i for i in levels if f"encoder.down_blocks.{i}.attentions.0.to_q.weight" in sd)
        dec_attn = tuple(i for i in levels if f"decoder.up_blocks.{n - 1 - i}.attentions.0.to_q.weight" in sd)
        latent = int(sd["decoder.conv_in.weight"].shape[1])
        in_ch, out_ch = int(sd["encoder.conv_in.weight"].shape[1]), int(sd["decoder.conv_out.weight"].shape[0])
    except (KeyError, IndexError) as e:
        raise UsageError(f"VAE checkpoint {path} does not have the diffusers AutoencoderKL layout (missing {e})") from None
    if not levels or levels != list(range(n)) or enc_attn != dec_attn:
        raise UsageError(f"VAE checkpoint {path}: unsupported level layout (levels {levels}, encoder attention at "
                         f"{list(enc_attn)}, decoder attention at {list(dec_attn)}); put its config.json beside it")
    cfg = _config(latent, channels, attn_levels=enc_attn, layers=layers)
    cfg.update(in_channels=in_ch, out_channels=out_ch, use_quant_conv="quant_conv.weight" in sd,
               use_post_quant_conv="post_quant_conv.weight" in sd,
               mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in sd)
    return cfg


def read_weights(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, foreign pickle
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise UsageError(f"cannot read VAE checkpoint {path}: {reason}") from None
