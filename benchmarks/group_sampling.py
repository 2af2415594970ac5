"""Group e: sampling throughput and FID feature-extraction throughput (images/s).

* Samplers through `ddaepp sample`'s own path (`sample.generate`: per-seed noise, the sampler, uint8
  images) on the ddpmpp UNet at a small batch for a few steps: DDIM on DDPM, Heun on EDM, Euler on RF.
  The network forwards are counted (NFE) with a hook, so NFE/s is reported too.
* FID features through the real torch-fidelity Inception (`inception.load_extractor`) with random
  weights in the official layout (no download possible here; throughput does not depend on the
  values): float64 (ddaepp's default, batch-size independent features) vs float32, interleaved.
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import torch

from backbones import SPECS, load
from ddaepp_cli.build import backbone_kwargs
from ddaepp_cli.diffusion import build_formulation
from ddaepp_cli.nets import build_backbone
from ddaepp_cli.sample import generate
from report import Row
from timing import time_interleaved

SAMPLERS = (("ddpm", "ddim"), ("edm", "heun"), ("rf", "euler"))


def run(ctx) -> list[Row]:
    rows = []
    spec = SPECS["ddpmpp"]
    kw = backbone_kwargs(load(spec.recipe, spec.overrides(ctx.quick)))
    kw.pop("name")
    kw["dropout"] = 0.0
    torch.manual_seed(0)
    net = build_backbone("ddpmpp", **kw).to(ctx.device).eval().requires_grad_(False)
    shape = (kw["in_channels"], kw["image_size"], kw["image_size"])
    steps = 2 if ctx.quick else 3
    b = ctx.sample_batch
    nfe = {"n": 0}
    hook = net.register_forward_pre_hook(lambda m, a: nfe.__setitem__("n", nfe["n"] + 1))
    calls = {}
    for form_name, sampler in SAMPLERS:
        form = build_formulation(form_name)
        calls[f"{form_name}/{sampler}"] = (lambda f=form, s=sampler: generate(
            net, f, list(range(b)), shape=shape, sampler=s, steps=steps, batch_size=b, device=ctx.device))
    per_call_nfe = {}
    for k, fn in calls.items():  # counts forwards per call (and warms up)
        nfe["n"] = 0
        fn()
        per_call_nfe[k] = nfe["n"]
    ctx.log(f"[e] samplers on ddpmpp, batch {b}, {steps} steps")
    t = time_interleaved(calls, min(ctx.reps, 3), 0, budget_s=ctx.group_budget("e"), min_reps=ctx.min_reps(),
                         device=ctx.device)
    hook.remove()
    for k, s in t.median.items():
        rows.append(Row("e", f"sample {k}", f"images/s ({steps} steps, {per_call_nfe[k]} NFE, batch {b})", b / s,
                        "img/s", note=f"{b * per_call_nfe[k] / s:.2f} image-NFE/s; ddpmpp {shape[1]}×{shape[2]}",
                        extra={"seconds": s, "samples_s": t.samples[k], "nfe": per_call_nfe[k], "batch": b,
                               "steps": steps}))
    del net
    gc.collect()
    rows += fid_rows(ctx)
    return rows


def fid_rows(ctx) -> list[Row]:
    from ddaepp_cli.eval import inception

    b = ctx.fid_batch
    with tempfile.TemporaryDirectory() as tmp:
        ctx.log("[e] FID extractor: writing random Inception weights")
        weights = Path(tmp) / "inception-random.pth"
        torch.save(inception.random_state_dict(0), weights)
        ex = {dtype: inception.load_extractor(weights, ["2048"], device=ctx.device, dtype=dtype)
              for dtype in ("float64", "float32")}
    images = torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = images.to(ctx.device)

    def run(e):
        @torch.no_grad()
        def fn():
            feats = e(images)
            assert feats[0].shape == (b, 2048)
        return fn

    ctx.log(f"[e] FID features: batch {b}")
    t = time_interleaved({k: run(e) for k, e in ex.items()}, min(ctx.reps, 3), 1, budget_s=ctx.group_budget("e"),
                         min_reps=ctx.min_reps(), device=ctx.device)
    med = t.median
    rows = [Row("e", f"FID Inception {k}", f"images/s (32×32 → 299×299, batch {b})", b / med[k], "img/s",
                note="ddaepp default" if k == "float64" else "torch-fidelity default",
                extra={"seconds": med[k], "samples_s": t.samples[k], "batch": b}) for k in ex]
    p = t.paired("float64", "float32")
    rows.append(Row("e", "FID Inception", "float64 ÷ float32 time", p["median"], "×", noise=p["half_iqr"],
                    extra={"paired": p}))
    del ex
    gc.collect()
    return rows
