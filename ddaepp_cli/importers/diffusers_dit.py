"""diffusers interoperability for the original DiT: `ddaepp export RUN --to diffusers OUT` and
`ddaepp import FOLDER --from diffusers-dit`.

The folder is diffusers' own format, as `facebook/DiT-XL-2-256` is published and as `DiTPipeline.save_pretrained`
writes it: model_index.json, transformer/ (config.json + diffusion_pytorch_model.safetensors of a
`DiTTransformer2DModel`), scheduler/ (scheduler_config.json) and vae/ (an `AutoencoderKL`). The import also
takes a bare transformer folder. Everything is written by diffusers' own `save_pretrained`.

Keys (ddaepp `dit_orig`, nets/dit_orig.py = facebookresearch/DiT models.py ↔ diffusers
models/transformers/dit_transformer_2d.py, attention.py `BasicTransformerBlock`, normalization.py
`AdaLayerNormZero`, embeddings.py `PatchEmbed`, `CombinedTimestepLabelEmbeddings`):
  x_embedder.proj                 ↔ pos_embed.proj
  t_embedder.{0,2}                ↔ transformer_blocks.N.norm1.emb.timestep_embedder.linear_{1,2}  (every N)
  y_embedder                      ↔ transformer_blocks.N.norm1.emb.class_embedder.embedding_table   (every N)
  blocks.N.adaLN_modulation.1     ↔ transformer_blocks.N.norm1.linear   (shift, scale, gate ×2: same order)
  blocks.N.attn.qkv (rows q|k|v)  ↔ transformer_blocks.N.attn1.to_{q,k,v}
  blocks.N.attn.proj              ↔ transformer_blocks.N.attn1.to_out.0
  blocks.N.mlp.fc{1,2}            ↔ transformer_blocks.N.ff.net.{0.proj,2}
  final_layer.adaLN_modulation.1  ↔ proj_out_1 (shift, scale)
  final_layer.linear              ↔ proj_out_2
  pos_embed (frozen sin-cos)      ↔ not stored: diffusers' PatchEmbed computes the same table (checked)
diffusers gives every block its own copy of the time and label embedders and reads block 0's for the final
layer; the export writes the one DiT embedder into every block, the import demands that the copies are equal
(a DiT whose blocks' embedders differ is not a DiT).

Two numerical conventions differ between the codes, and are converted or recorded:
* Time sinusoid: diffusers embeds t with frequencies 10000^(−k/127) (`get_timestep_embedding`,
  `downscale_freq_shift=1`), facebookresearch/DiT with 10000^(−k/128). ddaepp's `model.time_freq_shift: 1`
  computes diffusers' (nets/dit_orig.py). An imported folder gets 1, so ddaepp's network is the one diffusers
  runs; a run with DiT's 0 is exported with the same weights (as diffusers' own conversion of
  DiT-XL-2-256x256.pt did) and the difference diffusers then makes is measured and reported.
* LayerNorm eps: DiT uses 1e-6 everywhere; diffusers uses 1e-6 except before the MLP (`norm3`, `norm_eps`,
  default 1e-5). The export writes norm_eps 1e-6; an imported folder with another value is recorded.

Scheduler: DiT trains DDPM with T = 1000, β linear 1e-4…0.02, ε-prediction and the learned variance
(facebookresearch/DiT diffusion/__init__.py `create_diffusion`). `DiTPipeline.__call__` splits the learned
variance off before `scheduler.step` (pipelines/dit/pipeline_dit.py, "learned sigma"), so a learned-range
scheduler fails inside it; the export writes `DDPMScheduler` with that schedule, `variance_type="fixed_small"`
(σ² = β̃, what DiTPipeline can run), `clip_sample=False` (DiT `clip_denoised=False`) and
`timestep_spacing="linspace"`, whose grid for N steps equals DiT's `space_timesteps(1000, str(N))`.
`DDPMScheduler.from_pretrained(OUT, subfolder="scheduler", variance_type="learned_range")` stepped with the
transformer's full 2C-channel output is DiT's learned-variance sampler (tests/test_diffusers_dit.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UnavailableError, UsageError
from .common import Mapped, check_against, merge_drops, sha256

FAMILY = "diffusers-dit"
RECORD = "ddaepp_export.json"  # written next to model_index.json by the export: the run it came from
DEFAULT_RECIPE = "imagenet256_sra_ditxl"  # the base recipe of an import without --recipe (DiT's DDPM)
SUPPORTED = ("a diffusers DiT folder: a DiTPipeline folder (model_index.json, transformer/, scheduler/, vae/) as "
             "facebook/DiT-XL-2-256 is published, or a bare DiTTransformer2DModel folder (config.json + "
             "diffusion_pytorch_model.safetensors)")
DIT_NORM_EPS = 1e-6  # facebookresearch/DiT models.py: every LayerNorm eps=1e-6
T_TRAIN, BETA_START, BETA_END = 1000, 1e-4, 0.02  # DiT create_diffusion: linear schedule, 1000 steps
SCHEDULER = dict(num_train_timesteps=T_TRAIN, beta_schedule="linear", beta_start=BETA_START, beta_end=BETA_END,
                 prediction_type="epsilon", variance_type="fixed_small", clip_sample=False,
                 timestep_spacing="linspace")
EMB = "norm1.emb."
EMBEDDER_KEYS = {"t_embedder.0.": "timestep_embedder.linear_1.", "t_embedder.2.": "timestep_embedder.linear_2.",
                 "y_embedder.": "class_embedder.embedding_table."}
BLOCK_KEYS = {"adaLN_modulation.1.": "norm1.linear.", "attn.proj.": "attn1.to_out.0.", "mlp.fc1.": "ff.net.0.proj.",
              "mlp.fc2.": "ff.net.2."}
TOP_KEYS = {"x_embedder.proj.": "pos_embed.proj.", "final_layer.adaLN_modulation.1.": "proj_out_1.",
            "final_layer.linear.": "proj_out_2."}
QKV = ("q", "k", "v")
# config.json fields that must hold these values for the network to be DiT's (DiTTransformer2DModel's own
# defaults; the legacy Transformer2DModel config of facebook/DiT-XL-2-256 carries the same)
REQUIRED = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
            "norm_elementwise_affine": False}
ABSENT = ("cross_attention_dim", "num_vector_embeds", "caption_channels")  # other Transformer2DModel variants
CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")


# ------------------------------------------------------------------------------------------------
# Keys
# ------------------------------------------------------------------------------------------------


def to_diffusers(sd: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """ddaepp `dit_orig` state dict → DiTTransformer2DModel state dict (module doc); pos_embed is left out."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k == "pos_embed":
            continue
        if k.startswith(tuple(EMBEDDER_KEYS)):
            old = next(p for p in EMBEDDER_KEYS if k.startswith(p))
            for n in range(depth):
                out[f"transformer_blocks.{n}.{EMB}{EMBEDDER_KEYS[old]}{k[len(old):]}"] = v
        elif k.startswith("blocks."):
            n, rest = k[len("blocks."):].split(".", 1)
            if rest.startswith("attn.qkv."):
                for name, part in zip(QKV, v.chunk(3, dim=0)):
                    out[f"transformer_blocks.{n}.attn1.to_{name}.{rest.rsplit('.', 1)[1]}"] = part
            else:
                old = next((p for p in BLOCK_KEYS if rest.startswith(p)), None)
                if old is None:
                    raise UsageError(f"the run's network has {k}, which diffusers' DiT has no place for")
                out[f"transformer_blocks.{n}.{BLOCK_KEYS[old]}{rest[len(old):]}"] = v
        else:
            old = next((p for p in TOP_KEYS if k.startswith(p)), None)
            if old is None:
                raise UsageError(f"the run's network has {k}, which diffusers' DiT has no place for")
            out[TOP_KEYS[old] + k[len(old):]] = v
    return {k: v.contiguous() for k, v in out.items()}


def from_diffusers(sd: dict[str, Tensor], depth: int, pos_embed: Tensor, where: str) -> Mapped:
    """DiTTransformer2DModel state dict → ddaepp keys. The per-block embedder copies must be equal; the
    copies of blocks 1… are dropped (listed) after that check."""
    out = Mapped({}, {}, {})
    used: set[str] = set()

    def take(new: str, old: str) -> None:
        if old not in sd:
            raise UsageError(f"{where}: the diffusers DiT lacks {old} (for ddaepp's {new}); the file is incomplete")
        out.tensors[new], out.origin[new] = sd[old], old
        used.add(old)

    for ours, theirs in EMBEDDER_KEYS.items():
        for suffix in ("weight", "bias") if not ours.startswith("y_") else ("weight",):
            first = f"transformer_blocks.0.{EMB}{theirs}{suffix}"
            take(ours + suffix, first)
            for n in range(1, depth):
                other = f"transformer_blocks.{n}.{EMB}{theirs}{suffix}"
                if other in sd and not torch.equal(sd[other], sd[first]):
                    raise UsageError(f"{where}: {other} differs from {first}: this network's blocks embed time and "
                                     f"class separately, which DiT (one shared embedder) cannot represent")
                if other in sd:
                    used.add(other)
                    out.dropped.setdefault("per-block copies of the shared time/class embedder (checked equal to "
                                           "block 0's)", []).append(other)
    for n in range(depth):
        b = f"transformer_blocks.{n}."
        for suffix in ("weight", "bias"):
            parts = [f"{b}attn1.to_{name}.{suffix}" for name in QKV]
            for p in parts:
                if p not in sd:
                    raise UsageError(f"{where}: the diffusers DiT lacks {p}; the file is incomplete")
            out.tensors[f"blocks.{n}.attn.qkv.{suffix}"] = torch.cat([sd[p] for p in parts], dim=0)
            out.origin[f"blocks.{n}.attn.qkv.{suffix}"] = f"{b}attn1.to_{{q,k,v}}.{suffix}"
            used.update(parts)
            for ours, theirs in BLOCK_KEYS.items():
                take(f"blocks.{n}.{ours}{suffix}", b + theirs + suffix)
    for ours, theirs in TOP_KEYS.items():
        for suffix in ("weight", "bias"):
            take(ours + suffix, theirs + suffix)
    extra = sorted(set(sd) - used)
    if extra:
        raise UsageError(f"{where}: {extra[0]} ({len(extra)} such key(s)) has no place in DiT's network: not a DiT "
                         f"transformer, or a variant ddaepp does not map")
    out.tensors["pos_embed"] = pos_embed  # diffusers computes it (PatchEmbed); so does ddaepp
    out.origin["pos_embed"] = "(computed: 2-D sin-cos table)"
    return out


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------


def transformer_config(recipe, model) -> dict:
    """DiTTransformer2DModel's config for the run's network."""
    cfg = model.config
    return dict(num_attention_heads=cfg["heads"], attention_head_dim=cfg["width"] // cfg["heads"],
                in_channels=cfg["in_channels"], out_channels=model.out_channels, num_layers=cfg["depth"],
                sample_size=cfg["image_size"], patch_size=cfg["patch_size"], num_embeds_ada_norm=cfg["num_classes"],
                norm_eps=DIT_NORM_EPS, **{k: v for k, v in REQUIRED.items()})


def check_exportable(recipe) -> None:
    m = recipe.model
    what = ("ddaepp export --to diffusers writes dit_orig DDPM runs (DiT, DiT-SRA, an imported DiT) as a diffusers "
            "DiTTransformer2DModel")
    if m.backbone != "dit_orig" or recipe.diffusion.formulation != "ddpm":
        raise UsageError(f"{what}; this run has model.backbone {m.backbone} under diffusion.formulation "
                         f"{recipe.diffusion.formulation}")
    problems = []
    if m.num_classes <= 0:
        problems.append("it is unconditional (diffusers' DiT is class-conditional: num_embeds_ada_norm)")
    if m.qk_norm:
        problems.append("model.qk_norm is on (diffusers' DiT has no q/k norm)")
    if m.mlp_ratio != 4.0:
        problems.append(f"model.mlp_ratio is {m.mlp_ratio} (diffusers' DiT feed-forward is 4×)")
    if m.selfcond.layer is not None:
        problems.append("it has a self-conditioning layer (not part of DiT)")
    if (recipe.diffusion.timesteps, recipe.diffusion.beta_start, recipe.diffusion.beta_end) != \
            (T_TRAIN, BETA_START, BETA_END):
        problems.append(f"its DDPM schedule is not DiT's (linear β {BETA_START}…{BETA_END}, T = {T_TRAIN})")
    if problems:
        raise UsageError(f"{what}; this run cannot be: {'; '.join(problems)}")


def _vae_for(recipe) -> tuple[object | None, str]:
    """(the run's VAE as a diffusers AutoencoderKL with scaling_factor = data.latent_scale, note)."""
    from ..data.latentstore import read_manifest, resolve_vae_path
    from ..data.vae import load_vae

    d = recipe.data
    if d.dataset != "latents":
        return None, "no VAE: the run is not a latent run"
    if d.latent_scale is None:
        return None, ("no VAE: the run normalises latents with per-channel statistics, which DiTPipeline (z / "
                      "vae.config.scaling_factor) cannot express")
    try:
        manifest = read_manifest(d.root)
        path = resolve_vae_path(manifest, d.vae)
        vae = load_vae(path, expected_sha256=(manifest.get("vae") or {}).get("sha256"))
    except (UsageError, UnavailableError) as e:  # no cache or no VAE file: transformer and scheduler only
        return None, f"no VAE: {e}"
    vae.model.register_to_config(scaling_factor=float(d.latent_scale))
    return vae, f"vae/ from {vae.path.name} (sha256 {vae.sha256[:12]}…), scaling_factor {d.latent_scale}"


def _probe(model, theirs, cfg: dict, t: list[int]) -> float:
    """max |diffusers − ddaepp| / max |ddaepp| over a fixed probe batch at the integer steps `t`."""
    g = torch.Generator().manual_seed(0)
    n, c, s = len(t), cfg["in_channels"], cfg["sample_size"]
    x = torch.randn(n, c, s, s, generator=g)
    y = torch.randint(0, cfg["num_embeds_ada_norm"], (n,), generator=g)
    steps = torch.tensor(t, dtype=torch.int64)
    with torch.no_grad():
        ours = model(x, steps.float(), class_labels=y)
        other = theirs(x, timestep=steps, class_labels=y).sample
    return float((other - ours).abs().max() / ours.abs().max().clamp_min(1e-12))


def export_run(run: str | os.PathLike, out: str | os.PathLike, *, weights: str = "ema") -> dict:
    """Write the run's network (and its VAE and DiT's scheduler) as a diffusers DiT folder `out`."""
    from diffusers import DDPMScheduler, DiTPipeline, DiTTransformer2DModel

    from ..atomic import fsync_file, replace_dir
    from ..checkpoint import checkpoint_step
    from ..recipe import recipe_to_yaml
    from ..sample import load_model, weights_of

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not empty; ddaepp export writes a new folder only")
    recipe, model, ckpt = load_model(run, weights=weights)  # refuses what is not a run
    check_exportable(recipe)
    weights = weights_of(run, weights)
    cfg = transformer_config(recipe, model)
    theirs = DiTTransformer2DModel(**cfg).eval()
    table = theirs.pos_embed.pos_embed.float().reshape(model.pos_embed.shape)
    if not torch.allclose(table, model.pos_embed.float(), atol=1e-5, rtol=0):
        raise UsageError(f"{ckpt}: pos_embed differs from the sin-cos table diffusers computes for this geometry; "
                         f"diffusers does not store it, so the network cannot be exported")
    theirs.load_state_dict(to_diffusers(model.state_dict(), cfg["num_layers"]), strict=True)
    shift = model.time_freq_shift
    exact_at = [0] if shift == 0 else [0, 1, 250, 999]
    if (d := _probe(model, theirs, cfg, exact_at)) > 1e-5:  # every weight in place: must agree
        raise RuntimeError(f"internal: diffusers' DiT differs from the run's network by {d:.2e} at t = {exact_at}")
    record = {"format": "ddaepp-diffusers-dit-1", "run": str(Path(run).resolve()), "checkpoint": str(ckpt),
              "step": checkpoint_step(ckpt), "weights": weights, "time_freq_shift": shift,
              "transformer": cfg, "scheduler": {"class": "DDPMScheduler", **SCHEDULER}, "recipe": recipe_to_yaml(recipe)}
    if shift == 0:
        diff = _probe(model, theirs, cfg, [1, 100, 250, 500, 999])
        record["time_embedding"] = (
            f"the run embeds time as facebookresearch/DiT does (10000^(-k/128)); diffusers' DiTTransformer2DModel "
            f"uses 10000^(-k/127) (downscale_freq_shift=1): equal at t = 0, elsewhere diffusers' output differs "
            f"from the run's by up to {diff:.2e} of its largest value on a probe batch (t = 1…999)")
        record["max_relative_difference_t>0"] = diff
    else:
        record["time_embedding"] = "model.time_freq_shift 1: diffusers' time sinusoid; the outputs agree (≤ 1e-5)"
    vae, record["vae"] = _vae_for(recipe)
    scheduler = DDPMScheduler(**SCHEDULER)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-export-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if vae is not None:
            DiTPipeline(transformer=theirs, vae=vae.model, scheduler=scheduler).save_pretrained(tmp)
        else:
            theirs.save_pretrained(tmp / "transformer")
            scheduler.save_pretrained(tmp / "scheduler")
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        if out.exists():
            out.rmdir()  # empty (checked above)
        replace_dir(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"could not write {out}: {e.strerror or e}") from None
    record["out"], record["pipeline"] = str(out), vae is not None
    return record


# ------------------------------------------------------------------------------------------------
# Import
# ------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is not readable JSON ({e}); expected {SUPPORTED}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path} is not a JSON object; expected {SUPPORTED}")
    return obj


def locate(folder: Path) -> tuple[Path, Path | None, Path | None]:
    """(transformer folder, vae folder or None, scheduler folder or None) of a pipeline or bare folder."""
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; --from {FAMILY} reads {SUPPORTED}")
    if (folder / "model_index.json").is_file():
        index = _read_json(folder / "model_index.json")
        part = index.get("transformer")
        if not (isinstance(part, list) and (folder / "transformer" / "config.json").is_file()):
            raise UsageError(f"{folder}: model_index.json ({index.get('_class_name')}) names no transformer/ with a "
                             f"config.json; --from {FAMILY} reads {SUPPORTED}")
        vae = folder / "vae" if (folder / "vae" / "config.json").is_file() else None
        sched = folder / "scheduler" if (folder / "scheduler" / "scheduler_config.json").is_file() else None
        return folder / "transformer", vae, sched
    if (folder / "config.json").is_file():
        return folder, None, None
    if (folder / "transformer" / "config.json").is_file():  # an export without a VAE: transformer/ + scheduler/
        sched = folder / "scheduler" if (folder / "scheduler" / "scheduler_config.json").is_file() else None
        return folder / "transformer", None, sched
    raise UsageError(f"{folder} has neither model_index.json nor config.json; --from {FAMILY} reads {SUPPORTED}")


def read_config(folder: Path) -> dict:
    cfg = _read_json(folder / "config.json")
    name = cfg.get("_class_name")
    if name not in CLASSES:
        raise UsageError(f"{folder / 'config.json'} describes a {name}, not a DiT transformer; --from {FAMILY} "
                         f"reads {SUPPORTED}")
    bad = [f"{k} {cfg.get(k, '(default)')!r} (DiT: {v!r})" for k, v in REQUIRED.items() if cfg.get(k, v) != v]
    bad += [f"{k} {cfg[k]!r} (DiT: none)" for k in ABSENT if cfg.get(k) is not None]
    for k in ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "sample_size", "patch_size",
              "num_embeds_ada_norm"):
        if not isinstance(cfg.get(k), int) or cfg[k] <= 0:
            bad.append(f"{k} {cfg.get(k)!r} (a positive integer)")
    if not bad:
        c, o = cfg["in_channels"], cfg.get("out_channels") or cfg["in_channels"]
        if o not in (c, 2 * c):
            bad.append(f"out_channels {o} (DiT: in_channels {c}, or {2 * c} with the learned variance)")
    if bad:
        raise UsageError(f"{folder / 'config.json'} is not the original DiT: {'; '.join(bad)}")
    return cfg


def read_weights_folder(folder: Path) -> tuple[dict[str, Tensor], list[Path]]:
    """diffusers' weights files in `folder`: one .safetensors, a sharded index, or a .bin (weights-only)."""
    from safetensors.torch import load_file

    from .common import read_source

    single = folder / "diffusion_pytorch_model.safetensors"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    binary = folder / "diffusion_pytorch_model.bin"
    if single.is_file():
        files = [single]
    elif index.is_file():
        names = sorted(set((_read_json(index).get("weight_map") or {}).values()))
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if not names or missing:
            raise UsageError(f"{index}: shard(s) missing: {', '.join(missing) or '(empty weight_map)'}")
    elif binary.is_file():
        obj = read_source(binary)
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise UsageError(f"{binary} holds no state dict")
        return obj, [binary]
    else:
        raise UsageError(f"{folder} has no diffusion_pytorch_model.safetensors (or .bin, or a sharded index)")
    sd: dict[str, Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # SafetensorError, OSError: a damaged or foreign file
            raise UsageError(f"{f} is not a readable safetensors file ({' '.join(str(e).split())[:200]})") from None
    return sd, files


def recipe_overrides(cfg: dict, explicit: tuple[str, ...], time_freq_shift: int, latent_scale: float) -> list[str]:
    """The base recipe → the folder's network: geometry from config.json, DiT's DDPM, sra off."""
    from ..nets.dit_orig import DIT_ORIG_PRESETS

    width, depth, heads = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["num_layers"], \
        cfg["num_attention_heads"]
    size = next((k for k, p in DIT_ORIG_PRESETS.items() if p == dict(width=width, depth=depth, heads=heads)), "XL")
    c = cfg["in_channels"]
    sets = [f"model.size={size}", f"model.width={width}", f"model.depth={depth}", f"model.heads={heads}",
            f"model.patch_size={cfg['patch_size']}", f"model.num_classes={cfg['num_embeds_ada_norm']}",
            f"model.learn_sigma={'true' if (cfg.get('out_channels') or c) == 2 * c else 'false'}",
            "model.qk_norm=false", "model.mlp_ratio=4.0", f"model.time_freq_shift={time_freq_shift}",
            f"data.latent_channels={c}", f"data.image_size={cfg['sample_size']}", f"data.latent_scale={latent_scale}",
            "sra.enabled=false", "contrastive.enabled=false"]
    user = [o.split("=", 1)[0].strip() for o in explicit]
    return [s for s in sets if s.split("=", 1)[0] not in user]


def import_folder(source: str | os.PathLike, *, recipe, out: str | os.PathLike, vae: str | os.PathLike | None = None,
                  explicit: tuple[str, ...] = ()) -> dict:
    """A diffusers DiT folder → a ddaepp run `out` (importers/__init__.py's layout) under `recipe` (a base: the
    network's geometry comes from config.json)."""
    from ..build import build_backbone
    from ..recipe import replace
    from . import MAPPING_VERSION, _check_out, _latent_folder, _write_run, published

    folder, out = Path(source), Path(out)
    _check_out(out)
    tdir, vae_dir, sched_dir = locate(folder)
    cfg = read_config(tdir)
    sd, files = read_weights_folder(tdir)
    record_path = folder / RECORD
    exported = _read_json(record_path) if record_path.is_file() else {}
    shift = int(exported.get("time_freq_shift", 1))  # a ddaepp export keeps the run's; diffusers' otherwise
    vae_cfg = _read_json(vae_dir / "config.json") if vae_dir is not None else {}
    scale = float(vae_cfg.get("scaling_factor") or 0.18215)
    if recipe.diffusion.formulation != "ddpm":
        raise UsageError(f"--from {FAMILY} runs under diffusion.formulation ddpm (DiT); the recipe has "
                         f"{recipe.diffusion.formulation}")
    overrides = recipe_overrides(cfg, explicit, shift, scale)
    recipe = replace(recipe, ["model.backbone=dit_orig", *overrides] if recipe.model.backbone != "dit_orig"
                     else overrides)
    recipe, sampling = published.apply("dit", recipe, explicit)
    model = build_backbone(recipe)
    mapped = from_diffusers(sd, cfg["num_layers"], model.state_dict()["pos_embed"], str(tdir))
    state = check_against(model, mapped, tdir, "transformer weights")
    model.load_state_dict(state, strict=True)

    conventions = [
        "time: diffusers' DiT embeds the integer step 0..999 as DiT does; ddaepp's ddpm feeds t − 1 for t = 1..1000",
        (f"time sinusoid: model.time_freq_shift {shift} — " +
         ("diffusers' frequencies 10000^(-k/127) (downscale_freq_shift=1): ddaepp computes what diffusers computes"
          if shift == 1 else "DiT's frequencies 10000^(-k/128), as the exported run had (ddaepp_export.json)")),
        "output: ε" + (" and the improved-DDPM variance interpolation v (model.learn_sigma)"
                       if recipe.model.learn_sigma else ""),
        f"latents: z·{scale} (data.latent_scale{', the VAE config scaling_factor' if vae_cfg else ''})",
    ]
    eps = cfg.get("norm_eps", 1e-5)
    if not math.isclose(eps, DIT_NORM_EPS):
        conventions.append(f"config norm_eps {eps}: diffusers' LayerNorm before each MLP uses it; ddaepp's DiT uses "
                           f"DiT's {DIT_NORM_EPS} (outputs differ by about that much, relatively)")
    latent_note = None
    if recipe.data.dataset == "latents":
        recipe, latent_note = _latent_folder(recipe, out, vae if vae is not None else vae_dir, None)
    drops = merge_drops(mapped.dropped)
    if sched_dir is not None:
        drops.setdefault("scheduler (ddaepp samples with DiT's published settings, import.json 'sampling')",
                         []).append(str(sched_dir.relative_to(folder)))
    record = {
        "family": FAMILY, "mapping_version": MAPPING_VERSION, "weights": "ema",
        "source": {"file": folder.name, "path": str(folder.resolve()), "files": [str(f.relative_to(folder)) for f in
                   files], "bytes": sum(f.stat().st_size for f in files), "sha256": sha256(files[0]),
                   "published": "diffusers DiTTransformer2DModel / DiTPipeline folder (save_pretrained)",
                   "config": {k: v for k, v in cfg.items() if not k.startswith("_")},
                   "exported_by_ddaepp": exported.get("run")},
        "step": int(exported.get("step") or 0), "recipe_overrides": overrides, "sampling": sampling,
        "conventions": conventions, "mapped_tensors": len(state),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dropped": drops, "latents": latent_note,
    }
    ckpt = _write_run(out, recipe, state, state, record)
    record["run"], record["checkpoint"] = str(out), str(ckpt)
    return record
