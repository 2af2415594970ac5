"""Group c: what the auxiliary objectives add to a training step (the real `Objective`, as `ddaepp train`).

* Contrastive self-distillation (DDAE++ §4.2) on the full DDAE++ recipe cifar10_edm_ddpm_sc_aug_cl
  against its CL-free twin cifar10_edm_ddpm_sc_aug. CL trains on two views of every image (both get
  the diffusion loss), so two ratios: at the same b images (what an epoch costs) and against the
  plain step on 2b images (same diffusion samples: only the MoCo heads and the EMA teacher's partial
  forward remain).
* SRA (imagenet256_sra_lightning_ditb, DiT-B/2) against the same recipe with `sra.enabled=false`: the EMA
  teacher's forward up to its block plus the student head. Target: below +20 %.
"""

from __future__ import annotations

import gc

from backbones import load
from report import Row
from timing import time_interleaved
from trainstep import TrainBench

_QUICK_CL = ["model.channels=32", "model.ch_mults=[1,2]", "model.n_blocks=1", "model.attn_resolutions=[16]",
             "model.selfcond.layer=out_2", "contrastive.hidden=256"]
_QUICK_SRA = ["model.width=64", "model.depth=4", "model.heads=2", "data.image_size=8",
              "sra.student_layer=1", "sra.teacher_layer=3"]


def run(ctx) -> list[Row]:
    rows = []
    b = max(2, ctx.batch)  # MoCo heads batch-normalise each view: at least 2 images per view
    q_cl = _QUICK_CL if ctx.quick else []
    ctx.log("[c] contrastive: building")
    plain = TrainBench(load("cifar10_edm_ddpm_sc_aug", q_cl), device=ctx.device, batch=b)
    plain2 = TrainBench(load("cifar10_edm_ddpm_sc_aug", q_cl), device=ctx.device, batch=2 * b)
    cl = TrainBench(load("cifar10_edm_ddpm_sc_aug_cl", q_cl), device=ctx.device, batch=b)
    ctx.log("[c] contrastive: timing")
    t = time_interleaved({"plain": plain.step_fn(), "plain_2b": plain2.step_fn(), "cl": cl.step_fn()},
                         ctx.reps, ctx.warmup, budget_s=ctx.group_budget("c"), min_reps=ctx.min_reps(),
                         device=ctx.device)
    med = t.median
    p1, p2 = t.paired("cl", "plain"), t.paired("cl", "plain_2b")
    extra = {"seconds": med, "samples_s": t.samples, "batch": b, "aux_params": cl.aux_params,
             "params": cl.num_params}
    rows.append(Row("c", "ddpm CL", f"CL step ÷ plain step (same {b} images, 2 views)", p1["median"], "×",
                    noise=p1["half_iqr"], note=f"MoCo heads {cl.aux_params / 1e6:.1f}M params (Adam + EMA each step)",
                    extra={**extra, "paired": p1}))
    rows.append(Row("c", "ddpm CL", f"CL step ÷ plain step on {2 * b} images (heads + EMA teacher)",
                    p2["median"], "×", noise=p2["half_iqr"], note="same diffusion samples: the contrastive part only",
                    extra={**extra, "paired": p2}))
    del plain, plain2, cl
    gc.collect()

    q_sra = _QUICK_SRA if ctx.quick else []
    ctx.log("[c] SRA: building")
    plain = TrainBench(load("imagenet256_sra_lightning_ditb", [*q_sra, "sra.enabled=false"]), device=ctx.device,
                       batch=ctx.batch)
    sra = TrainBench(load("imagenet256_sra_lightning_ditb", q_sra), device=ctx.device, batch=ctx.batch)
    ctx.log("[c] SRA: timing")
    t = time_interleaved({"plain": plain.step_fn(), "sra": sra.step_fn()}, ctx.reps, ctx.warmup,
                         budget_s=ctx.group_budget("c"), min_reps=ctx.min_reps(), device=ctx.device)
    p = t.paired("sra", "plain")
    rows.append(Row("c", "dit-B/2 SRA", "SRA step ÷ plain step", p["median"], "×", ("<=", 1.20), noise=p["half_iqr"],
                    note=f"EMA teacher to block {sra.objective.aux['sra'].teacher_layer}; "
                         f"head {sra.aux_params / 1e6:.2f}M params",
                    extra={"seconds": t.median, "samples_s": t.samples, "paired": p, "batch": ctx.batch,
                           "params": sra.num_params, "aux_params": sra.aux_params}))
    del plain, sra
    gc.collect()
    return rows
