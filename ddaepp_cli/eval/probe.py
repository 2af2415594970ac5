"""Linear probing of frozen diffusion features: the layer × timestep grid in one pass (DDAE §3.2,
DDAE++ App. B "Linear and dense probing", Tab. 10; FutureXiang/ddae `linear.py`).

Protocol (`ddae++`, the default): EMA weights; each training batch is flipped at random, noised at
every requested time with fresh noise (the same ε for all times of a batch) and passed through the
backbone once per time, stopping after the deepest requested layer; every (layer, time) feature is
global-average pooled and fed to its own head — parameter-free BatchNorm1d + Linear — and all heads
are trained together on the same batches with Adam and a cosine schedule (stepped per epoch, as
ddae:linear.py). `ddae` drops the BatchNorm and adds DDAE's random crop (pad 4 at 32 px).

The grid is chosen on a stratified held-out split of the training set (DDAE++ App. B; DDAE itself
searched on the test set — `--val-fraction 0` reproduces that, flagged `selected_on: test`); the
chosen head is then retrained on the full training set and tested.

Heads of equal width are one batched matmul (G, B, C) × (G, C, K): no Python loop over heads in
the step. Adam is element-wise, so one optimizer over the stacked weights updates every head exactly
as a separate optimizer would; heads are initialised from generators keyed by their own name, and
noise, flips and batch order depend only on the seed, so a head learns the same thing in a grid as
alone (tests/test_probe.py checks it).

Several processes (`torchrun` / `accelerate launch`): every rank reads the same global batch and makes
the same draws (flips, crops, noise) on it; each runs the backbone on its contiguous share of the batch,
the pooled features are all-gathered back into batch order, and every rank then trains the small heads
identically on the whole batch (no gradient all-reduce). The features, and so the results, are those of
one process up to the backbone's floating-point dependence on batch size (tests/test_multiprocess.py);
rank 0 writes the record and plot and returns the result, the other ranks return {}.
"""

from __future__ import annotations

import contextlib
import math
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..console import info, progress
from ..data import BatchStream
from ..distributed import Dist
from ..errors import UsageError, choices
from .latentprobe import latent_defaults, write_layer_curve
from .probesources import (CACHE_STREAM, RAW_LAYER, RAW_TIME, TEST_STREAM, TRAIN_STREAM,  # noqa: F401 (re-exported)
                           VAL_STREAM, CachedFeatures, LiveFeatures, RawLatentFeatures, key_of)
from .features import (check_same_classes, decoder_layers, default_grid, layer_order, load_eval_dataset,
                       ordered_batches, parse_times, pick_device, precision_for, resolve_layers, stratified_split)


@dataclass(frozen=True)
class Protocol:
    name: str
    batchnorm: bool  # parameter-free BatchNorm1d before the Linear head
    crop: bool  # random crop, padding = image_size / 8 (DDAE: RandomCrop(32, padding=4))


PROTOCOLS = {
    "ddae++": Protocol("ddae++", batchnorm=True, crop=False),  # DDAE++ App. B (BN after I-DAE, flip only)
    "ddae": Protocol("ddae", batchnorm=False, crop=True),  # ddae:linear.py (plain Linear, crop + flip)
}
# DDAE++ Tab. 10 (CIFAR): 15 epochs, Adam, lr 4e-3 = 1e-3 × 4 GPUs, cosine; batch 128 × 4 GPUs (DDAE config).
EPOCHS, LR, BATCH = 15, 4e-3, 512
# scikit-learn's digits is a CPU demo set the papers never probe: its 1,442 training images make 3 steps
# per epoch at batch 512, far from convergence, and a CPU spends minutes per epoch on the backbone. Its
# defaults (ours) cache the features (no flips on digits: one pass per time) and train the heads longer
# on smaller batches — within a point of an L-BFGS logistic regression on the same features.
DATASET_DEFAULTS = {"digits": {"epochs": 100, "batch_size": 128, "cache_features": True}}
SPLIT_SEED = 0  # the validation split is a property of the dataset, not of --seed


# ------------------------------------------------------------------------------------------------
# Heads
# ------------------------------------------------------------------------------------------------


class HeadBank(nn.Module):
    """Linear heads (optionally behind parameter-free BatchNorm), one per key, grouped by width.

    `forward(features)` takes the features in key order (each (B, C_key)) and returns logits
    (H, B, K) in key order. BatchNorm has running statistics (momentum 0.1, eps 1e-5: BatchNorm1d's
    defaults) used in eval mode; its input is frozen, so it runs without autograd.
    """

    def __init__(self, keys: Sequence[str], dims: Sequence[int], num_classes: int, *, batchnorm: bool,
                 seed: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        from ..seeding import generator_seed

        self.keys, self.num_classes = list(keys), num_classes
        self.batchnorm, self.momentum, self.eps = batchnorm, momentum, eps
        by_dim: dict[int, list[int]] = {}
        for i, d in enumerate(dims):
            by_dim.setdefault(int(d), []).append(i)
        self.groups = list(by_dim.items())  # [(C, [key index, …])]
        self.weight, self.bias = nn.ParameterList(), nn.ParameterList()
        for gi, (d, idx) in enumerate(self.groups):
            w, b = torch.empty(len(idx), num_classes, d), torch.empty(len(idx), num_classes)
            bound = 1.0 / math.sqrt(d)  # nn.Linear's default init: U(−1/√C, 1/√C) for weight and bias
            for j, i in enumerate(idx):
                g = torch.Generator().manual_seed(generator_seed(seed % (1 << 32), zlib.crc32(self.keys[i].encode())))
                w[j].uniform_(-bound, bound, generator=g)
                b[j].uniform_(-bound, bound, generator=g)
            self.weight.append(nn.Parameter(w))  # (G, K, C)
            self.bias.append(nn.Parameter(b))  # (G, K)
            self.register_buffer(f"running_mean_{gi}", torch.zeros(len(idx), d))
            self.register_buffer(f"running_var_{gi}", torch.ones(len(idx), d))
        order = [i for _, idx in self.groups for i in idx]
        self.register_buffer("inverse", torch.argsort(torch.tensor(order)), persistent=False)

    def _norm(self, gi: int, x: Tensor) -> Tensor:
        rm, rv = getattr(self, f"running_mean_{gi}"), getattr(self, f"running_var_{gi}")
        with torch.no_grad():
            if self.training:
                n = x.shape[1]
                mean, var = x.mean(1), x.var(1, unbiased=False)  # (G, C)
                rm.lerp_(mean, self.momentum)
                rv.lerp_(var * n / max(n - 1, 1), self.momentum)  # unbiased, as BatchNorm1d
            else:
                mean, var = rm, rv
            return (x - mean[:, None]) * torch.rsqrt(var[:, None] + self.eps)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        outs = []
        for gi, (_, idx) in enumerate(self.groups):
            x = torch.stack([features[i] for i in idx])  # (G, B, C)
            if self.batchnorm:
                x = self._norm(gi, x)
            w, b = self.weight[gi], self.bias[gi]
            outs.append(torch.baddbmm(b[:, None, :], x, w.transpose(1, 2)))  # (G, B, K)
        return torch.cat(outs).index_select(0, self.inverse)  # (H, B, K) in key order


# ------------------------------------------------------------------------------------------------
# Training and evaluation of a bank
# ------------------------------------------------------------------------------------------------


def cosine_lr(lr: float, epoch: int, epochs: int) -> float:
    """CosineAnnealingLR(T_max=epochs, eta_min=0) stepped once per epoch (ddae:linear.py)."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


@contextlib.contextmanager
def _few_threads(device: torch.device, enabled: bool):
    """One CPU thread while only heads train (cached features): their ops are too small to split, and
    OpenMP synchronisation then costs more than the work — 30 ms instead of 1 ms per step measured on
    a loaded 2-core machine."""
    if not enabled or device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_heads(bank: HeadBank, source, ds, *, epochs: int, batch_size: int, lr: float, seed: int,
                device: torch.device, num_workers: int = 0, desc: str = "probe") -> list[float]:
    """Train every head of `bank` on the same batches of `ds`; returns the mean loss per epoch."""
    n = len(ds)
    # a last batch of one image would give BatchNorm a zero variance: drop it in that case only
    stream = BatchStream(ds, global_batch=batch_size, seed=seed, drop_last=n % batch_size == 1 and n > batch_size,
                         num_workers=num_workers if source.needs_images else 0,
                         device=device if getattr(ds, "in_memory", False) else None)
    labels_all = None if source.needs_images else source.labels
    spe, heads = stream.steps_per_epoch, len(bank.keys)
    opt = torch.optim.Adam(bank.parameters(), lr=lr)  # β (0.9, 0.999), no weight decay (torch defaults, DDAE)
    bank.train()
    losses = []
    try:
        with _few_threads(device, not source.needs_images), progress(epochs * spe, desc, "step") as bar:
            for epoch in range(epochs):
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(lr, epoch, epochs)
                total = torch.zeros((), device=device)
                for s in range(spe):
                    step = epoch * spe + s
                    if source.needs_images:
                        images, labels = next(stream)
                        feats = source.train_batch(images.to(device), step)
                        labels = labels.to(device)
                    else:
                        idx = stream.global_indices(step).to(device)
                        feats, labels = source.train_batch(idx, step), labels_all[idx]
                    logits = bank(feats)  # (H, B, K)
                    B = labels.shape[0]
                    # sum over heads of each head's mean cross-entropy: every head gets its own gradient
                    loss = F.cross_entropy(logits.flatten(0, 1), labels.repeat(heads), reduction="sum") / B
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.detach() / heads
                    bar.update(1)
                losses.append(float(total) / spe)
    finally:
        stream.close()
    return losses


@torch.no_grad()
def evaluate(bank: HeadBank, source, ds, *, batch_size: int, device: torch.device, stream: int,
             num_workers: int = 0, desc: str = "evaluate") -> Tensor:
    """Accuracy (H,) of every head on `ds` (no augmentation; noise seeded per batch)."""
    bank.eval()
    correct = torch.zeros(len(bank.keys), device=device)
    with progress(math.ceil(len(ds) / batch_size), desc, "batch") as bar:
        for b, (images, labels) in enumerate(ordered_batches(ds, batch_size, device, num_workers=num_workers)):
            logits = bank(source.eval_batch(images, stream + b))  # (H, B, K)
            correct += (logits.argmax(-1) == labels).sum(1)
            bar.update(1)
    return (correct / len(ds)).cpu()


def run_bank(model, formulation, layers, times, train_ds, eval_ds, *, num_classes, protocol: Protocol, epochs,
             batch_size, lr, seed, hflip, crop_pad, cache, device, precision, eval_stream, num_workers=0,
             desc="probe", dist: Dist | None = None) -> tuple[list[str], Tensor, list[float]]:
    """Train heads for every (layer, time) on `train_ds` in one pass; accuracies on `eval_ds`.

    With several processes (`dist`) every rank returns rank 0's accuracies, so that all ranks choose
    the same cell even if their identical head training were not bitwise identical (GPU kernels)."""
    opts = dict(device=device, precision=precision, hflip=hflip, crop_pad=crop_pad, seed=seed, dist=dist)
    if list(layers) == [RAW_LAYER]:
        live = RawLatentFeatures((train_ds.channels, train_ds.image_size, train_ds.image_size), **opts)
    else:
        live = LiveFeatures(model, formulation, layers, times, **opts)
    source = CachedFeatures(live, train_ds, batch_size, num_workers) if cache else live
    bank = HeadBank(live.keys, live.dims, num_classes, batchnorm=protocol.batchnorm, seed=seed).to(device)
    losses = train_heads(bank, source, train_ds, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                         device=device, num_workers=num_workers, desc=desc)
    acc = evaluate(bank, live, eval_ds, batch_size=batch_size, device=device, stream=eval_stream,
                   num_workers=num_workers, desc=f"{desc} eval")
    if live.dist is not None:
        acc = live.dist.broadcast(acc)
    return live.keys, acc, losses


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


def probe(run_or_ckpt: str, *, layers: str | None = None, timesteps: str | None = None, dataset: str | None = None,
          data_root: str | None = None, test_root: str | None = None, protocol: str = "ddae++",
          epochs: int | None = None, lr: float | None = None,
          batch_size: int | None = None, val_fraction: float = 0.1, hflip: bool | None = None,
          cache_features: bool | None = None, weights: str = "ema", seed: int = 0, device: str | None = None,
          plot: str | None = None, record: bool = True) -> dict:
    """Library entry of `ddaepp probe`: grid search on a validation split, final probe, test accuracy.

    `epochs`, `batch_size`, `cache_features`, `lr` = None: the paper's (CIFAR 15, 512, off, 4e-3; latent
    runs 30, 1440, off, 2e-3 B / 1e-3 L), or `DATASET_DEFAULTS`. `layers`: a spec, `all` (every block,
    and the layer-wise curve of the final probe) or `latent` (the raw-latent baseline of a latent run).
    Multi-process aware (module doc): rank 0 writes the record and plot and returns the result, the
    other ranks return {}."""
    from .evalrecord import (checkpoint_record, dataset_fingerprint, device_record, new_record_path,
                             save_record, timestamp, versions)
    from ..sample import load_for_eval

    if protocol not in PROTOCOLS:
        raise UsageError(f"--protocol {protocol!r} is not known; valid: {choices(PROTOCOLS)}")
    proto = PROTOCOLS[protocol]
    from .plots import check_png

    check_png(plot)
    for name, v in (("--epochs", epochs), ("--batch-size", batch_size)):
        if v is not None and v <= 0:
            raise UsageError(f"{name} must be positive, got {v}")
    if lr is not None and not lr > 0:
        raise UsageError(f"--lr must be positive, got {lr}")
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"--val-fraction must lie in [0, 1), got {val_fraction}")
    dist = Dist(pick_device(device) if device else None)  # several processes: this rank's device
    dev = dist.device
    precision = precision_for(dev)
    recipe, model, ckpt, weights, formulation = load_for_eval(run_or_ckpt, weights, dev)  # weights: the file used
    latent = recipe.data.dataset == "latents"
    if latent and proto.crop:
        raise UsageError("the ddae protocol's random crops are not available on cached latents (the paper's latent "
                         "probe flips only); use --protocol ddae++")
    spec = layers.strip() if isinstance(layers, str) else layers
    curve = spec == "all"
    if spec == RAW_LAYER:
        if not latent:
            raise UsageError("--layers latent is the raw-VAE-latent baseline of latent (DiT) runs; this run reads pixels")
        if timesteps is not None:
            raise UsageError("--layers latent probes the clean latent: it takes no --timesteps")
        layer_list, times = [RAW_LAYER], [RAW_TIME]
    else:
        layer_list = layer_order(model, list(model.layer_names) if curve else
                                 resolve_layers(model, spec, decoder_layers(model)))
        times = parse_times(formulation, timesteps, default=default_grid(recipe, formulation))
    train_full = load_eval_dataset(recipe, dataset=dataset, split="train", root=data_root, latent=True)
    test_ds = load_eval_dataset(recipe, dataset=dataset, split="test", root=data_root, held_out=test_root,
                                latent=True)
    check_same_classes(train_full, test_ds)
    defaults = {"epochs": EPOCHS, "batch_size": BATCH, "cache_features": False, "lr": LR,
                **(latent_defaults(recipe) if latent else DATASET_DEFAULTS.get(train_full.name, {}))}
    lr = defaults["lr"] if lr is None else lr
    epochs = defaults["epochs"] if epochs is None else epochs
    batch_size = defaults["batch_size"] if batch_size is None else batch_size
    if cache_features is None:
        cache_features = defaults["cache_features"] and not proto.crop
    if cache_features and proto.crop:
        raise UsageError("--cache-features caches both flips only; the ddae protocol's random crop cannot be "
                         "cached (use --protocol ddae++ or drop --cache-features)")
    if hflip is None:  # the paper protocol flips; a dataset trained without flips (digits) is probed without
        hflip = recipe.data.hflip if train_full.name == recipe.data.dataset else True
    crop_pad = train_full.image_size // 8 if proto.crop else 0  # DDAE: pad 4 at 32 px
    workers = recipe.data.num_workers
    common = dict(num_classes=train_full.num_classes, protocol=proto, epochs=epochs, batch_size=batch_size, lr=lr,
                  seed=seed, hflip=hflip, crop_pad=crop_pad, cache=cache_features, device=dev,
                  precision=precision, num_workers=workers, dist=dist)
    timing = {}
    n_cells = len(layer_list) * len(times)
    info(f"probe {ckpt} ({weights}): {len(layer_list)} layers × {len(times)} times on {train_full.name}, "
         f"protocol {protocol}, {epochs} epochs, batch {batch_size}, lr {lr:g}, flip {'on' if hflip else 'off'}")

    cells, val_n = [], None
    t0 = time.perf_counter()
    if n_cells == 1:
        selected_on, best = "none", (layer_list[0], times[0])
    elif val_fraction > 0:
        train_part, val_ds = stratified_split(train_full, val_fraction, seed=SPLIT_SEED)
        val_n = len(val_ds)
        keys, acc, _ = run_bank(model, formulation, layer_list, times, train_part, val_ds, eval_stream=VAL_STREAM,
                                desc="grid", **common)
        selected_on = "val"
    else:  # DDAE's own protocol: every cell trained on the full set and compared on the test set
        keys, acc, _ = run_bank(model, formulation, layer_list, times, train_full, test_ds, eval_stream=TEST_STREAM,
                                desc="grid", **common)
        selected_on = "test"
    if n_cells > 1:
        timing["grid_s"] = round(time.perf_counter() - t0, 3)
        by_key = dict(zip(keys, acc.tolist()))
        cells = [{"layer": layer, "timestep": t.text, "t": t.value, "accuracy": by_key[key_of(layer, t)]}
                 for layer in layer_list for t in times]
        best_cell = max(cells, key=lambda c: c["accuracy"])  # ties: the first (shallowest, least noisy)
        best = (best_cell["layer"], next(t for t in times if t.text == best_cell["timestep"]))

    layer, t = best
    layer_test = None
    if selected_on == "test" and not curve:
        test_acc = by_key[key_of(layer, t)]
        final_losses = None
    else:  # the chosen cell retrained on all of train; with --layers all every block at the chosen time
        t1 = time.perf_counter()
        final_layers = layer_list if curve else [layer]
        _, acc_final, final_losses = run_bank(model, formulation, final_layers, [t], train_full, test_ds,
                                              eval_stream=TEST_STREAM, desc="final", **common)
        layer_test = dict(zip(final_layers, acc_final.tolist()))
        test_acc = float(layer_test[layer])
        timing["final_s"] = round(time.perf_counter() - t1, 3)
    if not dist.main:  # rank 0 alone describes, records and plots the result
        dist.barrier()
        return {}

    record_path = new_record_path(ckpt, "probe")
    # The chosen cell's accuracy on the split it was chosen on; a single cell is chosen on nothing, so its
    # accuracy is the final one, on the test set.
    best_acc = next((c["accuracy"] for c in cells if c["layer"] == layer and c["timestep"] == t.text), test_acc)
    result = {
        "command": "probe",
        "layers": layer_list,
        "timesteps": [x.as_dict() for x in times],
        "selected_on": selected_on,
        "cells": cells,
        "best": {"layer": layer, "timestep": t.text, "t": t.value, "accuracy": best_acc,
                 "accuracy_on": selected_on if cells else "test"},
        "test_accuracy": test_acc,
        "chance": 1.0 / train_full.num_classes,
        "final_losses": final_losses,
        "timing": timing,
        "protocol": {
            **checkpoint_record(ckpt, weights, recipe),
            "protocol": asdict(proto), "epochs": epochs, "batch_size": batch_size, "lr": lr,
            "optimizer": "adam", "schedule": "cosine per epoch", "features": "global average pool",
            "noise": "fixed per image (cached)" if cache_features else "fresh per batch",
            "hflip": hflip, "crop_pad": crop_pad, "seed": seed, "world_size": dist.world,
            "model_input": ("cached VAE latent (or its cached mirror), normalised with the training cache's statistics"
                            if latent else "pixels in [-1, 1]"),
            "features_kind": "flattened clean latent (no network)" if layer_list == [RAW_LAYER] else
                             "global average pool of block tokens / maps",
            "class_condition": "null label" if getattr(model, "num_classes", 0) else "none",
            "val_fraction": val_fraction, "split_seed": SPLIT_SEED if selected_on == "val" else None,
            "dataset": {**train_full.info(), "split": "train/test", "num_train": len(train_full),
                        "num_val": val_n, "num_test": len(test_ds),
                        "train_fingerprint": dataset_fingerprint(train_full),
                        "test_fingerprint": dataset_fingerprint(test_ds)},
            "layers": layer_list, "timesteps": [x.as_dict() for x in times],
            **device_record(dev, precision), "versions": versions(), "time": timestamp(),
        },
    }
    if curve:
        result["layer_curve"] = write_layer_curve(record_path, recipe.name, layer_list, layer_test, t,
                                                  chance=result["chance"], cells=cells, selected_on=selected_on)
    if cells:
        from .plots import probe_heatmap

        png = plot or str(record_path.with_suffix(".png"))
        result["plot"] = probe_heatmap(cells, layer_list, [x.text for x in times], png,
                                       title=f"{recipe.name}: linear probe ({selected_on} accuracy)",
                                       best=(layer, t.text))
    saved = save_record(record_path, result) if record else None  # None also when the folder is read-only
    result["eval_record"] = str(saved) if saved else None
    dist.barrier()
    return result


def print_probe(result: dict) -> None:
    """Rich table (stdout): layers × timesteps, best cell marked, test accuracy below; paths on stderr."""
    from rich.table import Table

    from ..console import err, out

    times = [t["text"] for t in result["timesteps"]]
    best = result["best"]
    if result["cells"]:
        acc = {(c["layer"], c["timestep"]): c["accuracy"] for c in result["cells"]}
        table = Table("layer", *[f"t={t}" for t in times],
                      title=f"linear probe, {result['selected_on']} accuracy (%)")
        for layer in result["layers"]:
            row = []
            for t in times:
                v = f"{100 * acc[(layer, t)]:.2f}"
                row.append(f"[bold green]{v}*[/]" if (layer, t) == (best["layer"], best["timestep"]) else v)
            table.add_row(layer, *row)
        out.print(table)
    out.print(f"best: {best['layer']} at t={best['timestep']} (selected on {result['selected_on']}); "
              f"test accuracy {100 * result['test_accuracy']:.2f}% (chance {100 * result['chance']:.1f}%)",
              markup=False)
    if result.get("eval_record"):
        err.print(f"record: {result['eval_record']}", markup=False)
    if result.get("plot"):
        err.print(f"plot: {result['plot']}", markup=False)
    curve = result.get("layer_curve")
    if curve:
        err.print("test accuracy per block: " + ", ".join(f"{layer} {100 * a:.1f}" for layer, a in
                                                          zip(curve["layers"], curve["test_accuracy"])), markup=False)
        err.print(f"layer curve: {curve['png']} and {curve['json']}", markup=False)
