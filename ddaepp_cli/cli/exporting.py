"""`ddaepp export`: a run → another library's format; and `ddaepp import --from diffusers-dit`, its way back
(importers/diffusers_dit.py). The `import` command itself is importing.py, which hands diffusers folders here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .base import check_run_or_ckpt, command, emit_json, json_option, run_argument, weights_option
from ..errors import UsageError

TARGETS = ("diffusers",)


@command("export", epilog="Example: ddaepp export runs/imagenet256_sra_ditxl --to diffusers exports/dit-xl-2")
def export_cmd(
    run: Path = run_argument(),
    out: Path = typer.Argument(..., help="New folder (must not exist or be empty)."),
    to: str = typer.Option(..., "--to", help="diffusers: a dit_orig DDPM run as a DiTPipeline folder (transformer/, scheduler/, vae/ where the run has one)."),
    weights: str = weights_option("ema or raw: the network written."),
    json_out: bool = json_option(),
) -> None:
    """Write a dit_orig DDPM run (DiT, DiT-SRA, an imported DiT) as a diffusers DiTTransformer2DModel / DiTPipeline folder."""
    if to not in TARGETS:
        raise UsageError(f"unknown --to {to!r}; valid: {', '.join(TARGETS)}")
    check_run_or_ckpt(str(run))  # before torch: a wrong path is answered at once
    from ..importers.diffusers_dit import export_run

    result = export_run(run, out, weights=weights)
    if json_out:
        emit_json({k: v for k, v in result.items() if k != "recipe"})
        return
    what = "DiTPipeline (transformer/, scheduler/, vae/)" if result["pipeline"] else "transformer/ and scheduler/"
    print(f"exported {result['checkpoint']} ({result['weights']} weights) as a diffusers {what}", file=sys.stderr)
    print(f"  {result['vae']}", file=sys.stderr)
    print(f"  time embedding: {result['time_embedding']}", file=sys.stderr)
    print(result["out"])


def import_diffusers(source: Path, recipe: Optional[str], out: Path, vae, set_: list[str], json_out: bool) -> None:
    """`ddaepp import FOLDER --from diffusers-dit`: the base recipe (default: DiT-XL/2's), --set, the folder."""
    from ..importers.diffusers_dit import DEFAULT_RECIPE, import_folder
    from ..recipe import load_recipe
    from .base import resolve_recipe_path

    rec = load_recipe(resolve_recipe_path(recipe or DEFAULT_RECIPE), set_)
    result = import_folder(source, recipe=rec, out=out, vae=None if vae is None else Path(vae), explicit=tuple(set_))
    if json_out:
        emit_json({k: v for k, v in result.items() if k != "dropped"} |
                  {"dropped": {r: len(keys) for r, keys in result["dropped"].items()}})
        return
    print(f"imported {source} (diffusers DiT: {', '.join(result['source']['files'])}): {result['mapped_tensors']} "
          f"tensors, {result['parameters']:,} parameters → {result['checkpoint']}", file=sys.stderr)
    for reason, keys in result["dropped"].items():
        print(f"  dropped {len(keys)}: {reason}", file=sys.stderr)
    for c in result["conventions"]:
        print(f"  converted: {c}", file=sys.stderr)
    print(f"  sampling as published: {', '.join(result['sampling']['overrides'])}", file=sys.stderr)
    print(result["run"])
