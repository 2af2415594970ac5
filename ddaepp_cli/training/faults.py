"""Fault injection for tests: environment variables make chosen steps of chosen processes fail, so that
what many processes do when one of them fails is testable on a CPU (`torchrun --nproc_per_node 2`, gloo).

    DDAEPP_FAULT_RANKS=1            the ranks the step faults below apply to (default: every rank)
    DDAEPP_FAULT_NAN_STEPS=5,6      these steps' loss is NaN (so are their gradients)
    DDAEPP_FAULT_OVERFLOW_STEPS=3   these steps' gradients are infinite with a finite loss: what an fp16
                                    overflow looks like to the step
    DDAEPP_FAULT_RAISE_STEPS=7      the step raises RuntimeError between the forward and the backward pass
                                    (the other processes are then inside a collective)
    DDAEPP_FAULT_KILL_STEPS=7       the process SIGKILLs itself as the step starts
    DDAEPP_FAULT_SIGNAL_STEPS=7     the process sends itself SIGTERM as the step starts
    DDAEPP_FAULT_RESUME_DELAY=2     seconds to wait between choosing the checkpoint and loading it
    DDAEPP_FAULT_FP16_SCALER=1      every rank: the fp16 gradient scaler on a CPU run (which computes in fp32),
                                    so that fp16's overflow decisions run on a CPU

Steps count from 0 (the step that makes `step-0000001` is step 0). Unset variables inject nothing; the
production path reads them once per run. The other test hooks slow every rank down: DDAEPP_TEST_STEP_DELAY
(train.py, after each step), DDAEPP_TEST_SAVE_DELAY (checkpoint.py, inside a save) and
DDAEPP_TEST_LOCK_DELAY (runlock.py, between looking at the run folder and locking it).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import torch


def _steps(name: str) -> frozenset[int]:
    raw = os.environ.get(name, "")
    return frozenset(int(s) for s in raw.split(",") if s.strip())


@dataclass(frozen=True)
class Faults:
    nan: frozenset[int] = frozenset()
    overflow: frozenset[int] = frozenset()
    raise_at: frozenset[int] = frozenset()
    kill: frozenset[int] = frozenset()
    signal: frozenset[int] = frozenset()
    resume_delay: float = 0.0
    fp16_scaler: bool = False

    @classmethod
    def from_env(cls, rank: int) -> "Faults":
        fp16 = os.environ.get("DDAEPP_FAULT_FP16_SCALER", "") not in ("", "0")
        ranks = os.environ.get("DDAEPP_FAULT_RANKS", "")
        if ranks.strip() and rank not in {int(r) for r in ranks.split(",") if r.strip()}:
            return cls(fp16_scaler=fp16)
        return cls(nan=_steps("DDAEPP_FAULT_NAN_STEPS"), overflow=_steps("DDAEPP_FAULT_OVERFLOW_STEPS"),
                   raise_at=_steps("DDAEPP_FAULT_RAISE_STEPS"), kill=_steps("DDAEPP_FAULT_KILL_STEPS"),
                   signal=_steps("DDAEPP_FAULT_SIGNAL_STEPS"),
                   resume_delay=float(os.environ.get("DDAEPP_FAULT_RESUME_DELAY", "0")), fp16_scaler=fp16)

    def step_start(self, step: int) -> None:
        if step in self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        if step in self.signal:
            os.kill(os.getpid(), signal.SIGTERM)

    def after_forward(self, step: int, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to report, the loss to back-propagate) of a micro-batch at `step`."""
        if step in self.raise_at:
            raise RuntimeError(f"injected fault at step {step} (DDAEPP_FAULT_RAISE_STEPS)")
        if step in self.nan:
            loss = loss * float("nan")
        if step in self.overflow:
            return loss, loss * float("inf")
        return loss, loss

    def before_resume(self) -> None:
        if self.resume_delay:
            time.sleep(self.resume_delay)


NONE = Faults()
