"""The original DiT / SiT family: DiT, SiT, and REPA's and SRA's SiT/DiT checkpoints → `dit_orig`.

Files (each as its repository's train.py saves it):
* DiT (facebookresearch/DiT) and SiT (willisma/SiT): released files are the EMA state dict alone
  (`DiT-XL-2-256x256.pt`, `SiT-XL-2-256x256.pt`); training checkpoints `{'model', 'ema', 'opt', 'args'}`.
* REPA (sihyun-yu/REPA): `{'model', 'ema', 'opt', 'args', 'steps'}`; the alignment projectors
  `projectors.*` (REPA:models/sit.py `build_mlp`) are dropped and listed.
* SRA (vvvvvjdy/SRA): `{'model', 'ema', 'opt', 'args', 'steps'}` of SiT-SRA or DiT-SRA; the
  self-alignment head `ap_head.*` (SRA:SiT-SRA/models/sit.py and DiT-SRA/models/dit.py `SimpleHead`)
  is dropped and listed.

Keys → ddaepp's `dit_orig` (nets/dit_orig.py, built to the same layout): `t_embedder.mlp.{0,2}` →
`t_embedder.{0,2}` and `y_embedder.embedding_table` → `y_embedder`; every other name is the same
(timm `x_embedder.proj`, `blocks.N.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1}`,
`final_layer.{linear, adaLN_modulation.1}`; the LayerNorms have no parameters). `pos_embed`, a frozen
parameter in all four code bases, is checked equal to ddaepp's sin-cos table, then copied. The label
table has num_classes + 1 rows (the last the CFG null class; DiT/SiT/REPA/SRA train with class dropout 0.1).

Conventions:
* DiT and DiT-SRA (DiT:diffusion/gaussian_diffusion.py, DDPM with T = 1000 linear β 1e-4…0.02): the
  network embeds the integer step 0…999 and outputs ε (C channels) and, with learned Σ, the improved-
  DDPM variance interpolation v (C more). ddaepp's `ddpm` with `dit_orig` feeds t − 1 for its t = 1…T
  (`time_input: index`) and reads the variance with `model.learn_sigma: true`.
* SiT (willisma/SiT transport/transport.py, path `ICPlan`): x_t = t·x1 + (1 − t)·x0 with x1 = data and
  x0 = noise, the network gets that t and predicts x1 − x0: t = 1 is data. ddaepp's RF is
  x_t = (1 − t)·x0 + t·ε, v = ε − x0, so the import sets `diffusion.net_convention: sit` (1 − t in, −v out).
* REPA and SRA-SiT (REPA:loss.py and SRA:SiT-SRA/loss.py `interpolant`, path "linear"): x_t =
  (1 − t)·x + t·ε, target ε − x, the network gets t — ddaepp's own RF convention; nothing converted.
* SiT's learned Σ (willisma/SiT models.py `learn_sigma=True` by default; train.py keeps that default and
  the released `SiT-XL-2-256x256.pt` is built with it, sample.py `learn_sigma = image_size == 256`): the
  final layer has 2C outputs per pixel, but SiT's forward keeps only the first C channels
  (`x, _ = x.chunk(2, dim=1)` after unpatchify) and its transport never reads the rest. Unpatchify reshapes
  each token's p·p·2C outputs as (p, p, 2C), channel fastest, so the unused outputs are the rows r of
  `final_layer.linear` with r mod 2C ≥ C — not the second half of the rows. The import drops them (listed
  in import.json) and maps the rest onto ddaepp's C-channel RF network, whose output then equals SiT's
  forward. (REPA's and SRA's SiT, models/sit.py, have `out_channels = in_channels`: no learned Σ; DiT and
  DiT-SRA keep theirs under DDPM, `model.learn_sigma: true`.)
* Latents: all four train on SD-VAE latents z·0.18215 (DiT sample.py decodes samples / 0.18215; REPA and
  SRA train.py `latents_scale` 0.18215): the import sets `data.latent_scale: 0.18215`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UsageError
from .common import DIT_EMBEDDER_PREFIXES, Mapped, Source, check_derived, is_state_dict, rename, strip_prefix, swap_prefix
from .lightningdit import WRAPPERS, extract_dict

# family → (where it is published, head prefixes, why they are dropped, diffusion formulations)
FAMILIES = {
    "dit": ("github.com/facebookresearch/DiT (download.py: DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt)", (), "",
            ("ddpm",)),
    "sit": ("github.com/willisma/SiT (README: SiT-XL-2-256x256.pt)", (), "", ("rf",)),
    "repa": ("github.com/sihyun-yu/REPA (README: SiT-XL/2 + REPA on Hugging Face / Dropbox)",
             ("projectors.",), "REPA alignment projectors (projectors.*)", ("rf",)),
    "sra": ("github.com/vvvvvjdy/SRA (README: SiT/DiT + SRA checkpoints on Hugging Face)",
            ("ap_head.",), "SRA self-alignment head (ap_head.*)", ("rf", "ddpm")),
}
BACKBONES = ("dit_orig",)
SD_VAE_SCALE = 0.18215  # DiT sample.py `vae.decode(samples / 0.18215)`; REPA/SRA train.py latents_scale


UNUSED_SIGMA = ("sit",)  # families whose forward discards a learned-Σ half (module doc)
FINAL = "final_layer.linear."


def extract_for(family: str):
    _, heads, reason, _ = FAMILIES[family]

    def extract(obj, path: Path, weights: str) -> Source:
        src = _extract(obj, path, weights)
        if family in UNUSED_SIGMA:
            for which in ("ema", "raw"):
                sd = getattr(src, which)
                if sd is not None:
                    where = "" if is_state_dict(obj) else ("ema/" if which == "ema" else "model/")
                    sd, drop = drop_unused_sigma(sd, where)
                    setattr(src, which, sd)
                    for why, keys in drop.items():
                        src.dropped.setdefault(why, []).extend(keys)
        return src

    def _extract(obj, path: Path, weights: str) -> Source:
        if is_state_dict(obj):  # a released file: the EMA network alone
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


def drop_unused_sigma(sd: dict, where: str = "") -> tuple[dict, dict[str, list[str]]]:
    """A learned-Σ SiT state dict → the C-output network SiT's forward computes (module doc), and the drop.

    C and p come from the patch embedding (x_embedder.proj.weight: D × C × p × p); a final layer with
    p²·2C outputs keeps the rows r with r mod 2C < C (weight rows and bias entries). Other layouts pass."""
    emb, w, b = sd.get("x_embedder.proj.weight"), sd.get(FINAL + "weight"), sd.get(FINAL + "bias")
    if emb is None or w is None or b is None or emb.ndim != 4 or w.ndim != 2 or b.ndim != 1:
        return sd, {}
    c, p = emb.shape[1], emb.shape[2]
    rows = w.shape[0]
    if rows != 2 * p * p * c or b.shape[0] != rows:
        return sd, {}
    keep = torch.arange(rows)
    keep = keep[keep.remainder(2 * c) < c]  # per token (p, p, 2C), channel fastest: the first C of each pixel
    sd = dict(sd)
    sd[FINAL + "weight"], sd[FINAL + "bias"] = (t.index_select(0, keep.to(t.device)) for t in (w, b))
    why = (f"SiT learned-Σ outputs its forward discards (unpatchify, then x.chunk(2, dim=1)): the rows r of "
           f"{FINAL}weight and bias with r mod {2 * c} ≥ {c} ({rows // 2} of {rows})")
    return sd, {why: [f"{where}{FINAL}weight", f"{where}{FINAL}bias"]}


def _wants_sit_time(family: str) -> bool:
    return family == "sit"  # SiT's own transport; REPA/SRA train with ddaepp's direction (module doc)


def overrides_for(family: str):
    def recipe_overrides(recipe) -> list[str]:
        out = []
        if recipe.sra.enabled:  # the file's head is dropped; an imported run samples and evaluates, never trains
            out.append("sra.enabled=false")
        if recipe.diffusion.formulation == "rf":
            want = "sit" if _wants_sit_time(family) else "ddaepp"
            if family == "sit" or recipe.diffusion.net_convention != want:
                out.append(f"diffusion.net_convention={want}")
        if recipe.data.dataset == "latents" and recipe.data.latent_scale != SD_VAE_SCALE:
            out.append(f"data.latent_scale={SD_VAE_SCALE}")
        return out

    return recipe_overrides


def conventions_for(family: str):
    def conventions(recipe) -> list[str]:
        out = []
        if recipe.diffusion.formulation == "ddpm":
            out.append("time: DiT embeds the integer step 0..999; ddaepp's ddpm feeds t − 1 for its t = 1..1000 "
                       "(time_input index for dit_orig)")
            out.append("output: ε" + (" and the improved-DDPM variance interpolation v (second half of the channels; "
                                      "model.learn_sigma)" if getattr(recipe.model, "learn_sigma", False) else ""))
        elif _wants_sit_time(family):
            out.append("time direction: SiT's network gets t_SiT = 1 − t (t_SiT = 1 is data, transport ICPlan); "
                       "diffusion.net_convention = sit feeds 1 − t")
            out.append("velocity sign: SiT predicts data − noise = −(ε − x0); net_convention = sit negates it")
        else:
            out.append(f"time and velocity kept: {family.upper()} trains x_t = (1 − t)·x + t·ε with target ε − x "
                       f"and feeds t (loss.py interpolant 'linear'), ddaepp's RF convention; nothing converted")
        if recipe.data.dataset == "latents":
            out.append(f"latents: SD-VAE z·{SD_VAE_SCALE} (data.latent_scale), no per-channel statistics")
        return out

    return conventions


def convert(sd, model: torch.nn.Module, path: Path) -> Mapped:
    cfg = model.config
    c, p = cfg["in_channels"], cfg["patch_size"]
    w = sd.get("final_layer.linear.weight")
    rows = w.shape[0] if w is not None and w.ndim == 2 else None
    if rows in (p * p * c, 2 * p * p * c) and rows != model.out_channels * p * p:
        learned = rows == 2 * p * p * c
        raise UsageError(f"{path}: final_layer.linear has {rows} outputs = {p}²·{2 * c if learned else c}: the "
                         f"checkpoint was trained {'with' if learned else 'without'} learned Σ; set "
                         f"model.learn_sigma: {'true' if learned else 'false'} in the recipe")
    if "pos_embed" in sd:
        check_derived(sd, "pos_embed", _pos_table(cfg), path)  # computed on the CPU, whatever the model's device

    return rename(sd, lambda k: swap_prefix(k, DIT_EMBEDDER_PREFIXES))


def _pos_table(cfg: dict) -> torch.Tensor:
    from ..nets.common import sincos_pos_embed_2d

    return torch.from_numpy(sincos_pos_embed_2d(cfg["width"], cfg["image_size"] // cfg["patch_size"])).float()[None]
