"""Latent-run settings of `ddaepp probe`, its layer-wise curve, and evaluation over several checkpoints.

Latent (DiT) runs follow DDAE++ Tab. 10's ImageNet linear probe: batch 1440, 30 epochs, Adam at 2e-3
for DiT-B and 1e-3 for DiT-L (XL, which the table does not list, takes L's), cosine schedule, flip as
the only augmentation, and Tab. 9's time t = 0.25 (features.LATENT_TIME). The input is the cached
latent or, for a flipped sample, the cached latent of the mirrored image (what training saw).

`--layers all` writes the layer-wise curve (DDAE++ Fig. 5): every block probed at the chosen time on the
full training set and tested, as `<record>.layers.png` and `<record>.layers.json`.

`--checkpoints all|latest|100000,200000`: one evaluation per checkpoint (`checkpoint.select_checkpoints`),
then the best by the command's score (DDAE++ App. B reports the best of several checkpoints).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

LATENT_EPOCHS, LATENT_BATCH = 30, 1440  # DDAE++ Tab. 10, ImageNet linear probing
LATENT_LR = {"B": 2e-3, "L": 1e-3, "XL": 1e-3}  # Tab. 10: 2e-3 (B) / 1e-3 (L)


def latent_defaults(recipe) -> dict:
    size = str(getattr(recipe.model, "size", "B") or "B").upper()
    return {"epochs": LATENT_EPOCHS, "batch_size": LATENT_BATCH, "cache_features": False,
            "lr": LATENT_LR.get(size, LATENT_LR["L"])}


def write_layer_curve(record_path: Path, name: str, layers: Sequence[str], test: dict, t, *, chance: float,
                      cells: list, selected_on: str) -> dict:
    """Fig. 5's curve as PNG + JSON beside the eval record; returns their paths and the values."""
    from .evalrecord import save_record
    from .plots import layer_curve

    acc = [float(test[layer]) for layer in layers]
    data = {"timestep": t.as_dict(), "layers": list(layers), "test_accuracy": acc, "chance": chance,
            "grid_accuracy": {f"{c['layer']}@{c['timestep']}": c["accuracy"] for c in cells},
            "grid_selected_on": selected_on,
            "protocol": "every block probed at the chosen time on the full training set, tested on the held-out split"}
    png = layer_curve(layers, acc, record_path.with_suffix(".layers.png"),
                      title=f"{name}: linear probe per block (t={t.text})", ylabel="test accuracy (%)",
                      chance=chance)
    saved = save_record(record_path.with_suffix(".layers.json"), data)
    return {"png": png, "json": str(saved) if saved else None, "layers": list(layers), "test_accuracy": acc}


def over_checkpoints(run_or_ckpt: str, spec: str | None, evaluate: Callable[[str], dict],
                     score: Callable[[dict], float], command: str) -> dict:
    """`evaluate` on every checkpoint `spec` selects; one checkpoint returns its result unchanged, several
    a summary {checkpoints: [...], best: {...}} with every full result under `results`."""
    from ..checkpoint import checkpoint_step, select_checkpoints
    from ..distributed import Dist, world_size

    if world_size() > 1:
        Dist()  # the process group first: every rank then evaluates rank 0's list (select_checkpoints)
    ckpts = select_checkpoints(run_or_ckpt, spec)
    if len(ckpts) == 1:
        return evaluate(str(ckpts[0]))
    results = []
    for c in ckpts:
        r = evaluate(str(c))
        if not r:  # ranks other than 0
            continue
        results.append(r)
    if not results:
        return {}
    rows = [{"checkpoint": str(c), "step": checkpoint_step(c), "score": score(r),
             "eval_record": r.get("eval_record")} for c, r in zip(ckpts, results)]
    best = max(rows, key=lambda row: row["score"])  # ties: the earliest
    return {"command": command, "checkpoints": rows, "best": best, "results": results}


def format_checkpoints(result: dict, label: str) -> str:
    lines = [f"{'step':>10}  {label}"]
    for row in result["checkpoints"]:
        mark = "  *best" if row is result["best"] or row == result["best"] else ""
        lines.append(f"{row['step']:>10}  {100 * row['score']:.2f}{mark}")
    return os.linesep.join(lines)
