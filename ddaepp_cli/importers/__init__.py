"""`ddaepp import`: released checkpoints of other code bases → an ordinary ddaepp run folder.

    RUN_DIR/
      recipe.yaml                          the resolved recipe (with the conversions it needs)
      import.json                          the source: file name, sha256, family, key-mapping version,
                                           conventions converted, every dropped key and why, and the
                                           published sampling settings applied with the FID they target
      checkpoints/step-NNNNNNN/
        model.safetensors, ema.safetensors the mapped weights (metadata as `train` writes them)
        recipe.yaml
      latents/                             latent families given --vae (with --latent-stats unless the recipe
                                           has data.latent_scale): the VAE identity and statistics that
                                           `sample` decodes with (no latents inside)

The run has no `state.pt`: `sample`, `fid`, `probe`, `cka`, … read it; `train` cannot resume it.
diffusers DiT folders (`--from diffusers-dit`) go through diffusers_dit.py, which also exports.
One module per family (ddae, uvit, lightningdit; sit for DiT, SiT, REPA and SRA) provides `extract`
(file object → state dicts, drops) and `convert` (state dict → ddaepp keys); this driver checks,
records and writes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..atomic import replace_dir
from ..errors import UsageError, choices
from . import ddae, lightningdit, published, sit, uvit
from .common import Mapped, Source, check_against, merge_drops, read_source, sha256

MAPPING_VERSION = 1  # bump when a family's key mapping or a recorded convention changes


@dataclass(frozen=True)
class Family:
    name: str
    published: str
    backbones: tuple[str, ...]
    formulations: tuple[str, ...]
    extract: Callable[..., Source]
    convert: Callable[..., Mapped]
    overrides: Callable[..., list[str]]
    conventions: Callable[..., list[str]]


FAMILIES: dict[str, Family] = {
    "ddae": Family("ddae", ddae.PUBLISHED, ddae.BACKBONES, ddae.FORMULATIONS, ddae.extract, ddae.convert,
                   ddae.recipe_overrides, lambda r: list(ddae.CONVENTIONS)),
    "uvit": Family("uvit", uvit.PUBLISHED, uvit.BACKBONES, uvit.FORMULATIONS, uvit.extract, uvit.convert,
                   uvit.recipe_overrides, uvit.conventions),
    "lightningdit": Family("lightningdit", lightningdit.PUBLISHED, lightningdit.BACKBONES, lightningdit.FORMULATIONS,
                           lightningdit.extract, lightningdit.convert, lightningdit.recipe_overrides,
                           lambda r: list(lightningdit.CONVENTIONS)),
}
for _name, (_published, _, _, _forms) in sit.FAMILIES.items():
    FAMILIES[_name] = Family(_name, _published, sit.BACKBONES, _forms, sit.extract_for(_name), sit.convert,
                             sit.overrides_for(_name), sit.conventions_for(_name))

def import_checkpoint(source: str | os.PathLike, *, family: str, recipe, out: str | os.PathLike,
                      weights: str = "ema", vae: str | os.PathLike | None = None,
                      latent_stats: str | os.PathLike | None = None, explicit: tuple[str, ...] = ()) -> dict:
    """Map `source` (a file of `family`) onto `recipe`'s network and write the run folder `out`.

    The family's published sampling settings (published.py) become the run's `sample`/`diffusion`
    defaults, except the keys `explicit` (the user's `--set` overrides) already set."""
    from ..recipe import replace

    if family not in FAMILIES:
        raise UsageError(f"unknown --from {family!r}; valid: {choices([*FAMILIES, 'diffusers-dit (a folder)'])}")
    if weights not in ("ema", "model"):
        raise UsageError(f"--weights must be ema or model, got {weights!r}")
    fam = FAMILIES[family]
    path, out = Path(source), Path(out)
    _check_out(out)
    src = read_source(path)
    source_ = fam.extract(src, path, weights)
    overrides = fam.overrides(recipe)
    recipe = replace(recipe, overrides) if overrides else recipe
    if recipe.model.backbone not in fam.backbones:
        raise UsageError(f"--from {family} maps onto model.backbone {choices(fam.backbones)}; the recipe "
                         f"has {recipe.model.backbone}")
    if recipe.diffusion.formulation not in fam.formulations:
        raise UsageError(f"--from {family} networks run under diffusion.formulation {choices(fam.formulations)}; "
                         f"the recipe has {recipe.diffusion.formulation}")
    if recipe.sra.enabled or recipe.contrastive.enabled:
        raise UsageError("the import recipe must not enable sra or contrastive (their heads are not in the file)")
    recipe, sampling = published.apply(family, recipe, explicit)

    from ..build import build_backbone

    model = build_backbone(recipe)
    chosen = source_.ema if weights == "ema" else source_.raw
    if chosen is None:
        other = "model" if weights == "ema" else "ema"
        raise UsageError(f"{path} holds no {'EMA' if weights == 'ema' else 'raw (model)'} weights; "
                         f"use --weights {other}")
    drops = [source_.dropped]
    states = {}
    for which, sd in (("ema", source_.ema), ("raw", source_.raw)):
        if sd is None:
            continue
        if weights == "model" and which == "ema":
            drops.append({"EMA weights (--weights model imports the raw weights)": sorted(sd)})
            continue
        mapped = fam.convert(sd, model, path)
        what = "EMA weights" if which == "ema" else "raw (model) weights"
        states[which] = check_against(model, mapped, path, what)
        drops.append({f"{which}: {reason}": keys for reason, keys in mapped.dropped.items()})
    ema_state = states["ema"] if weights == "ema" else states["raw"]
    raw_state = states.get("raw", ema_state)
    model.load_state_dict(ema_state, strict=True)

    conventions = fam.conventions(recipe)
    latent_note = None
    if recipe.data.dataset == "latents":
        recipe, latent_note = _latent_folder(recipe, out, vae, latent_stats)
    elif vae is not None or latent_stats is not None:
        raise UsageError("--vae / --latent-stats apply to latent recipes (data.dataset: latents) only")

    record = {
        "family": family, "mapping_version": MAPPING_VERSION, "weights": weights,
        "source": {"file": path.name, "path": str(path.resolve()), "bytes": path.stat().st_size,
                   "sha256": sha256(path), "published": fam.published},
        "step": source_.step or 0, "recipe_overrides": overrides, "sampling": sampling, "conventions": conventions,
        "mapped_tensors": len(ema_state), "parameters": sum(p.numel() for p in model.parameters()),
        "dropped": {reason: keys for reason, keys in merge_drops(*drops).items()},
        "latents": latent_note,
    }
    ckpt = _write_run(out, recipe, raw_state, ema_state, record)
    record["run"], record["checkpoint"] = str(out), str(ckpt)
    return record


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not empty; ddaepp import writes a new run folder only")


def _latent_folder(recipe, out: Path, vae, latent_stats):
    """Point a latent recipe at the VAE (and the statistics) the imported network was trained with.

    Recipes with per-channel statistics (LightningDiT) take --latent-stats and --vae together; recipes with
    a fixed `data.latent_scale` (DiT/SiT/REPA/SRA: z·0.18215) take --vae alone."""
    from ..recipe import replace

    scale = recipe.data.latent_scale
    if latent_stats is None and vae is None:
        how = "its VAE decodes samples" if scale is not None else "its statistics decode samples"
        give = "--vae" if scale is not None else "--latent-stats and --vae"
        return recipe, (f"data.root {recipe.data.root} (the recipe's latent cache: {how}; give {give} to use the "
                        f"checkpoint's own)")
    if scale is not None and latent_stats is not None:
        raise UsageError(f"--latent-stats does not apply: the recipe scales latents by data.latent_scale {scale} "
                         f"(no per-channel statistics); give --vae alone")
    if scale is None and (latent_stats is None or vae is None):
        raise UsageError("--latent-stats and --vae go together (the statistics and the VAE the network was "
                         "trained with)")
    from ..build import dataset_geometry
    from ..data.latents import MANIFEST, STATS
    from ..data.vae import load_vae

    v = load_vae(vae)
    c = dataset_geometry(recipe.data)[0]  # the network's input channels
    mean = std = None
    if scale is None:
        mean, std = _read_stats(Path(latent_stats))
    if c != v.latent_channels or (mean is not None and mean.numel() != v.latent_channels):
        have = f"--latent-stats has {mean.numel()} channels and " if mean is not None else ""
        raise UsageError(f"{have}the VAE has {v.latent_channels} latent channels; the recipe's data.latent_channels "
                         f"is {c}: they must agree")
    size = recipe.data.image_size or (16 if v.latent_channels == 32 else 32)
    folder = (out / "latents").resolve()
    recipe = replace(recipe, [f"data.root={folder}", f"data.vae={v.path.resolve()}", "data.image_size=null"])
    ident = v.identity()
    manifest = {"version": 1, "count": 0, "complete": False, "num_shards": 0, "shards": [], "shard_size": 0,
                "latent_shape": [v.latent_channels, size, size],
                "vae": {k: ident[k] for k in ("kind", "file", "file_name", "sha256")}}
    note = {"root": str(folder), "vae": manifest["vae"]}
    staged = {"manifest": (MANIFEST, manifest)}
    if mean is not None:
        manifest.update(stats=STATS, stats_values={"mean": mean.tolist(), "std": std.tolist()},
                        note=f"statistics of {Path(latent_stats).name} (imported with the network; no latents here)")
        staged["stats"] = (STATS, {"mean": mean, "std": std})
        note.update(stats_file=Path(latent_stats).name, stats_sha256=sha256(latent_stats))
    else:
        manifest["note"] = f"latents scaled by data.latent_scale {scale} (imported with the network; no latents here)"
        note["latent_scale"] = scale
    note["_staged"] = staged
    return recipe, note


def _read_stats(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """LightningDiT's latents_stats.pt ({'mean', 'std'}, (1, C, 1, 1)) or a .safetensors with the same keys."""
    obj = read_source(path)
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), torch.Tensor) for k in ("mean", "std")):
        raise UsageError(f"{path} holds no latent statistics: expected tensors 'mean' and 'std' "
                         f"(LightningDiT latents_stats.pt)")
    mean, std = obj["mean"].double().reshape(-1), obj["std"].double().reshape(-1)
    if mean.shape != std.shape or not bool((std > 0).all()):
        raise UsageError(f"{path}: 'mean' and 'std' must have one value per channel and std > 0")
    return mean.float(), std.float()


def _write_run(out: Path, recipe, raw_state: dict, ema_state: dict, record: dict) -> Path:
    from safetensors.torch import save_file

    from ..checkpoint import step_dir_name
    from ..recipe import recipe_to_yaml

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-import-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    text = recipe_to_yaml(recipe)
    step = int(record["step"])
    try:
        ckpt = tmp / "checkpoints" / step_dir_name(step)
        ckpt.mkdir(parents=True)
        meta = {"recipe": text, "step": str(step), "format": "ddaepp-1", "imported_from": record["source"]["sha256"]}
        save_file(raw_state, str(ckpt / "model.safetensors"), metadata={**meta, "kind": "raw"})
        save_file(ema_state, str(ckpt / "ema.safetensors"), metadata={**meta, "kind": "ema"})
        (ckpt / "recipe.yaml").write_text(text, encoding="utf-8")
        (tmp / "recipe.yaml").write_text(text, encoding="utf-8")
        latents = record.get("latents")
        if isinstance(latents, dict) and "_staged" in latents:
            staged = latents.pop("_staged")
            (tmp / "latents").mkdir()
            name, manifest = staged["manifest"]
            (tmp / "latents" / name).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            if "stats" in staged:
                name, stats = staged["stats"]
                save_file({k: v.contiguous() for k, v in stats.items()}, str(tmp / "latents" / name))
        (tmp / "import.json").write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked before): replaced by the finished folder
        replace_dir(tmp, out)  # atomic.py: the run appears whole or not at all
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"could not write {out}: {e.strerror or e}") from None
    return out / "checkpoints" / step_dir_name(step)
