"""Contrastive self-distillation: MoCo v3 with the diffusion EMA model as teacher (DDAE++ §4.2, App. A,
Tab. 6b–e; facebookresearch/moco-v3 `moco/builder.py`).

    q_i = pred(proj(pool(f_θ(view_i at a random t)) + e(t)))          online, with gradient
    k_i = proj_ema(pool(f_ema(view_i at the probing t)) + e_ema(t_p))    teacher, no gradient
    L_MoCo = InfoNCE(q_1, k_2) + InfoNCE(q_2, k_1),   L = L_diff + γ·L_MoCo,  γ = 0.01 (Tab. 6d)

* Feature (DDAE++ §4.2): the self-conditioning feature — the pooled output of the UNet's
  self-conditioning layer, or the UViT's [CLS] token (`cls` tap). `layer` may name any tap; its
  features are mean-pooled over H·W or tokens (Tab. 6e's "pooling of tokens" is `layer: out_2`).
  The online feature comes from the very forward that computes the diffusion loss (no extra pass).
* Teacher (DDAE++ §4.2): the generation EMA — no separate momentum encoder. The EMA backbone runs
  under no_grad and stops after `layer` (`forward_features`); its projection head is the EMA of the
  online one, updated with the backbone EMA (MoCo v3's momentum encoder includes the projector).
  It sees the other view at a fixed time: the Tab. 9 probing time by default (DDPM t = 11, EDM σ ≈ 0.06,
  RF t = 0.06; Tab. 6c: +0.7 % over SD-DiT's minimal noise), with that view's augmentation label.
* Time-dependent head (App. A): a time embedding — DDAE's TimeEmbedding, sinusoid(D/4) → MLP → D, of the
  formulation's network time — is added to the feature before the projector's first Linear; the
  teacher's head receives the probing time. `time_dependent=False` is "original MoCo v3" (Tab. 6b).

Choices where the paper is silent (recipe options, `contrastive.*`): MoCo v3's ViT heads — projector
3 layers, predictor 2, hidden 4096, output 256, Linear(bias=False) → BatchNorm → ReLU, final BatchNorm
without affine (moco-v3 `_build_mlp`, `last_bn=True`) — and τ = 0.2 (moco-v3 CONFIG.md, ViT). The
heads see one vector per image, so their cost is negligible next to the backbone's. Batch-norm
statistics are per view (MoCo v3 runs each view separately) and synchronised across processes
(SyncBatchNorm) when training on several; the teacher head uses batch statistics like MoCo v3's
momentum encoder. Keys are gathered from every process (negatives = micro-batch × processes: the
whole global batch when there is no gradient accumulation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nets.common import sinusoidal_embedding
from ..nets.layers import TimeEmbedding
from .aux import AuxLoss, teacher_input

def pool(feat: Tensor) -> Tensor:
    """Global average pool of a tap: (B, C, H, W) over H·W, (B, N, D) over tokens → (B, C)."""
    return feat.mean(dim=(2, 3)) if feat.ndim == 4 else feat.mean(dim=1)


def mlp(layers: int, in_dim: int, hidden: int, out_dim: int, norm: str) -> nn.Sequential:
    """moco-v3 `_build_mlp`: (Linear → BN → ReLU) × (layers − 1) → Linear → BN(affine=False).

    With `norm="none"` the Linears get biases instead of the normalisations.
    """
    mods: list[nn.Module] = []
    bn = norm == "batchnorm"
    for i in range(layers):
        d_in = in_dim if i == 0 else hidden
        d_out = out_dim if i == layers - 1 else hidden
        mods.append(nn.Linear(d_in, d_out, bias=not bn))
        if i < layers - 1:
            mods += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)] if bn else [nn.ReLU(inplace=True)]
        elif bn:
            mods.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*mods)


def info_nce(q: Tensor, k_all: Tensor, offset: int, tau: float) -> Tensor:
    """MoCo v3 `contrastive_loss`: q (b, d) against all gathered keys k_all (K, d); the positive of q[n]
    is k_all[offset + n]. Cross-entropy × 2τ (moco-v3 scales by 2τ so the gradient scale is τ-free)."""
    with torch.autocast(q.device.type, enabled=False):  # logits / τ in float32 under AMP
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k_all.float(), dim=1)
        logits = q @ k.t() / tau  # (b, K)
        labels = torch.arange(q.shape[0], device=q.device) + offset
        return F.cross_entropy(logits, labels) * (2 * tau)


@dataclass
class Keys:
    """Teacher keys of both views, gathered over processes; this process's rows start at `offset`."""

    k1: Tensor  # (K, dim) view 1
    k2: Tensor  # (K, dim) view 2
    offset: int


class ContrastiveHead(AuxLoss):
    """Time-dependent projector + predictor, and the symmetrised MoCo v3 loss (module docstring); an
    `AuxLoss` (aux.py): two views per image, keys from the EMA teacher."""

    name = "contrastive"
    views = 2

    @classmethod
    def from_recipe(cls, recipe, model: nn.Module, formulation) -> "ContrastiveHead | None":
        import dataclasses

        from ..recipe import PROBE_TIMES

        c = recipe.contrastive
        if not c.enabled:
            return None
        layer = c.layer or recipe.model.selfcond.layer  # default: the self-conditioning feature (§4.2)
        model.resolve_layers([layer])  # UsageError listing the valid taps
        text = c.target_t if c.target_t is not None else PROBE_TIMES[recipe.diffusion.formulation]
        with torch.device("cpu"):  # a schedule look-up, even when the heads are built on `meta`
            target = formulation.parse_time(text)
        kw = {k: v for k, v in dataclasses.asdict(c).items() if k not in ("enabled", "layer", "target_t")}
        return cls(model.feature_dims[layer], layer=layer, target_time=target, **kw)

    def __init__(self, feat_dim: int, *, layer: str, target_time: float, weight: float = 0.01,
                 tau: float = 0.2, hidden: int = 4096, dim: int = 256, proj_layers: int = 3,
                 pred_layers: int = 2, norm: str = "batchnorm", time_dependent: bool = True,
                 diffusion_views: str = "both"):
        super().__init__()
        self.layer, self.target_time, self.weight, self.tau = layer, float(target_time), float(weight), float(tau)
        self.diffusion_views = diffusion_views
        self.sinusoid_dim = max(2, feat_dim // 4)
        self.time_emb = TimeEmbedding(self.sinusoid_dim, feat_dim) if time_dependent else None
        self.projector = mlp(proj_layers, feat_dim, hidden, dim, norm)
        self.predictor = mlp(pred_layers, dim, hidden, dim, norm)

    @property
    def student_layers(self) -> tuple[str, ...]:
        return (self.layer,)

    def draw(self, n: int, shape: tuple[int, ...], *, generator, device) -> dict[str, Tensor]:
        return {"key_noise": torch.randn((n, 2, *shape), device=device, generator=generator)}  # teacher noise

    @torch.no_grad()
    def teacher(self, net: nn.Module, own_ema: nn.Module | None, formulation, batch, draws, *,
                gather: Callable[[Tensor], Tensor], rank: int) -> Keys:
        """The EMA teacher's keys of both views at the fixed target time."""
        t = torch.full_like(batch.t, self.target_time, dtype=torch.float64)  # (2b,) paper time
        noise = torch.cat((draws.key_noise[:, 0], draws.key_noise[:, 1]))  # (2b, C, H, W)
        x_in = teacher_input(formulation, batch.x0, t, noise)
        return self.teacher_keys(net, own_ema, x_in, formulation.net_time(t), batch.aug_label, gather, rank)

    def loss(self, features: dict[str, Tensor], batch, teacher_out: Keys, epoch: float,
             formulation) -> tuple[Tensor, dict[str, Tensor]]:
        l_moco = self(features[self.layer], formulation.net_time(batch.t), teacher_out)
        return self.weight * l_moco, {"loss_moco": l_moco.detach()}

    def project(self, feat: Tensor, t_net: Tensor) -> Tensor:
        """Tap (B, …) and network time (B,) → projection (B, dim); the time embedding enters before
        the first Linear (DDAE++ App. A)."""
        h = pool(feat).float()  # (B, C)
        if self.time_emb is not None:
            h = h + self.time_emb(sinusoidal_embedding(t_net, self.sinusoid_dim))  # (B, C)
        return self.projector(h)  # (B, dim)

    def forward(self, feat: Tensor, t_net: Tensor, keys: Keys) -> Tensor:
        """Online features of both views stacked (2b, …) with their network times → L_MoCo (scalar)."""
        b = feat.shape[0] // 2
        q1 = self.predictor(self.project(feat[:b], t_net[:b]))  # (b, dim), one view per call (BN stats)
        q2 = self.predictor(self.project(feat[b:], t_net[b:]))
        return info_nce(q1, keys.k2, keys.offset, self.tau) + info_nce(q2, keys.k1, keys.offset, self.tau)

    @staticmethod
    @torch.no_grad()
    def teacher_keys(teacher: nn.Module, head: "ContrastiveHead", x_in: Tensor, t_net: Tensor,
                     aug_label: Tensor | None, gather: Callable[[Tensor], Tensor], rank: int) -> Keys:
        """EMA backbone (stops after the layer) + EMA projector on both views (2b, …) at the fixed time."""
        feat = teacher.forward_features(x_in, t_net, [head.layer], aug_label=aug_label)[head.layer]
        b = x_in.shape[0] // 2
        was_training = head.training
        head.train()  # batch statistics, as MoCo v3's momentum encoder
        k1, k2 = head.project(feat[:b], t_net[:b]), head.project(feat[b:], t_net[b:])
        head.train(was_training)
        return Keys(gather(k1.float()), gather(k2.float()), rank * b)
