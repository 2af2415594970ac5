"""One training step exactly as `ddaepp train` runs it (train.py's inner loop, no gradient accumulation),
built from a recipe with the library's own constructors:

    draws = objective.draw(B, …)          per-sample times, noise, augmentation, views
    batch = objective.batch(x, draws)     (augmented) views
    keys / target                         EMA teacher: contrastive keys / SRA targets (None otherwise)
    loss = objective(batch, keys, target) L_diff (+ γ·L_MoCo or λ·L_SRA)
    backward, grad-norm clip + finite check, Adam(W) step, EMA update(s), zero_grad

Inputs are random tensors of the dataset's geometry (images in [−1, 1], normalised latents), fixed per
bench so every call does the same work. Variants of the *same* weights (`objective_for`): a compiled
network, a feature-tap wrapper; the naive-attention reference is the default objective run inside
`naive_attention()` in fp32.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ddaepp_cli.build import backbone_kwargs, build_formulation, build_objective
from ddaepp_cli.training.ema import EMA
from ddaepp_cli.nets import build_backbone
from ddaepp_cli.training.state import build_optimizer, effective_precision


class TapsNet(nn.Module):
    """Runs the backbone's `forward_with_features` at `layer` and folds the feature into the output
    (times 0), so the tap path is taken and the feature stays in the autograd graph."""

    def __init__(self, model: nn.Module, layer: str):
        super().__init__()
        self.model, self.layer = model, layer

    def forward(self, x, t, **cond):
        out, feats = self.model.forward_with_features(x, t, [self.layer], **cond)
        return out + 0.0 * feats[self.layer].float().mean().to(out.dtype)

    def forward_with_features(self, x, t, layers, **cond):
        return self.model.forward_with_features(x, t, layers, **cond)


class TrainBench:
    """A recipe's network, objective, optimiser and EMA on `device`, with a fixed random batch."""

    def __init__(self, recipe, *, device: torch.device, batch: int, channels_last: bool = False, seed: int = 0):
        kw = backbone_kwargs(recipe)
        name = kw.pop("name")
        self.recipe, self.device, self.batch = recipe, device, batch
        self.channels_last = channels_last
        torch.manual_seed(seed)
        self.model = build_backbone(name, **kw).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.formulation = build_formulation(recipe)
        self.objective = build_objective(recipe, self.model, self.formulation)
        self.aux = self.objective.aux.to(device)
        t = recipe.train
        ema_kw = dict(decay=t.ema.decay, warmup=t.ema.warmup, inv_gamma=t.ema.inv_gamma, power=t.ema.power)
        self.ema = EMA(self.model, **ema_kw)
        self.aux_ema = EMA(self.aux, **ema_kw) if len(self.aux.state_dict()) else None
        self.optimizer = build_optimizer(recipe, self.model, device, self.aux)
        self.params = [p for p in self.objective.parameters() if p.requires_grad]
        self.grad_clip = t.grad_clip if t.grad_clip else math.inf
        self.precision = effective_precision(recipe, device)  # "fp32" on CPU, the recipe's (bf16) on GPU
        self.generator = torch.Generator(device=device).manual_seed(seed)
        c, s = kw["in_channels"], kw["image_size"]
        self.shape = (c, s, s)
        g = torch.Generator().manual_seed(seed + 1)
        latent = recipe.data.dataset == "latents"
        x = torch.randn(batch, *self.shape, generator=g)  # normalised latents
        if not latent:  # images in [−1, 1]
            x = torch.rand(batch, *self.shape, generator=g) * 2 - 1
        self.x = x.to(device)
        classes = getattr(recipe.model, "num_classes", 0) or 10
        self.labels = torch.randint(0, classes, (batch,), generator=g).to(device)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.aux_params = sum(p.numel() for p in self.aux.parameters())

    # ------------------------------------------------------------------ variants of the same weights

    def objective_for(self, net: nn.Module):
        """An objective sharing this bench's backbone and auxiliary modules but calling `net`."""
        obj = build_objective(self.recipe, self.model, self.formulation, net=net)
        obj.aux = self.objective.aux  # the same heads (build_objective makes new ones)
        return obj

    def taps_objective(self, layer: str):
        self.model.resolve_layers([layer])  # UsageError on a wrong layer, before any timing
        return self.objective_for(TapsNet(self.model, layer))

    def compiled_objective(self, **compile_kw):
        return self.objective_for(torch.compile(self.model, **compile_kw))

    # ------------------------------------------------------------------ the step

    def autocast(self, enabled: bool = True):
        if self.precision == "fp32" or not enabled:
            return contextlib.nullcontext()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        return torch.autocast(self.device.type, dtype=dtype)

    def step(self, objective=None, *, mixed_precision: bool = True) -> float:
        """One optimisation step; returns nothing useful but forces the loss to exist (no host sync
        beyond train.py's own finite check)."""
        obj = self.objective if objective is None else objective
        x = self.x.contiguous(memory_format=torch.channels_last) if self.channels_last else self.x
        draws = obj.draw(self.batch, x.shape[1:], generator=self.generator, device=self.device)
        with self.autocast(mixed_precision):
            batch = obj.batch(x, draws, self.labels)
            teach = obj.teacher_outputs(self.ema.module, self.aux_ema.module if self.aux_ema else None, batch, draws)
            loss, _ = obj(batch, teach, 0.0)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if bool(torch.isfinite(grad_norm)):  # train.py's non-finite guard (a host sync on GPUs)
            self.optimizer.step()
            self.ema.update(self.model)
            if self.aux_ema is not None:
                self.aux_ema.update(self.aux)
        self.optimizer.zero_grad(set_to_none=True)

    def step_fn(self, objective=None, *, mixed_precision: bool = True, context=None):
        """A zero-argument callable running `step` (inside `context()` when given)."""
        if context is None:
            return lambda: self.step(objective, mixed_precision=mixed_precision)

        def fn():
            with context():
                self.step(objective, mixed_precision=mixed_precision)
        return fn
