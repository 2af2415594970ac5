"""`ddaepp fid`: plan → extract → compute → record, for files, folders and one or several checkpoints.

1. plan: what is measured (a source of images, or checkpoints of a run with their sampling settings)
   and against what, with every cheap check first (no network, no model);
2. the Inception extractor, the run's generation options (the VAE is loaded once for all checkpoints)
   and the reference's statistics/features (once, cached by content);
3. per checkpoint (or the one file source): features extracted sharded over processes, gathered on
   rank 0; statistics and metrics computed; the record written next to the run.
Several checkpoints (`--checkpoints all|latest|100000,200000`) give one result each and the best
(lowest FID), since DDAE++ Tab. 2 reports the best of several checkpoints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import inception
from ...distributed import Dist, from_rank0
from ...errors import UnavailableError, UsageError, choices
from .constants import (DIM, FEATURES, LOGITS, PRESETS, PROTOCOLS, REGISTERED, RESIZE_POLICY, SPATIAL,
                        TORCH_FIDELITY_ONLY)
from .extract import extract
from .metrics import compute_metrics, parse_metrics
from .reference import (ADM_REFERENCE_URL, Reference, default_adm_reference, is_adm_batch, reference_data,
                        resolve_reference)
from .report import versions, write_record
from .sources import FolderSource, ImageSource, ModelSource, NpzSource
from .stats import Stats, npz_keys, stats_from_features, write_stats

ADM_METRICS = "fid,sfid,is,prc"  # what ADM's evaluator prints


def _is_run(p: Path) -> bool:
    if p.is_file():
        return p.suffix == ".safetensors"
    return p.is_dir() and any((p / f).exists() for f in ("model.safetensors", "ema.safetensors", "checkpoints",
                                                         "recipe.yaml"))


def _sample_count(n: int | None, preset: str | None, default: int | None) -> tuple[int | None, str | None]:
    if preset is not None and preset not in PRESETS:
        raise UsageError(f"--preset {preset!r} is not known; valid: {choices(PRESETS)}")
    if n is not None:
        if n <= 0:
            raise UsageError(f"--n must be positive, got {n}")
        if preset is not None and n != PRESETS[preset]:
            raise UsageError(f"--n {n} contradicts --preset {preset} ({PRESETS[preset]} images); give one of them")
        return n, preset
    if preset is not None:
        return PRESETS[preset], preset
    return default, None


@dataclass
class Plan:
    """What one `fid` call measures (step 1)."""

    wanted: list[str]
    protocol: str
    reference: Reference | None
    ref_text: str | None
    count: int | None = None
    preset: str | None = None
    source: ImageSource | None = None  # a folder / npz input
    checkpoints: list[Path] = field(default_factory=list)  # a run input
    recipe: Any = None
    seeds: list[int] | None = None
    cfg_scale: float | None = None
    cfg_interval: tuple[float, float] | None = None
    labels: str | None = None  # --labels (random, balanced); None: the recipe's sample.labels
    spatial: bool = False  # extract the sFID features (sfid requested, or statistics to save)

    @property
    def is_run(self) -> bool:
        return bool(self.checkpoints)

    @property
    def layers(self) -> list[str]:
        return [FEATURES] + ([LOGITS] if "is" in self.wanted else []) + ([SPATIAL] if self.spatial else [])


def plan(samples_or_run: str, *, ref, metrics, n, preset, seeds, batch_size, extractor_dtype, save_stats,
         save_samples, sampler, steps, clip, data_root, download, checkpoints, cfg_scale, cfg_interval,
         protocol, labels=None) -> Plan:
    from ...sample import LABELS, parse_interval

    if batch_size is not None and batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    if extractor_dtype not in ("float32", "float64"):
        raise UsageError(f"--extractor-dtype must be float32 or float64, got {extractor_dtype!r}")
    if protocol is not None and protocol not in PROTOCOLS:
        raise UsageError(f"--protocol {protocol!r} is not known; valid: {choices(PROTOCOLS)}")
    if save_stats is not None and Path(save_stats).suffix != ".npz":
        raise UsageError(f"--save-stats {save_stats}: give a .npz file name")
    if metrics is not None:
        parse_metrics(metrics)
    if labels is not None and labels not in LABELS:
        raise UsageError(f"--labels must be one of {choices(LABELS)}; got {labels!r}")
    interval = parse_interval(cfg_interval)
    path = Path(samples_or_run)
    if not path.exists():
        raise UsageError(f"no such folder, .npz or run: {samples_or_run}")
    is_run = _is_run(path)
    run_only = (seeds is not None or save_samples or sampler or steps is not None or clip is not None
                or checkpoints is not None or cfg_scale is not None or cfg_interval is not None or labels is not None)
    if not is_run and run_only:
        raise UsageError("--seeds, --save-samples, --sampler, --steps, --clip, --checkpoints, --cfg-scale, "
                         f"--cfg-interval and --labels apply to a run or checkpoint, not to {samples_or_run}")
    p = Plan(wanted=[], protocol="", reference=None, ref_text=ref, cfg_scale=cfg_scale, cfg_interval=interval,
             labels=labels)
    if is_run:
        ref = _plan_run(p, path, ref=ref, metrics=metrics, n=n, preset=preset, seeds=seeds, checkpoints=checkpoints,
                        save_stats=save_stats, save_samples=save_samples, clip=clip)
    else:
        _plan_files(p, path, n=n, preset=preset)
    _plan_metrics(p, ref, metrics, save_stats=save_stats, data_root=data_root, download=download)
    p.protocol = protocol or ("adm" if is_adm_batch(p.reference) else "torch-fidelity")
    return p


def _plan_run(p: Plan, path: Path, *, ref, metrics, n, preset, seeds, checkpoints, save_stats, save_samples,
              clip) -> str | None:
    """Checkpoints, seeds and the default reference of a run input; returns the reference to use."""
    from ...checkpoint import checkpoint_recipe, select_checkpoints
    from ...sample import check_clip

    p.checkpoints = select_checkpoints(path, checkpoints)
    p.recipe = checkpoint_recipe(p.checkpoints[-1])
    check_clip(clip, p.recipe)  # as `sample`: unit-variance latents are never clipped to the pixel range
    if len(p.checkpoints) > 1 and (save_stats or save_samples):
        raise UsageError("--save-stats and --save-samples take one checkpoint; drop them or choose one "
                         "with --checkpoints")
    if seeds is not None:
        if n is not None or preset is not None:
            raise UsageError("give --seeds, or --n / --preset, not both")
        p.count, p.preset = len(seeds), None
    else:
        p.count, p.preset = _sample_count(n, preset, PRESETS["fid50k"])
        p.preset = p.preset or ("fid50k" if n is None else None)
        seeds = list(range(p.count))
    p.seeds = seeds
    if save_samples:  # a new or empty folder (fid has no --force; outdir.py)
        from ...outdir import check_output_folder

        check_output_folder(save_samples, flag="--save-samples")
    if ref is not None or (metrics is not None and not _needs_ref(parse_metrics(metrics))):
        return ref
    default = f"{p.recipe.data.dataset}-train"  # DDAE/EDM convention: FID against the training set
    if default in REGISTERED:
        return default
    if save_stats is not None:
        return None
    if p.recipe.data.dataset == "latents":  # ImageNet 256²: ADM's reference batch at its documented place
        adm = default_adm_reference()
        if not adm.is_file():
            raise UnavailableError(f"no --ref given and ADM's reference batch is not at {adm}: download "
                                   f"{ADM_REFERENCE_URL} and put it there (or pass --ref FILE/FOLDER)")
        return str(adm)
    raise UsageError(f"--ref is needed for a {p.recipe.data.dataset} model: an image folder, an .npz of "
                     f"images or statistics, or one of {choices([*REGISTERED, *TORCH_FIDELITY_ONLY])}")


def _plan_files(p: Plan, path: Path, *, n, preset) -> None:
    p.count, p.preset = _sample_count(n, preset, None)
    if path.is_dir():
        p.source = FolderSource(path, limit=p.count)
    elif path.suffix == ".npz":
        keys = npz_keys(path)
        if "arr_0" not in keys and "mu" in keys:
            raise UsageError(f"{path} holds statistics, not images: pass it as --ref")
        p.source = NpzSource(path, limit=p.count)
    else:
        raise UsageError(f"{path}: give an image folder, an .npz of images (arr_0) or a run/checkpoint")


def _plan_metrics(p: Plan, ref: str | None, metrics: str | None, *, save_stats, data_root, download) -> None:
    """The reference and the metrics it allows (default: FID; ADM's set against an ADM reference batch)."""
    p.ref_text = ref
    wanted = parse_metrics(metrics) if metrics is not None else None
    if ref is not None and (wanted is None or _needs_ref(wanted)):
        p.reference = resolve_reference(ref, data_root=data_root, download=download)
    if wanted is None:
        wanted = parse_metrics(ADM_METRICS if is_adm_batch(p.reference) else "fid")
    if _needs_ref(wanted) and p.reference is None and save_stats is None:
        raise UsageError("--ref is needed for fid, sfid, kid and prc: a registered name "
                         f"({choices([*REGISTERED, *TORCH_FIDELITY_ONLY])}), an image folder, or a statistics .npz")
    p.spatial = "sfid" in wanted or save_stats is not None  # a statistics file carries mu_s, sigma_s too
    if p.reference is None:  # --save-stats alone: statistics (and IS) only
        if ref is not None:
            from ...console import info

            info("note: --ref is not used by the requested metrics (is)")
        wanted = [m for m in wanted if m == "is"]
    r = p.reference
    if r is not None and r.source is None and any(m in wanted for m in ("kid", "prc")):
        raise UsageError(f"KID and precision/recall compare features, not statistics: give reference images "
                         f"instead of {ref}")
    if r is not None and r.stats is not None and r.stats.spatial is None and "sfid" in wanted:
        raise UsageError(f"sFID needs spatial statistics (mu_s, sigma_s, as in ADM's reference batches); {ref} "
                         "holds mu and sigma only: give reference images, or leave sfid out of --metrics")
    p.wanted = wanted


def _needs_ref(wanted: list[str]) -> bool:
    return any(m in wanted for m in ("fid", "sfid", "kid", "prc"))


def fid(samples_or_run: str, *, ref: str | None = None, metrics: str | None = None, n: int | None = None,
        preset: str | None = None, seeds: list[int] | None = None, batch_size: int | None = None,
        inception_weights: str | None = None, download: bool = False, extractor_dtype: str = "float64",
        save_stats: str | None = None, save_samples: str | None = None, sampler: str | None = None,
        steps: int | None = None, weights: str = "ema", clip: bool | None = None, data_root: str | None = None,
        cache: bool = True, device: str | None = None, record: bool = True, checkpoints: str | None = None,
        cfg_scale: float | None = None, cfg_interval: str | None = None,
        protocol: str | None = None, labels: str | None = None) -> dict[str, Any]:
    """Library entry of `ddaepp fid` (multi-process aware: rank 0 returns the full result, others {})."""
    t_start = time.perf_counter()
    p = plan(samples_or_run, ref=ref, metrics=metrics, n=n, preset=preset, seeds=seeds, batch_size=batch_size,
             extractor_dtype=extractor_dtype, save_stats=save_stats, save_samples=save_samples, sampler=sampler,
             steps=steps, clip=clip, data_root=data_root, download=download, checkpoints=checkpoints,
             cfg_scale=cfg_scale, cfg_interval=cfg_interval, protocol=protocol, labels=labels)

    # ---- 2. extractor, generation options, reference ------------------------------------------------
    weights_path = inception.find_weights(inception_weights, download=download)  # exit 3 with instructions
    from ..features import pick_device

    dist = Dist(pick_device(device) if device else None)
    if p.checkpoints:  # listed by each rank before the process group existed: rank 0's list for every rank
        p.checkpoints = from_rank0(lambda: p.checkpoints)
    tf_layers = [name for name in p.layers if name != SPATIAL]
    extractor = inception.load_extractor(weights_path, tf_layers, device=dist.device, dtype=extractor_dtype)
    ext_info = inception.describe(weights_path, extractor_dtype)
    from ...sample import weights_of

    weights = weights_of(samples_or_run, weights)  # a named .safetensors file decides (sample.py)
    generation = _Generation(p, dist.device, weights=weights, sampler=sampler, steps=steps, clip=clip) \
        if p.is_run else None  # loads the VAE of a latent run (exit 3 when missing), once
    ref_bs = batch_size or 100
    t0 = time.perf_counter()
    ref_stats, ref_feats, cinfo = None, None, {}
    if p.reference is not None:
        ref_stats, ref_feats, cinfo = reference_data(
            p.reference, extractor, ext_info, dist, need_features=any(m in p.wanted for m in ("kid", "prc")),
            need_spatial="sfid" in p.wanted, use_cache=cache, batch_size=ref_bs)
        p.reference.description.update(cinfo)
    t_ref = time.perf_counter() - t0

    # ---- 3. per checkpoint: extract → compute → record ----------------------------------------------
    results = []
    for ckpt in p.checkpoints or [None]:
        t0 = time.perf_counter()
        if ckpt is None:
            source, protocol_rec, bs = p.source, {}, ref_bs
        else:
            source, protocol_rec, bs = generation.source(ckpt, batch_size)
        feats, images = extract(source, extractor, p.layers, dist, batch_size=bs,
                                desc=f"fid: sample + features ({ckpt.name})" if ckpt else "fid: features",
                                keep_images=bool(save_samples), strided=ckpt is not None)
        t_input = time.perf_counter() - t0
        if not dist.main:
            continue
        result = compute(p, source, feats, images, ref_stats, ref_feats, protocol_rec, ext_info,
                         save_stats=save_stats, save_samples=save_samples)
        result["protocol"].update({"batch_size": bs, "world_size": dist.world})
        result["protocol"].update(_environment(dist.device, extractor_dtype))
        result["timing"] = {"input_s": round(t_input, 3), "reference_s": round(t_ref, 3),
                            "metrics_s": result.pop("_metrics_s"), "total_s": round(time.perf_counter() - t_start, 3)}
        result["eval_record"] = write_record(result, ckpt, source) if record else None
        results.append(result)
    dist.barrier()
    if not dist.main:
        return {}
    if len(results) == 1:
        return results[0]
    return _several(samples_or_run, p, results, time.perf_counter() - t_start)


def _environment(device: torch.device, extractor_dtype: str) -> dict:
    from ..evalrecord import device_record, timestamp

    return {**device_record(device, extractor_dtype), "versions": versions(), "time": timestamp()}


class _Generation:
    """The run's network per checkpoint as an image source, with `ddaepp sample`'s defaults (sampler,
    steps, clipping, class labels — random per seed unless `--labels balanced` / `sample.labels` —, CFG from
    the recipe unless overridden, VAE decoding)."""

    def __init__(self, p: Plan, device: torch.device, *, weights: str, sampler: str | None, steps: int | None,
                 clip: bool | None):
        from ...build import build_formulation, dataset_geometry
        from ...sample import label_mode, load_model, resolve_steps, sampling_options

        self.p, self.device, self.weights = p, device, weights
        recipe, model, _ = load_model(p.checkpoints[0], weights, device)  # checks the weights file early
        self.formulation = build_formulation(recipe)
        self.sampler = sampler or recipe.sample.sampler or self.formulation.samplers[0]
        self.formulation.check_sampler(self.sampler)
        self.steps = resolve_steps(self.formulation, self.sampler, steps, recipe.sample.steps)  # none for rk45
        if self.steps is not None and self.steps <= 0:
            raise UsageError(f"--steps must be positive, got {self.steps}")
        clip = recipe.sample.clip_x0 if clip is None else clip
        self.clip = self.formulation.clip_x0 if clip is None else clip
        channels, size, _ = dataset_geometry(recipe.data)
        self.shape = (channels, size, size)
        # class labels of every seed, CFG settings, and the VAE decoder (loaded once, for every checkpoint)
        self.labels = label_mode(recipe, getattr(model, "num_classes", 0), labels=p.labels)
        self.options = sampling_options(recipe, model, p.seeds, labels=p.labels, cfg_scale=p.cfg_scale,
                                        cfg_interval=p.cfg_interval, device=device)
        self.first = (p.checkpoints[0], recipe, model)

    def source(self, ckpt: Path, batch_size: int | None) -> tuple[ModelSource, dict, int]:
        from ..evalrecord import checkpoint_record
        from ...sample import load_model

        if self.first is not None and self.first[0] == ckpt:
            _, recipe, model = self.first
        else:
            recipe, model, _ = load_model(ckpt, self.weights, self.device)
        self.first = None  # one network in memory at a time
        source = ModelSource(model, self.formulation, self.p.seeds, shape=self.shape, sampler=self.sampler,
                             steps=self.steps, clip=self.clip, device=self.device, options=self.options,
                             labels=self.labels)
        o = self.options
        guided = o.get("class_labels") is not None
        protocol = {**checkpoint_record(ckpt, self.weights, recipe), "labels": self.labels,
                    "cfg_scale": o["cfg_scale"] if guided else None,
                    "cfg_interval": list(o["cfg_interval"]) if guided else None,
                    "cfg_channels": o["cfg_channels"] if guided else None,
                    "latent": o.get("decode") is not None}
        return source, protocol, batch_size or recipe.sample.batch_size


def compute(p: Plan, source: ImageSource, feats: dict, images, ref_stats: Stats | None, ref_feats,
            protocol_rec: dict, ext_info: dict, *, save_stats: str | None, save_samples: str | None) -> dict:
    """Statistics, metrics, warnings, written statistics/samples and the result object (rank 0)."""
    wanted, reference = p.wanted, p.reference
    input_desc = source.describe()
    count = len(source)
    warnings = []
    if not ext_info["official_weights"]:
        warnings.append(f"{ext_info['weights']} is not the official {inception.WEIGHTS_NAME} (sha256 "
                        f"{ext_info['weights_sha256'][:12]}…): numbers are not comparable with published FIDs")
    need_stats = "fid" in wanted or "sfid" in wanted or save_stats
    stats = stats_from_features(feats[FEATURES], feats.get(SPATIAL)) if need_stats else None
    if count < DIM and need_stats:
        warnings.append(f"{count} images < {DIM} feature dimensions: the covariance is rank-deficient and the FID "
                        "is biased upwards; papers report FID-10k or FID-50k")
    if isinstance(source, FolderSource) and source.lossy:
        warnings.append(f"{source.root} holds lossy (JPEG/WebP) images: compression changes FID; use PNG")
    if reference is not None and reference.stats is not None:
        m = reference.stats.meta.get("extractor") or {}
        if m.get("weights_sha256") and m["weights_sha256"] != ext_info["weights_sha256"]:
            warnings.append(f"{p.ref_text} was computed with other Inception weights (sha256 {m['weights_sha256'][:12]}…)")
    if p.preset and count != PRESETS[p.preset]:
        warnings.append(f"{count} images, not the {PRESETS[p.preset]} of {p.preset}")
    t0 = time.perf_counter()
    values, settings = compute_metrics(wanted, feats, stats, ref_stats, ref_feats, protocol=p.protocol)
    t_metrics = time.perf_counter() - t0

    stats_file = None
    if save_stats:
        fingerprint = None if isinstance(source, ModelSource) else source.fingerprint()
        if fingerprint is not None:
            input_desc["fingerprint"] = fingerprint
        stats_file = write_stats(save_stats, stats, {
            "source": input_desc, "fingerprint": fingerprint, "extractor": ext_info, "resize": RESIZE_POLICY,
            **({"checkpoint": protocol_rec.get("checkpoint")} if p.is_run else {})})
    if save_samples and images is not None:
        from ...sample import write_outputs

        input_desc["written"] = write_outputs(images, source.seeds, Path(save_samples), ["png", "npz", "grid"],
                                              {"command": "sample", **protocol_rec, **source.describe(),
                                               "written": True})
    samples = {"n": count}
    if p.is_run:
        samples.update({k: input_desc[k] for k in ("seeds", "sampler", "steps", "clip_x0")})
    return {
        "command": "fid",
        "metrics": values,
        "n": count,
        "preset": p.preset,
        "input": input_desc,
        "reference": reference.description if reference is not None else None,
        "warnings": warnings,
        "stats_file": stats_file,
        "protocol": {
            **protocol_rec,
            "samples": samples,
            "reference": p.ref_text, "reference_fingerprint": (reference.description.get("fingerprint")
                                                               if reference is not None else None),
            "metric_protocol": p.protocol,
            "extractor": ext_info, "resize": RESIZE_POLICY, "settings": settings,
        },
        "_metrics_s": round(t_metrics, 3),
    }


def _several(run: str, p: Plan, results: list[dict], total_s: float) -> dict:
    """One result per checkpoint and the best (lowest FID; DDAE++ Tab. 2 reports the best checkpoint)."""
    key = "fid" if "fid" in p.wanted else ("sfid" if "sfid" in p.wanted else None)
    best = None
    if key is not None:
        i = min(range(len(results)), key=lambda j: results[j]["metrics"][key])
        r = results[i]
        best = {"by": key, "index": i, "checkpoint": r["protocol"]["checkpoint"], "step": r["protocol"]["step"],
                "metrics": r["metrics"]}
    return {"command": "fid", "run": run, "n": p.count, "reference_text": p.ref_text, "metrics_requested": p.wanted,
            "checkpoints": results, "best": best, "timing": {"total_s": round(total_s, 3)}}
