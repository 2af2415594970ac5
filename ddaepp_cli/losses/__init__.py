"""The training objective L = L_diff + γ·L_MoCo (DDAE++ §4.2) or L_diff + λ·L_SRA (SRA) as one module, with
its per-sample draws.

`Objective` holds everything that receives gradients — the backbone and the auxiliary modules (EDM2's
uncertainty u(σ), the contrastive heads) — so that one DDP wrapper all-reduces all of them. The
train step (train.py) is

    draws = objective.draw(B_global, shape, generator=shared)[lo:hi]     # every random number
    batch = objective.batch(x, draws)                                    # views, times, noise, labels
    keys  = objective.teacher_keys(ema_net, ema_aux, batch, draws, …)   # no grad; None without CL
    target = objective.teacher_targets(ema_net, batch, draws)           # no grad; None without SRA
    loss, parts = ddp_objective(batch, keys, target, epoch)

Class-conditional backbones (DiT with `num_classes > 0`): the data labels are replaced by the null class
with probability `label_dropout` (CFG training, LightningDiT 0.1); the drop bits are per-sample draws.

Randomness: all per-sample draws (augmentation parameters, the second view, diffusion times and
noise, the teacher's noise) come from one generator for the whole global batch in a fixed order, so
a rank's slice is the same for any process count. The order starts with t and noise exactly as a
plain diffusion step draws them, so recipes without augmentation keep their random stream.

Views: with augmentation the batch is the augmented image (label = its 9-d EDM label); with
contrastive learning two independently augmented views of each image, stacked (2b, …), each with its
own diffusion time and noise. `contrastive.diffusion_views` says which get the diffusion loss:
`both` (default — the online forward of both views is needed for q1 and q2 anyway, so the second
diffusion loss is free) or `first`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable

import torch
from torch import Tensor, nn

from ..diffusion.augment import AugmentPipe, AugParams
from .contrastive import ContrastiveHead, Keys
from .sra import SRAHead

__all__ = ["Batch", "ContrastiveHead", "Draws", "Keys", "Objective", "SRAHead"]


@dataclass
class Draws:
    """Per-sample random draws of one step for n images; `draws[lo:hi]` slices every field."""

    t: Tensor  # (n,) diffusion time of view 1 (paper convention)
    noise: Tensor  # (n, C, H, W)
    aug: AugParams | None = None  # view 1's augmentation
    aug2: AugParams | None = None  # contrastive: view 2's augmentation, time and noise
    t2: Tensor | None = None
    noise2: Tensor | None = None
    key_noise: Tensor | None = None  # (n, 2, C, H, W): the teacher's noise for views 1 and 2
    label_drop: Tensor | None = None  # (n,) bool: CFG label dropout (class-conditional models)
    sra_u: Tensor | None = None  # (n,) U(0, 1): SRA's dynamic teacher-time gap

    def __getitem__(self, sl: slice) -> "Draws":
        return replace(self, **{f.name: getattr(self, f.name)[sl] for f in fields(self)
                                if getattr(self, f.name) is not None})


@dataclass
class Batch:
    """What the network trains on: x0 of every view (V·b, C, H, W) with its time, noise and label."""

    x0: Tensor
    t: Tensor
    noise: Tensor
    aug_label: Tensor | None
    views: int  # 1, or 2 with contrastive learning (view 1 rows first)
    class_labels: Tensor | None = None  # (b,) after label dropout; None for unconditional backbones


class Objective(nn.Module):
    """Diffusion loss (+ γ·MoCo) of a backbone; `aux` holds the trainable non-backbone modules."""

    def __init__(self, net: nn.Module, formulation, *, augment: AugmentPipe | None = None,
                 contrastive: ContrastiveHead | None = None, sra: SRAHead | None = None,
                 num_classes: int = 0, label_dropout: float = 0.0):
        super().__init__()
        self.net = net  # the backbone (possibly torch.compile'd); checkpointed separately
        self.formulation = formulation
        self.augment = augment
        self.num_classes, self.label_dropout = num_classes, label_dropout if num_classes > 0 else 0.0
        self.aux = nn.ModuleDict()  # optimised, EMA'd and checkpointed with the training state
        if getattr(formulation, "uncertainty", None) is not None:
            self.aux["uncertainty"] = formulation.uncertainty  # EDM2 u(σ): the formulation calls it
        if contrastive is not None:
            self.aux["contrastive"] = contrastive
        if sra is not None:
            self.aux["sra"] = sra

    @property
    def sra(self) -> SRAHead | None:
        return self.aux["sra"] if "sra" in self.aux else None

    @property
    def contrastive(self) -> ContrastiveHead | None:
        return self.aux["contrastive"] if "contrastive" in self.aux else None

    # ------------------------------------------------------------------ randomness and inputs

    def draw(self, n: int, shape: tuple[int, ...], *, generator: torch.Generator | None,
             device: torch.device | str) -> Draws:
        """Every per-sample draw for n images of `shape` (C, H, W), in a fixed order (module doc)."""
        size = tuple(shape[-2:])
        aug = self.augment.draw(n, size=size, generator=generator, device=device) if self.augment else None
        t = self.formulation.sample_time(n, device=device, generator=generator)
        noise = torch.randn((n, *shape), device=device, generator=generator)
        d = Draws(t=t, noise=noise, aug=aug)
        if self.contrastive is not None:
            d.aug2 = self.augment.draw(n, size=size, generator=generator, device=device)
            d.t2 = self.formulation.sample_time(n, device=device, generator=generator)
            d.noise2 = torch.randn((n, *shape), device=device, generator=generator)
            d.key_noise = torch.randn((n, 2, *shape), device=device, generator=generator)
        if self.label_dropout > 0:  # after the draws above: recipes without labels keep their stream
            d.label_drop = torch.rand(n, device=device, generator=generator) < self.label_dropout
        if self.sra is not None:
            d.sra_u = torch.rand(n, device=device, generator=generator)
        return d

    @torch.no_grad()
    def batch(self, x: Tensor, d: Draws, labels: Tensor | None = None) -> Batch:
        """Views of the images x (b, C, H, W) under the draws d (b rows); `labels` (b,) the data's classes."""
        if self.num_classes > 0:
            if labels is None:
                raise ValueError("a class-conditional backbone needs the data's labels")
            y = labels.to(x.device).long()
            if d.label_drop is not None:
                y = torch.where(d.label_drop, torch.full_like(y, self.num_classes), y)  # null class
            return Batch(x, d.t, d.noise, None, 1, y)
        if self.augment is None:
            return Batch(x, d.t, d.noise, None, 1)
        x1 = self.augment(x, d.aug)
        if self.contrastive is None:
            return Batch(x1, d.t, d.noise, d.aug.label.to(x.dtype), 1)
        x2 = self.augment(x, d.aug2)
        return Batch(torch.cat((x1, x2)), torch.cat((d.t, d.t2)), torch.cat((d.noise, d.noise2)),
                     torch.cat((d.aug.label, d.aug2.label)).to(x.dtype), 2)

    @torch.no_grad()
    def teacher_keys(self, teacher: nn.Module, teacher_aux: nn.ModuleDict, batch: Batch, d: Draws, *,
                     gather: Callable[[Tensor], Tensor] = lambda k: k, rank: int = 0) -> Keys | None:
        """The EMA teacher's keys of both views at the fixed target time; None without contrastive."""
        head = self.contrastive
        if head is None:
            return None
        f = self.formulation
        t = torch.full_like(batch.t, head.target_time, dtype=torch.float64)  # (2b,) paper time
        noise = torch.cat((d.key_noise[:, 0], d.key_noise[:, 1]))  # (2b, C, H, W)
        x_t = f.perturb(batch.x0, t, noise)
        scale = f.net_input_scale(t)
        x_in = (x_t if isinstance(scale, float) else x_t * scale.reshape(-1, 1, 1, 1)).to(batch.x0.dtype)
        return ContrastiveHead.teacher_keys(teacher, teacher_aux["contrastive"], x_in, f.net_time(t),
                                            batch.aug_label, gather, rank)

    @torch.no_grad()
    def teacher_targets(self, teacher: nn.Module, batch: Batch, d: Draws) -> Tensor | None:
        """SRA: the EMA teacher's block output at t' < t, same noise and labels; None without SRA.

        `forward_features` stops right after the teacher's block (taps.py early exit)."""
        sra = self.sra
        if sra is None:
            return None
        f = self.formulation
        t = sra.teacher_time(f, batch.t, d.sra_u)  # (b,) paper time
        x_t = f.perturb(batch.x0, t, batch.noise)
        scale = f.net_input_scale(t)
        x_in = (x_t if isinstance(scale, float) else x_t * scale.reshape(-1, 1, 1, 1)).to(batch.x0.dtype)
        feats = teacher.forward_features(x_in, f.net_time(t), [sra.teacher_layer], class_labels=batch.class_labels)
        return feats[sra.teacher_layer]  # (b, N, D)

    # ------------------------------------------------------------------ the loss

    def forward(self, batch: Batch, keys: Keys | None = None, sra_target: Tensor | None = None,
                epoch: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar training loss and its detached parts (for logging)."""
        head, sra = self.contrastive, self.sra
        layers = (head.layer,) if head is not None else (sra.student_layer,) if sra is not None else ()
        out = self.formulation.loss(self.net, batch.x0, t=batch.t, noise=batch.noise,
                                    aug_label=batch.aug_label, class_labels=batch.class_labels,
                                    feature_layers=layers)
        per_sample = out.loss.float()  # (V·b,)
        if sra is not None:
            l_diff = per_sample.mean()
            l_sra = sra(out.features[sra.student_layer], sra_target)
            return l_diff + sra.weight_at(epoch) * l_sra, {"loss_diff": l_diff.detach(), "loss_sra": l_sra.detach()}
        if head is None:
            return per_sample.mean(), {}
        b = batch.x0.shape[0] // batch.views
        l_diff = (per_sample if head.diffusion_views == "both" else per_sample[:b]).mean()
        l_moco = head(out.features[head.layer], self.formulation.net_time(batch.t), keys)
        return l_diff + head.weight * l_moco, {"loss_diff": l_diff.detach(), "loss_moco": l_moco.detach()}
