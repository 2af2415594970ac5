"""`ddaepp profile-layers`: choose the self-conditioning layer from short runs (DDAE++ §4.1, §5.4).

"We conduct short, parallel training runs (e.g., 20 epochs) on each mid-to-late layer (e.g., 8-11 in
DiT-B), and select the one with lowest loss" — §5.4 shows that early loss predicts final FID and
accuracy (class-conditional DiT-B: 0.4135 / 0.4133 / 0.4136 / 0.4140 for layers 8–11, baseline 0.4141
→ layer 9). One run per candidate plus the baseline, all with the recipe's seed, so the data order, the
initial weights of the shared backbone and every per-sample draw are identical (self-conditioning adds
no randomness, and its P starts at zero: the runs start from the same function). Runs go one after
another in this process; each is an ordinary run folder, so re-running resumes unfinished ones and
skips finished ones. The score is the mean training loss over the final `window` fraction of steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from ..console import info
from ..errors import UsageError
from ..recipe import DIT_CONFIGS, Recipe, UNetConfig, replace

BASELINE = "baseline"


def candidate_layers(recipe: Recipe, spec: str) -> list[str]:
    """Expand `spec` (`8-11`, `out_6-9`, `7,9,12`) into layers the recipe's backbone can self-condition at."""
    from ..build import build_backbone
    from ..nets.taps import expand_layer_spec

    if not isinstance(recipe.model, (UNetConfig, *DIT_CONFIGS)):
        raise UsageError(f"profile-layers needs a backbone with a self-conditioning layer (ddpm, ddpmpp, dit, dit_orig); "
                         f"{recipe.name} uses {recipe.model.backbone}")
    base = replace(recipe, ["model.selfcond.layer=null"])
    names = list(build_backbone(base, device="meta").layer_names)
    # What the backbone accepts as a self-conditioning layer: a UNet's decoder outputs but the last
    # (nets/unet.py), a DiT's blocks but the last (nets/dit.py) — so the error lists only those.
    decoder = [n for n in names if n.startswith("out_")] if isinstance(recipe.model, UNetConfig) else names
    layers = expand_layer_spec(spec, decoder[:-1], backbone=recipe.model.backbone)
    for layer in layers:  # the backbone's own rule (e.g. DiT: not after the last block)
        build_backbone(replace(recipe, [f"model.selfcond.layer={json.dumps(layer)}"]), device="meta")
    return layers


def window_mean(losses: Sequence[float], window: float) -> float:
    """Mean of the last ceil(window·n) losses (at least one)."""
    k = max(1, math.ceil(window * len(losses)))
    tail = losses[-k:]
    return sum(tail) / len(tail)


def paired_margin(baseline: Sequence[float], candidate: Sequence[float], window: float) -> tuple[float, float]:
    """(baseline − candidate window mean, its noise): the runs share every per-step draw, so their
    step-by-step loss differences are paired; the noise is two standard errors of the mean difference
    over the final window (0 when the window holds a single step). A margin within it is a tie."""
    k = max(1, math.ceil(window * min(len(baseline), len(candidate))))
    d = [b - c for b, c in zip(baseline[-k:], candidate[-k:])]
    mean = sum(d) / len(d)
    if len(d) < 2:
        return mean, 0.0
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean, 2.0 * math.sqrt(var / len(d))


def read_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [rec["loss"] for rec in map(json.loads, lines) if rec.get("loss") is not None]


def profile_layers(recipe: Recipe, spec: str, run_dir: str | Path, *, steps: int | None = None,
                   epochs: float | None = None, window: float = 0.25, plot: str | Path | None = None) -> dict[str, Any]:
    """Train the baseline and one run per candidate layer; return the scores and the best layer."""
    from ..build import dataset_geometry
    from .runlock import run_lock
    from .train import make_plan, train

    if (steps is None) == (epochs is None):
        raise UsageError("give exactly one of --steps N or --epochs E")
    if not 0.0 < window <= 1.0:
        raise UsageError(f"--window must be in (0, 1], got {window}")
    if recipe.contrastive.enabled and recipe.contrastive.layer is None:
        # contrastive.layer unset follows model.selfcond.layer, which the baseline run does not have
        raise UsageError("profile-layers: contrastive.layer follows the self-conditioning layer, which the "
                         "baseline run has none of; fix it for every run with --set contrastive.layer=LAYER "
                         "(e.g. out_7), or profile the recipe without Aug + CL (DDAE++ Sec. 4.1 chooses the "
                         "layer before adding them)")
    layers = candidate_layers(recipe, spec)
    if epochs is not None:
        if epochs <= 0:
            raise UsageError(f"--epochs must be positive, got {epochs}")
        spe = make_plan(recipe, 1, dataset_geometry(recipe.data)[2]).steps_per_epoch
        if spe is None:
            raise UsageError("--epochs needs the dataset size; give --steps N instead")
        steps = max(1, round(epochs * spe))
    if steps <= 0:
        raise UsageError(f"--steps must be positive, got {steps}")
    run_dir = Path(run_dir)
    # Same seed everywhere; per-step losses for the curves; no grids (they would cost more than the runs).
    common = ["train.log_every=1", "train.sample_every=0", f"train.checkpoint_every={steps}"]
    curves: dict[str, list[float]] = {}
    for layer in [BASELINE, *layers]:
        value = "null" if layer == BASELINE else json.dumps(layer)
        rec = replace(recipe, common + [f"model.selfcond.layer={value}"])
        folder = run_dir / (BASELINE if layer == BASELINE else f"layer-{layer}")
        info(f"profile-layers: {'baseline' if layer == BASELINE else 'layer ' + layer}, {steps} steps -> {folder}")
        with run_lock(folder):  # one writer per run folder, as `ddaepp train` (runlock.py)
            train(rec, folder, max_steps=steps)
        curves[layer] = read_losses(folder)
    scores = {layer: window_mean(c, window) for layer, c in curves.items()}
    best = min(layers, key=lambda name: scores[name])  # first of equals: the earliest layer
    margin, noise = paired_margin(curves[BASELINE], curves[best], window)
    verdict = "tie" if abs(margin) <= noise else ("better" if margin > 0 else "worse")
    result = {"recipe": recipe.name, "steps": steps, "window": window, "baseline": scores[BASELINE],
              "losses": {k: scores[k] for k in layers}, "best": best, "best_loss": scores[best],
              "margin": margin, "noise": noise, "verdict": verdict,
              "beats_baseline": verdict == "better", "run_dir": str(run_dir)}
    if plot is not None:
        result["plot"] = str(plot_curves(curves, Path(plot), title=f"{recipe.name}: self-conditioning layer"))
    return result


def plot_curves(curves: dict[str, list[float]], path: Path, *, title: str) -> Path:
    """Training-loss curves (moving average over ~5 % of the steps) of every run, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, losses in curves.items():
        y = np.asarray(losses, dtype=float)
        k = max(1, len(y) // 20)
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k, len(y) + 1), smooth, label=name if name == BASELINE else f"layer {name}",
                linestyle="--" if name == BASELINE else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving average)")
    ax.set_title(title)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def format_table(result: dict[str, Any]) -> str:
    rows = [f"{'baseline':>10}  {result['baseline']:.6f}"]
    rows += [f"{'layer ' + k:>10}  {v:.6f}{'  <- best' if k == result['best'] else ''}"
             for k, v in result["losses"].items()]
    if "verdict" in result:
        word = {"tie": "a tie with", "better": "better than", "worse": "worse than"}[result["verdict"]]
        rows.append(f"layer {result['best']} is {word} the baseline: margin {result['margin']:+.6f}, "
                    f"noise ±{result['noise']:.6f} (2 standard errors of the paired per-step differences)")
    return "\n".join(rows)


__all__ = ["candidate_layers", "format_table", "profile_layers", "window_mean"]
