"""KL autoencoders for latent diffusion: VA-VAE f16d32 and SD-VAE, loaded from LDM-format checkpoints
(or from diffusers' own layout: a `save_pretrained` folder or its weights file, vae_diffusers.py).

The network is diffusers' `AutoencoderKL` (a well-kept implementation); only the key conversion is
ours (layout: hustvl/LightningDiT `tokenizer/configs/vavae_f16d32.yaml`, CompVis LDM `AutoencoderKL`):

* training-only keys of the released VA-VAE file are dropped — `loss.*` (LPIPS / discriminator),
  `foundation_model.*` (DINOv2), `linear_proj.*` (the alignment projection) — and a Lightning
  `{"state_dict": …}` wrapper or a `first_stage_model.` / `vae.` prefix is unwrapped;
* `diffusers.loaders.single_file_utils.convert_ldm_vae_checkpoint` converts every other key except
  the attention blocks *inside* a resolution level (VA-VAE: `encoder.down.4.attn.{0,1}`,
  `decoder.up.4.attn.{0,1,2}`, 50 keys), which we map to `encoder.down_blocks.{i}.attentions.{j}` /
  `decoder.up_blocks.{n-1-i}.attentions.{j}` (norm→group_norm, q/k/v→to_q/to_k/to_v,
  proj_out→to_out.0, 1×1-conv weights squeezed to linear);
* the result is loaded strictly: a missing, unexpected or mis-shaped key is an error naming the file.

The architecture is read from the checkpoint's shapes (channels per level, blocks per level, where
attention sits, latent channels), so any LDM-layout KL autoencoder loads; `--vae-kind` checks it is
the expected one (VA-VAE: 69,836,067 parameters; SD-VAE: 83,653,863). Weights: `.safetensors`
preferred; `.pt/.ckpt` are read with `torch.load(weights_only=True)` only (no arbitrary pickles).

Default weight location: `$DDAEPP_CACHE/weights/` (default `~/.cache/ddaepp/weights/`), then the Hugging Face
cache; `--vae sdvae` / `vavae` / `sdvae-mse` / `hf://…` name files of hub.py's table (`resolve_vae`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..errors import UnavailableError, UsageError
from ..hub import cache_dir  # noqa: F401  (re-exported: latentstore.py)

TRAINING_ONLY_PREFIXES = ("loss.", "foundation_model.", "linear_proj.")
LDM_PREFIXES = ("first_stage_model.", "vae.")


@dataclass(frozen=True)
class VAEKind:
    name: str
    description: str
    file: str  # the released file name
    source: str  # where to download it
    config: dict  # diffusers AutoencoderKL config (architecture only)
    params: int  # counted
    scaling_factor: float  # informational: ddaepp normalises latents per channel (latents.py)


def _config(latent: int, channels: list[int], attn_levels: tuple[int, ...], layers: int = 2) -> dict:
    n = len(channels)
    down = ["AttnDownEncoderBlock2D" if i in attn_levels else "DownEncoderBlock2D" for i in range(n)]
    up = ["AttnUpDecoderBlock2D" if (n - 1 - i) in attn_levels else "UpDecoderBlock2D" for i in range(n)]
    return dict(in_channels=3, out_channels=3, latent_channels=latent, block_out_channels=list(channels),
                down_block_types=down, up_block_types=up, layers_per_block=layers, norm_num_groups=32,
                act_fn="silu", use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True)


KINDS = {
    "vavae": VAEKind(
        "vavae", "VA-VAE f16d32 (LightningDiT; DINOv2-aligned, 32×16×16 latents of 256² images)",
        "vavae-imagenet256-f16d32-dinov2.pt",
        "https://huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2",
        _config(32, [128, 128, 256, 256, 512], attn_levels=(4,)), 69_836_067, 1.0),
    "sdvae": VAEKind(
        "sdvae", "SD-VAE f8d4 (Stable Diffusion kl-f8, e.g. sd-vae-ft-ema; 4×32×32 latents of 256² images)",
        "sd-vae-ft-ema.safetensors",
        "https://huggingface.co/stabilityai/sd-vae-ft-ema (diffusion_pytorch_model.safetensors, diffusers layout; "
        "or the LDM-layout vae-ft-ema-560000-ema-pruned.safetensors of stabilityai/sd-vae-ft-ema-original)",
        _config(4, [128, 256, 512, 512], attn_levels=()), 83_653_863, 0.18215),
}


def default_weights_path(kind: str) -> Path:
    return cache_dir() / "weights" / KINDS[kind].file


def resolve_vae(spec: str | os.PathLike | None, kind: Optional[str] = None, *,
                download: bool = False) -> tuple[Path, Optional[str]]:
    """`--vae` → (weights file, kind to check). A name of hub.py's table (vavae, sdvae, sdvae-mse, …) or an
    hf://OWNER/REPO/FILE address resolves through hub.py (ddaepp's cache, the Hugging Face cache, then only
    with `download` the Hub; sha256 checked); a path stays a path; none: the `kind`'s file (vavae unless given)."""
    from .. import hub

    if kind is not None and kind not in KINDS:
        from ..errors import choices

        raise UsageError(f"unknown --vae-kind {kind!r}; valid: {choices(KINDS)}")
    if spec is None:
        spec = kind or "vavae"
    if not hub.is_reference(spec):
        return Path(spec).expanduser(), kind
    weight = hub.weight_for(str(spec))
    if weight.vae_kind is None and not str(spec).startswith(hub.HF_PREFIX):
        vaes = ", ".join(n for n, w in hub.WEIGHTS.items() if w.vae_kind)
        raise UsageError(f"--vae {spec}: {weight.what} is not a VAE; VAE names: {vaes}")
    if kind is not None and weight.vae_kind not in (None, kind):
        raise UsageError(f"--vae {spec} is a {KINDS[weight.vae_kind].description}, not --vae-kind {kind}")
    return hub.resolve(weight, download=download), kind or weight.vae_kind


def missing_message(path: Path, kind: Optional[str]) -> str:
    if kind in KINDS:
        k = KINDS[kind]
        return (f"VAE weights not found: {path}. Download {k.file} from {k.source} and put it at "
                f"{default_weights_path(kind)} (the default; $DDAEPP_CACHE/weights/), or pass --vae PATH")
    return f"VAE weights not found: {path}; pass --vae PATH to an LDM- or diffusers-format autoencoder checkpoint"


# ------------------------------------------------------------------------------------------------
# Reading the checkpoint
# ------------------------------------------------------------------------------------------------


def read_ldm_state_dict(path: str | os.PathLike, kind: Optional[str] = None) -> dict[str, Tensor]:
    """The autoencoder's tensors of an LDM-format file, training-only keys dropped, prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise UnavailableError(missing_message(path, kind))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, not a checkpoint at all
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        hint = "" if path.suffix == ".safetensors" else \
            " (only tensors are read from .pt/.ckpt files: torch.load(weights_only=True))"
        raise UsageError(f"cannot read VAE checkpoint {path}: {reason}{hint}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]  # PyTorch Lightning / LDM training checkpoint
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise UsageError(f"VAE checkpoint {path} is not a state dict of tensors")
    for prefix in LDM_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    sd = {k: v for k, v in sd.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    if "encoder.conv_in.weight" not in sd or "decoder.conv_in.weight" not in sd:
        raise UsageError(f"VAE checkpoint {path} holds no KL autoencoder, neither LDM nor diffusers layout "
                         f"(encoder.conv_in.weight / decoder.conv_in.weight missing)")
    return sd


def _indices(sd: dict, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def infer_config(sd: dict[str, Tensor], path: str | os.PathLike = "checkpoint") -> dict:
    """diffusers AutoencoderKL config from an LDM state dict's shapes (module doc)."""
    try:
        levels = _indices(sd, r"encoder\.down\.(\d+)\.")
        channels = [int(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in levels]
        layers = len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\."))
        enc_attn = tuple(i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd)
        dec_attn = tuple(i for i in levels if f"decoder.up.{i}.attn.0.q.weight" in sd)
        latent = int(sd["decoder.conv_in.weight"].shape[1])
        in_ch = int(sd["encoder.conv_in.weight"].shape[1])
        out_ch = int(sd["decoder.conv_out.weight"].shape[0])
    except (KeyError, IndexError) as e:
        raise UsageError(f"VAE checkpoint {path} does not have the LDM autoencoder layout (missing {e})") from None
    if not levels or levels != list(range(len(levels))) or enc_attn != dec_attn:
        raise UsageError(f"VAE checkpoint {path}: unsupported level layout (levels {levels}, encoder attention at "
                         f"{list(enc_attn)}, decoder attention at {list(dec_attn)})")
    cfg = _config(latent, channels, attn_levels=enc_attn, layers=layers)
    cfg.update(in_channels=in_ch, out_channels=out_ch,
               use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd)
    return cfg


def kind_of(config: dict) -> Optional[str]:
    for name, k in KINDS.items():
        if all(config.get(key) == v for key, v in k.config.items()):
            return name
    return None


# ------------------------------------------------------------------------------------------------
# Conversion and the model
# ------------------------------------------------------------------------------------------------


def build_autoencoder(config: dict, device: torch.device | str = "cpu"):
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**config)


_ATTN_RENAMES = (("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                 ("proj_out.", "to_out.0."))


def convert_ldm_to_diffusers(sd: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """LDM keys → diffusers AutoencoderKL keys (module doc)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    n = len(config["block_out_channels"])
    rx = re.compile(r"^(encoder\.down|decoder\.up)\.(\d+)\.attn\.(\d+)\.(.+)$")
    in_level, rest = {}, {}
    for k, v in sd.items():
        m = rx.match(k)
        if not m:
            rest[k] = v
            continue
        side, level, j, leaf = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        for old, new in _ATTN_RENAMES:
            if leaf.startswith(old):
                leaf = new + leaf[len(old):]
                break
        prefix = f"encoder.down_blocks.{level}" if side == "encoder.down" else f"decoder.up_blocks.{n - 1 - level}"
        if v.ndim == 4 and leaf.endswith("weight") and not leaf.startswith("group_norm"):
            v = v[:, :, 0, 0]  # 1×1 conv → linear
        in_level[f"{prefix}.attentions.{j}.{leaf}"] = v
    out = convert_ldm_vae_checkpoint(rest, config)
    out.update(in_level)
    return out


def file_sha256(path: str | os.PathLike) -> str:
    from ..hub import sha256_file  # memoised: the file resolve_vae just verified is not hashed again

    return sha256_file(path)


class VAE:
    """A loaded autoencoder: `encode_moments` (posterior mean, std) and `decode`, plus its identity."""

    def __init__(self, model, config: dict, path: Path, sha256: str):
        self.model, self.config, self.path, self.sha256 = model, config, path, sha256
        self.kind = kind_of(config)

    @property
    def latent_channels(self) -> int:
        return self.config["latent_channels"]

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    def identity(self) -> dict:
        k = KINDS.get(self.kind)
        return {"kind": self.kind or "custom", "name": k.description if k else "LDM-layout KL autoencoder",
                "file": str(self.path.resolve()), "file_name": self.path.name, "sha256": self.sha256,
                "params": sum(p.numel() for p in self.model.parameters()),
                "scaling_factor": k.scaling_factor if k else 1.0, "config": self.config}

    @torch.no_grad()
    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images in [−1, 1] (B, 3, H, W) → posterior mean and std (B, C, H/f, W/f), logvar clamped to [−30, 20]."""
        dist = self.model.encode(x).latent_dist
        return dist.mean, dist.std

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """VAE latents → images, nominally in [−1, 1] (not clamped)."""
        return self.model.decode(z).sample


def load_vae(path: str | os.PathLike, kind: Optional[str] = None, device: torch.device | str = "cpu",
             expected_sha256: Optional[str] = None) -> VAE:
    """Load an LDM-format KL autoencoder strictly. `kind` (vavae / sdvae) checks the architecture."""
    if kind is not None and kind not in KINDS:
        from ..errors import choices

        raise UsageError(f"unknown VAE kind {kind!r}; valid: {choices(KINDS)}")
    from .vae_diffusers import diffusers_config, is_diffusers_layout, weights_file

    path = weights_file(Path(path)) if Path(path).is_dir() else Path(path)
    sd = read_ldm_state_dict(path, kind)
    diffusers_layout = is_diffusers_layout(sd)  # diffusers' own keys: loaded as they are (vae_diffusers.py)
    config = diffusers_config(sd, path) if diffusers_layout else infer_config(sd, path)
    if kind is not None and kind_of(config) != kind:
        want = KINDS[kind].config
        diff = ", ".join(f"{k} {config.get(k)} (expected {v})" for k, v in want.items() if config.get(k) != v)
        raise UsageError(f"VAE checkpoint {path} is not a {KINDS[kind].description}: {diff}")
    sha = file_sha256(path)
    if expected_sha256 is not None and sha != expected_sha256:
        raise UsageError(f"VAE weights {path} (sha256 {sha[:16]}…) are not the ones the latent cache was made with "
                         f"(sha256 {expected_sha256[:16]}…); decoding would produce wrong images")
    model = build_autoencoder(config)
    converted = sd if diffusers_layout else convert_ldm_to_diffusers(sd, config)
    try:
        result = model.load_state_dict(converted, strict=False)
    except RuntimeError as e:  # shape mismatch
        reason = " ".join(str(e).split())[:400]
        raise UsageError(f"VAE checkpoint {path} does not fit the autoencoder it describes: {reason}") from None
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"{len(result.missing_keys)} missing (e.g. {', '.join(result.missing_keys[:3])})")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected (e.g. {', '.join(result.unexpected_keys[:3])})")
        raise UsageError(f"VAE checkpoint {path} does not match the autoencoder: keys {'; '.join(parts)}")
    model = model.to(device).eval().requires_grad_(False)
    return VAE(model, config, path, sha)
