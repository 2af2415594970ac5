"""The `ddaepp` command line: thin wrappers that parse, load and call one library function each.

Conventions: `--json` prints exactly one JSON object on stdout, tables go to stdout, progress and logs to
stderr; exit codes 0 ok, 1 unexpected failure, 2 bad usage/input, 3 weights/data unavailable offline, 130
interrupted after a checkpoint was written.

`base` holds the app and the shared helpers; each other module registers its commands on that app when
imported below (imports point one way: commands → base).
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

import typer
from typer.core import TyperCommand

# Registering order is the order of `ddaepp --help`: training and generation first.
from . import run  # noqa: F401,I001  train, sample, recipes, info
from . import analysis  # noqa: F401  probe, cka, align, noisy-classifier
from . import evaluate  # noqa: F401  fid, segprobe
from . import latent  # noqa: F401  profile-layers, cache-latents, export-digits
from . import importing  # noqa: F401  import
from . import exporting  # noqa: F401  export
from .base import FlagHelpCommand, app, emit_json, handle_errors, interrupted_message, resolve_recipe_path  # noqa: F401
from .. import threads

__all__ = ["app", "main"]


def main(argv: Optional[List[str]] = None, prog_name: str = "ddaepp") -> None:
    """Entry point: Click's own parse errors (unknown option, `--n abc`, missing argument, unknown
    command) become one `error:` line and exit 2, like every other bad input, instead of
    Click's multi-line usage box."""
    # Click's UsageError (base of BadParameter, NoSuchOption, MissingParameter): found through the public
    # typer.BadParameter, because typer ≥ 0.25 vendors its own Click and older releases use click itself.
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    threads.set_default()  # OMP_NUM_THREADS before torch is imported: this process's share of the cores
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
        print(interrupted_message(), file=sys.stderr)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)


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
