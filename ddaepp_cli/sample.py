"""`ddaepp sample`: images from a checkpoint with per-sample seeds (EDM-style).

Image i is a function of its seed alone: its initial noise (and any per-step noise) comes from
a generator seeded by that seed, so the output does not depend on the batch size or on how the
seeds are split across processes. Class-conditional models draw image i's class from seed i too:
uniformly at random by default (`torch.randint` from the seed's own generator, `seeding.LABEL_STREAM`),
as DiT and SiT `sample_ddp.py` and REPA and SRA `generate.py` draw their FID labels
(`y = torch.randint(0, args.num_classes, (n,))`), or `seed % num_classes` with `--labels balanced`
(`sample.labels`; exactly balanced over seeds 0..N-1); `--class-label` fixes one class.
`--cfg-scale` / `--cfg-interval` guide them (diffusion/cfg.py). Latent models decode through the VAE
recorded in their latent cache (latents.py). Outputs: one PNG per seed (`000042.png`), an `.npz` with
`arr_0` uint8 N×H×W×C (the ADM evaluator format) and a grid PNG.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .atomic import atomic_path
from .build import build_backbone, build_formulation, dataset_geometry
from .checkpoint import checkpoint_recipe, load_weights_into, resolve_checkpoint
from .console import progress
from .errors import UsageError, choices
from .outdir import check_output_folder, replace_folder
from .recipe import Recipe

FORMATS = ("png", "npz", "grid")
LABELS = ("random", "balanced")  # how class labels follow from seeds (module doc); recipe key sample.labels
LATENT_CLIP = ("--clip clips x̂0 to [-1, 1], a pixel range; this run's latents have unit variance "
               "(latent runs sample unclipped)")


def weights_of(run_or_ckpt: str | os.PathLike, weights: str) -> str:
    """`--weights`, unless RUN_OR_CKPT names one weights file: `model.safetensors` is the raw weights,
    `ema.safetensors` the EMA — the file the user named is the one used."""
    name = Path(run_or_ckpt).name
    if Path(run_or_ckpt).is_file() and name in ("model.safetensors", "ema.safetensors"):
        return "raw" if name == "model.safetensors" else "ema"
    return weights


def load_model(run_or_ckpt: str | os.PathLike, weights: str = "ema", device: torch.device | str = "cpu"):
    """(recipe, network, checkpoint folder) rebuilt from the checkpoint alone. Callers that record the
    weights take them from `weights_of` first (a named .safetensors file decides)."""
    if weights not in ("ema", "raw"):
        raise UsageError(f"--weights must be one of ema, raw; got {weights!r}")
    weights = weights_of(run_or_ckpt, weights)
    ckpt = resolve_checkpoint(run_or_ckpt)
    recipe = checkpoint_recipe(ckpt)
    model = build_backbone(recipe)
    file = ckpt / ("ema.safetensors" if weights == "ema" else "model.safetensors")
    load_weights_into(model, file, f"{recipe.model.backbone} network of {ckpt}")
    return recipe, model.to(device).eval().requires_grad_(False), ckpt


def load_for_eval(run_or_ckpt: str | os.PathLike, weights: str, device: torch.device | str):
    """What every evaluation command starts from: (recipe, frozen network on `device`, checkpoint folder,
    the weights actually used — `weights_of` — and the recipe's formulation)."""
    recipe, model, ckpt = load_model(run_or_ckpt, weights, device)
    return recipe, model, ckpt, weights_of(run_or_ckpt, weights), build_formulation(recipe)


def check_clip(clip: bool | None, recipe: Recipe) -> None:
    """`--clip` is refused on a latent run (`sample` and `fid` alike): x̂0 clipping is a pixel-range operation."""
    if clip and recipe.data.dataset == "latents":
        raise UsageError(LATENT_CLIP)


def label_mode(recipe: Recipe, num_classes: int, *, class_label: int | None = None,
               labels: str | None = None) -> str | None:
    """How the class labels are drawn — random or balanced (`--labels`, else the recipe's `sample.labels`),
    or fixed (`--class-label`) — checked against the model; None for an unconditional model."""
    if labels is not None and labels not in LABELS:
        raise UsageError(f"--labels must be one of {choices(LABELS)}; got {labels!r}")
    if num_classes == 0:
        for flag, value in (("--class-label", class_label), ("--labels", labels)):
            if value is not None:
                raise UsageError(f"{flag} needs a class-conditional model; this one is unconditional")
        return None
    if class_label is not None:
        if labels is not None:
            raise UsageError("give --class-label (one class) or --labels (random, balanced), not both")
        if not 0 <= class_label < num_classes:
            raise UsageError(f"--class-label must be in 0..{num_classes - 1}, got {class_label}")
        return "fixed"
    return labels or recipe.sample.labels


def class_labels_for(seeds: Sequence[int], num_classes: int, mode: str | None,
                     class_label: int | None = None) -> list[int] | None:
    """Per-seed class labels (module doc) for a `label_mode`; None for an unconditional model."""
    from .seeding import per_sample_randint

    if mode is None:
        return None
    if mode == "fixed":
        return [class_label] * len(seeds)
    if mode == "balanced":
        return [s % num_classes for s in seeds]
    return per_sample_randint(seeds, num_classes)


def describe_labels(mode: str | None) -> str | None:
    """The label rule of a `label_mode`, for protocol records."""
    return {None: None, "fixed": "--class-label for every seed", "balanced": "seed % num_classes",
            "random": "torch.randint(num_classes) per seed, generator_seed(seed, LABEL_STREAM) on the CPU"}[mode]


@torch.no_grad()
def generate(model: torch.nn.Module, formulation, seeds: Sequence[int], *, shape: tuple[int, ...],
             sampler: str | None = None, steps: int | None = None, clip: bool | None = None,
             batch_size: int = 256, device: torch.device | str = "cpu", show_progress: bool = False,
             class_labels: Sequence[int] | None = None, cfg_scale: float = 1.0,
             cfg_interval: tuple[float, float] = (0.0, 1.0), cfg_channels: str = "all", decode=None,
             churn: tuple | None = None) -> torch.Tensor:
    """uint8 images (N, C, H, W) for `seeds`, computed `batch_size` at a time.

    `class_labels` (one per seed) with CFG for class-conditional models; `decode` maps the sampler's
    output (latents) to images in [−1, 1] (the VAE decoder, latents.py); `churn` makes heun EDM's
    stochastic sampler (diffusion/samplers.py)."""
    from .data import from_model_range
    from .diffusion.cfg import guided_denoiser
    from .diffusion.samplers import sample as run_sampler
    from .seeding import per_sample_randn

    sampler = sampler or formulation.samplers[0]
    if sampler not in formulation.samplers:
        raise UsageError(f"sampler {sampler!r} is not available for {formulation.name}; "
                         f"valid: {choices(formulation.samplers)}")
    if churn is not None and sampler != "heun":
        raise UsageError(f"sample.s_churn {churn[0]} (EDM's stochastic sampler) needs the heun sampler, not "
                         f"{sampler}: drop --sampler (`ddaepp sample`: or add --churn 0)")
    was_training = model.training
    model.eval()
    out = []
    clip = formulation.clip_x0 if clip is None else clip
    denoise = formulation.denoiser(model, clip=clip)
    ctx = progress(len(seeds), "sample", "img") if show_progress else _null_progress()
    with ctx as bar:
        for i in range(0, len(seeds), batch_size):
            chunk = list(seeds[i:i + batch_size])
            if class_labels is not None:  # CFG wrapper; clipping stays with the sampler
                y = torch.tensor(list(class_labels[i:i + batch_size]), device=device)
                denoise = guided_denoiser(formulation, model, y, null_label=model.num_classes, scale=cfg_scale,
                                          interval=cfg_interval, channels=cfg_channels)
            x_T = per_sample_randn(chunk, shape, device=device, dtype=torch.float32) * formulation.prior_scale()
            x0 = run_sampler(formulation, denoise, x_T, sampler=sampler, steps=steps, seeds=chunk, clip=clip,
                             churn=churn)
            if decode is not None:
                x0 = decode(x0.float())  # latents → images in [−1, 1]
            out.append(from_model_range(x0.float()).cpu())
            bar.update(len(chunk))
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, *shape), dtype=torch.uint8)


def sampling_options(recipe: Recipe, model: torch.nn.Module, seeds: Sequence[int], *, class_label: int | None = None,
                     labels: str | None = None, cfg_scale: float | None = None,
                     cfg_interval: tuple[float, float] | None = None,
                     device: torch.device | str = "cpu") -> dict[str, Any]:
    """`generate` keywords from the recipe's `sample` section, CLI overrides and the data (latent decoding).
    The label rule itself is `label_mode(...)` (the same checks; for the protocol records)."""
    s = recipe.sample
    num_classes = getattr(model, "num_classes", 0)
    mode = label_mode(recipe, num_classes, class_label=class_label, labels=labels)
    scale = s.cfg_scale if cfg_scale is None else cfg_scale
    if scale != 1.0 and num_classes == 0:
        raise UsageError("--cfg-scale needs a class-conditional model; this one is unconditional (use 1)")
    if scale < 0:
        raise UsageError(f"--cfg-scale must be >= 0, got {scale}")
    decode = None
    if recipe.data.dataset == "latents":
        from .data.latents import load_decoder

        decode = load_decoder(recipe.data.root, device=device, vae=recipe.data.vae, scale=recipe.data.latent_scale)
    return dict(class_labels=class_labels_for(seeds, num_classes, mode, class_label), cfg_scale=scale,
                cfg_interval=tuple(s.cfg_interval if cfg_interval is None else cfg_interval),
                cfg_channels=s.cfg_channels, decode=decode,
                churn=(s.s_churn, s.s_min, s.s_max, s.s_noise) if s.s_churn > 0 else None)


def resolve_steps(formulation, sampler: str, steps: int | None, recipe_steps: int | None) -> int | None:
    """`--steps`, else the recipe's step count; an adaptive sampler (rk45: no default step count)
    takes none, so the recipe's count for its fixed-grid default is not forced on it."""
    if steps is not None:
        return steps
    if sampler in formulation.default_steps and formulation.default_steps[sampler] is None:
        return None
    return recipe_steps


def parse_interval(text: str | None) -> tuple[float, float] | None:
    """`--cfg-interval 0,0.89` → (0.0, 0.89) (paper time, t = 0 is data)."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--cfg-interval expects LO,HI in paper time (e.g. 0,0.89), got {text!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise UsageError(f"--cfg-interval needs 0 <= LO <= HI <= 1, got {text!r}")
    return lo, hi


class _null_progress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1, extra: str = "") -> None:
        pass


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    """A square-ish grid PNG of uint8 images (N, C, H, W), written atomically."""
    from PIL import Image
    from torchvision.utils import make_grid

    n = images.shape[0]
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    if images.shape[-1] < 32:  # tiny images (digits) are shown enlarged; PNG/npz keep native size
        k = math.ceil(32 / images.shape[-1])
        images = images.repeat_interleave(k, dim=-1).repeat_interleave(k, dim=-2)
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=255)  # (C, H, W) uint8
    arr = grid.permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, durable=False) as tmp:
        Image.fromarray(arr).save(tmp)


def write_outputs(images: torch.Tensor, seeds: Sequence[int], out_dir: Path, formats: Sequence[str],
                  record: dict[str, Any]) -> dict[str, str]:
    """PNG folder / npz / grid into `out_dir` (built in a temporary folder, then renamed)."""
    from PIL import Image

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    written = {}
    try:
        arr = images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C) uint8
        if "png" in formats:
            for img, seed in zip(arr, seeds):
                Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(tmp / f"{seed:06d}.png")
            written["png"] = str(out_dir)
        if "npz" in formats:
            np.savez(tmp / "samples.npz", arr_0=arr)
            written["npz"] = str(out_dir / "samples.npz")
        if "grid" in formats:
            save_grid(images[:256], tmp / "grid.png")
            written["grid"] = str(out_dir / "grid.png")
        (tmp / "protocol.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        replace_folder(tmp, out_dir)  # an existing folder: only an empty or earlier sample folder
    except UsageError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"could not write samples to {out_dir}: {e.strerror or e}") from None
    return written


def parse_formats(text: str) -> list[str]:
    fmts = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise UsageError(f"--format: {', '.join(bad) or 'empty'} not valid; choose from {choices(FORMATS)}")
    return fmts


def sample_command(run_or_ckpt: str, *, seeds: list[int], out: str | None, sampler: str | None,
                   steps: int | None, weights: str, formats: list[str], batch_size: int | None,
                   clip: bool | None, force: bool = False, cfg_scale: float | None = None,
                   cfg_interval: str | None = None, class_label: int | None = None,
                   labels: str | None = None, churn: float | None = None) -> dict[str, Any]:
    """Library entry of `ddaepp sample` (multi-process aware: seeds are sharded, rank 0 writes)."""
    from accelerate import PartialState

    from . import __version__

    state = PartialState(cpu=not torch.cuda.is_available())
    device = state.device
    recipe, model, ckpt = load_model(run_or_ckpt, weights, device)
    if churn is not None:  # --churn: the recipe's sample.s_churn for this command (validated as the recipe is)
        from .recipe import replace

        recipe = replace(recipe, [f"sample.s_churn={churn}"] + ([f"sample.sampler={sampler}"] if sampler else []))
    weights = weights_of(run_or_ckpt, weights)  # a named model.safetensors samples the raw weights
    formulation = build_formulation(recipe)
    sampler = sampler or recipe.sample.sampler or formulation.samplers[0]
    steps = resolve_steps(formulation, sampler, steps, recipe.sample.steps)
    check_clip(clip, recipe)
    clip = recipe.sample.clip_x0 if clip is None else clip
    clip = formulation.clip_x0 if clip is None else clip
    batch_size = recipe.sample.batch_size if batch_size is None else batch_size
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    if steps is not None and steps <= 0:
        raise UsageError(f"--steps must be positive, got {steps}")
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    out_dir = Path(out) if out else run_dir / "samples" / (
        f"{ckpt.name}-{weights}-{sampler}{steps or ''}-seeds{seeds[0]}-{seeds[-1]}")
    check_output_folder(out_dir, force=force)  # --force replaces only an earlier sample folder (outdir.py)
    channels, size, _ = dataset_geometry(recipe.data)
    shape = (channels, size, size)
    mine = seeds[state.process_index::state.num_processes]
    mode = label_mode(recipe, getattr(model, "num_classes", 0), class_label=class_label, labels=labels)
    opts = sampling_options(recipe, model, mine, class_label=class_label, labels=labels, cfg_scale=cfg_scale,
                            cfg_interval=parse_interval(cfg_interval), device=device)
    images = generate(model, formulation, mine, shape=shape, sampler=sampler, steps=steps, clip=clip,
                      batch_size=batch_size, device=device, show_progress=True, **opts)
    if state.num_processes > 1:  # to the writer (rank 0) only: every rank holding all images costs N×H×W×C each
        import torch.distributed as td

        parts = [None] * state.num_processes if state.is_main_process else None
        td.gather_object((mine, images), parts, dst=0)
        del images
        if parts is not None:
            order = {}
            for s_list, imgs in parts:
                for s, img in zip(s_list, imgs):
                    order[s] = img
            images = torch.stack([order[s] for s in seeds])
    record = {"command": "sample", "checkpoint": str(ckpt), "weights": weights, "sampler": sampler,
              "steps": steps, "clip_x0": clip, "seeds": [seeds[0], seeds[-1]], "n": len(seeds),
              "churn": dict(zip(("s_churn", "s_min", "s_max", "s_noise"), opts["churn"])) if opts["churn"] else None,
              "formulation": recipe.diffusion.formulation, "backbone": recipe.model.backbone,
              "cfg_scale": opts["cfg_scale"], "cfg_interval": list(opts["cfg_interval"]),
              "cfg_channels": opts["cfg_channels"], "labels": mode, "class_labels": describe_labels(mode),
              "class_label": class_label,
              "ddaepp": __version__, "torch": torch.__version__}
    result = {"out": str(out_dir), **record}
    if state.is_main_process:
        result["written"] = write_outputs(images, seeds, out_dir, formats, record)
    state.wait_for_everyone()
    return result
