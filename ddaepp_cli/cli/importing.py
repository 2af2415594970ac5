"""`ddaepp import`: a released checkpoint of another code base → a ddaepp run folder (importers/)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from .base import command, emit_json, json_option, resolve_recipe_path, weights_option
from ..errors import UsageError


@command("import", epilog="Example: ddaepp import ddae_edm_ddpmpp_cifar10.pth --from ddae --recipe cifar10_edm_ddpmpp "
             "--out runs/ddae_edm_ddpmpp")
def import_cmd(
    source: str = typer.Argument(..., help="The checkpoint file (.pt/.pth/.ckpt read with torch.load(weights_only=True), or .safetensors), or hf://OWNER/REPO/FILE on the Hugging Face Hub (looked up in the Hugging Face cache; fetched only with --download)."),
    family: str = typer.Option(..., "--from", help="ddae, uvit, lightningdit, sra, repa, dit, sit; diffusers-dit: SOURCE is a diffusers DiT folder (docs/import.md)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe YAML or shipped recipe name whose network matches the checkpoint (diffusers-dit: optional, a base recipe; the network comes from config.json)."),
    out: Path = typer.Option(..., "--out", help="New run folder (must not exist or be empty)."),
    weights: str = weights_option("ema: the file's EMA weights become ema.safetensors (raw weights, where present, model.safetensors); model: its raw weights become both."),
    vae: Optional[str] = typer.Option(None, "--vae", help="Latent families: the VAE the network was trained with (LDM or diffusers layout): a path, a name (sdvae, vavae, …: docs/offline.md) or hf://OWNER/REPO/FILE."),
    download: bool = typer.Option(False, "--download", help="Fetch an hf:// source or a named --vae missing from the caches from the Hugging Face Hub."),
    revision: Optional[str] = typer.Option(None, "--revision", help="hf:// sources: the Hub revision (commit, branch or tag; default: the pinned one of a known file, else main)."),
    latent_stats: Optional[Path] = typer.Option(None, "--latent-stats", help="LightningDiT only: the per-channel latent mean/std it was trained with (latents_stats.pt); DiT/SiT/REPA/SRA use the fixed SD-VAE scale 0.18215."),
    set_: List[str] = typer.Option([], "--set", help="Override a recipe key: --set model.num_classes=1000 (repeatable)."),
    json_out: bool = json_option(),
) -> None:
    """Convert a DDAE / U-ViT / LightningDiT / DiT / SiT / REPA / SRA checkpoint into a run: keys, conventions, a source record."""
    if family == "diffusers-dit":  # a folder, not a file (importers/diffusers_dit.py)
        from .exporting import import_diffusers
        from ..hub import HF_PREFIX

        if source.startswith(HF_PREFIX):  # hf://OWNER/REPO[/SUBFOLDER]: the cached snapshot (--download: the Hub)
            from ..hub import resolve_folder

            source = resolve_folder(source, download=download, revision=revision)
        elif revision is not None:
            raise UsageError("--revision applies to hf:// sources only")
        if vae is not None:  # a name or hf:// file → the verified local file
            from ..data.vae import resolve_vae

            vae = resolve_vae(vae, download=download)[0]
        return import_diffusers(Path(source), recipe, out, vae, list(set_), json_out)
    if recipe is None:
        raise UsageError(f"--from {family} needs --recipe: the recipe whose network matches the checkpoint")
    from ..recipe import load_recipe

    rec = load_recipe(resolve_recipe_path(recipe), list(set_))  # recipe and source first: no torch needed
    from ..hub import resolve_spec

    source = resolve_spec(source, download=download, revision=revision, option="the local file as SOURCE")  # hf:// → the cached file
    if not source.is_file():
        raise UsageError(f"no such checkpoint file: {source}")
    if vae is not None:
        from ..data.vae import resolve_vae

        vae = resolve_vae(vae, download=download)[0]
    from ..importers import import_checkpoint

    result = import_checkpoint(source, family=family, recipe=rec, out=out, weights=weights, vae=vae,
                               latent_stats=latent_stats, explicit=tuple(set_))
    if json_out:
        emit_json({k: v for k, v in result.items() if k != "dropped"} |
                   {"dropped": {r: len(keys) for r, keys in result["dropped"].items()}})
        return
    print(f"imported {result['source']['file']} ({family}, sha256 {result['source']['sha256'][:12]}…): "
          f"{result['mapped_tensors']} tensors, {result['parameters']:,} parameters → {result['checkpoint']}",
          file=sys.stderr)
    for reason, keys in result["dropped"].items():
        print(f"  dropped {len(keys)}: {reason}", file=sys.stderr)
    for c in result["conventions"]:
        print(f"  converted: {c}", file=sys.stderr)
    sampling = result.get("sampling") or {}
    if sampling.get("overrides"):
        fid = sampling.get("published_fid")
        target = f"; targets FID {fid} ({sampling['target']})" if fid else ""
        print(f"  sampling as published: {', '.join(sampling['overrides'])}{target}", file=sys.stderr)
    print(result["run"])
