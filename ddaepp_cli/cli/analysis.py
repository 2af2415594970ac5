"""`ddaepp probe`, `cka`, `align` and `noisy-classifier`: representation analysis (DDAE §3.2–3.3, §4.1.3;
DDAE++ §5.3)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .base import (check_log_to_run, check_plot_for_checkpoints, check_run_or_ckpt, command, dataset_option,
                   device_option, json_option, log_to_run, log_to_run_option, report, report_checkpoints, run_argument,
                   threads_option, weights_option)
from ..threads import use_threads


# ------------------------------------------------------------------------------------------------
# representation analysis: probe, cka, align, noisy-classifier (DDAE §3.2–3.3, §4.1.3; DDAE++ §5.3)
# ------------------------------------------------------------------------------------------------


@command(epilog="Example: ddaepp probe runs/quickstart --layers out_2-4 --timesteps idx:3,idx:4,idx:5 --json")
def probe(
    run_or_ckpt: str = run_argument(),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layer spec: out_6-9, out_6,out_9, DiT 7-9 (default: every out_k / every DiT block); all: every layer plus the layer-wise curve (PNG + JSON); latent: the flattened clean VAE latent baseline (latent runs)."),
    timesteps: Optional[str] = typer.Option(None, "--timesteps", help="Comma list in paper convention: DDPM 1,11,21; EDM idx:3,idx:4 or 0.06; RF 0.02,0.06 (default: DDAE's grid; latent runs RF 0.25, or the DDPM step / EDM σ of the same σ/α)."),
    dataset: Optional[str] = dataset_option(),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Dataset folder (default: the recipe's, else $DDAEPP_DATA or ./data); latent runs: the training latent cache."),
    test_root: Optional[str] = typer.Option(None, "--test-root", help="Latent runs: the labelled validation latent cache (default: <training cache>_val)."),
    checkpoints: Optional[str] = typer.Option(None, "--checkpoints", help="all, latest (default) or steps 100000,200000 of a run: each is probed, the best reported."),
    protocol: str = typer.Option("ddae++", "--protocol", help="ddae++ (parameter-free BatchNorm, flip) or ddae (plain Linear, crop + flip)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs of every head (default: DDAE++ Tab. 10's 15; digits 100; latent runs 30)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate, cosine schedule (DDAE++ Tab. 10: 4e-3; latent runs 2e-3 DiT-B, 1e-3 DiT-L)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per step (default: 512 = DDAE's 128 × 4 GPUs; digits 128; latent runs 1440)."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Share of the training set held out to choose the cell (0: choose on the test set, as DDAE did)."),
    hflip: Optional[bool] = typer.Option(None, "--hflip/--no-hflip", help="Random horizontal flips (default: the recipe's data.hflip)."),
    cache_features: Optional[bool] = typer.Option(None, "--cache-features/--no-cache-features", help="Extract features once per flip with fixed noise, then train from the cache (fast; not the paper protocol; default: off, on for digits)."),
    weights: str = weights_option(),
    seed: int = typer.Option(0, "--seed", help="Batch order, flips, noise and head initialisation."),
    device: Optional[str] = device_option(),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Heatmap PNG (default: next to the eval record)."),
    log_to_run_: bool = log_to_run_option(),
    threads: Optional[int] = threads_option(),
    json_out: bool = json_option(),
) -> None:
    """Linear probe: grid search over layers × timesteps in one pass, then the final probe on the test set."""
    check_run_or_ckpt(run_or_ckpt)
    check_plot_for_checkpoints(plot, checkpoints)
    tracked = check_log_to_run(run_or_ckpt, log_to_run_)
    use_threads(threads)
    from ..eval.latentprobe import over_checkpoints
    from ..eval.probe import print_probe, probe as run_probe

    result = over_checkpoints(run_or_ckpt, checkpoints, lambda ckpt: run_probe(
        ckpt, layers=layers, timesteps=timesteps, dataset=dataset, data_root=data_root, test_root=test_root,
        protocol=protocol, epochs=epochs, lr=lr, batch_size=batch_size, val_fraction=val_fraction, hflip=hflip,
        cache_features=cache_features, weights=weights, seed=seed, device=device, plot=str(plot) if plot else None),
        score=lambda r: r["test_accuracy"], command="probe")
    if not result:  # ranks other than 0 of a multi-process launch
        return
    report_checkpoints(result, json_out, print_probe, "test accuracy (%)")
    log_to_run(tracked, result)


@command(epilog="Example: ddaepp cka runs/baseline runs/selfcond --timestep idx:4 --n 2048 --plot cka.png")
def cka(
    run_or_ckpt: str = run_argument(),
    other: Optional[str] = typer.Argument(None, help="A second model: CKA of every layer of the first against every layer of this one."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layer spec (default: every layer)."),
    timestep: Optional[str] = typer.Option(None, "--timestep", help="Paper-convention time (default: DDAE++ Tab. 9's: 11, idx:4, 0.06; latent runs RF 0.25, or the DDPM step / EDM σ of the same σ/α)."),
    n: int = typer.Option(2048, "--n", help="Number of images (the first N of the split)."),
    dataset: Optional[str] = dataset_option(),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Dataset folder (latent runs: the training latent cache)."),
    test_root: Optional[str] = typer.Option(None, "--test-root", help="Latent runs: the validation latent cache (default: <training cache>_val)."),
    split: str = typer.Option("test", "--split", help="train or test (latent runs: the validation cache)."),
    features: str = typer.Option("pooled", "--features", help="pooled (global average pool) or full (flattened maps; Gram form when wider than N)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per forward."),
    weights: str = weights_option(),
    seed: int = typer.Option(0, "--seed", help="Noise seed (shared by both models)."),
    device: Optional[str] = device_option(),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Heatmap PNG (default: next to the eval record)."),
    log_to_run_: bool = log_to_run_option(),
    threads: Optional[int] = threads_option(),
    json_out: bool = json_option(),
) -> None:
    """Linear CKA between every pair of layers of one model, or layer by layer between two models."""
    for path in (run_or_ckpt, other):
        if path is not None:
            check_run_or_ckpt(path)
    tracked = check_log_to_run(run_or_ckpt, log_to_run_)  # the first model's run
    use_threads(threads)
    from ..eval.cka import cka_command, print_cka

    result = cka_command(run_or_ckpt, other, layers=layers, timestep=timestep, n=n, dataset=dataset,
                         data_root=data_root, test_root=test_root, split=split, features=features, batch_size=batch_size, weights=weights,
                         seed=seed, device=device, plot=str(plot) if plot else None)
    report(result, json_out, print_cka)
    log_to_run(tracked, result)


@command(epilog="Example: ddaepp align runs/quickstart/checkpoints/step-* --layers out_1-4 --plot align.png")
def align(
    checkpoints: List[str] = typer.Argument(..., help="One or more runs/checkpoints (several: a training trajectory)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layer spec (default: every out_k)."),
    timestep: Optional[str] = typer.Option(None, "--timestep", help="Paper-convention time (default: DDAE++ Tab. 9's: 11, idx:4, 0.06)."),
    n: Optional[int] = typer.Option(None, "--n", help="Number of training images (default: all)."),
    dataset: Optional[str] = dataset_option(),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Dataset folder."),
    batch_size: int = typer.Option(512, "--batch-size", help="Images per batch; uniformity is averaged over batches (DDAE: 512)."),
    weights: str = weights_option(),
    seed: int = typer.Option(0, "--seed", help="Noise seed."),
    device: Optional[str] = device_option(),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Alignment-vs-uniformity PNG (default: next to the eval record)."),
    threads: Optional[int] = threads_option(),
    json_out: bool = json_option(),
) -> None:
    """DDAE's label-free alignment and uniformity of each layer's features (DDAE Eqs. 3-4)."""
    for path in checkpoints:
        check_run_or_ckpt(path)
    use_threads(threads)
    from ..eval.analysis import align_command, print_align

    result = align_command(checkpoints, layers=layers, timestep=timestep, n=n, dataset=dataset, data_root=data_root,
                           batch_size=batch_size, weights=weights, seed=seed, device=device,
                           plot=str(plot) if plot else None)
    report(result, json_out, print_align)


@command(name="noisy-classifier", epilog="Example: ddaepp noisy-classifier runs/quickstart --layer out_2 --epochs 5")
def noisy_classifier(
    run_or_ckpt: str = run_argument(),
    layer: Optional[str] = typer.Option(None, "--layer", help="One layer (default: DDAE++ Tab. 9's for paper UNets, else the self-conditioning or middle decoder layer)."),
    dataset: Optional[str] = dataset_option(),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Dataset folder."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (default: DDAE's 15; digits 50)."),
    lr: float = typer.Option(4e-3, "--lr", help="Adam learning rate, cosine schedule (DDAE: 1e-3 × 4 GPUs)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per step (default: 512 = DDAE's 128 × 4 GPUs; digits 128)."),
    hflip: Optional[bool] = typer.Option(None, "--hflip/--no-hflip", help="Random horizontal flips (default: the recipe's data.hflip)."),
    crop: Optional[bool] = typer.Option(None, "--crop/--no-crop", help="Random crop with padding image_size/8 (default: on as DDAE, 4 px at 32 px; off for digits)."),
    n_test: Optional[int] = typer.Option(None, "--n-test", help="Test images per noise level: the first N (default: all)."),
    weights: str = weights_option(),
    seed: int = typer.Option(0, "--seed", help="Seed of batches, noise, times and the head."),
    device: Optional[str] = device_option(),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Accuracy-vs-noise PNG (default: next to the eval record)."),
    threads: Optional[int] = threads_option(),
    json_out: bool = json_option(),
) -> None:
    """Noise-conditional classifier on frozen features (DDAE Eq. 5): accuracy at every noise level."""
    check_run_or_ckpt(run_or_ckpt)
    use_threads(threads)
    from ..eval.analysis import noisy_classifier as run_noisy, print_noisy

    result = run_noisy(run_or_ckpt, layer=layer, dataset=dataset, data_root=data_root, epochs=epochs, lr=lr,
                       batch_size=batch_size, hflip=hflip, crop=crop, n_test=n_test, weights=weights, seed=seed,
                       device=device,
                       plot=str(plot) if plot else None)
    report(result, json_out, print_noisy)
