"""One optimisation step of `TrainState` on one global batch (this rank's share of it).

Randomness is split so that results do not depend on the process count: every per-sample draw of the
objective (flip bits — for cached latents the choice between the image's latent and its mirror's —,
augmentation, the contrastive second view, diffusion times, noise, CFG label dropout, SRA teacher
times) is made for the whole global batch from the shared generator, and each rank takes its slice.

A step whose gradients are not finite is skipped (no update, no EMA update). With fp16 the scaler is
updated either way, so an overflow backs the scale off; an overflow with a finite loss is normal in the
first fp16 steps and is not counted towards `train.max_nonfinite`.

With several processes "finite" is decided over all of them: one all-reduce of two flags (gradients,
loss) per step, so that every process skips, counts and eventually stops at the same step. A loss that is
NaN on one rank only is a non-finite step on every rank, not an overflow on the others (which would let
that rank alone reach `train.max_nonfinite` and stop while the others wait in their next collective).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .faults import NONE, Faults
from .state import TrainState, lr_at


@dataclass
class StepResult:
    loss: torch.Tensor  # () mean training loss of the step (this rank's share), detached
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # loss_diff, loss_moco / loss_sra
    grad_norm: float = 0.0
    applied: bool = True  # False: skipped (non-finite gradients)
    overflow: bool = False  # skipped under fp16 with a finite loss (the scaler backs off)


def select_view(x: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
    """Images (b, C, H, W) flipped where `flip`; cached latents (b, 2, C, H, W) pick the image's
    latent or its mirror's (latents.py)."""
    if x.ndim == 5:
        return x[:, 0] if flip is None else torch.where(flip[:, None, None, None, None], x[:, 1:], x[:, :1])[:, 0]
    return x if flip is None else torch.where(flip[:, None, None, None], x.flip(3), x)


def train_step(ts: TrainState, x: torch.Tensor, labels: torch.Tensor, *, plan, warmup_steps: int,
               no_sync=None, faults: Faults = NONE) -> StepResult:
    """x: this rank's images in the model range (or cached latents); labels: their classes. `faults`:
    test-only fault injection (faults.py)."""
    recipe, t = ts.recipe, ts.recipe.train
    B, device = t.global_batch, ts.device
    lo, hi = ts.rank * plan.per_process_batch, (ts.rank + 1) * plan.per_process_batch
    flip = torch.rand(B, device=device, generator=ts.shared)[lo:hi] < 0.5 if recipe.data.hflip else None
    x = select_view(x, flip)
    if t.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    obj = ts.objective
    draws = obj.draw(B, x.shape[1:], generator=ts.shared, device=device)[lo:hi]

    step_loss = torch.zeros((), device=device)
    parts: dict[str, torch.Tensor] = {}
    for m in range(plan.grad_accum):
        sl = slice(m * plan.micro_batch, (m + 1) * plan.micro_batch)
        last = m == plan.grad_accum - 1
        with (nullcontext() if last or no_sync is None else no_sync()), ts.autocast():
            batch = obj.batch(x[sl], draws[sl], labels[sl])  # views, times, noise, labels
            teach = obj.teacher_outputs(ts.teacher, ts.teacher_aux, batch, draws[sl], gather=ts.gather,
                                        rank=ts.rank)  # the auxiliary losses' EMA teacher (no grad)
            loss, step_parts = ts.net(batch, teach, ts.step / plan.steps_per_epoch)
            loss, backprop = faults.after_forward(ts.step, loss)
        ts.scaler.scale(backprop / plan.grad_accum).backward()
        step_loss += loss.detach().float() / plan.grad_accum
        for k, v in step_parts.items():
            parts[k] = parts.get(k, 0.0) + v / plan.grad_accum

    ts.scaler.unscale_(ts.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(list(ts.parameters()), t.grad_clip if t.grad_clip else float("inf"))
    bad = (~torch.isfinite(torch.stack((grad_norm.float(), step_loss.float())))).float()
    grads_ok, loss_ok = (ts.reduce_mean(bad) == 0).tolist()  # over every process (module doc); one host sync
    if grads_ok:
        for g in ts.optimizer.param_groups:
            g["lr"] = lr_at(recipe, ts.step, warmup_steps)
        ts.scaler.step(ts.optimizer)  # optimizer.step(); the scaler found no inf in unscale_
        ts.update_ema()
    ts.scaler.update()  # every step: an fp16 overflow halves the scale
    ts.optimizer.zero_grad(set_to_none=True)
    ts.step += 1
    if not grads_ok:
        ts.nonfinite_total += 1
    return StepResult(step_loss, parts, float(grad_norm), applied=bool(grads_ok),
                      overflow=bool(not grads_ok and loss_ok and ts.scaler.is_enabled()))
