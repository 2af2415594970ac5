"""Errors that reach the user as one clear line and a documented exit code (docs/commands.md, "Exit codes").

Library code raises these; the CLI catches them, prints `error: <message>` on stderr and exits
with `exit_code`. Anything else is an unexpected failure (exit 1, with a traceback).
"""

from __future__ import annotations

from typing import Iterable


class DdaeppError(Exception):
    """Base class: a problem the user can fix. `exit_code` is what the CLI returns."""

    exit_code = 1


class UsageError(DdaeppError):
    """Bad usage or bad input: unknown key, wrong type, missing file, unknown layer (exit 2)."""

    exit_code = 2


class UnavailableError(DdaeppError):
    """A weight file or dataset is not available offline (exit 3). Say which file, where to put it."""

    exit_code = 3


class NonFiniteError(DdaeppError):
    """Training hit too many non-finite losses/gradients in a row (exit 1, checkpoint kept)."""

    exit_code = 1


class ProcessFailed(DdaeppError):
    """A process of a multi-process launch failed, or was lost: every process stops with this one line
    (failures.py; exit 1). `peer_lost`: the lost process cannot confirm it printed the line too."""

    exit_code = 1

    def __init__(self, message: str, *, peer_lost: bool = False):
        super().__init__(message)
        self.peer_lost = peer_lost


class Interrupted(DdaeppError):
    """SIGINT/SIGTERM after a checkpoint was written (exit 130)."""

    exit_code = 130


def choices(valid: Iterable[object], limit: int = 40) -> str:
    """Format valid choices for an error message: `a, b, c` (long lists are elided in the middle)."""
    items = [str(v) for v in valid]
    if len(items) > limit:
        items = items[: limit // 2] + ["…"] + items[-limit // 2 :]
    return ", ".join(items)
