"""`TrainState`: every object that changes while a run trains, with one `state_dict()`.

It owns the backbone, its EMA, the auxiliary modules (EDM2's u(σ), the contrastive heads, SRA's head)
and their EMA, the optimiser, the gradient scaler, the shared per-sample generator and the counters.
Checkpointing writes `state_dict()`; resuming is `load(checkpoint)`; nothing else touches them.

Construction order is what makes many processes equal one:

1. every rank builds the networks from the same seed (identical initial weights everywhere);
2. `accelerator.prepare` wraps backbone + auxiliary modules in DDP, which broadcasts rank 0's
   parameters and buffers;
3. only then are the EMA copies (the SRA and contrastive *teacher*) made, from the synchronised
   modules — as EDM's training loop builds its EMA after DDP. A copy made before step 2 would keep
   each rank's own initialisation for ever (the teacher differs per rank; only rank 0's is saved);
4. the per-rank RNG (dropout) is seeded with seed + rank.

Precision (`train.precision`): bf16/fp16 autocast on a GPU (CPU runs fp32, benchmarks/); fp16 adds a
`torch.amp.GradScaler`. The scaler is updated after every step, including skipped ones, so an early
fp16 overflow backs the scale off as it should.
"""

from __future__ import annotations

import json
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..build import build_backbone, build_formulation, build_objective
from ..checkpoint import load_training_state, load_weights_into
from .ema import EMA
from ..recipe import Recipe
from .compiled import maybe_compile

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def effective_precision(recipe: Recipe, device: torch.device) -> str:
    """fp32 / bf16 / fp16 as run on `device`: CPUs run fp32 (CPU autocast is slower than fp32 here)."""
    return recipe.train.precision if device.type == "cuda" else "fp32"


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


# ------------------------------------------------------------------------------------------------
# Per-rank RNG state (dropout; python/numpy for anything that uses them)
# ------------------------------------------------------------------------------------------------


def seed_rank_rngs(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    np_state = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    state = {"torch": torch.get_rng_state(),
             "numpy": torch.from_numpy(np.frombuffer(json.dumps(np_state).encode(), dtype=np.uint8).copy()),
             "python": torch.tensor(list(json.dumps(random.getstate()).encode()), dtype=torch.uint8)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    name, keys, pos, has_gauss, cached = json.loads(bytes(state["numpy"].tolist()).decode())
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    py = json.loads(bytes(state["python"].tolist()).decode())
    random.setstate((py[0], tuple(py[1]), py[2]))


# ------------------------------------------------------------------------------------------------
# The state
# ------------------------------------------------------------------------------------------------


class TrainState:
    """See the module docstring. `accelerator` is a Hugging Face Accelerator (or None: one process)."""

    def __init__(self, recipe: Recipe, *, device: torch.device, accelerator=None, rank: int = 0,
                 world: int = 1, precision: str | None = None, compile_kw: dict | None = None):
        t = recipe.train
        self.recipe, self.device, self.rank, self.world = recipe, device, rank, world
        self.precision = precision or effective_precision(recipe, device)
        self.formulation = build_formulation(recipe)

        torch.manual_seed(t.seed)  # 1. the same initial weights (backbone and heads) on every rank
        self.model = build_backbone(recipe).to(device)
        if t.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        compiling = t.compile or compile_kw is not None
        self.objective = build_objective(recipe, self.model, self.formulation,
                                         net=maybe_compile(self.model, compiling, **(compile_kw or {})))
        self.aux = self.objective.aux.to(device)  # EDM2 u(σ), contrastive / SRA heads (may be empty)
        if world > 1 and device.type == "cuda":
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.aux)  # head BN statistics over all processes
        # 2. DDP over backbone + aux: broadcasts rank 0's parameters and buffers.
        self.net = accelerator.prepare(self.objective) if accelerator is not None else self.objective
        self.gather: Callable[[torch.Tensor], torch.Tensor] = accelerator.gather if accelerator else (lambda x: x)
        self.reduce_mean = (lambda x: accelerator.reduce(x, "mean")) if accelerator else (lambda x: x)

        # 3. Every copy from the synchronised modules.
        ema_kw = dict(decay=t.ema.decay, warmup=t.ema.warmup, inv_gamma=t.ema.inv_gamma, power=t.ema.power)
        self.ema = EMA(self.model, **ema_kw)
        self.aux_ema = EMA(self.aux, **ema_kw) if len(self.aux.state_dict()) else None
        self.teacher = maybe_compile(self.ema.module, compiling, **(compile_kw or {}))
        self.optimizer = build_optimizer(recipe, self.model, device, self.aux)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.shared = torch.Generator(device=device).manual_seed(t.seed)  # per-sample draws, same on every rank
        self.step, self.nonfinite_total = 0, 0
        self.data_state: dict | None = None  # the data stream's saved position (BatchStream.state_dict), on resume
        seed_rank_rngs(t.seed + rank)  # 4. dropout differs per rank

    # ------------------------------------------------------------------ precision

    def autocast(self):
        dtype = AMP_DTYPES[self.precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()

    # ------------------------------------------------------------------ parameters

    def parameters(self):
        """Everything the optimiser updates (backbone and auxiliary modules)."""
        return self.objective.parameters()

    def update_ema(self) -> None:
        self.ema.update(self.model)
        if self.aux_ema is not None:
            self.aux_ema.update(self.aux)

    @property
    def teacher_aux(self):
        return self.aux_ema.module if self.aux_ema is not None else None

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        """What state.pt holds (tensors and plain values: loadable with weights_only=True); the backbone
        and its EMA go to model/ema.safetensors. `rngs`: every rank's `rng_state()`."""
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "ema": self.ema.state_dict(),
                 "shared_generator": self.shared.get_state().cpu(), "rng": rngs,
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                 "nonfinite_total": self.nonfinite_total}
        if self.aux_ema is not None:  # training-only modules
            state["aux"] = {k: v.detach().cpu() for k, v in self.aux.state_dict().items()}
            state["aux_ema"] = {k: v.detach().cpu() for k, v in self.aux_ema.module.state_dict().items()}
        return state

    def load(self, ckpt: Path) -> str | None:
        """Resume from a checkpoint folder; returns a note for the log, or None."""
        state = load_training_state(ckpt)
        what = f"{self.recipe.model.backbone} network"
        load_weights_into(self.model, ckpt / "model.safetensors", what)
        load_weights_into(self.ema.module, ckpt / "ema.safetensors", what)
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        if self.aux_ema is not None:
            self.aux.load_state_dict(state["aux"])
            self.aux_ema.module.load_state_dict(state["aux_ema"])
            self.aux_ema.load_state_dict(state["ema"])
        self.shared.set_state(state["shared_generator"].to(self.shared.get_state().device))
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.data_state = state.get("data")  # train.py checks it against the data and restores the stream
        rngs = state["rng"]
        if len(rngs) != self.world:
            return (f"note: resuming {len(rngs)}-process state with {self.world} processes; "
                    "per-rank dropout RNG is re-derived (per-sample draws are unaffected)")
        set_rng_state(rngs[self.rank])
        return None
