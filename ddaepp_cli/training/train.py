"""`ddaepp train`: the plan (batch arithmetic, `--dry-run`), the run folder and the training loop.

The loop drives the training core (`training/`): `TrainState` owns what changes while training (built
after DDP has synchronised the weights, one `state_dict()` for checkpoints and resume), `train_step`
makes one optimisation step on a global batch with per-sample draws that do not depend on the process
count, `MetricsLog` writes metrics.jsonl. Re-running the same command resumes exactly (same losses as
an uninterrupted run on CPU). SIGINT/SIGTERM finish the step, write a checkpoint and exit 130.

A latest checkpoint that is damaged (checkpoint.checkpoint_problem: a missing, truncated or foreign file)
is refused before anything is written, in one line naming the newest intact earlier checkpoint and the
command resuming from it (`--resume-from STEP`). Resuming from an earlier step sets the newer checkpoint
folders aside (`checkpoints/set-aside-step-N`, checkpoint.set_aside_checkpoints) once that step has loaded.

`train.log_with` adds an experiment tracker through Accelerate (tracking.py): the metrics.jsonl lines and the
sample grids go to `<run>/tracker/` as they are written; a resume continues the same tracker run.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..atomic import write_text_atomic
from ..build import build_backbone, build_formulation, build_objective, count_params, dataset_geometry, load_training_data
from ..checkpoint import (CorruptCheckpoint, checkpoint_problem, checkpoint_recipe, checkpoint_step, latest_checkpoint,
                          list_checkpoints, recover_checkpoints, save_checkpoint, set_aside_checkpoints, step_dir_name)
from ..console import info, progress
from ..data.stream import check_resumable
from ..errors import DdaeppError, Interrupted, NonFiniteError, ProcessFailed, UsageError, choices
from ..failures import lost_peer
from ..recipe import Recipe, diff_recipes, recipe_to_dict, recipe_to_yaml
from .faults import Faults
from .metrics import MetricsLog, truncate_metrics
from .state import TrainState, lr_at, rng_state
from .step import train_step
from .tracking import TrainingTrackers, resolve as resolve_trackers, tracker_dir


# ------------------------------------------------------------------------------------------------
# Plan: the batch arithmetic, shown by --dry-run
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    world_size: int
    global_batch: int
    per_process_batch: int
    micro_batch: int
    grad_accum: int
    steps_per_epoch: int | None
    total_steps: int | None
    warmup_steps: int | None


def make_plan(recipe: Recipe, world_size: int, dataset_len: int | None, max_steps: int | None = None) -> Plan:
    t = recipe.train
    if t.global_batch % world_size:
        raise UsageError(f"train.global_batch {t.global_batch} is not divisible by the {world_size} processes")
    share = t.global_batch // world_size
    micro = min(t.batch_per_process or share, share)
    if share % micro:
        raise UsageError(f"per-process batch {share} is not divisible by train.batch_per_process {micro}")
    spe = total = warm = None
    if dataset_len is not None:
        if dataset_len < t.global_batch:
            raise UsageError(f"dataset has {dataset_len} images, fewer than train.global_batch {t.global_batch}")
        spe = dataset_len // t.global_batch
        total = max(1, round(t.epochs * spe))
        warm = round(t.warmup_epochs * spe)
    if max_steps is not None:
        total = max_steps if total is None else min(total, max_steps)
    return Plan(world_size, t.global_batch, share, micro, share // micro, spe, total, warm)


def dry_run(recipe: Recipe, world_size: int = 1, max_steps: int | None = None) -> dict[str, Any]:
    _, _, n = dataset_geometry(recipe.data)
    plan = make_plan(recipe, world_size, n, max_steps)
    model = build_backbone(recipe, device="meta")
    total, trainable = count_params(model)
    formulation = build_formulation(recipe)
    with torch.device("meta"):
        aux = build_objective(recipe, model, formulation).aux
    return {
        "recipe": recipe_to_dict(recipe),
        "params": total,  # the network (what model/ema.safetensors hold)
        "trainable_params": trainable,
        "aux_params": sum(p.numel() for p in aux.parameters()),  # training-only: heads, u(σ)
        "dataset_size": n,
        **{k: getattr(plan, k) for k in plan.__dataclass_fields__},
    }


# ------------------------------------------------------------------------------------------------
# Run directory
# ------------------------------------------------------------------------------------------------


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def prepare_run_dir(run_dir: Path, recipe: Recipe, *, allow_recipe_change: bool) -> Path | None:
    """Check the run folder; return the checkpoint to resume from (or None for a fresh run).

    A folder holding another recipe is refused (exit 2); a non-empty folder that is not a ddaepp
    run is refused too: nothing in it is ever overwritten.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"run directory {run_dir} exists and is not a folder")
    stored = run_dir / "recipe.yaml"
    if stored.is_file():
        old = checkpoint_recipe(run_dir)
        # the name and the tracker do not change what is trained: a resume may add or drop a tracker
        diffs = [d for d in diff_recipes(old, recipe) if not d.startswith(("name:", "train.log_with:"))]
        if diffs and not allow_recipe_change:
            shown = "; ".join(diffs[:4]) + (f"; … ({len(diffs)} keys)" if len(diffs) > 4 else "")
            raise UsageError(f"{run_dir} was trained with another recipe ({shown}); "
                             f"use another --run-dir, or --allow-recipe-change to resume anyway")
        return latest_checkpoint(run_dir)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise UsageError(f"{run_dir} is not empty and holds no ddaepp run (no recipe.yaml); choose another --run-dir")
    return None


# ------------------------------------------------------------------------------------------------
# Pieces of the loop
# ------------------------------------------------------------------------------------------------


class _StopFlag:
    """SIGINT/SIGTERM: finish the step, write a checkpoint, exit 130.

    `quiet` (several processes): the handler only notes the signal; the loop reduces the flag over every
    rank and rank 0 says what happens. Leaving with an exception, a quiet flag ignores further signals
    instead of restoring the old handlers: the process is on its way out with an agreed exit code
    (failures.py), and the launcher's SIGTERM to the remaining processes must not cut that short."""

    def __init__(self, quiet: bool = False) -> None:
        self.raised, self.quiet = False, quiet
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a notebook worker)
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.quiet:
            self.raised = True
            return
        if self.raised:  # a second signal: the checkpoint is still written (exit 130 means one was)
            info(f"received signal {signum} again: still finishing the step and writing the checkpoint "
                 "(SIGKILL stops at once, losing the steps since the last checkpoint)")
            return
        self.raised = True
        info(f"received signal {signum}: finishing the step and writing a checkpoint")

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, signal.SIG_IGN if self.quiet and exc[0] is not None else old)


def _failed(e: Exception, rank: int, step: int, kept: str) -> ProcessFailed:
    """The one line every process stops with when this one failed unexpectedly (its traceback is printed
    here) or lost contact with another one (failures.py)."""
    resume = "re-run the same command to resume"
    if lost_peer(e):
        return ProcessFailed(f"lost contact with another process after step {step} (it was killed or crashed: "
                             f"its own output or the launcher's report says which); {kept}; {resume}",
                             peer_lost=True)
    traceback.print_exc()
    first = (str(e).strip().splitlines() or [""])[0]
    return ProcessFailed(f"rank {rank} failed after step {step}: {type(e).__name__}: {first}; {kept}; {resume}")


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


def _write_run_files(run_dir: Path, recipe: Recipe, ts: TrainState, resume_from: Path | None) -> None:
    """Rank 0: the resolved recipe (fresh runs), metrics cut to the resumed step, meta.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_from is None:
        write_text_atomic(run_dir / "recipe.yaml", recipe_to_yaml(recipe))
    truncate_metrics(run_dir / "metrics.jsonl", ts.step)  # also at step 0: no line is ever logged twice
    meta = {"ddaepp": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "git_revision": _git_revision(), "world_size": ts.world, "precision": ts.precision,
            "device": str(ts.device), "started": datetime.now(timezone.utc).isoformat(),
            "resumed_from": str(resume_from) if resume_from else None}
    write_text_atomic(run_dir / "meta.json", json.dumps(meta, indent=2) + "\n")


class GridSampler:
    """The fixed-seed sample grid written during training; the sampling options (for latent runs the
    VAE decoder) are built once, at the first grid."""

    def __init__(self, ts: TrainState, shape: tuple[int, ...], run_dir: Path):
        self.ts, self.shape, self.run_dir, self.options = ts, shape, run_dir, None

    def __call__(self, step: int) -> None:
        from ..sample import generate, sampling_options, save_grid

        ts, s = self.ts, self.ts.recipe.sample
        seeds = list(range(ts.recipe.train.sample_grid))
        if self.options is None:
            self.options = sampling_options(ts.recipe, ts.ema.module, seeds, device=ts.device)
        images = generate(ts.ema.module, ts.formulation, seeds, shape=self.shape, sampler=s.sampler, steps=s.steps,
                          clip=s.clip_x0, batch_size=s.batch_size, device=ts.device, **self.options)
        save_grid(images, self.path(step))

    def path(self, step: int) -> Path:
        return self.run_dir / "samples" / f"grid-{step:07d}.png"


def _start(recipe: Recipe, run_dir: Path, *, max_steps: int | None, allow_recipe_change: bool,
           compile_kw: dict | None, resume_step: int | None = None, resume_command: str | None = None):
    """Processes, the run folder check (rank 0's, for every rank: `_resume_point`), data, plan, the
    trackers and the `TrainState`, resumed from the latest checkpoint (or `resume_step`'s) when there is one."""
    from accelerate import Accelerator, PartialState

    names = resolve_trackers(recipe.train.log_with)  # a missing tracker package: exit 3 before anything runs
    cpu = not torch.cuda.is_available()
    state = PartialState(cpu=cpu)  # the processes; the Accelerator follows once the resumed step is known
    rank, world = state.process_index, state.num_processes
    faults = Faults.from_env(rank)
    resume_from, newer = _resume_point(run_dir, recipe, allow_recipe_change=allow_recipe_change,
                                       resume_step=resume_step, resume_command=resume_command,
                                       main=state.is_main_process, world=world)
    trackers = TrainingTrackers(run_dir, names, main=state.is_main_process)
    start_step = (checkpoint_step(resume_from) or 0) if resume_from is not None else 0
    # DDP and the trackers (TensorBoard drops the events an interrupted session wrote after start_step);
    # precision is the state's
    accelerator = Accelerator(cpu=cpu, log_with=trackers.instances(start_step),
                              project_dir=str(tracker_dir(run_dir)) if names else None)
    device = accelerator.device
    dataset = load_training_data(recipe)
    if world > 1:  # each rank read the data itself: the plan (steps, epochs) must be every rank's
        from accelerate.utils import gather_object

        sizes = gather_object([len(dataset)])
        if len(set(sizes)) > 1:
            raise UsageError(f"the processes see data sets of different sizes ({', '.join(map(str, sizes))} "
                             f"images by rank): is {recipe.data.root or 'the data folder'} being rewritten?")
    plan = make_plan(recipe, world, len(dataset), max_steps)
    if recipe.train.compile and device.type == "cpu":  # benchmarks/group_train.py: compile loses on CPU
        info("warning: train.compile on a CPU: the UNet step measured 0.83-0.88x the speed of eager after "
             "3 min of compilation (benchmarks/bench.py); it is meant for GPUs")
    ts = TrainState(recipe, device=device, accelerator=accelerator, rank=rank, world=world, compile_kw=compile_kw)
    if faults.fp16_scaler and not ts.scaler.is_enabled():  # test hook: fp16's step decisions on a CPU
        ts.scaler = torch.amp.GradScaler(device.type)
    if resume_from is not None:
        faults.before_resume()
        try:
            note = ts.load(resume_from)
        except CorruptCheckpoint as e:  # damage inside files whose structure looked complete
            raise _corrupt(run_dir, resume_from, str(e), resume_command) from None
        if ts.data_state is not None:  # before anything is written: same data-set size and global batch
            check_resumable(ts.data_state, num_samples=len(dataset), global_batch=recipe.train.global_batch)
        if note:
            info(note)
        info(f"resuming {run_dir} from step {ts.step} ({resume_from.name})")
        if newer and accelerator.is_main_process:  # only once the earlier checkpoint has loaded
            moved = set_aside_checkpoints(newer)
            info(f"moved the checkpoints after step {ts.step} aside (kept; never read, counted by train.keep_last "
                 f"or pruned; delete them when no longer needed): "
                 + ", ".join(f"{a.name} -> {b.name}" for a, b in zip(newer, moved)))
    if accelerator.is_main_process:
        _write_run_files(run_dir, recipe, ts, resume_from)
        trackers.start(accelerator, recipe, ts.step)
    return accelerator, ts, dataset, plan, trackers


def _resume_point(run_dir: Path, recipe: Recipe, *, allow_recipe_change: bool, main: bool, world: int,
                  resume_step: int | None = None, resume_command: str | None = None) -> tuple[Path | None, list[Path]]:
    """The checkpoint every rank resumes from (None: a fresh run) and the newer checkpoint folders that rank 0
    sets aside once it has loaded (`--resume-from` an earlier step). Rank 0 alone checks the folder, puts
    back a checkpoint displaced by a re-save that crashed between its two renames (checkpoint.py) and checks
    the chosen checkpoint's files; the other ranks take its answer from a collective, so they read nothing
    before the repair is done — a rank resolving the folder by itself could pick the displaced copy while
    rank 0 renames it back."""
    from accelerate.utils import broadcast_object_list

    answer: list = ["", []]
    if main:
        resume, newer = prepare_run_dir(run_dir, recipe, allow_recipe_change=allow_recipe_change), []
        if resume is not None:
            recover_checkpoints(run_dir)
            resume, newer = _choose_checkpoint(run_dir, resume_step, resume_command)
        elif resume_step is not None:
            raise UsageError(f"--resume-from {resume_step}: {run_dir} holds no checkpoint to resume from")
        answer = [str(resume) if resume else "", [str(p) for p in newer]]
    if world > 1:
        broadcast_object_list(answer, from_process=0)  # a refusal on rank 0 stops the others (failures.py)
    return (Path(answer[0]) if answer[0] else None), [Path(p) for p in answer[1]]


def _choose_checkpoint(run_dir: Path, resume_step: int | None, command: str | None) -> tuple[Path, list[Path]]:
    """Rank 0: the latest checkpoint, or `resume_step`'s, once its files are checked; and the checkpoints
    after it. A damaged one is refused (exit 2) before anything in the run folder changes."""
    ckpts = list_checkpoints(run_dir)
    if resume_step is None:
        ckpt = ckpts[-1][1]
        why = checkpoint_problem(ckpt)
        if why:
            raise _corrupt(run_dir, ckpt, f"the latest checkpoint {ckpt} is corrupt: {why}", command)
        return ckpt, []
    by_step = dict(ckpts)
    ckpt = by_step.get(resume_step)
    why = checkpoint_problem(ckpt) if ckpt is not None else None
    if ckpt is None or why:
        intact = [s for s, c in ckpts if c != ckpt and checkpoint_problem(c) is None]
        have = (f"intact checkpoints: step{'s' if len(intact) > 1 else ''} {choices(intact)}" if intact
                else "it holds no intact checkpoint")
        what = f"the checkpoint at step {resume_step} is corrupt: {why}" if why else \
            f"{run_dir} has no checkpoint at step {resume_step}"
        raise UsageError(f"--resume-from {resume_step}: {what}; {have}; nothing in {run_dir} was changed")
    return ckpt, [c for s, c in ckpts if s > resume_step]


def _corrupt(run_dir: Path, ckpt: Path, problem: str, command: str | None) -> UsageError:
    """The refusal of a damaged checkpoint: the problem, the newest intact earlier checkpoint and the exact
    command that resumes from it."""
    step = checkpoint_step(ckpt)
    earlier = next((s for s, c in reversed(list_checkpoints(run_dir))
                    if step is not None and s < step and checkpoint_problem(c) is None), None)
    if earlier is None:
        hint = "no earlier checkpoint is intact: train again with another --run-dir"
    else:
        base = command or f"ddaepp train {shlex.quote(str(run_dir / 'recipe.yaml'))} --run-dir {shlex.quote(str(run_dir))}"
        hint = (f"the newest intact checkpoint is step {earlier}: resume from it with `{base} --resume-from {earlier}` "
                f"(the checkpoints after step {earlier} are then moved aside to checkpoints/set-aside-step-*, "
                f"not deleted)")
    return UsageError(f"{problem}; {hint}; nothing in {run_dir} was changed")


def _stop_requested(stop: _StopFlag, accelerator) -> int:
    """How many ranks received a signal; any stops every rank after this step (one collective)."""
    if accelerator.num_processes == 1:
        return int(stop.raised)
    flag = torch.tensor([float(stop.raised)], device=accelerator.device)
    return int(accelerator.reduce(flag, "sum").item())


def train(recipe: Recipe, run_dir: str | os.PathLike, *, max_steps: int | None = None,
          allow_recipe_change: bool = False, compile_kw: dict | None = None, resume_step: int | None = None,
          resume_command: str | None = None) -> dict[str, Any]:
    """Train (or resume) `recipe` in `run_dir`. `compile_kw`: torch.compile options (tests pass a backend).
    `resume_step`: resume from that step's checkpoint instead of the latest (`--resume-from`);
    `resume_command`: the command line that trains this run, named (plus --resume-from N) in the refusal
    of a damaged checkpoint."""
    run_dir = Path(run_dir)
    accelerator, ts, dataset, plan, trackers = _start(recipe, run_dir, max_steps=max_steps, compile_kw=compile_kw,
                                                      allow_recipe_change=allow_recipe_change,
                                                      resume_step=resume_step, resume_command=resume_command)
    try:
        return _loop(recipe, run_dir, accelerator, ts, dataset, plan, trackers)
    finally:
        trackers.finish()


def _loop(recipe: Recipe, run_dir: Path, accelerator, ts: TrainState, dataset, plan: Plan,
          trackers: TrainingTrackers) -> dict[str, Any]:
    from accelerate.utils import gather_object

    from ..data import BatchStream, to_model_range

    t = recipe.train
    device, rank, world, main = ts.device, ts.rank, ts.world, accelerator.is_main_process
    stream = BatchStream(dataset, global_batch=t.global_batch, rank=rank, world_size=world, seed=t.seed,
                         start_step=ts.step, num_workers=recipe.data.num_workers if not dataset.in_memory else 0,
                         pin_memory=device.type == "cuda" and not dataset.in_memory,
                         device=device if dataset.in_memory else None)
    if ts.data_state is not None:
        stream.load_state_dict(ts.data_state)
    log = MetricsLog(run_dir / "metrics.jsonl", device=device, global_batch=t.global_batch,
                     reduce_mean=ts.reduce_mean, main=main)
    grid = GridSampler(ts, (dataset.channels, dataset.image_size, dataset.image_size), run_dir)

    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / step_dir_name(ts.step) if ts.step else None  # the last good checkpoint: no file is read

    def checkpoint() -> None:
        nonlocal last
        rngs = gather_object([rng_state()]) if world > 1 else [rng_state()]
        if main:
            save_checkpoint(run_dir, ts.step, recipe=recipe, model=ts.model, ema=ts.ema.module,
                            state={**ts.state_dict(rngs), "data": stream.state_dict()},
                            keep_last=t.keep_last, milestones=t.milestones)
        last = ckpt_dir / step_dir_name(ts.step)

    def kept() -> str:
        return f"the last good checkpoint {last} is kept" if last else "no checkpoint was written yet"

    faults, test_delay = Faults.from_env(rank), float(os.environ.get("DDAEPP_TEST_STEP_DELAY", "0"))
    bad_in_a_row, total = 0, plan.total_steps
    ts.objective.train()  # backbone, heads (batch-norm) and u(σ) (forced weight normalisation)
    try:
        with _StopFlag(quiet=world > 1) as stop, progress(total, "train", "step", start=ts.step) as bar:
            batches = iter(stream)
            while ts.step < total:
                faults.step_start(ts.step)
                images, labels = next(batches)
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                x = images if images.ndim == 5 else to_model_range(images)  # cached latents: (b, 2, C, H, W)
                r = train_step(ts, x, labels, plan=plan, warmup_steps=plan.warmup_steps or 0,
                               no_sync=lambda: accelerator.no_sync(ts.net), faults=faults)
                log.add(r)
                # r.applied / r.overflow are decided over every rank (step.py): all ranks stop at the same step
                bad_in_a_row = 0 if r.applied or r.overflow else bad_in_a_row + 1
                if bad_in_a_row >= t.max_nonfinite:
                    raise NonFiniteError(f"{bad_in_a_row} non-finite losses/gradients in a row at step {ts.step}; "
                                         f"stopped; {kept()} (lower train.lr or enable train.grad_clip)")
                if ts.step % t.log_every == 0 or ts.step == total:
                    rec = log.write(step=ts.step, epoch=ts.step / plan.steps_per_epoch, grad_norm=r.grad_norm,
                                    lr=lr_at(recipe, ts.step - 1, plan.warmup_steps or 0),
                                    nonfinite=ts.nonfinite_total)
                    trackers.log(rec)
                    shown = f"{rec['loss']:.4f}" if rec["loss"] is not None else "skipped"
                    bar.update(0, extra=f"loss {shown} {rec['img_per_s']:.1f} img/s")
                bar.update(1)
                if test_delay:
                    time.sleep(test_delay)
                signalled = _stop_requested(stop, accelerator)
                if signalled and world > 1 and main:
                    info(f"{signalled} of {world} processes received a stop signal: writing a checkpoint at "
                         f"step {ts.step}")
                if ts.step % t.checkpoint_every == 0 or ts.step == total or signalled:
                    checkpoint()
                if main and t.sample_every and recipe.sample.steps != 0 and \
                        (ts.step % t.sample_every == 0 or ts.step == total):
                    grid(ts.step)
                    trackers.log_grid(grid.path(ts.step), ts.step)
                if signalled:
                    accelerator.wait_for_everyone()
                    raise Interrupted(f"interrupted at step {ts.step}; checkpoint written to {ckpt_dir}; "
                                      f"re-run the same command to resume")
    except (DdaeppError, KeyboardInterrupt):
        raise
    except Exception as e:
        if world == 1:
            raise
        raise _failed(e, rank, ts.step, kept()) from e
    accelerator.wait_for_everyone()
    return {"run_dir": str(run_dir), "step": ts.step, "total_steps": total,
            "checkpoint": str(latest_checkpoint(run_dir)) if main else None, "nonfinite_skipped": ts.nonfinite_total}
