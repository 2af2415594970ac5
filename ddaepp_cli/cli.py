"""The `ddaepp` command line: thin wrappers that parse, load and call one library function each.

Conventions (SPEC §1): `--json` prints exactly one JSON object on stdout, everything else goes to
stderr; exit codes 0 ok, 1 unexpected failure, 2 bad usage/input, 3 weights/data unavailable
offline, 130 interrupted after a checkpoint was written.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from .errors import DdaeppError, UsageError


def _help_as_flag(option):
    if option is not None and getattr(option, "metavar", None) is None:
        option.metavar = ""  # `-h, --help` shows as a flag, not `<bool>` (see _show_flags_as_flags)
    return option


class FlagHelpCommand(TyperCommand):
    def get_help_option(self, ctx):
        return _help_as_flag(super().get_help_option(ctx))


class FlagHelpGroup(TyperGroup):
    def get_help_option(self, ctx):
        return _help_as_flag(super().get_help_option(ctx))


app = typer.Typer(
    name="ddaepp",
    cls=FlagHelpGroup,
    help="Diffusion models as unified generative and discriminative learners (DDAE++, DDAE, SRA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _shipped_recipes() -> Path:
    from .recipe import shipped_recipes_dir

    return shipped_recipes_dir()


RECIPES_DIR = _shipped_recipes()  # recipes/ of a checkout, or the copy installed in the package


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"ddaepp {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, metavar="",
                                 help="Print the version and exit."),
) -> None:
    """Diffusion models as unified generative and discriminative learners (DDAE++, DDAE, SRA)."""


def _emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def handle_errors(fn):
    """One clear line and the documented exit code for user-fixable problems; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DdaeppError as e:
            if int(os.environ.get("RANK", "0")) == 0 or e.exit_code != 2:
                print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130)
        except OSError as e:  # a user-given path that cannot be used (`--run-dir a_file/sub`, `/proc/x`)
            if e.filename is None:
                raise
            where = f"{e.filename} → {e.filename2}" if e.filename2 else str(e.filename)
            print(f"error: {where}: {e.strerror or e}", file=sys.stderr)
            raise typer.Exit(2)

    return wrapper


def _resolve_recipe_path(recipe: str) -> Path:
    """A path, or the name of a shipped recipe (`cifar10_edm_ddpmpp`)."""
    p = Path(recipe)
    if p.exists():
        return p
    for cand in (RECIPES_DIR / recipe, RECIPES_DIR / f"{recipe}.yaml"):
        if cand.is_file():
            return cand
    raise UsageError(f"recipe not found: {recipe} (a YAML path, or a shipped recipe name; see `ddaepp recipes`)")


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------


@app.command(epilog="Example: ddaepp train recipes/quickstart.yaml --run-dir runs/quick")
@handle_errors
def train(
    recipe: str = typer.Argument(..., help="Recipe YAML (or a shipped recipe name)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run folder (default runs/<recipe name>). Re-running resumes."),
    set_: List[str] = typer.Option([], "--set", help="Override a recipe key: --set train.lr=2e-4 (repeatable, YAML values)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps in total."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Shortcut for --set train.seed=N."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe, parameter counts and batch plan; train nothing."),
    num_processes: Optional[int] = typer.Option(None, "--num-processes", help="With --dry-run: plan for this many processes."),
    allow_recipe_change: bool = typer.Option(False, "--allow-recipe-change", help="Resume a run folder whose stored recipe differs."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Train a model from a recipe (resumes exactly when the run folder already has checkpoints)."""
    from .recipe import load_recipe
    from .runlock import run_lock
    from .train import dry_run as plan_run, train as run_train

    overrides = list(set_) + ([f"train.seed={seed}"] if seed is not None else [])
    rec = load_recipe(_resolve_recipe_path(recipe), overrides)
    if max_steps is not None and max_steps <= 0:
        raise UsageError(f"--max-steps must be positive, got {max_steps}")
    if num_processes is not None and num_processes <= 0:
        raise UsageError(f"--num-processes must be positive, got {num_processes}")
    if dry_run:
        world = num_processes or int(os.environ.get("WORLD_SIZE", "1"))
        out = plan_run(rec, world, max_steps)
        if json_out:
            _emit_json(out)
        else:
            _print_plan(out)
        return
    run_dir = run_dir or Path("runs") / rec.name
    with run_lock(run_dir):  # one writer per run folder: a second `train` exits 2 (runlock.py)
        result = run_train(rec, run_dir, max_steps=max_steps, allow_recipe_change=allow_recipe_change)
    if int(os.environ.get("RANK", "0")) == 0:
        if json_out:
            _emit_json(result)
        elif result["step"] > result["total_steps"]:
            limit = f"--max-steps {max_steps}" if max_steps is not None else f"the recipe's {result['total_steps']} steps"
            print(f"nothing to train: {run_dir} is already at step {result['step']}, past {limit}; "
                  f"latest checkpoint {result['checkpoint']}", file=sys.stderr)
        else:
            print(f"trained to step {result['step']}/{result['total_steps']}: {result['checkpoint']}", file=sys.stderr)


def _print_plan(out: dict) -> None:
    import yaml
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(yaml.safe_dump(out["recipe"], sort_keys=False), markup=False, highlight=False)
    table = Table(title=f"plan: {out['recipe']['name']}", show_header=False)
    rows = [("parameters", f"{out['params']:,}"), ("trainable parameters", f"{out['trainable_params']:,}"),
            ("training-only parameters", f"{out.get('aux_params', 0):,} (heads, projectors; not in the model)"),
            ("dataset size", f"{out['dataset_size']:,}" if out["dataset_size"] else "unknown until loaded"),
            ("processes", str(out["world_size"])), ("global batch", str(out["global_batch"])),
            ("per-process batch", str(out["per_process_batch"])), ("micro-batch", str(out["micro_batch"])),
            ("gradient accumulation", str(out["grad_accum"])),
            ("steps per epoch", str(out["steps_per_epoch"])), ("total steps", str(out["total_steps"])),
            ("warm-up steps", str(out["warmup_steps"]))]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


# ------------------------------------------------------------------------------------------------
# sample
# ------------------------------------------------------------------------------------------------


@app.command(epilog="Example: ddaepp sample runs/quickstart --n 64 --out samples/quick")
@handle_errors
def sample(
    run_or_ckpt: str = typer.Argument(..., help="Run folder (latest checkpoint), checkpoint folder, or its .safetensors."),
    n: Optional[int] = typer.Option(None, "--n", help="Number of images (seeds 0..N-1)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Seed range or list: 0-49999, 3,5,9."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (must not exist or be empty)."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Sampler (default: the recipe's/formulation's)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampler steps (default: the paper's)."),
    weights: str = typer.Option("ema", "--weights", help="ema or raw."),
    fmt: str = typer.Option("png,npz,grid", "--format", help="Comma list of png, npz, grid."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per forward (results do not depend on it)."),
    clip: Optional[bool] = typer.Option(None, "--clip/--no-clip", help="Clip x̂0 to [-1, 1] inside the sampler."),
    force: bool = typer.Option(False, "--force", help="Replace an output folder written by an earlier `ddaepp sample` (nothing else)."),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg-scale", help="Classifier-free guidance scale, class-conditional models (default: the recipe's; 1 = none)."),
    cfg_interval: Optional[str] = typer.Option(None, "--cfg-interval", help="Guide only for paper t in LO,HI (e.g. 0,0.89; default: the recipe's)."),
    class_label: Optional[int] = typer.Option(None, "--class-label", help="Sample this class only (default: class seed % num_classes)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Generate images with per-sample seeds (identical for any batch size or process count)."""
    from .sample import parse_formats, sample_command
    from .seeding import parse_seeds

    if (n is None) == (seeds is None):
        raise UsageError("give exactly one of --n N or --seeds A-B")
    if n is not None and n <= 0:
        raise UsageError(f"--n must be positive, got {n}")
    seed_list = list(range(n)) if n is not None else parse_seeds(seeds)
    result = sample_command(run_or_ckpt, seeds=seed_list, out=str(out) if out else None, sampler=sampler,
                            steps=steps, weights=weights, formats=parse_formats(fmt), batch_size=batch_size,
                            clip=clip, force=force, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                            class_label=class_label)
    if int(os.environ.get("RANK", "0")) == 0:
        if json_out:
            _emit_json(result)
        else:
            print(f"wrote {result['n']} images to {result['out']}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# recipes, info
# ------------------------------------------------------------------------------------------------


@app.command(epilog="Example: ddaepp recipes --json | jq '.[].name'")
@handle_errors
def recipes(json_out: bool = typer.Option(False, "--json", help="Print one JSON array on stdout.")) -> None:
    """List the shipped recipes with the paper row each reproduces."""
    from .recipe import load_recipe

    rows = []
    files = sorted(RECIPES_DIR.glob("*.yaml"))
    if not files:
        print(f"warning: no shipped recipes found in {RECIPES_DIR}; reinstall ddaepp (`pip install .` ships "
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
        _emit_json(rows)
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


@app.command(epilog="Example: ddaepp info runs/quickstart --json")
@handle_errors
def info(run_dir: Path = typer.Argument(..., help="A run folder."),
         json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout.")) -> None:
    """Summarise a run: recipe, checkpoints, last logged metrics."""
    from .checkpoint import checkpoint_recipe, list_checkpoints

    if not (run_dir / "recipe.yaml").is_file():
        raise UsageError(f"{run_dir} is not a ddaepp run folder (no recipe.yaml)")
    rec = checkpoint_recipe(run_dir)
    last = None
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        lines = [ln for ln in metrics.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if lines:
            try:
                last = json.loads(lines[-1])
            except json.JSONDecodeError:
                last = None
    out = {"run_dir": str(run_dir), "name": rec.name, "backbone": rec.model.backbone,
           "formulation": rec.diffusion.formulation, "selfcond": rec.model.selfcond.layer,
           "checkpoints": [{"step": s, "path": str(p)} for s, p in list_checkpoints(run_dir)],
           "last_metrics": last}
    if json_out:
        _emit_json(out)
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


def main(argv: Optional[List[str]] = None, prog_name: str = "ddaepp") -> None:
    """Entry point: Click's own parse errors (unknown option, `--n abc`, missing argument, unknown
    command) become one `error:` line and exit 2, like every other bad input (SPEC §1), instead of
    Click's multi-line usage box."""
    # Click's UsageError (base of BadParameter, NoSuchOption, MissingParameter): found through the public
    # typer.BadParameter, because typer ≥ 0.25 vendors its own Click and older releases use click itself.
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    try:
        rc = app(args=argv, prog_name=prog_name, standalone_mode=False)
    except usage_error as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `ddaepp`: the help is already printed
            sys.exit(2)
        if int(os.environ.get("RANK", "0")) == 0:
            where = e.ctx.command_path if e.ctx is not None else prog_name
            hint = f" (see '{where} -h')" if e.ctx is not None else ""
            msg = " ".join(e.format_message().split())  # one line, whatever Click wrapped
            print(f"error: {where}: {msg}{hint}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:  # Ctrl-C outside a command body
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)


# ------------------------------------------------------------------------------------------------
# representation analysis: probe, cka, align, noisy-classifier (DDAE §3.2–3.3, §4.1.3; DDAE++ §5.3)
# ------------------------------------------------------------------------------------------------


@app.command(epilog="Example: ddaepp probe runs/quickstart --layers out_2-4 --timesteps idx:3,idx:4,idx:5 --json")
@handle_errors
def probe(
    run_or_ckpt: str = typer.Argument(..., help="Run folder (latest checkpoint), checkpoint folder, or its .safetensors."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layer spec: out_6-9, out_6,out_9, DiT 7-9 (default: every out_k / every DiT block); all: every layer plus the layer-wise curve (PNG + JSON); latent: the flattened clean VAE latent baseline (latent runs)."),
    timesteps: Optional[str] = typer.Option(None, "--timesteps", help="Comma list in paper convention: DDPM 1,11,21; EDM idx:3,idx:4 or 0.06; RF 0.02,0.06 (default: DDAE's grid; latent runs 0.25)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="digits, cifar10, cifar100 or imagefolder (default: the recipe's)."),
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
    weights: str = typer.Option("ema", "--weights", help="ema or raw."),
    seed: int = typer.Option(0, "--seed", help="Batch order, flips, noise and head initialisation."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda when available)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Heatmap PNG (default: next to the eval record)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Linear probe: grid search over layers × timesteps in one pass, then the final probe on the test set."""
    from .latentprobe import format_checkpoints, over_checkpoints
    from .probe import print_probe, probe as run_probe

    if plot is not None and checkpoints not in (None, "latest"):
        raise UsageError("--plot names one file; with --checkpoints each checkpoint's plot goes next to its record")
    result = over_checkpoints(run_or_ckpt, checkpoints, lambda ckpt: run_probe(
        ckpt, layers=layers, timesteps=timesteps, dataset=dataset, data_root=data_root, test_root=test_root,
        protocol=protocol, epochs=epochs, lr=lr, batch_size=batch_size, val_fraction=val_fraction, hflip=hflip,
        cache_features=cache_features, weights=weights, seed=seed, device=device, plot=str(plot) if plot else None),
        score=lambda r: r["test_accuracy"], command="probe")
    if not result:  # ranks other than 0 of a multi-process launch
        return
    if json_out:
        _emit_json(result)
    elif "checkpoints" in result:
        for r in result["results"]:
            print_probe(r)
        print(format_checkpoints(result, "test accuracy (%)"), file=sys.stderr)
    else:
        print_probe(result)


@app.command(epilog="Example: ddaepp cka runs/baseline runs/selfcond --timestep idx:4 --n 2048 --plot cka.png")
@handle_errors
def cka(
    run_or_ckpt: str = typer.Argument(..., help="Run folder, checkpoint folder, or its .safetensors."),
    other: Optional[str] = typer.Argument(None, help="A second model: CKA of every layer of the first against every layer of this one."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layer spec (default: every layer)."),
    timestep: Optional[str] = typer.Option(None, "--timestep", help="Paper-convention time (default: DDAE++ Tab. 9's: 11, idx:4, 0.06; latent runs 0.25)."),
    n: int = typer.Option(2048, "--n", help="Number of images (the first N of the split)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="digits, cifar10, cifar100 or imagefolder (default: the recipe's)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Dataset folder (latent runs: the training latent cache)."),
    test_root: Optional[str] = typer.Option(None, "--test-root", help="Latent runs: the validation latent cache (default: <training cache>_val)."),
    split: str = typer.Option("test", "--split", help="train or test (latent runs: the validation cache)."),
    features: str = typer.Option("pooled", "--features", help="pooled (global average pool) or full (flattened maps; Gram form when wider than N)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per forward."),
    weights: str = typer.Option("ema", "--weights", help="ema or raw."),
    seed: int = typer.Option(0, "--seed", help="Noise seed (shared by both models)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda when available)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Heatmap PNG (default: next to the eval record)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Linear CKA between every pair of layers of one model, or layer by layer between two models."""
    from .cka import cka_command, print_cka

    result = cka_command(run_or_ckpt, other, layers=layers, timestep=timestep, n=n, dataset=dataset,
                         data_root=data_root, test_root=test_root, split=split, features=features, batch_size=batch_size, weights=weights,
                         seed=seed, device=device, plot=str(plot) if plot else None)
    if json_out:
        _emit_json(result)
    else:
        print_cka(result)


@app.command(epilog="Example: ddaepp align runs/quickstart/checkpoints/step-* --layers out_1-4 --plot align.png")
@handle_errors
def align(
    checkpoints: List[str] = typer.Argument(..., help="One or more runs/checkpoints (several: a training trajectory)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layer spec (default: every out_k)."),
    timestep: Optional[str] = typer.Option(None, "--timestep", help="Paper-convention time (default: DDAE++ Tab. 9's: 11, idx:4, 0.06)."),
    n: Optional[int] = typer.Option(None, "--n", help="Number of training images (default: all)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="digits, cifar10, cifar100 or imagefolder (default: the recipe's)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Dataset folder."),
    batch_size: int = typer.Option(512, "--batch-size", help="Images per batch; uniformity is averaged over batches (DDAE: 512)."),
    weights: str = typer.Option("ema", "--weights", help="ema or raw."),
    seed: int = typer.Option(0, "--seed", help="Noise seed."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda when available)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Alignment-vs-uniformity PNG (default: next to the eval record)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """DDAE's label-free alignment and uniformity of each layer's features (DDAE Eqs. 3-4)."""
    from .analysis import align_command, print_align

    result = align_command(checkpoints, layers=layers, timestep=timestep, n=n, dataset=dataset, data_root=data_root,
                           batch_size=batch_size, weights=weights, seed=seed, device=device,
                           plot=str(plot) if plot else None)
    if json_out:
        _emit_json(result)
    else:
        print_align(result)


@app.command(name="noisy-classifier", epilog="Example: ddaepp noisy-classifier runs/quickstart --layer out_2 --epochs 5")
@handle_errors
def noisy_classifier(
    run_or_ckpt: str = typer.Argument(..., help="Run folder, checkpoint folder, or its .safetensors."),
    layer: Optional[str] = typer.Option(None, "--layer", help="One layer (default: DDAE++ Tab. 9's for paper UNets, else the self-conditioning or middle decoder layer)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="digits, cifar10, cifar100 or imagefolder (default: the recipe's)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Dataset folder."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (default: DDAE's 15; digits 50)."),
    lr: float = typer.Option(4e-3, "--lr", help="Adam learning rate, cosine schedule (DDAE: 1e-3 × 4 GPUs)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per step (default: 512 = DDAE's 128 × 4 GPUs; digits 128)."),
    hflip: Optional[bool] = typer.Option(None, "--hflip/--no-hflip", help="Random horizontal flips (default: the recipe's data.hflip)."),
    crop: Optional[bool] = typer.Option(None, "--crop/--no-crop", help="Random crop with padding image_size/8 (default: on as DDAE, 4 px at 32 px; off for digits)."),
    n_test: Optional[int] = typer.Option(None, "--n-test", help="Test images per noise level: the first N (default: all)."),
    weights: str = typer.Option("ema", "--weights", help="ema or raw."),
    seed: int = typer.Option(0, "--seed", help="Seed of batches, noise, times and the head."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda when available)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Accuracy-vs-noise PNG (default: next to the eval record)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Noise-conditional classifier on frozen features (DDAE Eq. 5): accuracy at every noise level."""
    from .analysis import noisy_classifier as run_noisy, print_noisy

    result = run_noisy(run_or_ckpt, layer=layer, dataset=dataset, data_root=data_root, epochs=epochs, lr=lr,
                       batch_size=batch_size, hflip=hflip, crop=crop, n_test=n_test, weights=weights, seed=seed,
                       device=device,
                       plot=str(plot) if plot else None)
    if json_out:
        _emit_json(result)
    else:
        print_noisy(result)
from . import cli_eval  # noqa: E402,F401  (registers fid, segprobe)
from . import cli_latent  # noqa: E402,F401
from . import cli_import  # noqa: E402,F401  (registers import)


def _show_flags_as_flags() -> None:
    """Boolean options read `--json`, `--clip / --no-clip` in `--help`, not `--json <bool>` (recent typer,
    e.g. 0.29, prints a type for every option in its rich help unless the option has a metavar)."""
    import inspect

    for command in app.registered_commands:
        if command.cls in (None, TyperCommand):
            command.cls = FlagHelpCommand
        for param in inspect.signature(command.callback).parameters.values():
            info = param.default
            if isinstance(info, typer.models.OptionInfo) and param.annotation in (bool, "bool", Optional[bool],
                                                                                  "Optional[bool]"):
                if getattr(info, "metavar", None) is None:
                    info.metavar = ""


_show_flags_as_flags()
