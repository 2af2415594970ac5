"""What every command module shares: the Typer `app`, error handling (one line, the documented exit code),
JSON output and recipe look-up. Command modules import this; nothing here imports them."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

from ..errors import DdaeppError, Interrupted, UsageError
from ..failures import close_launch, lost_peer, stop_together, watch_failures, world_size


def _help_as_flag(option):
    if option is not None and getattr(option, "metavar", None) is None:
        option.metavar = ""  # `-h, --help` shows as a flag, not `<bool>` (see _show_flags_as_flags)
    return option


def _plain_argument(piece: str) -> str:
    """`{source}` → `SOURCE`, `[other]` → `[OTHER]`: Click's usage convention, which typer ≥ 0.2x replaced
    by braces around required arguments (`Usage: ddaepp import [OPTIONS] {source}`)."""
    m = re.fullmatch(r"\{(\w+)\}(\.\.\.)?|\[([a-z]\w*)\](\.\.\.)?", piece)
    if m is None:
        return piece
    if m.group(1):
        return m.group(1).upper() + (m.group(2) or "")
    return f"[{m.group(3).upper()}]" + (m.group(4) or "")


class FlagHelpCommand(TyperCommand):
    def get_help_option(self, ctx):
        return _help_as_flag(super().get_help_option(ctx))

    def collect_usage_pieces(self, ctx):
        return [_plain_argument(p) for p in super().collect_usage_pieces(ctx)]


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
    from ..recipe import shipped_recipes_dir

    return shipped_recipes_dir()


RECIPES_DIR = _shipped_recipes()  # recipes/ of a checkout, or the copy installed in the package


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        print(f"ddaepp {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, metavar="",
                                 help="Print the version and exit."),
) -> None:
    """Diffusion models as unified generative and discriminative learners (DDAE++, DDAE, SRA)."""



# Options several commands share: one definition each, help text included.
def json_option(help: str = "Print one JSON object on stdout."):
    return typer.Option(False, "--json", help=help)


def run_argument():
    return typer.Argument(..., help="Run folder (latest checkpoint), checkpoint folder, or its .safetensors.")


def device_option():
    return typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda when available).")


def threads_option():
    return typer.Option(None, "--threads", metavar="N",
                        help="CPU threads of this process (default: $OMP_NUM_THREADS, else the physical cores "
                             "it may use, shared among the processes of a launch; on a machine shared with other "
                             "jobs, 1).")


def weights_option(help: str = "ema or raw."):
    return typer.Option("ema", "--weights", help=help)


def log_to_run_option():
    return typer.Option(False, "--log-to-run", help="Also put the result into the run's experiment tracker "
                        "(the one train.log_with made) at the checkpoint's step, as eval/<metric>; see docs/tracking.md.")


def check_log_to_run(run_or_ckpt: str, wanted: bool):
    """`--log-to-run`'s checks before anything runs (no torch): the run folder, or None without the option."""
    if not wanted:
        return None
    from ..training.tracking import check_log_to_run as check

    return check(run_or_ckpt)


def log_to_run(run, result) -> None:
    """Put `result` into `run`'s trackers (rank 0: other ranks have no result) and say where it went."""
    if run is None or not result:
        return
    from ..training.tracking import log_eval

    for line in log_eval(run, result):
        print(line, file=sys.stderr)


def dataset_option():
    return typer.Option(None, "--dataset", help="digits, cifar10, cifar100 or imagefolder (default: the recipe's).")


# Checks of RUN_OR_CKPT and other paths that need no torch: a mistyped path is refused at once, before
# the seconds it takes to import torch and load a model.
def check_run_or_ckpt(path: str) -> None:
    """The refusals of `checkpoint.resolve_checkpoint`, made without importing torch: a missing path, a
    file that is not .safetensors, a folder with neither weights nor `checkpoints/`. The full resolution
    (which checkpoint, is it complete) still happens where the checkpoint is loaded."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"no such run or checkpoint: {p}")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise UsageError(f"{p} is not a run folder, checkpoint folder or .safetensors file")
        return
    if not any((p / name).exists() for name in ("model.safetensors", "ema.safetensors", "checkpoints")):
        raise UsageError(f"{p} holds no checkpoint (expected {p}/checkpoints/step-*/ or model.safetensors)")


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()



def report(result, json_out: bool, show) -> None:
    """`--json`: the result as one JSON object on stdout; otherwise the command's own `show(result)`."""
    if json_out:
        emit_json(result)
    else:
        show(result)


def check_plot_for_checkpoints(plot, checkpoints: str | None) -> None:
    if plot is not None and checkpoints not in (None, "latest"):
        raise UsageError("--plot names one file; with --checkpoints each checkpoint's plot goes next to its record")


def report_checkpoints(result, json_out: bool, show, score: str) -> None:
    """`report` for a result of `eval.latentprobe.over_checkpoints`: with several checkpoints, each one's
    result, then the table of `score` per checkpoint on stderr."""
    if json_out or "checkpoints" not in result:
        return report(result, json_out, show)
    from ..eval.latentprobe import format_checkpoints

    for r in result["results"]:
        show(r)
    print(format_checkpoints(result, score), file=sys.stderr)


def interrupted_message(command: str | None = None) -> str:
    """What every command prints on Ctrl-C (exit 130). It starts with "interrupted" like train's
    "interrupted at step N; checkpoint written to …": a stop the user asked for is not an `error:`."""
    what = f"`ddaepp {command}`" if command else "ddaepp"
    return f"interrupted: {what} stopped before it finished; re-run the same command"


def handle_errors(fn, name: str | None = None):
    """One clear line and the documented exit code for user-fixable problems; no traceback. `name`: the
    command's, for the Ctrl-C line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        watch_failures()  # several processes: one's failure stops every one, with one message (failures.py)
        try:
            result = fn(*args, **kwargs)
            close_launch()  # several processes: together, then the process group is destroyed (failures.py)
            return result
        except Interrupted as e:  # a signal, handled: "interrupted at step N; checkpoint written …"
            _exit(e.exit_code, str(e))
        except DdaeppError as e:
            _exit(e.exit_code, f"error: {e}", every_rank=e.exit_code != 2, wait=not getattr(e, "peer_lost", False))
        except KeyboardInterrupt:
            _exit(130, interrupted_message(name))
        except OSError as e:  # a user-given path that cannot be used (`--run-dir a_file/sub`, `/proc/x`)
            if e.filename is None:
                _unexpected(e)
                raise
            where = f"{e.filename} → {e.filename2}" if e.filename2 else str(e.filename)
            _exit(2, f"error: {where}: {e.strerror or e}")
        except Exception as e:
            _unexpected(e)
            raise

    return wrapper


def _exit(code: int, text: str, *, every_rank: bool = True, wait: bool = True) -> NoReturn:
    """Print `text` (one line) and exit with `code`; with several processes, the line and code every
    process agreed on (failures.py; `wait`: for the others to print it). Without that agreement exit-2
    lines are printed by rank 0 alone: every rank sees the same bad input."""
    agreed = stop_together(code, text, wait=wait)
    if agreed is not None:
        _exit_now(agreed[0])
    if every_rank or int(os.environ.get("RANK", "0")) == 0:
        print(text, file=sys.stderr)
    raise typer.Exit(code)


def _exit_now(code: int) -> NoReturn:
    """Exit a process of a launch that is stopping as a whole: everything it writes is written atomically,
    and tearing down a process group whose peers are gone takes seconds (gloo: ~3 s) for nothing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _unexpected(e: Exception) -> None:
    """An unexpected failure (a bug) keeps its traceback and exit 1. With several processes the others
    stop too, with a line naming this rank; a lost peer (a killed process) is said in one line."""
    if world_size() <= 1:
        return
    if lost_peer(e):
        text = ("error: lost contact with another process of the launch (it was killed or crashed: its own "
                "output or the launcher's report says which)")
        agreed = stop_together(1, text, wait=False)
    else:
        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0]
        agreed = stop_together(1, f"error: rank {os.environ.get('RANK', '0')}: {type(e).__name__}: {first}")
    if agreed is not None:
        _exit_now(agreed[0])


def command(*args, **kwargs):
    """Register a command on `app` (Typer's `app.command` arguments) with `handle_errors` around it."""

    def register(fn):
        name = args[0] if args else kwargs.get("name") or fn.__name__.lower().replace("_", "-")
        return app.command(*args, **kwargs)(handle_errors(fn, name))

    return register


def resolve_recipe_path(recipe: str) -> Path:
    """A path, or the name of a shipped recipe (`cifar10_edm_ddpmpp`)."""
    p = Path(recipe)
    if p.exists():
        return p
    for cand in (RECIPES_DIR / recipe, RECIPES_DIR / f"{recipe}.yaml"):
        if cand.is_file():
            return cand
    raise UsageError(f"recipe not found: {recipe} (a YAML path, or a shipped recipe name; see `ddaepp recipes`)")
