"""`ddaepp train`, `sample`, `recipes` and `info`: training, generation and what a run holds."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UsageError
from . import base
from .base import (check_run_or_ckpt, command, emit_json, json_option, report, resolve_recipe_path, run_argument,
                   threads_option, weights_option)
from ..threads import busy_hint, use_threads


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------


@command(epilog="Example: ddaepp train recipes/quickstart.yaml --run-dir runs/quick")
def train(
    recipe: str = typer.Argument(..., help="Recipe YAML (or a shipped recipe name)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run folder (default runs/<recipe name>). Re-running resumes."),
    set_: List[str] = typer.Option([], "--set", help="Override a recipe key: --set train.lr=2e-4 (repeatable, YAML values)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps in total."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Shortcut for --set train.seed=N."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe, parameter counts and batch plan; train nothing."),
    num_processes: Optional[int] = typer.Option(None, "--num-processes", help="With --dry-run: plan for this many processes."),
    allow_recipe_change: bool = typer.Option(False, "--allow-recipe-change", help="Resume a run folder whose stored recipe differs."),
    resume_from: Optional[int] = typer.Option(None, "--resume-from", metavar="STEP", help="Resume from this step's checkpoint instead of the latest; the checkpoints after it are moved aside to checkpoints/set-aside-step-N (not deleted)."),
    log_with: Optional[str] = typer.Option(None, "--log-with", metavar="TRACKER", help="Experiment tracker through Accelerate: none, tensorboard, wandb or all-installed (shortcut for --set train.log_with=...; files in RUN/tracker/; see docs/tracking.md)."),
    threads: Optional[int] = threads_option(),
    json_out: bool = json_option(),
) -> None:
    """Train a model from a recipe (resumes exactly when the run folder already has checkpoints)."""
    from ..recipe import load_recipe

    # Everything checkable without torch first: a wrong path or key is answered at once.
    overrides = list(set_) + ([f"train.seed={seed}"] if seed is not None else []) + \
        ([f"train.log_with={log_with}"] if log_with is not None else [])
    rec = load_recipe(resolve_recipe_path(recipe), overrides)
    from ..training.tracking import resolve as resolve_trackers

    trackers = resolve_trackers(rec.train.log_with)  # a missing tensorboard / wandb: exit 3, before torch
    if max_steps is not None and max_steps <= 0:
        raise UsageError(f"--max-steps must be positive, got {max_steps}")
    if num_processes is not None and num_processes <= 0:
        raise UsageError(f"--num-processes must be positive, got {num_processes}")
    if resume_from is not None and dry_run:
        raise UsageError("--resume-from resumes a run; --dry-run trains nothing: give one of them")
    if resume_from is not None and resume_from <= 0:
        raise UsageError(f"--resume-from must be a checkpoint's step (positive), got {resume_from}")
    use_threads(threads)
    import torch

    from ..training.runlock import run_lock
    from ..training.train import dry_run as plan_run, train as run_train

    if dry_run:
        world = num_processes or int(os.environ.get("WORLD_SIZE", "1"))
        out = plan_run(rec, world, max_steps) | {"threads": torch.get_num_threads(), "trackers": trackers}
        report(out, json_out, _print_plan)
        return
    run_dir = run_dir or Path("runs") / rec.name
    hint = busy_hint(torch.get_num_threads()) if not torch.cuda.is_available() else None
    if hint and int(os.environ.get("RANK", "0")) == 0:
        print(hint, file=sys.stderr)
    with run_lock(run_dir):  # one writer per run folder: a second `train` exits 2 (runlock.py)
        result = run_train(rec, run_dir, max_steps=max_steps, allow_recipe_change=allow_recipe_change,
                           resume_step=resume_from,
                           resume_command=_train_command(recipe, run_dir, overrides, max_steps, allow_recipe_change,
                                                         threads))
    if int(os.environ.get("RANK", "0")) == 0:
        if json_out:
            emit_json(result)
        elif result["step"] > result["total_steps"]:
            limit = f"--max-steps {max_steps}" if max_steps is not None else f"the recipe's {result['total_steps']} steps"
            print(f"nothing to train: {run_dir} is already at step {result['step']}, past {limit}; "
                  f"latest checkpoint {result['checkpoint']}", file=sys.stderr)
        else:
            print(f"trained to step {result['step']}/{result['total_steps']}: {result['checkpoint']}", file=sys.stderr)


def _train_command(recipe: str, run_dir: Path, overrides: list[str], max_steps: int | None,
                   allow_recipe_change: bool, threads: int | None) -> str:
    """This `ddaepp train` command line as typed (less --resume-from): the refusal of a damaged checkpoint
    appends `--resume-from N` to it."""
    import shlex

    words = ["ddaepp", "train", recipe, "--run-dir", str(run_dir)]
    for o in overrides:
        words += ["--set", o]
    if max_steps is not None:
        words += ["--max-steps", str(max_steps)]
    if allow_recipe_change:
        words.append("--allow-recipe-change")
    if threads is not None:
        words += ["--threads", str(threads)]
    return shlex.join(words)


def _print_plan(out: dict) -> None:
    import yaml
    from rich.console import Console
    from rich.table import Table

    console = Console()
    text = yaml.safe_dump(out["recipe"], sort_keys=False)
    console.print(_explain_augment(text, out["recipe"].get("augment") or {}), markup=False, highlight=False,
                  soft_wrap=True)
    table = Table(title=f"plan: {out['recipe']['name']}", show_header=False)
    rows = [("parameters", f"{out['params']:,}"), ("trainable parameters", f"{out['trainable_params']:,}"),
            ("training-only parameters", f"{out.get('aux_params', 0):,} (heads, projectors; not in the model)"),
            ("dataset size", f"{out['dataset_size']:,}" if out["dataset_size"] else "unknown until loaded"),
            ("processes", str(out["world_size"])), ("global batch", str(out["global_batch"])),
            ("per-process batch", str(out["per_process_batch"])), ("micro-batch", str(out["micro_batch"])),
            ("gradient accumulation", str(out["grad_accum"])),
            ("steps per epoch", str(out["steps_per_epoch"])), ("total steps", str(out["total_steps"])),
            ("warm-up steps", str(out["warmup_steps"]))]
    if out.get("trackers"):
        rows.append(("trackers", f"{', '.join(out['trackers'])} (in RUN/tracker/; docs/tracking.md)"))
    if "threads" in out:
        rows.append(("CPU threads", f"{out['threads']} per process (--threads, OMP_NUM_THREADS)"))
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


AUGMENT_MULTIPLIERS = ("xflip", "yflip", "scale", "rotate_frac", "aniso", "translate_frac")


def _explain_augment(text: str, augment: dict) -> str:
    """The dumped recipe with a comment on each augmentation multiplier: the share of images it touches.
    EDM's AugmentPipe applies a transform with probability multiplier × p, so x-flip's 1e8 means "always
    considered" — and a considered flip is a coin toss, so half the images are flipped."""
    p = float(augment.get("p", 0.0))

    def note(key: str, mult: float) -> str:
        prob = min(1.0, mult * p)
        share = "≥ 1: every image" if prob >= 1 else f"= {prob:.0%} of images"
        return f"× p {share}" + (" considered, half of them flipped" if key in ("xflip", "yflip") else "")

    lines, section = [], None
    for line in text.splitlines():
        if not line.startswith(" "):
            section = line.rstrip(":")
        key, _, value = line.strip().partition(": ")
        if section == "augment" and key in AUGMENT_MULTIPLIERS and isinstance(augment.get(key), (int, float)):
            mult = float(augment[key])
            shown = f"{mult:.1e}".replace("e+0", "e+") if mult >= 1e6 else value  # 100000000.0 → 1.0e+8 (YAML float)
            line = f"  {key}: {shown}  # {note(key, mult)}"
        lines.append(line)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# sample
# ------------------------------------------------------------------------------------------------


@command(epilog="Example: ddaepp sample runs/quickstart --n 64 --out samples/quick")
def sample(
    run_or_ckpt: str = run_argument(),
    n: Optional[int] = typer.Option(None, "--n", help="Number of images (seeds 0..N-1)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Seed range or list: 0-49999, 3,5,9."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (must not exist or be empty)."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Sampler (default: the recipe's/formulation's)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampler steps (default: the paper's)."),
    churn: Optional[float] = typer.Option(None, "--churn", help="EDM's stochastic Heun sampler: S_churn (0 = the deterministic one; default: the recipe's sample.s_churn)."),
    weights: str = weights_option(),
    fmt: str = typer.Option("png,npz,grid", "--format", help="Comma list of png, npz, grid."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per forward (results do not depend on it)."),
    clip: Optional[bool] = typer.Option(None, "--clip/--no-clip", help="Clip x̂0 to [-1, 1] inside the sampler."),
    force: bool = typer.Option(False, "--force", help="Replace an output folder written by an earlier `ddaepp sample` (nothing else)."),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg-scale", help="Classifier-free guidance scale, class-conditional models (default: the recipe's; 1 = none)."),
    cfg_interval: Optional[str] = typer.Option(None, "--cfg-interval", help="Guide only for paper t in LO,HI (e.g. 0,0.89; default: the recipe's)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Class labels, class-conditional models: random (uniform per seed, as DiT/SiT/REPA/SRA sample) or balanced (seed % num_classes); default: the recipe's sample.labels (random)."),
    class_label: Optional[int] = typer.Option(None, "--class-label", help="Sample this class only (instead of --labels)."),
    threads: Optional[int] = threads_option(),
    json_out: bool = json_option(),
) -> None:
    """Generate images with per-sample seeds (identical for any batch size or process count)."""
    if (n is None) == (seeds is None):
        raise UsageError("give exactly one of --n N or --seeds A-B")
    if n is not None and n <= 0:
        raise UsageError(f"--n must be positive, got {n}")
    if seeds is not None:
        from ..seedlist import parse_seeds  # torch-free

        seed_list = parse_seeds(seeds)
    else:
        seed_list = list(range(n))
    check_run_or_ckpt(run_or_ckpt)  # before torch: a wrong path is answered at once
    use_threads(threads)
    from ..sample import parse_formats, sample_command

    result = sample_command(run_or_ckpt, seeds=seed_list, out=str(out) if out else None, sampler=sampler,
                            steps=steps, weights=weights, formats=parse_formats(fmt), batch_size=batch_size,
                            clip=clip, force=force, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                            class_label=class_label, labels=labels, churn=churn)
    if int(os.environ.get("RANK", "0")) == 0:
        if json_out:
            emit_json(result)
        else:
            print(f"wrote {result['n']} images to {result['out']}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# recipes, info
# ------------------------------------------------------------------------------------------------


@command(epilog="Example: ddaepp recipes --json | jq '.[].name'")
def recipes(json_out: bool = json_option("Print one JSON array on stdout.")) -> None:
    """List the shipped recipes with the paper row each reproduces."""
    from ..recipe import load_recipe

    rows = []
    files = sorted(base.RECIPES_DIR.glob("*.yaml"))
    if not files:
        print(f"warning: no shipped recipes found in {base.RECIPES_DIR}; reinstall ddaepp (`pip install .` ships "
              f"them in ddaepp_cli/recipes/) or pass a recipe file's path", file=sys.stderr)
    for p in files:
        header = []
        for line in p.read_text(encoding="utf-8").splitlines():
            if not line.startswith("#"):
                break
            header.append(line.lstrip("# ").rstrip())
        rec = load_recipe(p)
        rows.append({"name": p.stem, "path": str(p), "backbone": rec.model.backbone,
                     "formulation": rec.diffusion.formulation, "dataset": rec.data.dataset,
                     "selfcond": rec.model.selfcond.layer, "about": header[0] if header else ""})
    if json_out:
        emit_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()  # 80 columns when piped (or $COLUMNS)
    if console.width < 130:  # too narrow for the table: one block per recipe, the paper row wrapped
        import textwrap

        for r in rows:
            about = r["about"].removeprefix("DDAE++ ")
            print(f"{r['name']}  [{r['dataset']}, {r['formulation']}, {r['backbone']}, "
                  f"self-cond {r['selfcond'] or '-'}]")
            if about:
                print(textwrap.fill(about, width=max(40, console.width), initial_indent="    ",
                                    subsequent_indent="    "))
        return
    table = Table()
    table.add_column("recipe", no_wrap=True)
    for col in ("data", "form.", "backbone", "SC"):
        table.add_column(col, no_wrap=True)
    table.add_column("reproduces")
    for r in rows:
        about = r["about"].removeprefix("DDAE++ ")
        table.add_row(r["name"], r["dataset"], r["formulation"], r["backbone"], r["selfcond"] or "-", about)
    console.print(table)


@command(epilog="Examples: ddaepp info runs/quickstart --json; ddaepp info runs/quickstart --plot")
def info(run_dir: Path = typer.Argument(..., help="A run folder."),
         plot: bool = typer.Option(False, "--plot", help="Draw the training curves of metrics.jsonl (loss and its "
                                   "parts, learning rate, gradient norm, images/s) into RUN/training_curves.png."),
         json_out: bool = json_option()) -> None:
    """Summarise a run: recipe, checkpoints, last logged metrics; --plot draws the training curves."""
    if not (run_dir / "recipe.yaml").is_file():
        raise UsageError(f"{run_dir} is not a ddaepp run folder (no recipe.yaml)")
    from ..checkpoint import checkpoint_recipe, list_checkpoints
    from ..training.metrics import read_metrics

    rec = checkpoint_recipe(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    last = records[-1] if records else None
    out = {"run_dir": str(run_dir), "name": rec.name, "backbone": rec.model.backbone,
           "formulation": rec.diffusion.formulation, "selfcond": rec.model.selfcond.layer,
           "checkpoints": [{"step": s, "path": str(p)} for s, p in list_checkpoints(run_dir)],
           "last_metrics": last}
    if plot:
        if not records:
            raise UsageError(f"{run_dir / 'metrics.jsonl'} holds no logged step yet: nothing to plot")
        from ..eval.plots import training_curves

        out["plot"] = training_curves(records, run_dir / "training_curves.png",
                                      title=f"{rec.name}: training ({run_dir})")
    if json_out:
        emit_json(out)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run {run_dir}", show_header=False)
    for k, v in (("recipe", rec.name), ("backbone", rec.model.backbone), ("formulation", rec.diffusion.formulation),
                 ("self-conditioning", rec.model.selfcond.layer or "-"),
                 ("checkpoints", ", ".join(f"step {c['step']}" for c in out["checkpoints"]) or "none")):
        table.add_row(k, str(v))
    if last:
        table.add_row("last logged", "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in last.items()))
    Console().print(table)
    if "plot" in out:
        print(f"plot: {out['plot']}", file=sys.stderr)
