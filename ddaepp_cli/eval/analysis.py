"""DDAE's label-free metrics and its noise-conditional classifier (DDAE §3.3 Eqs. 3–4, §4.1.3 Eq. 5;
FutureXiang/ddae `contrastive.py`, `noisy_classifier_DDAE.py`).

* Alignment / uniformity (`ddaepp align`): features of the same training image under two
  independent noises, L2-normalised; alignment = E‖f(x^ε1) − f(x^ε2)‖² (α = 2), uniformity =
  log E exp(−2‖f(x) − f(y)‖²) over the distinct pairs of a batch (torch.pdist), averaged over the
  two noise draws; batch values averaged weighted by batch size (ddae:contrastive.py). Uniformity is
  a per-batch estimate: it depends on the batch size (default 512 = DDAE's 128 × 4 GPUs, gathered).
* Noise-conditional classifier (`ddaepp noisy-classifier`): p_t(y|x_t) = g(f_t(x_t) + τ(t)) on frozen
  pooled features of one layer; τ = TimeEmbedding(dim) of the raw timestep (DDPM step, EDM schedule
  index, RF 1000·t), g = Linear(dim → 2·dim) → SiLU → Linear(2·dim → classes); trained with a time
  drawn per sample over all noise levels, tested on a fixed grid of levels (DDAE Fig. 6).
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..console import info, progress
from ..data import BatchStream, to_model_range
from ..errors import UsageError
from .features import (DEFAULT_TIME, augment, check_same_classes, decoder_layers, default_layer, layer_order, load_eval_dataset,
                       noised_features, ordered_batches, parse_times, per_batch_generator, pick_device,
                       precision_for)

# ================================================================================================
# Alignment and uniformity (DDAE Eqs. 3–4)
# ================================================================================================


def alignment(f1: Tensor, f2: Tensor, alpha: float = 2.0) -> Tensor:
    """E‖f1 − f2‖^α over a batch of L2-normalised positive pairs (B, D)."""
    return (f1 - f2).norm(dim=1).pow(alpha).mean()


def uniformity(f: Tensor, t: float = 2.0) -> Tensor:
    """log E exp(−t‖fi − fj‖²) over the distinct pairs of a batch (B, D) of L2-normalised features."""
    return torch.pdist(f).pow(2).mul(-t).exp().mean().log()


@torch.no_grad()
def align_uniform(model, formulation, ds, layers: Sequence[str], t: float, *, n: int | None, batch_size: int,
                  seed: int, device, precision: str, desc: str = "align") -> dict[str, dict[str, float]]:
    """{layer: {"alignment", "uniformity"}} over the first n images of `ds` (no augmentation)."""
    total = len(ds) if n is None else min(n, len(ds))
    sums = {name: torch.zeros(2, dtype=torch.float64) for name in layers}
    with progress(math.ceil(total / batch_size), desc, "batch") as bar:
        for b, (images, _) in enumerate(ordered_batches(ds, batch_size, device, limit=total)):
            x0 = to_model_range(images)
            if x0.shape[0] < 2:  # a lone last image has no pair for uniformity
                continue
            g = per_batch_generator(device, seed, 1 + b)
            noise1 = torch.randn(x0.shape, generator=g, device=device)
            noise2 = torch.randn(x0.shape, generator=g, device=device)  # independent of noise1 (Eq. 3)
            f1 = noised_features(model, formulation, x0, t, layers, noise=noise1, precision=precision)
            f2 = noised_features(model, formulation, x0, t, layers, noise=noise2, precision=precision)
            for name in layers:
                a, c = F.normalize(f1[name], dim=1), F.normalize(f2[name], dim=1)
                unif = (uniformity(a) + uniformity(c)) / 2
                sums[name] += torch.tensor([float(alignment(a, c)), float(unif)], dtype=torch.float64) * x0.shape[0]
            bar.update(1)
    used = total - (total % batch_size == 1)
    return {name: {"alignment": float(s[0] / used), "uniformity": float(s[1] / used)} for name, s in sums.items()}


def align_command(checkpoints: Sequence[str], *, layers: str | None = None, timestep: str | None = None,
                  n: int | None = None, dataset: str | None = None, data_root: str | None = None, batch_size: int = 512,
                  weights: str = "ema", seed: int = 0, device: str | None = None, plot: str | None = None,
                  record: bool = True) -> dict:
    """Library entry of `ddaepp align`: metrics per layer for one checkpoint or a training trajectory."""
    from ..build import build_formulation
    from ..checkpoint import resolve_checkpoint
    from .evalrecord import (checkpoint_record, dataset_fingerprint, device_record, new_record_path,
                             save_record, timestamp, versions)
    from .plots import align_scatter, check_png
    from ..sample import load_model

    check_png(plot)
    if not checkpoints:
        raise UsageError("give at least one run or checkpoint")
    if batch_size < 2:
        raise UsageError(f"--batch-size must be at least 2 (uniformity needs pairs), got {batch_size}")
    if n is not None and n < 2:
        raise UsageError(f"--n must be at least 2, got {n}")
    ckpts = [resolve_checkpoint(c) for c in checkpoints]
    dev = pick_device(device)
    precision = precision_for(dev)
    runs, series, ds, names, t = [], {}, None, None, None
    for c in ckpts:
        recipe, model, ckpt = load_model(c, weights, dev)
        form = build_formulation(recipe)
        t_c = parse_times(form, timestep or DEFAULT_TIME[form.name], default=())[0]
        names_c = layer_order(model, model.resolve_layers(layers) if layers else decoder_layers(model))
        if ds is None:
            ds = load_eval_dataset(recipe, dataset=dataset, split="train", root=data_root, command="align")  # DDAE: training set
            names, t = names_c, t_c
        elif names_c != names or t_c.value != t.value:
            raise UsageError(f"{c} has other layers or another time scale than {ckpts[0]}; compare like with like")
        metrics = align_uniform(model, form, ds, names, t.value, n=n, batch_size=batch_size, seed=seed, device=dev,
                                precision=precision, desc=f"align {ckpt.name}")
        runs.append({**checkpoint_record(ckpt, weights, recipe), "metrics": metrics})
        for name in names:
            series.setdefault(name, []).append((metrics[name]["alignment"], metrics[name]["uniformity"]))
    used = len(ds) if n is None else min(n, len(ds))
    result = {"command": "align", "layers": names, "timestep": t.as_dict(), "n": used,
              "metrics": runs[-1]["metrics"], "checkpoints": runs}
    record_path = new_record_path(ckpts[-1], "align")
    result["protocol"] = {
        "timestep": t.as_dict(), "layers": names, "n": used, "batch_size": batch_size, "alpha": 2, "t_uniform": 2,
        "features": "global average pool, L2-normalised", "noise": "two independent draws per image, seeded per batch",
        "seed": seed, "weights": weights,
        "dataset": {**ds.info(), "fingerprint": dataset_fingerprint(ds), "images_used": used},
        **device_record(dev, precision), "versions": versions(), "time": timestamp(),
    }
    labels = [r["checkpoint"].rstrip("/").split("/")[-1] for r in runs]
    result["plot"] = align_scatter(series, plot or record_path.with_suffix(".png"), labels=labels,
                                   title=f"alignment vs uniformity (t={t.text})")
    result["eval_record"] = str(save_record(record_path, result)) if record else None
    return result


def print_align(result: dict) -> None:
    from rich.table import Table

    from ..console import err, out

    runs = result["checkpoints"]
    table = Table("layer", *[h for r in runs for h in (f"align {_short(r)}", f"uniform {_short(r)}")],
                  title=f"alignment / uniformity at t={result['timestep']['text']} (lower is better)")
    for name in result["layers"]:
        table.add_row(name, *[f"{r['metrics'][name][k]:.4f}" for r in runs for k in ("alignment", "uniformity")])
    out.print(table)
    for key in ("eval_record", "plot"):
        if result.get(key):
            err.print(f"{key.replace('_', ' ')}: {result[key]}", markup=False)


def _short(run: dict) -> str:
    return f"@{run['step']}" if run.get("step") is not None else ""


# ================================================================================================
# Noise-conditional classifier (DDAE Eq. 5)
# ================================================================================================


class NoiseLevels:
    """Training draws and test grid of noise levels, with the raw value τ(t) embeds (DDAE `noisy_classifier_DDAE.py`)."""

    def __init__(self, formulation):
        self.f = formulation
        if formulation.name == "edm":
            self.sigmas = formulation.karras_sigmas(formulation.probe_steps).flip(0)  # (19,), index 0 is σ = 0

    def sample(self, n: int, generator, device) -> tuple[Tensor, Tensor]:
        """(paper time (n,), raw time (n,)) drawn over all levels."""
        name = self.f.name
        if name == "ddpm":  # t ~ U{1..T}; τ embeds t itself (not t/T)
            t = torch.randint(1, self.f.T + 1, (n,), generator=generator, device=device)
            return t.float(), t.float()
        if name == "edm":  # schedule index ~ U{1..18}; τ embeds the index
            k = torch.randint(1, self.f.probe_steps + 1, (n,), generator=generator, device=device)
            return self.sigmas.to(device)[k].float(), k.float()
        t = torch.rand(n, generator=generator, device=device) * self.f.t_max  # RF: U[0, t_max)
        return t, 1000.0 * t  # τ of 1000·t: the same range as DDPM's steps (ours; DDAE has no RF)

    def grid(self) -> list[tuple[str, float, float]]:
        """(label, paper time, raw time) of the test levels: DDPM 1, 51, …, 951; EDM idx 1..18; RF 0, 0.05, …, 0.95."""
        name = self.f.name
        if name == "ddpm":
            return [(str(t), float(t), float(t)) for t in range(1, self.f.T, 50)]
        if name == "edm":
            return [(f"idx:{k}", float(self.sigmas[k]), float(k)) for k in range(1, self.f.probe_steps + 1)]
        return [(f"{k / 20:g}", k / 20, 1000.0 * k / 20) for k in range(20)]


class NoisyClassifier(nn.Module):
    """g(f + τ(t)): τ = TimeEmbedding(dim) (sinusoid dim/4 → Linear → SiLU → Linear), g a two-layer MLP."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        from ..nets.layers import TimeEmbedding

        self.sinusoid_dim = dim // 4
        self.time = TimeEmbedding(self.sinusoid_dim, dim)
        self.head = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, num_classes))

    def forward(self, features: Tensor, t_raw: Tensor) -> Tensor:
        from ..nets.common import sinusoidal_embedding

        tau = self.time(sinusoidal_embedding(t_raw, self.sinusoid_dim))  # (B, D)
        return self.head(features + tau)  # (B, K)


# DDAE's noisy-classifier settings (15 epochs, batch 128 × 4 GPUs, flip + 4 px crop at 32 px) are for
# CIFAR. On scikit-learn's digits (1,442 training images) they make 3 steps per epoch, 45 in all. Measured
# on a quickstart run (recipes/quickstart.yaml, 675 steps, layer out_2, CPU): DDAE's settings give
# 52-66 % at the six lowest EDM noise levels (mean over all 18: 34.3 %); batch 128 for 50 epochs
# without the crop (a 1 px shift of a 12 px digit is a large deformation) gives 88-91 % (mean 48.7 %).
# As `probe` does (probe.DATASET_DEFAULTS), the defaults follow the dataset; explicit options win.
NOISY_DEFAULTS = {"epochs": 15, "batch_size": 512, "crop": True}
NOISY_DATASET_DEFAULTS = {"digits": {"epochs": 50, "batch_size": 128, "crop": False}}


def noisy_defaults(dataset: str, *, epochs: int | None = None, batch_size: int | None = None,
                   crop: bool | None = None) -> dict:
    """The noisy classifier's epochs, batch size and crop for `dataset`, with the given values kept."""
    d = {**NOISY_DEFAULTS, **NOISY_DATASET_DEFAULTS.get(dataset, {})}
    given = {"epochs": epochs, "batch_size": batch_size, "crop": crop}
    return {k: d[k] if v is None else v for k, v in given.items()}


def noisy_classifier(run_or_ckpt: str, *, layer: str | None = None, dataset: str | None = None,
                     data_root: str | None = None, epochs: int | None = None, lr: float = 4e-3,
                     batch_size: int | None = None, hflip: bool | None = None, crop: bool | None = None,
                     n_test: int | None = None, weights: str = "ema", seed: int = 0, device: str | None = None,
                     plot: str | None = None, record: bool = True) -> dict:
    """Library entry of `ddaepp noisy-classifier`: train over all noise levels, test per level.

    `epochs`, `batch_size`, `crop` = None: DDAE's (15, 512, crop) or `NOISY_DATASET_DEFAULTS`."""
    from .evalrecord import (checkpoint_record, dataset_fingerprint, device_record, new_record_path,
                             save_record, timestamp, versions)
    from .plots import accuracy_curve, check_png
    from .probe import cosine_lr
    from ..sample import load_for_eval

    check_png(plot)
    for name, v in (("--epochs", epochs), ("--batch-size", batch_size)):
        if v is not None and v <= 0:
            raise UsageError(f"{name} must be positive, got {v}")
    if not lr > 0:
        raise UsageError(f"--lr must be positive, got {lr}")
    if n_test is not None and n_test <= 0:
        raise UsageError(f"--n-test must be positive, got {n_test}")
    dev = pick_device(device)
    precision = precision_for(dev)
    recipe, model, ckpt, weights, form = load_for_eval(run_or_ckpt, weights, dev)  # weights: the file used
    train_ds = load_eval_dataset(recipe, dataset=dataset, split="train", root=data_root, command="noisy-classifier")
    test_ds = load_eval_dataset(recipe, dataset=dataset, split="test", root=data_root, command="noisy-classifier")
    check_same_classes(train_ds, test_ds)
    chosen = noisy_defaults(train_ds.name, epochs=epochs, batch_size=batch_size, crop=crop)
    epochs, batch_size, crop = chosen["epochs"], chosen["batch_size"], chosen["crop"]
    n_test = len(test_ds) if n_test is None else min(n_test, len(test_ds))
    layer = layer or default_layer(recipe, model, train_ds.name)
    layer = model.resolve_layers(layer)
    if len(layer) != 1:
        raise UsageError(f"--layer takes one layer, got {', '.join(layer)}")
    layer = layer[0]
    if hflip is None:
        hflip = recipe.data.hflip if train_ds.name == recipe.data.dataset else True
    crop_pad = train_ds.image_size // 8 if crop else 0  # DDAE: flip + RandomCrop(32, padding=4)
    levels = NoiseLevels(form)
    torch.manual_seed(seed)  # head initialisation
    clf = NoisyClassifier(model.feature_dims[layer], train_ds.num_classes).to(dev)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    stream = BatchStream(train_ds, global_batch=batch_size, seed=seed, drop_last=False,
                         num_workers=recipe.data.num_workers,
                         device=dev if getattr(train_ds, "in_memory", False) else None)
    spe = stream.steps_per_epoch
    info(f"noise-conditional classifier on {layer} of {ckpt} ({weights}), {epochs} epochs, batch {batch_size}")
    t0 = time.perf_counter()
    losses = []
    try:
        with progress(epochs * spe, "noisy classifier", "step") as bar:
            for epoch in range(epochs):
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(lr, epoch, epochs)
                total = 0.0
                for s in range(spe):
                    images, labels = next(stream)
                    g = per_batch_generator(dev, seed, 1 + epoch * spe + s)
                    x0 = augment(to_model_range(images.to(dev)), hflip=hflip, crop_pad=crop_pad, generator=g)
                    t, t_raw = levels.sample(x0.shape[0], g, dev)
                    f = noised_features(model, form, x0, t, [layer], generator=g, precision=precision)[layer]
                    loss = F.cross_entropy(clf(f, t_raw), labels.to(dev))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach())
                    bar.update(1)
                losses.append(total / spe)
    finally:
        stream.close()
    train_s = time.perf_counter() - t0
    curve = []
    clf.eval()
    grid = levels.grid()
    with torch.no_grad(), progress(len(grid), "test per noise level", "level") as bar:
        for j, (label, t, t_raw) in enumerate(grid):
            correct = 0
            for b, (images, labels) in enumerate(ordered_batches(test_ds, batch_size, dev, limit=n_test)):
                g = per_batch_generator(dev, seed, (1 << 31) + j * 100_003 + b)
                f = noised_features(model, form, to_model_range(images), t, [layer], generator=g,
                                    precision=precision)[layer]
                raw = torch.full((f.shape[0],), t_raw, device=dev)
                correct += int((clf(f, raw).argmax(1) == labels).sum())
            curve.append({"timestep": label, "t": t, "accuracy": correct / n_test})
            bar.update(1)
    record_path = new_record_path(ckpt, "noisy-classifier")
    result = {
        "command": "noisy-classifier", "layer": layer, "curve": curve,
        "mean_accuracy": sum(c["accuracy"] for c in curve) / len(curve), "chance": 1.0 / train_ds.num_classes,
        "train_losses": losses, "timing": {"train_s": round(train_s, 3)},
        "protocol": {
            **checkpoint_record(ckpt, weights, recipe), "layer": layer, "epochs": epochs, "batch_size": batch_size,
            "lr": lr, "optimizer": "adam", "schedule": "cosine per epoch", "hflip": hflip, "crop_pad": crop_pad,
            "head": f"TimeEmbedding({clf.time.lin2.out_features}) + Linear-SiLU-Linear",
            "training_times": {"ddpm": "t ~ U{1..T}", "edm": "index ~ U{1..18}", "rf": "t ~ U[0, t_max)"}[form.name],
            "time_embedding_input": {"ddpm": "t", "edm": "schedule index", "rf": "1000·t"}[form.name],
            "seed": seed,
            "dataset": {**train_ds.info(), "split": "train/test", "num_train": len(train_ds),
                        "num_test": n_test, "train_fingerprint": dataset_fingerprint(train_ds),
                        "test_fingerprint": dataset_fingerprint(test_ds)},
            **device_record(dev, precision), "versions": versions(), "time": timestamp(),
        },
    }
    xlabel = {"ddpm": "timestep t", "edm": "σ", "rf": "t"}[form.name]
    result["plot"] = accuracy_curve([c["t"] for c in curve], [c["accuracy"] for c in curve],
                                    plot or record_path.with_suffix(".png"), xlabel=xlabel, log_x=form.name == "edm",
                                    chance=result["chance"], title=f"{recipe.name}: noise-conditional classifier on {layer}")
    result["eval_record"] = str(save_record(record_path, result)) if record else None
    return result


def print_noisy(result: dict) -> None:
    from rich.table import Table

    from ..console import err, out

    table = Table("timestep", "t", "accuracy (%)", title=f"noise-conditional classifier on {result['layer']}")
    for c in result["curve"]:
        table.add_row(c["timestep"], f"{c['t']:.4g}", f"{100 * c['accuracy']:.2f}")
    out.print(table)
    out.print(f"mean accuracy over levels {100 * result['mean_accuracy']:.2f}% (chance {100 * result['chance']:.1f}%)",
              markup=False)
    for key in ("eval_record", "plot"):
        if result.get(key):
            err.print(f"{key.replace('_', ' ')}: {result[key]}", markup=False)
