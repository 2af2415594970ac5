"""Linear CKA (Kornblith et al., 2019) between layers of one model or of two (DDAE++ §5.3, Fig. 7).

For representations X (N, Dx) and Y (N, Dy) of the same N inputs, centred column-wise,

    CKA(X, Y) = ‖YᵀX‖²_F / (‖XᵀX‖_F · ‖YᵀY‖_F)          (Kornblith et al. Eq. 5, feature space)
              = ⟨XXᵀ, YYᵀ⟩_F / (‖XXᵀ‖_F · ‖YYᵀ‖_F)        (the same with N × N Gram matrices).

The feature-space form costs N·Dx·Dy and never builds an N × N matrix: it is used whenever both
widths are below N (pooled features); the Gram form, N²·D per layer and N² per pair, otherwise
(`--features full`, flattened maps wider than N). CKA is invariant to orthogonal transforms and
isotropic scaling of either side, not to general invertible linear maps (tests/test_cka.py).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..console import info
from ..errors import UsageError

FEATURES = ("pooled", "full")
N_DEFAULT = 2048


def center(x: Tensor) -> Tensor:
    """Subtract the column means: (N, D) → (N, D)."""
    return x - x.mean(dim=0, keepdim=True)


def cka_feature_space(x: Tensor, y: Tensor) -> float:
    """Linear CKA from (N, D) features without N × N matrices (float64)."""
    x, y = center(x.double()), center(y.double())
    cross = (y.T @ x).square().sum()  # ‖YᵀX‖²_F, (Dy, Dx) intermediate
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()))


def cka_gram(x: Tensor, y: Tensor) -> float:
    """Linear CKA through the centred N × N Gram matrices (float64)."""
    x, y = center(x.double()), center(y.double())
    k, l = x @ x.T, y @ y.T  # (N, N): centred features give centred Grams, HKH = XcXcᵀ
    return float((k * l).sum() / (k.norm() * l.norm()))


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA, in feature space when both widths are below N, else through Gram matrices."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same inputs on both sides: {x.shape[0]} vs {y.shape[0]} rows")
    n = x.shape[0]
    return cka_feature_space(x, y) if max(x.shape[1], y.shape[1]) < n else cka_gram(x, y)


class _Side:
    """Centred features of one layer with the pieces CKA needs, each computed at most once."""

    def __init__(self, x: Tensor):
        self.n, self.d = x.shape
        self.wide = self.d >= self.n
        # Wide layers keep float32 features (a flattened 128×32×32 map of 2,048 images is 1 GiB);
        # their Gram matrix is accumulated in float32 and kept in float64.
        self.x = center(x.float() if self.wide else x.double())
        self._gram = None
        self.norm = float(self.gram().norm() if self.wide else (self.x.T @ self.x).norm())

    def gram(self) -> Tensor:
        if self._gram is None:
            self._gram = (self.x @ self.x.T).double()  # (N, N)
        return self._gram


def cka_matrix(a: Sequence[Tensor], b: Sequence[Tensor] | None = None) -> Tensor:
    """CKA between every feature set of `a` and every one of `b` (default `a`): (len(a), len(b)).

    Each pair uses the feature-space form when both widths are below N, else Gram matrices
    (computed once per layer). Within one model the matrix is symmetric: half is computed.
    """
    sa = [_Side(x) for x in a]
    sb = sa if b is None else [_Side(y) for y in b]
    if any(s.n != sa[0].n for s in sa + sb):
        raise ValueError("CKA needs the same inputs for every layer")
    out = torch.empty(len(sa), len(sb), dtype=torch.float64)
    for i, p in enumerate(sa):
        for j, q in enumerate(sb):
            if b is None and j < i:
                out[i, j] = out[j, i]
                continue
            if p.wide or q.wide:
                cross = (p.gram() * q.gram()).sum()
            else:
                cross = (q.x.T @ p.x).square().sum()  # ‖YᵀX‖²_F
            out[i, j] = float(cross) / (p.norm * q.norm)
    return out


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def model_features(model, formulation, ds, layers, t: float, *, n: int, batch_size: int, seed: int, device,
                   precision: str, full: bool, desc: str) -> dict[str, Tensor]:
    """(n, D) features per layer: pooled (D = C) or flattened maps (D = C·H·W), on the CPU."""
    from ..console import progress
    from .features import model_input, noised_features, ordered_batches, per_batch_generator

    out: dict[str, list[Tensor]] = {name: [] for name in layers}
    with progress(math.ceil(n / batch_size), desc, "batch") as bar:
        for b, (images, _) in enumerate(ordered_batches(ds, batch_size, device, limit=n)):
            g = per_batch_generator(device, seed, 1 + b)  # the same noise for every model compared
            feats = noised_features(model, formulation, model_input(images), t, layers, generator=g,
                                    pooled=not full, precision=precision)
            for name in layers:
                out[name].append(feats[name].flatten(1).cpu())
            bar.update(1)
    return {name: torch.cat(v) for name, v in out.items()}


def cka_command(run_or_ckpt: str, other: str | None = None, *, layers: str | None = None, timestep: str | None = None,
                n: int = N_DEFAULT, dataset: str | None = None, data_root: str | None = None,
                test_root: str | None = None, split: str = "test",
                features: str = "pooled", batch_size: int = 256, weights: str = "ema", seed: int = 0,
                device: str | None = None, plot: str | None = None, record: bool = True) -> dict:
    """Library entry of `ddaepp cka`: all layer pairs of one model, or every layer of A against B."""
    from ..build import build_formulation
    from .evalrecord import (checkpoint_record, dataset_fingerprint, device_record, new_record_path,
                             save_record, timestamp, versions)
    from .features import (check_choice, default_time, layer_order, load_eval_dataset, parse_times,
                           pick_device, precision_for)
    from .plots import check_png, cka_heatmap
    from ..sample import load_for_eval, load_model

    check_choice("--features", features, FEATURES)
    check_choice("--split", split, ("train", "test"))
    check_png(plot)
    if n < 2:
        raise UsageError(f"--n must be at least 2, got {n}")
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    dev = pick_device(device)
    precision = precision_for(dev)
    recipe, model, ckpt, weights, form = load_for_eval(run_or_ckpt, weights, dev)  # weights: the file used
    ds = load_eval_dataset(recipe, dataset=dataset, split=split, root=data_root, held_out=test_root, latent=True)
    n = min(n, len(ds))
    text = timestep or default_time(recipe, form)
    t = parse_times(form, text, default=())[0]
    names = layer_order(model, model.resolve_layers(layers) if layers else list(model.layer_names))
    fa = model_features(model, form, ds, names, t.value, n=n, batch_size=batch_size, seed=seed, device=dev,
                        precision=precision, full=features == "full", desc="features A")
    result = {"command": "cka", "layers": names, "timestep": t.as_dict(), "n": n, "features": features}
    models = [checkpoint_record(ckpt, weights, recipe)]
    if other is None:
        matrix = cka_matrix([fa[k] for k in names])
        result["matrix"] = matrix.tolist()
        rows, cols, title = names, names, f"{recipe.name}: linear CKA between layers (t={t.text})"
        xlabel = ylabel = "layer"
    else:
        recipe_b, model_b, ckpt_b = load_model(other, weights, dev)
        form_b = build_formulation(recipe_b)
        t_b = parse_times(form_b, text, default=())[0]
        names_b = layer_order(model_b, model_b.resolve_layers(layers) if layers else list(model_b.layer_names))
        from ..build import dataset_geometry

        if dataset_geometry(recipe_b.data)[:2] != dataset_geometry(recipe.data)[:2]:
            raise UsageError(f"{other} reads images of another size or channel count than {run_or_ckpt}")
        if (recipe_b.data.dataset == "latents") != (recipe.data.dataset == "latents"):
            raise UsageError(f"{run_or_ckpt} and {other}: one reads VAE latents, the other pixels; compare like with like")
        if recipe.data.dataset == "latents":
            from ..data.latentstore import read_manifest

            sha = [(read_manifest(r.data.root).get("vae") or {}).get("sha256") for r in (recipe, recipe_b)]
            if sha[0] != sha[1]:
                raise UsageError(f"{run_or_ckpt} and {other} were trained on latents of different VAEs; CKA needs "
                                 "the same inputs for both")
        del model
        fb = model_features(model_b, form_b, ds, names_b, t_b.value, n=n, batch_size=batch_size, seed=seed,
                            device=dev, precision=precision, full=features == "full", desc="features B")
        matrix = cka_matrix([fa[k] for k in names], [fb[k] for k in names_b])
        result.update(other_layers=names_b, matrix=matrix.tolist(),
                      layerwise={k: float(matrix[i, names_b.index(k)]) for i, k in enumerate(names) if k in names_b})
        models.append(checkpoint_record(ckpt_b, weights, recipe_b))
        rows, cols = names, names_b
        title, ylabel, xlabel = f"linear CKA: {recipe.name} vs {recipe_b.name} (t={t.text})", recipe.name, recipe_b.name
    widths = {k: int(v.shape[1]) for k, v in fa.items()}
    result["form"] = {k: ("feature space" if w < n else "gram") for k, w in widths.items()}
    record_path = new_record_path(ckpt, "cka")
    result["protocol"] = {
        "models": models, "timestep": t.as_dict(), "n": n, "features": features, "batch_size": batch_size,
        "noise": "seeded per batch, shared by both models", "seed": seed, "layers": names,
        "dataset": {**ds.info(), "fingerprint": dataset_fingerprint(ds), "images_used": n},
        **device_record(dev, precision), "versions": versions(), "time": timestamp(),
    }
    result["plot"] = cka_heatmap(matrix.numpy(), rows, cols, plot or record_path.with_suffix(".png"), title=title,
                                 xlabel=xlabel, ylabel=ylabel)
    result["eval_record"] = str(save_record(record_path, result)) if record else None
    info(f"linear CKA on {n} {ds.name} {split} images at t={t.text}, {features} features")
    return result


def print_cka(result: dict) -> None:
    from rich.table import Table

    from ..console import err, out

    rows, cols = result["layers"], result.get("other_layers", result["layers"])
    title = "linear CKA" + (" (rows: A, columns: B)" if "other_layers" in result else "")
    table = Table("", *cols, title=title)
    for name, row in zip(rows, result["matrix"]):
        table.add_row(name, *[f"{v:.2f}" for v in row])
    out.print(table)
    for key in ("eval_record", "plot"):
        if result.get(key):
            err.print(f"{key.replace('_', ' ')}: {result[key]}", markup=False)
