"""Latent-space commands on the `ddaepp` app: `profile-layers` and `cache-latents` (latents.py, vae.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .base import command, emit_json, json_option, resolve_recipe_path, threads_option
from ..threads import use_threads


@command("profile-layers", epilog="Example: ddaepp profile-layers imagenet256_rf_ditb_cond --candidates 8-11 --epochs 20 --json | jq .best")
def profile_layers(
    recipe: str = typer.Argument(..., help="Recipe YAML (or a shipped recipe name); its self-conditioning layer is replaced."),
    candidates: str = typer.Option(..., "--candidates", help="Layers to try: 8-11, out_6-9, 7,9,12."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps per run."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Training epochs per run (DDAE++: e.g. 20)."),
    window: float = typer.Option(0.25, "--window", help="Score = mean loss over this final fraction of the steps."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Folder of the runs (default runs/<recipe>-profile); re-running resumes."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Loss-curve PNG (default <run-dir>/loss_curves.png)."),
    set_: List[str] = typer.Option([], "--set", help="Override a recipe key: --set train.global_batch=256 (repeatable)."),
    threads: Optional[int] = threads_option(),
    json_out: bool = json_option("Print one JSON object on stdout (`best` is the chosen layer)."),
) -> None:
    """Short runs with self-conditioning at each candidate layer plus the baseline; the lowest final loss wins."""
    from ..recipe import load_recipe

    rec = load_recipe(resolve_recipe_path(recipe), list(set_))  # before torch: a wrong path is answered at once
    use_threads(threads)
    from ..training.profile import format_table, profile_layers as run_profile

    folder = run_dir or Path("runs") / f"{rec.name}-profile"
    result = run_profile(rec, candidates, folder, steps=steps, epochs=epochs, window=window,
                         plot=plot or folder / "loss_curves.png")
    if json_out:
        emit_json(result)
    else:
        print(format_table(result), file=sys.stderr)
        print(result["best"])


@command("cache-latents", epilog="Example: ddaepp cache-latents --data imagenet/train --vae vavae --download "
             "--out data/imagenet256_vavae; then the validation split: "
             "ddaepp cache-latents --data imagenet/val --labels LOC_val_solution.csv --classes data/imagenet256_vavae "
             "--out data/imagenet256_vavae_val")
def cache_latents(
    data: Path = typer.Option(..., "--data", help="Image folder: one subfolder per class (ImageNet train/), or flat (ImageNet val/ with --labels)."),
    vae: Optional[str] = typer.Option(None, "--vae", help="VAE weights: a path (LDM or diffusers layout; .safetensors, or "
                                      ".pt/.ckpt read with weights_only), a name (vavae, sdvae, sdvae-mse, "
                                      "sdvae-original, sdvae-mse-original: docs/offline.md) or hf://OWNER/REPO/FILE. "
                                      "Default: the --vae-kind file (vavae unless given). Names are looked up in "
                                      "$DDAEPP_CACHE/weights/, then the Hugging Face cache."),
    download: bool = typer.Option(False, "--download", help="Fetch a named VAE missing from both caches from the "
                                  "Hugging Face Hub (pinned revision, sha256 checked). Without it nothing touches "
                                  "the network."),
    out: Path = typer.Option(..., "--out", help="Cache folder (data.root of a latents recipe); re-running resumes."),
    image_size: int = typer.Option(256, "--image-size", help="ADM centre crop to this size before encoding."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per encoder batch (each is encoded with its mirror)."),
    shard_size: int = typer.Option(10_000, "--shard-size", help="Images per safetensors shard (the unit of resumption)."),
    vae_kind: Optional[str] = typer.Option(None, "--vae-kind", help="Check the checkpoint is this VAE: vavae (VA-VAE f16d32) "
                                          "or sdvae (SD-VAE kl-f8). Default: any LDM KL autoencoder, read from the file."),
    num_workers: int = typer.Option(4, "--num-workers", help="Image decoding workers."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Labels of a flat folder: ImageNet's LOC_val_solution.csv, "
                                          "or a text file of `<file> <class index or name>` lines (Caffe val.txt)."),
    classes: Optional[Path] = typer.Option(None, "--classes", help="Class list the --labels index: the training latent "
                                           "cache or the training class folder."),
    moments: bool = typer.Option(False, "--moments", help="Store each posterior's mean and std (twice the disk) "
                                 "instead of one sample, for recipes that draw a fresh latent every step "
                                 "(data.latent_posterior: per_step; the SRA recipes)."),
    threads: Optional[int] = threads_option(),
    json_out: bool = json_option(),
) -> None:
    """Encode an image folder with a VAE into sharded latents (image and mirror) plus per-channel statistics."""
    use_threads(threads)
    from ..data.latents import cache_latents as run_cache
    from ..data.vae import resolve_vae

    vae, vae_kind = resolve_vae(vae, vae_kind, download=download)
    result = run_cache(data, vae, out, image_size=image_size, batch_size=batch_size, shard_size=shard_size,
                       vae_kind=vae_kind, num_workers=num_workers, labels_file=labels, classes_from=classes,
                       moments=moments)
    if json_out:
        if int(os.environ.get("RANK", "0")) == 0:
            emit_json(result)
    elif int(os.environ.get("RANK", "0")) == 0:
        kind = "the posterior mean and std of " if moments else ""
        print(f"cached {result['count']} images as {kind}{'×'.join(map(str, result['latent_shape']))} latents in "
              f"{result['num_shards']} shard(s) ({result['encoded_shards']} encoded, {result['skipped_shards']} kept): "
              f"{result['out']}", file=sys.stderr)


@command("export-digits", epilog="Example: ddaepp export-digits data/digits-imagenet && ddaepp cache-latents "
             "--data data/digits-imagenet/train --vae tiny-vae.safetensors --out data/digits_lat --image-size 32")
def export_digits(
    out: Path = typer.Argument(..., help="New (or empty) folder: train/<digit>/, val/<digit>/, val_flat/ + val_labels.txt."),
    image_size: int = typer.Option(32, "--image-size", help="Side of the PNGs (upsampled from 8×8 as the digits dataset is)."),
    json_out: bool = json_option(),
) -> None:
    """Write scikit-learn's digits as an ImageNet-style class folder (train and val), to try the latent pipeline on a CPU."""
    from ..data.exportdigits import export_digits as run_export

    result = run_export(out, image_size=image_size)
    if json_out:
        emit_json(result)
    else:
        print(f"wrote {result['train']} train and {result['val']} val digits ({image_size}×{image_size} RGB PNG) "
              f"to {result['out']}", file=sys.stderr)
