"""Experiment trackers (TensorBoard, Weights & Biases) through Hugging Face Accelerate: `train.log_with`.

Accelerate does the tracking (`Accelerator(log_with=…)`, `init_trackers`, `log`; its `TensorBoardTracker`
and `WandBTracker`); this module only decides what goes where, so that `ddaepp train` and the evaluation
commands' `--log-to-run` write into the same tracker run. docs/tracking.md is the user's page.

- Files live in the run folder: `<run>/tracker/` (Accelerate's project dir). TensorBoard writes to
  `<run>/tracker/<run name>/`, wandb to `<run>/tracker/wandb/`. `<run>/tracker/tracker.json` records which
  trackers the run has, the tracker run name (the run folder's name) and the wandb run id, so a resume and
  a later `--log-to-run` continue the same tracker run.
- Only the main process logs (Accelerate's trackers start and log on the main process alone).
- A resume cuts metrics.jsonl back to the resumed step (metrics.py); TensorBoard's `purge_step` does the same
  to the event files: readers drop the events of steps after the resumed step that the interrupted session
  wrote. wandb keeps the run (same id, `resume="allow"`); its steps only increase, see docs/tracking.md.
- A tracker added to a run that already logged (a resume with `--log-with`) first receives the lines of
  metrics.jsonl up to the resumed step.

Nothing here imports torch at module level: `resolve` answers a missing package (exit 3) before torch loads.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from ..atomic import write_text_atomic
from ..errors import UnavailableError, UsageError, choices

TRACKERS = ("tensorboard", "wandb")
CHOICES = ("none", *TRACKERS, "all-installed")  # train.log_with / --log-with
FOLDER = "tracker"
INFO = "tracker.json"
GRID_KEY = "samples/grid"
EVAL_STEP = "eval/step"  # wandb: the x-axis of the eval/* series (define_metric), see log_eval


# ------------------------------------------------------------------------------------------------
# Which trackers (no torch)
# ------------------------------------------------------------------------------------------------


def installed(name: str) -> bool:
    """Whether the tracker's package can be imported (without importing it: wandb takes ~0.6 s)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or sys.modules[name] is None
        return False


def _missing(names: Iterable[str], what: str) -> UnavailableError:
    names = list(names)
    pkgs = " and ".join(names)
    extras = ",".join(names)
    return UnavailableError(f"{what} needs the {pkgs} package{'s' if len(names) > 1 else ''}, which "
                            f"{'are' if len(names) > 1 else 'is'} not installed: pip install 'ddaepp[{extras}]' "
                            f"(pixi: pixi add --pypi {' '.join(names)})")


def resolve(log_with: str) -> list[str]:
    """`train.log_with` → the trackers to start: [] for none; exit 3 (one line) when a named one is not
    installed, or all-installed finds neither."""
    if log_with not in CHOICES:
        raise UsageError(f"train.log_with must be one of {choices(CHOICES)}, got {log_with!r}")
    if log_with == "none":
        return []
    if log_with == "all-installed":
        found = [t for t in TRACKERS if installed(t)]
        if not found:
            raise _missing(TRACKERS, "train.log_with all-installed")
        return found
    if not installed(log_with):
        raise _missing([log_with], f"train.log_with {log_with}")
    return [log_with]


def tracker_dir(run_dir: Path) -> Path:
    return Path(run_dir) / FOLDER


def read_info(run_dir: Path) -> dict | None:
    p = tracker_dir(run_dir) / INFO
    if not p.is_file():
        return None
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{p} is unreadable ({e}); it names the run's trackers: delete the tracker folder "
                         f"to start new tracker runs") from None
    return info if isinstance(info, dict) else None


def _new_info(run_dir: Path, names: list[str], old: dict | None) -> dict:
    """tracker.json of this session: the trackers used so far (old ones kept: `--log-to-run` logs to every
    one), the run name, the wandb run id and project (made once, then kept)."""
    info = dict(old or {})
    info["trackers"] = [t for t in TRACKERS if t in names or t in info.get("trackers", [])]
    info.setdefault("name", Path(os.path.abspath(run_dir)).name)
    if "wandb" in names and "wandb" not in info:
        import secrets

        info["wandb"] = {"id": secrets.token_hex(4),  # wandb's own ids are 8 characters of [0-9a-z]
                         "project": os.environ.get("WANDB_PROJECT") or "ddaepp"}
    return info


def _instances(run_dir: Path, names: list[str], info: dict, *, purge_step: int | None) -> list:
    """Accelerate's tracker objects for `names`, pointed at the run's tracker folder and run."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    out = []
    folder = tracker_dir(run_dir)
    for name in names:
        if name == "tensorboard":
            kw = {} if purge_step is None else {"purge_step": purge_step}
            out.append(TensorBoardTracker(info["name"], folder, **kw))
        else:
            w = info["wandb"]  # WandBTracker's first argument is wandb's project
            out.append(WandBTracker(w["project"], id=w["id"], name=info["name"], resume="allow", dir=str(folder)))
    return out


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


class TrainingTrackers:
    """The trackers of one training session (main process; an empty `names` is a no-op everywhere).

    `instances(step)` goes into `Accelerator(log_with=…)`; `start` writes tracker.json and calls
    `init_trackers` with the resolved recipe as config."""

    def __init__(self, run_dir: Path, names: list[str], *, main: bool):
        self.run_dir, self.names = Path(run_dir), (names if main else [])
        self.old = read_info(self.run_dir) if self.names else None
        self.info = _new_info(self.run_dir, self.names, self.old) if self.names else {}
        self.accelerator = None

    def instances(self, step: int) -> list | None:
        """Accelerate trackers resuming at `step` (TensorBoard purges the events after it), or None."""
        return _instances(self.run_dir, self.names, self.info, purge_step=step + 1) if self.names else None

    def start(self, accelerator, recipe, step: int) -> None:
        if not self.names:
            return
        from ..recipe import recipe_to_dict
        from .metrics import read_metrics

        self.accelerator = accelerator
        folder = tracker_dir(self.run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / INFO, json.dumps(self.info, indent=2) + "\n")
        try:
            accelerator.init_trackers(self.info["name"], config=flat_config(recipe_to_dict(recipe)))
        except Exception as e:  # wandb without a login, say: one line, before the first step
            first = (str(e).strip().splitlines() or [""])[0]
            raise UsageError(f"the tracker ({', '.join(self.names)}) did not start: {type(e).__name__}: {first}; "
                             f"wandb needs `wandb login` (or WANDB_MODE=offline); or train without a tracker: "
                             f"--log-with none") from None
        new = [t for t in accelerator.trackers if t.name not in (self.old or {}).get("trackers", [])]
        if step and new:  # a tracker added to a run that already logged: its lines and grids up to the step
            for rec in read_metrics(self.run_dir / "metrics.jsonl"):
                if rec["step"] <= step:
                    for t in new:
                        t.log(scalars(rec), step=rec["step"])
            for png in sorted((self.run_dir / "samples").glob("grid-*.png")):
                s = png.stem.removeprefix("grid-")
                if s.isdigit() and int(s) <= step:
                    _log_grid(new, png, int(s))

    def log(self, rec: dict) -> None:
        """One metrics.jsonl line (`train/<field>`), at its step."""
        if self.accelerator is not None:
            self.accelerator.log(scalars(rec), step=rec["step"])

    def log_grid(self, png: Path, step: int) -> None:
        """The sample grid just written (`samples/grid`), as the PNG holds it."""
        if self.accelerator is not None:
            _log_grid(self.accelerator.trackers, png, step)

    def finish(self) -> None:
        """Flush and close (wandb writes its last records). Not `accelerator.end_training()`: that also tears
        down the process group, which the CLI's exit handling (failures.py) still uses."""
        if self.accelerator is not None:
            for t in self.accelerator.trackers:
                t.finish()
            self.accelerator = None


def _log_grid(trackers: list, png: Path, step: int) -> None:
    image = grid_array(png)
    for t in trackers:
        t.log_images({GRID_KEY: image}, step=step, **({"dataformats": "NHWC"} if t.name == "tensorboard" else {}))


def scalars(rec: dict) -> dict[str, float]:
    """A metrics.jsonl line as tracker scalars: every field but `step` (the x-axis) as `train/<field>`; a
    loss of a window with only skipped steps (null) is left out."""
    return {f"train/{k}": v for k, v in rec.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool)}


def flat_config(d: dict, prefix: str = "") -> dict[str, Any]:
    """The recipe as `section.key: value` (TensorBoard's hparams take scalars and strings only)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = str(list(v))
        else:
            out[key] = v if v is None or isinstance(v, (int, float, str, bool)) else str(v)
    return out


def grid_array(png: Path):
    """The grid PNG as a (1, H, W, 3) uint8 array: what TensorBoard's add_images (NHWC) and wandb.Image take."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as im:
        return np.asarray(im.convert("RGB"))[None]


# ------------------------------------------------------------------------------------------------
# Evaluation commands: --log-to-run
# ------------------------------------------------------------------------------------------------


def _run_of(path: Path) -> Path:
    """The run folder of RUN_OR_CKPT (a run, `checkpoints/step-N`, or one of its .safetensors files)."""
    p = path.parent if path.is_file() else path
    return p.parent.parent if p.parent.name == "checkpoints" else p


def check_log_to_run(run_or_ckpt: str) -> Path:
    """`--log-to-run`, before anything runs (no torch): the run folder whose tracker gets the results.
    A run without a tracker, or a path that is no run, is exit 2; a tracker package that is missing exit 3."""
    path = Path(run_or_ckpt)
    run = _run_of(path)
    if not (run / "recipe.yaml").is_file():
        raise UsageError(f"--log-to-run logs into a run's tracker: {run_or_ckpt} is not a run folder or one of its "
                         f"checkpoints (no {run / 'recipe.yaml'})")
    info = read_info(run)
    if not info or not info.get("trackers"):
        raise UsageError(f"--log-to-run: {run} has no tracker (it was trained with train.log_with none); "
                         f"resume it once with `ddaepp train {run / 'recipe.yaml'} --run-dir {run} --log-with "
                         f"tensorboard` (or wandb) to create one, or leave out --log-to-run")
    gone = [t for t in info["trackers"] if not installed(t)]
    if gone:
        raise _missing(gone, f"--log-to-run ({run}'s tracker)")
    return run


def eval_scalars(result: dict) -> list[tuple[int, dict[str, float]]]:
    """(checkpoint step, {series: value}) of a probe, fid, segprobe or cka result; several checkpoints (a
    `--checkpoints` summary) give one entry each. Values as the eval record holds them (fractions, not %)."""
    if "results" in result:  # probe / segprobe over several checkpoints
        return [e for r in result["results"] for e in eval_scalars(r)]
    if result.get("command") == "fid" and "checkpoints" in result:
        return [e for r in result["checkpoints"] for e in eval_scalars(r)]
    cmd, proto = result.get("command"), result.get("protocol") or {}
    if cmd == "cka":
        step = proto["models"][0].get("step")
        if "layerwise" in result:  # against another model: layer by layer
            values = {f"eval/cka_layerwise/{k}": float(v) for k, v in result["layerwise"].items()}
            if values:
                values["eval/cka_layerwise_mean"] = sum(values.values()) / len(values)
        else:  # one model: how alike its layers are
            m = result["matrix"]
            off = [m[i][j] for i in range(len(m)) for j in range(len(m)) if i != j]
            values = {"eval/cka_offdiag_mean": sum(off) / len(off)} if off else {}
    elif cmd == "probe":
        step, values = proto.get("step"), {"eval/probe_acc": float(result["test_accuracy"])}
    elif cmd == "segprobe":
        step, d = proto.get("step"), result["dataset"]
        values = {f"eval/segprobe_miou_{d}": float(result["miou"]),
                  f"eval/segprobe_pixel_acc_{d}": float(result["pixel_accuracy"])}
    elif cmd == "fid":
        step, n = proto.get("step"), result["n"]
        size = f"{n // 1000}k" if n % 1000 == 0 else str(n)  # FID depends on the sample count: fid50k, fid10k
        values = {f"eval/{k}{size}": float(v) for k, v in (result.get("metrics") or {}).items()
                  if isinstance(v, (int, float)) and math.isfinite(v)}
    else:
        raise ValueError(f"no tracker series for a {cmd!r} result")
    if step is None:
        raise UsageError(f"--log-to-run: {proto.get('checkpoint') or 'the checkpoint'} has no step (not a "
                         f"checkpoints/step-N folder of a run)")
    return [(int(step), values)]


def log_eval(run_dir: Path, result: dict) -> list[str]:
    """Put an evaluation's numbers into the run's trackers at its checkpoint's step; the lines to print.

    TensorBoard: a new event file in the run's TensorBoard folder (no purge). wandb: the same run (its
    id), the numbers against `eval/step` (define_metric) since wandb's own step only increases and a
    finished run is already past every checkpoint's step."""
    from accelerate import PartialState

    entries = eval_scalars(result)
    info = read_info(run_dir) or {}
    # Accelerate's trackers log through its process state. Only rank 0 gets here (the result exists there
    # alone); in a multi-process evaluation the process group exists already and is reused, not joined.
    PartialState(cpu=True)
    lines = []
    for t in _instances(run_dir, info.get("trackers", []), info, purge_step=None):
        t.start()
        try:
            if t.name == "wandb":
                t.tracker.define_metric(EVAL_STEP)
                t.tracker.define_metric("eval/*", step_metric=EVAL_STEP)
            for step, values in entries:
                if t.name == "wandb":
                    t.log({**values, EVAL_STEP: step})
                else:
                    t.log(values, step=step)
        finally:
            t.finish()
        where = t.logging_dir if t.name == "tensorboard" else f"wandb run {info['wandb']['id']}"
        for step, values in entries:
            lines.append(f"logged {', '.join(values)} at step {step} to {t.name} ({where})")
    return lines
