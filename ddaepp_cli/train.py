"""`ddaepp train`: the training loop (SPEC §3–4) on Hugging Face Accelerate.

Randomness is split so that results do not depend on the process count:
* per-sample randomness of the objective (flip bits — for cached latents the choice between the image's
  latent and its mirror's —, augmentation parameters, the contrastive second view, diffusion times,
  noise, CFG label dropout, SRA teacher times) is drawn for the whole global batch from one shared generator (same
  seed, same state on every rank) and each rank takes its slice — two processes see exactly the draws
  one process sees;
* dropout uses the per-rank torch RNG (seed + rank).
Both generators, the data position, optimizer, scaler and EMA counter are checkpointed, so
re-running the same command continues exactly (same losses as an uninterrupted run on CPU).

What is optimised is `losses.Objective`: the backbone plus the auxiliary modules (EDM2's
uncertainty u(σ), the contrastive heads), wrapped together for DDP. The backbone's weights and EMA go
into model/ema.safetensors; the auxiliary modules and their EMA (the teacher's projection head) are
training-only and travel in state.pt.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .build import (build_backbone, build_formulation, build_objective, count_params, dataset_geometry,
                    load_training_data)
from .checkpoint import (checkpoint_recipe, latest_checkpoint, load_training_state, load_weights_into,
                         save_checkpoint)
from .console import info, progress
from .ema import EMA
from .errors import Interrupted, NonFiniteError, UsageError
from .recipe import Recipe, diff_recipes, recipe_to_dict, recipe_to_yaml


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
        diffs = [d for d in diff_recipes(old, recipe) if not d.startswith("name:")]
        if diffs and not allow_recipe_change:
            shown = "; ".join(diffs[:4]) + (f"; … ({len(diffs)} keys)" if len(diffs) > 4 else "")
            raise UsageError(f"{run_dir} was trained with another recipe ({shown}); "
                             f"use another --run-dir, or --allow-recipe-change to resume anyway")
        return latest_checkpoint(run_dir)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise UsageError(f"{run_dir} is not empty and holds no ddaepp run (no recipe.yaml); choose another --run-dir")
    return None


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _truncate_metrics(file: Path, step: int) -> None:
    """On resume, drop metric lines logged after the checkpoint (they will be logged again)."""
    if not file.is_file():
        return
    keep = []
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    _write_text_atomic(file, "".join(k + "\n" for k in keep))


# ------------------------------------------------------------------------------------------------
# Pieces of the loop
# ------------------------------------------------------------------------------------------------


def effective_precision(recipe: Recipe, device: torch.device) -> str:
    """Accelerate mixed-precision mode. CPU runs fp32 (CPU autocast is slower than fp32 here)."""
    if device.type != "cuda":
        return "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[recipe.train.precision]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms (1-d tensors) and what the model names in `no_weight_decay()`.

    UViT (DDAE++ App. B): the positional embedding is named there, while the [CLS] token (1, 1, D)
    keeps its decay.
    """
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(recipe: Recipe, model: torch.nn.Module, device: torch.device,
                    aux: torch.nn.Module | None = None) -> torch.optim.Optimizer:
    """Adam/AdamW over the backbone, then the auxiliary modules (same rules, their own groups)."""
    t = recipe.train
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    groups = []
    for module in (model, aux):
        if module is None or not any(p.requires_grad for p in module.parameters()):
            continue
        groups += param_groups(module, t.weight_decay) if t.optimizer == "adamw" else \
            [{"params": [p for p in module.parameters() if p.requires_grad], "weight_decay": t.weight_decay}]
    return cls(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps, **fast)


def lr_at(recipe: Recipe, step: int, warmup_steps: int) -> float:
    """Linear warm-up (per step) to the constant base lr (DDAE++ Tab. 10)."""
    if warmup_steps <= 0:
        return recipe.train.lr
    return recipe.train.lr * min(1.0, (step + 1) / warmup_steps)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(),
             "numpy": torch.from_numpy(np.frombuffer(json.dumps(_np_state()).encode(), dtype=np.uint8).copy()),
             "python": torch.tensor(list(json.dumps(random.getstate()).encode()), dtype=torch.uint8)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _np_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    name, keys, pos, has_gauss, cached = json.loads(bytes(state["numpy"].tolist()).decode())
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    py = json.loads(bytes(state["python"].tolist()).decode())
    random.setstate((py[0], tuple(py[1]), py[2]))


class _StopFlag:
    """SIGINT/SIGTERM: finish the step, write a checkpoint, exit 130."""

    def __init__(self) -> None:
        self.raised = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a notebook worker)
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.raised:  # a second signal: the checkpoint is still written (exit 130 means one was)
            info(f"received signal {signum} again: still finishing the step and writing the checkpoint "
                 "(SIGKILL stops at once, losing the steps since the last checkpoint)")
            return
        self.raised = True
        info(f"received signal {signum}: finishing the step and writing a checkpoint")

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _fault_steps() -> set[int]:
    """Fault injection for tests (DDAEPP_FAULT_NAN_STEPS=5,6): those steps get a NaN loss."""
    raw = os.environ.get("DDAEPP_FAULT_NAN_STEPS", "")
    return {int(s) for s in raw.split(",") if s.strip()}


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


def train(recipe: Recipe, run_dir: str | os.PathLike, *, max_steps: int | None = None,
          allow_recipe_change: bool = False) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from .data import BatchStream, to_model_range
    from .sample import generate, sampling_options, save_grid

    run_dir = Path(run_dir)
    t = recipe.train
    precision = effective_precision(recipe, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process

    # Every rank checks (read-only): a refusal then stops all ranks alike instead of leaving the
    # others waiting in a collective. Rank 0's answer is used so all ranks resume the same step.
    resume_from = prepare_run_dir(run_dir, recipe, allow_recipe_change=allow_recipe_change)
    if world > 1:
        resume_from = gather_object([str(resume_from) if resume_from else ""])[0]
        resume_from = Path(resume_from) if resume_from else None

    dataset = load_training_data(recipe)
    plan = make_plan(recipe, world, len(dataset), max_steps)
    formulation = build_formulation(recipe)

    torch.manual_seed(t.seed + rank)  # dropout; per-sample draws come from `shared` below
    np.random.seed(t.seed + rank)
    random.seed(t.seed + rank)
    model = build_backbone(recipe).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if t.compile and device.type == "cpu":  # benchmarks/group_train.py: compile loses on CPU for the UNets
        info("warning: train.compile on a CPU: the UNet step measured 0.83-0.88x the speed of eager after "
             "3 min of compilation (benchmarks/bench.py); it is meant for GPUs")
    objective = build_objective(recipe, model, formulation, net=torch.compile(model) if t.compile else model)
    aux = objective.aux.to(device)  # EDM2 u(σ), contrastive heads (empty for a plain recipe)
    if world > 1 and device.type == "cuda":
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(aux)  # head BN statistics over all processes
    ema_kw = dict(decay=t.ema.decay, warmup=t.ema.warmup, inv_gamma=t.ema.inv_gamma, power=t.ema.power)
    ema = EMA(model, **ema_kw)
    aux_ema = EMA(aux, **ema_kw) if len(aux.state_dict()) else None  # holds the teacher's projector
    optimizer = build_optimizer(recipe, model, device, aux)
    shared = torch.Generator(device=device).manual_seed(t.seed)  # same on every rank
    start_step, nonfinite_total = 0, 0

    if resume_from is not None:
        state = load_training_state(resume_from)
        load_weights_into(model, resume_from / "model.safetensors", f"{recipe.model.backbone} network")
        load_weights_into(ema.module, resume_from / "ema.safetensors", f"{recipe.model.backbone} network")
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        if aux_ema is not None:
            aux.load_state_dict(state["aux"])
            aux_ema.module.load_state_dict(state["aux_ema"])
            aux_ema.load_state_dict(state["ema"])
        shared.set_state(state["shared_generator"].to(shared.get_state().device))
        rngs = state["rng"]
        if len(rngs) != world:
            info(f"note: resuming {len(rngs)}-process state with {world} processes; "
                 "per-rank dropout RNG is re-derived (per-sample draws are unaffected)")
        else:
            _set_rng_state(rngs[rank])
        start_step = int(state["step"])
        nonfinite_total = int(state.get("nonfinite_total", 0))
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        info(f"resuming {run_dir} from step {start_step} ({resume_from.name})")

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            _write_text_atomic(run_dir / "recipe.yaml", recipe_to_yaml(recipe))
        else:
            _truncate_metrics(run_dir / "metrics.jsonl", start_step)
        meta = {"ddaepp": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
                "git_revision": _git_revision(), "world_size": world, "precision": precision,
                "device": str(device), "started": datetime.now(timezone.utc).isoformat(),
                "resumed_from": str(resume_from) if resume_from else None}
        _write_text_atomic(run_dir / "meta.json", json.dumps(meta, indent=2) + "\n")

    net, optimizer = accelerator.prepare(objective, optimizer)  # DDP over backbone + aux together
    stream = BatchStream(dataset, global_batch=t.global_batch, rank=rank, world_size=world, seed=t.seed,
                         start_step=start_step, num_workers=recipe.data.num_workers if not dataset.in_memory else 0,
                         pin_memory=device.type == "cuda" and not dataset.in_memory,
                         device=device if dataset.in_memory else None)
    batches = iter(stream)
    total_steps = plan.total_steps
    warm = plan.warmup_steps or 0
    lo, hi = rank * plan.per_process_batch, (rank + 1) * plan.per_process_batch
    faults = _fault_steps()
    test_delay = float(os.environ.get("DDAEPP_TEST_STEP_DELAY", "0"))  # lets fault tests kill mid-run
    sample_shape = (dataset.channels, dataset.image_size, dataset.image_size)

    def checkpoint(step: int) -> None:
        rngs = gather_object([_rng_state()]) if world > 1 else [_rng_state()]
        if not main:
            return
        state = {"step": step, "optimizer": optimizer.state_dict(), "ema": ema.state_dict(),
                 "shared_generator": shared.get_state().cpu(), "rng": rngs,
                 "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                 "data": stream.state_dict(), "nonfinite_total": nonfinite_total}
        if aux_ema is not None:  # training-only modules: tensors, so weights_only loading works
            state["aux"] = {k: v.detach().cpu() for k, v in aux.state_dict().items()}
            state["aux_ema"] = {k: v.detach().cpu() for k, v in aux_ema.module.state_dict().items()}
        save_checkpoint(run_dir, step, recipe=recipe, model=model, ema=ema.module, state=state,
                        keep_last=t.keep_last, milestones=t.milestones)

    def sample_grid(step: int) -> None:
        if main and t.sample_every and recipe.sample.steps != 0:
            seeds = list(range(t.sample_grid))
            images = generate(ema.module, formulation, seeds, shape=sample_shape,
                              sampler=recipe.sample.sampler, steps=recipe.sample.steps,
                              clip=recipe.sample.clip_x0, batch_size=recipe.sample.batch_size, device=device,
                              **sampling_options(recipe, ema.module, seeds, device=device))
            save_grid(images, run_dir / "samples" / f"grid-{step:07d}.png")

    loss_sum = torch.zeros((), device=device)
    part_sums: dict[str, torch.Tensor] = {}  # loss_diff, loss_moco with contrastive learning
    teacher_aux = aux_ema.module if aux_ema is not None else None
    logged_steps, good_steps, consecutive_bad, last_log = 0, 0, 0, time.perf_counter()
    step = start_step
    objective.train()  # backbone, heads (batch-norm) and u(σ) (forced weight normalisation)
    with _StopFlag() as stop, progress(total_steps, "train", "step", start=start_step) as bar:
        while step < total_steps:
            images, labels = next(batches)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            latent = images.ndim == 5  # cached latents: (b, 2, C, H, W), the image's and its mirror's (latents.py)
            x = images if latent else to_model_range(images)
            # Per-sample draws for the global batch, then this rank's slice (see module docstring).
            B = t.global_batch
            if recipe.data.hflip:
                flip = torch.rand(B, device=device, generator=shared)[lo:hi] < 0.5
                x = torch.where(flip[:, None, None, None, None], x[:, 1:], x[:, :1])[:, 0] if latent else \
                    torch.where(flip[:, None, None, None], x.flip(3), x)
            elif latent:
                x = x[:, 0]
            if t.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            draws = objective.draw(B, x.shape[1:], generator=shared, device=device)[lo:hi]

            step_loss = torch.zeros((), device=device)
            step_parts: dict[str, torch.Tensor] = {}
            for m in range(plan.grad_accum):
                sl = slice(m * plan.micro_batch, (m + 1) * plan.micro_batch)
                sync = nullcontext() if m == plan.grad_accum - 1 else accelerator.no_sync(net)
                with sync, accelerator.autocast():
                    batch = objective.batch(x[sl], draws[sl], labels[sl])  # views, times, noise, labels
                    keys = objective.teacher_keys(ema.module, teacher_aux, batch, draws[sl],
                                                  gather=accelerator.gather, rank=rank)  # EMA teacher (CL)
                    target = objective.teacher_targets(ema.module, batch, draws[sl])  # EMA teacher (SRA)
                    loss, parts = net(batch, keys, target, step / plan.steps_per_epoch)  # L_diff (+ γ·L_MoCo or λ·L_SRA)
                    if step in faults:
                        loss = loss * float("nan")
                accelerator.backward(loss / plan.grad_accum)
                step_loss += loss.detach() / plan.grad_accum
                for k, v in parts.items():
                    step_parts[k] = step_parts.get(k, 0.0) + v / plan.grad_accum

            grad_norm = accelerator.clip_grad_norm_(net.parameters(), t.grad_clip if t.grad_clip else float("inf"))
            finite = bool(torch.isfinite(grad_norm))  # host sync: non-finite guard (the aug pad margin is the other)
            if finite:
                for g in optimizer.param_groups:
                    g["lr"] = lr_at(recipe, step, warm)
                optimizer.step()
                ema.update(model)
                if aux_ema is not None:
                    aux_ema.update(aux)
                loss_sum += step_loss
                for k, v in step_parts.items():
                    part_sums[k] = part_sums.get(k, 0.0) + v
                good_steps += 1
                consecutive_bad = 0
            else:  # skipped: no update, not in the logged mean, counted in metrics.jsonl
                consecutive_bad += 1
                nonfinite_total += 1
            optimizer.zero_grad(set_to_none=True)
            step += 1
            logged_steps += 1

            if consecutive_bad >= t.max_nonfinite:
                last = latest_checkpoint(run_dir)
                kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint was written yet"
                raise NonFiniteError(f"{consecutive_bad} non-finite losses/gradients in a row at step {step}; "
                                     f"stopped; {kept} (lower train.lr or enable train.grad_clip)")
            if step % t.log_every == 0 or step == total_steps:
                mean_loss = accelerator.reduce(loss_sum, "mean").item() / good_steps if good_steps else None
                now = time.perf_counter()
                rate = logged_steps * t.global_batch / (now - last_log)
                rec = {"step": step, "epoch": step / plan.steps_per_epoch, "loss": mean_loss,
                       "grad_norm": float(grad_norm), "lr": lr_at(recipe, step - 1, warm),
                       "img_per_s": rate, "nonfinite_skipped": nonfinite_total}
                for k, v in part_sums.items():  # means over the interval's good steps, like `loss`
                    rec[k] = accelerator.reduce(v, "mean").item() / good_steps if good_steps else None
                part_sums.clear()
                if main:
                    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                        f.write(json.dumps(rec) + "\n")
                loss_sum.zero_()
                logged_steps, good_steps, last_log = 0, 0, now
                shown = f"{mean_loss:.4f}" if mean_loss is not None else "skipped"
                bar.update(0, extra=f"loss {shown} {rate:.1f} img/s")
            bar.update(1)
            if test_delay:
                time.sleep(test_delay)

            stop_now = stop.raised
            if world > 1:
                flag = torch.tensor([float(stop_now)], device=device)
                stop_now = bool(accelerator.reduce(flag, "sum").item() > 0)
            if step % t.checkpoint_every == 0 or step == total_steps or stop_now:
                checkpoint(step)
            if t.sample_every and (step % t.sample_every == 0 or step == total_steps):
                sample_grid(step)
            if stop_now:
                accelerator.wait_for_everyone()
                raise Interrupted(f"interrupted at step {step}; checkpoint written to {run_dir}/checkpoints; "
                                  f"re-run the same command to resume")

    accelerator.wait_for_everyone()
    return {"run_dir": str(run_dir), "step": step, "total_steps": total_steps,
            "checkpoint": str(latest_checkpoint(run_dir)) if main else None,
            "nonfinite_skipped": nonfinite_total}
