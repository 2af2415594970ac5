"""`ddaepp fid` and `ddaepp segprobe`: generation quality and dense probing (issue 6).

Registered on the main Typer app by the import at the end of cli.py; each command parses its
options and calls one library function (fid.fid, segprobe.segprobe).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .base import (check_log_to_run, check_plot_for_checkpoints, check_run_or_ckpt, command, device_option, json_option,
                   log_to_run, log_to_run_option, report, report_checkpoints, run_argument, threads_option,
                   weights_option)
from ..errors import UsageError
from ..threads import use_threads


@command(epilog="Examples: ddaepp fid runs/cifar10_edm_ddpmpp --preset fid50k --ref cifar10-train --json; "
                     "ddaepp fid runs/imagenet256_rf_ditb_cond --ref VIRTUAL_imagenet256_labeled.npz --checkpoints all")
def fid(
    samples_or_run: str = typer.Argument(..., help="Image folder, .npz of images (arr_0, uint8 NHWC), or a run / checkpoint (samples generated on the fly; latent runs decode through their VAE)."),
    ref: Optional[str] = typer.Option(None, "--ref", help="cifar10-train, cifar10-val, cifar100-train, cifar100-val, stl10-*, an image folder, an .npz of images, or statistics {mu, sigma[, mu_s, sigma_s]} (.npz: ADM reference batch, EDM, ddaepp). Default: <dataset>-train for CIFAR runs; $DDAEPP_CACHE/refs/VIRTUAL_imagenet256_labeled.npz for latent runs."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Comma list of fid, is, kid, prc, sfid (default: fid; fid,sfid,is,prc against an ADM reference batch)."),
    checkpoints: Optional[str] = typer.Option(None, "--checkpoints", help="Checkpoints of a run: latest (default), all, or steps such as 100000,200000; reports each and the best (lowest FID)."),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg-scale", help="Classifier-free guidance scale of a class-conditional run (default: the recipe's; 1 = none)."),
    cfg_interval: Optional[str] = typer.Option(None, "--cfg-interval", help="Guide only for paper t in LO,HI (e.g. 0,0.89; default: the recipe's)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Class labels of a class-conditional run: random (uniform per seed, as DiT/SiT/REPA/SRA sample for FID) or balanced (seed % num_classes); default: the recipe's sample.labels (random)."),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="IS splits: adm (consecutive splits of 5000) or torch-fidelity (10 shuffled splits); default adm against an ADM reference batch, else torch-fidelity."),
    n: Optional[int] = typer.Option(None, "--n", help="Number of images: a run generates seeds 0..N-1; a folder/npz uses its first N (default: all; runs: 50000)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="fid10k or fid50k (sets --n)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Seeds of a run's samples: 0-49999, 50000-99999 (instead of --n)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per batch (results do not depend on it; runs default to the recipe's sampling batch, else 100)."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="weights-inception-2015-12-05-6726825d.pth (default: $DDAEPP_CACHE/weights/, then $TORCH_HOME/hub/checkpoints/)."),
    download: bool = typer.Option(False, "--download", help="Download missing Inception weights / reference datasets (needs the internet)."),
    extractor_dtype: str = typer.Option("float64", "--extractor-dtype", help="float64 (batch-size independent features) or float32 (torch-fidelity's default)."),
    save_stats: Optional[Path] = typer.Option(None, "--save-stats", help="Write the input's statistics {mu, sigma, n} to this .npz (usable as --ref; with no --ref only the statistics are computed)."),
    save_samples: Optional[Path] = typer.Option(None, "--save-samples", help="Also write a run's generated samples (PNGs, samples.npz, grid) to this folder."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Sampler for a run (default: the recipe's)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampler steps for a run (default: the recipe's / paper's)."),
    weights: str = weights_option("ema or raw weights of a run."),
    clip: Optional[bool] = typer.Option(None, "--clip/--no-clip", help="Clip x̂0 to [-1, 1] inside the sampler."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where registered reference sets live (default $DDAEPP_DATA, else ./data)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the reference statistics (and do not store them)."),
    device: Optional[str] = device_option(),
    log_to_run_: bool = log_to_run_option(),
    threads: Optional[int] = threads_option(),
    json_out: bool = json_option(),
) -> None:
    """FID, sFID, IS, KID and precision/recall through torch-fidelity's Inception, with a protocol record."""
    if not Path(samples_or_run).exists():  # before torch (eval.fid says the same after it)
        raise UsageError(f"no such folder, .npz or run: {samples_or_run}")
    tracked = check_log_to_run(samples_or_run, log_to_run_)
    use_threads(threads)
    from ..eval.fid import fid as run_fid, print_fid

    seed_list = None
    if seeds is not None:
        from ..seedlist import parse_seeds  # torch-free

        seed_list = parse_seeds(seeds)
    result = run_fid(samples_or_run, ref=ref, metrics=metrics, n=n, preset=preset, seeds=seed_list,
                     batch_size=batch_size, inception_weights=str(inception_weights) if inception_weights else None,
                     download=download, extractor_dtype=extractor_dtype,
                     save_stats=str(save_stats) if save_stats else None,
                     save_samples=str(save_samples) if save_samples else None, sampler=sampler, steps=steps,
                     weights=weights, clip=clip, data_root=data_root, cache=not no_cache, device=device,
                     checkpoints=checkpoints, cfg_scale=cfg_scale, cfg_interval=cfg_interval, protocol=protocol,
                     labels=labels)
    if not result:  # ranks other than 0
        return
    report(result, json_out, print_fid)
    log_to_run(tracked, result)


@command(epilog="Example: ddaepp segprobe runs/cifar10_edm_ddpmpp --dataset voc --data-root data/VOCdevkit --json")
def segprobe(
    run_or_ckpt: str = run_argument(),
    dataset: str = typer.Option("ade20k", "--dataset", help="ade20k (150 classes) or voc (21 classes)."),
    checkpoints: Optional[str] = typer.Option(None, "--checkpoints", help="all, latest (default) or steps 100000,200000 of a run: each is probed, the best mIoU reported."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="ADEChallengeData2016 / VOC2012 folder or a parent of it (default $DDAEPP_DATA, else ./data)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Two (or more) layers to concatenate (default: DiT-B's 5,7 at the same relative depth: ddpm out_5,out_7; ddpmpp out_6,out_9; uvit in_5,out_1)."),
    timestep: Optional[str] = typer.Option(None, "--timestep", help="Paper-convention time (default: RF 0.25 ADE20K / 0.45 VOC, or the same σ/α in DDPM steps / EDM σ)."),
    epochs: int = typer.Option(30, "--epochs", help="Training epochs (DDAE++ Tab. 10: 30)."),
    lr: float = typer.Option(3e-3, "--lr", help="Adam learning rate, cosine decay (Tab. 10: 3e-3)."),
    batch_size: int = typer.Option(128, "--batch-size", help="Images per step (Tab. 10: 128)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Side of the square images fed to the model (default: the model's own resolution; latent runs: the training cache's image size, encoded by the run's VAE)."),
    label_size: int = typer.Option(256, "--label-size", help="Side of the label maps: mIoU is measured there (paper: 256)."),
    grid: int = typer.Option(16, "--grid", help="Feature grid before the head (paper: 16×16 patch tokens, then ×16 upsampling)."),
    cache_features: str = typer.Option("auto", "--cache-features", help="auto (keep features in memory when they fit), on, off."),
    weights: str = weights_option(),
    seed: int = typer.Option(0, "--seed", help="Noise, head initialisation and batch order."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Image decoding processes (default 4 on a GPU, 0 on a CPU)."),
    device: Optional[str] = device_option(),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of predictions beside ground truth (default: next to the eval record)."),
    log_to_run_: bool = log_to_run_option(),
    threads: Optional[int] = threads_option(),
    json_out: bool = json_option(),
) -> None:
    """Dense linear probe (semantic segmentation, mIoU) on frozen noised features of two layers."""
    if workers is not None and workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {workers}")
    check_run_or_ckpt(run_or_ckpt)
    check_plot_for_checkpoints(plot, checkpoints)
    tracked = check_log_to_run(run_or_ckpt, log_to_run_)
    use_threads(threads)
    from ..eval.latentprobe import over_checkpoints
    from ..eval.segprobe import print_segprobe, segprobe as run_segprobe

    result = over_checkpoints(run_or_ckpt, checkpoints, lambda ckpt: run_segprobe(
        ckpt, dataset=dataset, data_root=data_root, layers=layers, timestep=timestep, epochs=epochs, lr=lr,
        batch_size=batch_size, image_size=image_size, label_size=label_size, grid=grid, cache_features=cache_features,
        weights=weights, seed=seed, workers=workers, device=device, plot=str(plot) if plot else None),
        score=lambda r: r["miou"], command="segprobe")
    report_checkpoints(result, json_out, print_segprobe, "mIoU (%)")
    log_to_run(tracked, result)
