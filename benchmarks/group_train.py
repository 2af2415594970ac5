"""Groups a and b: the training step per backbone at paper size, variants interleaved in one run.

a. per backbone: our default step (eager, fused SDPA, the recipe's precision: fp32 on CPU, bf16
   autocast on GPU) against
     control the same step again (the noise floor: identical work, so its ratio's distance from 1 is
             what this machine's noise does to every other ratio of the backbone);
     naive   the reference layout: explicit softmax(QKᵀ/√d)V attention, fp32, default memory format
             (acceptance: naive ÷ ours ≥ 1, our step at least as fast);
     channels-last (UNets);
     taps    `forward_with_features` at the self-conditioning layer instead of the plain forward;
     torch.compile — in a child process with a deadline (compile_worker.py), run last by the driver.
b. self-conditioning (the recipe's `_sc` twin): parameters (target ≤ 1.5 %) and step time (≤ 3 %).
"""

from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

from backbones import SPECS, UNETS, load
from naive_attention import naive_attention, naive_sdpa
from report import Row
from timing import time_interleaved
from trainstep import TrainBench


def backbone_keys(ctx) -> list[str]:
    keys = ["ddpm", "ddpmpp", "uvit", "dit-B/1"]
    if ctx.with_dit_l:
        keys.append("dit-L/1")
    return keys


@torch.no_grad()
def _naive_matches(bench: TrainBench) -> float:
    """max |out_naive − out_sdpa| of the network on the bench's batch (eval mode, fp32)."""
    model = bench.model
    was = model.training
    model.eval()
    t = torch.full((bench.batch,), 0.5, device=bench.device)
    kw = {"class_labels": bench.labels} if getattr(model, "num_classes", 0) else {}
    ours = model(bench.x, t, **kw)
    with naive_attention():
        ref = model(bench.x, t, **kw)
    model.train(was)
    return float((ours.float() - ref.float()).abs().max())


@torch.no_grad()
def attention_calls(bench: TrainBench) -> list[tuple]:
    """Every attention call of one forward: (q, k, v shapes, mask or None), recorded by a patched SDPA."""
    calls = []
    fused = F.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape), attn_mask))
        return fused(q, k, v, attn_mask=attn_mask, **kw)

    model = bench.model
    t = torch.full((bench.batch,), 0.5, device=bench.device)
    kw = {"class_labels": bench.labels} if getattr(model, "num_classes", 0) else {}
    F.scaled_dot_product_attention = record
    try:
        model(bench.x, t, **kw)
    finally:
        F.scaled_dot_product_attention = fused
    return calls


def attention_op_timings(calls: list[tuple], device, reps: int):
    """Forward + backward of all of one forward's attention calls: fused SDPA vs the naive layout."""
    g = torch.Generator(device=device).manual_seed(0)
    inputs = [tuple(torch.randn(s, device=device, generator=g, requires_grad=True) for s in shapes) + (mask,)
              for *shapes, mask in calls]

    def run(fn):
        def go():
            for q, k, v, mask in inputs:
                fn(q, k, v, attn_mask=mask).sum().backward()
        return go

    return time_interleaved({"sdpa": run(F.scaled_dot_product_attention), "naive": run(naive_sdpa)}, reps,
                            warmup=1, device=device)


def run(ctx, groups: set[str]) -> list[Row]:
    rows: list[Row] = []
    for key in backbone_keys(ctx):
        spec = SPECS[key]
        ctx.log(f"[a/b] {key}: building")
        base = TrainBench(load(spec.recipe, spec.overrides(ctx.quick)), device=ctx.device, batch=ctx.batch)
        variants = {"ours": base.step_fn()}
        benches = [base]
        if "a" in groups:
            diff = _naive_matches(base)
            variants["naive"] = base.step_fn(mixed_precision=False, context=naive_attention)
            variants["control"] = base.step_fn()  # our step again: the noise floor of every ratio below
            variants["taps"] = base.step_fn(base.taps_objective(spec.tap_layer(ctx.quick)))
            if key in UNETS:
                cl = TrainBench(load(spec.recipe, spec.overrides(ctx.quick)), device=ctx.device, batch=ctx.batch,
                                channels_last=True)
                variants["channels_last"] = cl.step_fn()
                benches.append(cl)
        if "b" in groups:
            sc = TrainBench(load(spec.sc_recipe, spec.overrides(ctx.quick, selfcond=True)), device=ctx.device,
                            batch=ctx.batch)
            variants["selfcond"] = sc.step_fn()
            benches.append(sc)
        ctx.log(f"[a/b] {key}: timing {len(variants)} variants")
        warm = [b.step_fn() for b in benches for _ in range(ctx.warmup)]  # one per model: the variants share it
        t = time_interleaved(variants, ctx.reps, warm=warm, budget_s=ctx.group_budget("a"),
                             min_reps=ctx.min_reps(), device=ctx.device)
        med = t.median
        ours = med["ours"]
        ctx.train_rate[key] = ctx.batch / ours
        ctx.step_seconds[key] = ours
        prec = "fp32" if base.precision == "no" else base.precision
        common = {"rounds": t.rounds, "samples_s": t.samples, "batch": ctx.batch, "params": base.num_params,
                  "recipe": spec.recipe}

        def pair(num, den):
            p = t.paired(num, den)
            return p, f"ratio of medians {p['ratio_of_medians']:.3f}"

        if "a" in groups:
            rows.append(Row("a", key, f"step time, ours (eager, SDPA, {prec})", ours, "s",
                            note=f"batch {ctx.batch} → {ctx.batch / ours:.2f} img/s; "
                                 f"{base.num_params / 1e6:.1f}M params; {t.rounds} rounds",
                            extra=common))
            p, txt = pair("control", "ours")
            rows.append(Row("a", key, "control: ours ÷ ours (noise floor)", p["median"], "×", noise=p["half_iqr"],
                            note=f"{txt}; the same step timed twice — ratios within this of 1 are ties",
                            extra={"paired": p}))
            p, txt = pair("naive", "ours")
            rows.append(Row("a", key, "naive ref ÷ ours, training step", p["median"], "×",
                            (">=", 1.0), note=f"{txt}; max|Δout| {diff:.1e}", noise=p["half_iqr"],
                            extra={"paired": p, "naive_s": med["naive"], "ours_s": ours, "max_abs_diff_out": diff}))
            calls = attention_calls(base)
            at = attention_op_timings(calls, ctx.device, max(ctx.reps, 5))
            pa = at.paired("naive", "sdpa")
            share = at.median["sdpa"] / ours
            shapes = sorted({c[0] for c in calls})
            rows.append(Row("a", key, "naive ÷ SDPA, attention op fwd+bwd", pa["median"], "×", (">=", 1.0),
                            noise=pa["half_iqr"],
                            note=f"{len(calls)} calls/forward, q {' '.join('×'.join(map(str, q)) for q in shapes[:2])}"
                                 f"; attention = {100 * share:.1f} % of our step",
                            extra={"paired": pa, "seconds": at.median, "calls": len(calls),
                                   "q_shapes": [list(q) for q in shapes], "share_of_step": share}))
            if "channels_last" in variants:
                p, txt = pair("channels_last", "ours")
                rows.append(Row("a", key, "channels-last ÷ default", p["median"], "×", noise=p["half_iqr"],
                                note=txt + " (< 1: channels-last faster)",
                                extra={"paired": p, "channels_last_s": med["channels_last"]}))
            p, txt = pair("taps", "ours")
            rows.append(Row("a", key, f"feature taps ÷ plain (tap {spec.tap_layer(ctx.quick)})",
                            p["median"], "×", ("<=", 1.05), note=txt, noise=p["half_iqr"],
                            extra={"paired": p, "taps_s": med["taps"]}))
        if "b" in groups:
            sc = benches[-1]
            added = sc.num_params - base.num_params
            pct = 100.0 * added / base.num_params
            rows.append(Row("b", key, "self-cond parameters", pct, "%", ("<=", 1.5),
                            note=f"+{added:,} on {base.num_params:,} ({spec.sc_recipe})",
                            extra={"params": base.num_params, "selfcond_params": sc.num_params, "added": added}))
            p, txt = pair("selfcond", "ours")
            rows.append(Row("b", key, "self-cond step ÷ plain step", p["median"], "×", ("<=", 1.03),
                            note=txt, noise=p["half_iqr"],
                            extra={"paired": p, "selfcond_s": med["selfcond"], "ours_s": ours}))
        del variants, benches, base, warm
        cl = sc = None  # noqa: F841 — free this backbone's models before the next is built
        gc.collect()
    return rows


def compile_rows(ctx) -> list[Row]:
    """torch.compile vs eager per backbone, each in a child process given the time left in the budget."""
    from compile_worker import run_compile

    rows = []
    # transformers first: their repeated blocks compile to few distinct kernels (≈ 1.5 min cold on 2 cores),
    # a UNet's forward + backward to many (≈ 3-5 min cold; seconds with a warm inductor cache)
    for key in sorted(backbone_keys(ctx), key=lambda k: k in UNETS):
        if ctx.no_compile:
            res = {"status": "skipped", "error": "--no-compile" if not ctx.quick else "skipped in --quick "
                   "(a cold inductor compile takes minutes)"}
        else:
            left = ctx.time_left() - ctx.reserve_s
            ctx.log(f"[a] {key}: torch.compile (≤ {max(left, 0):.0f} s left)")
            res = run_compile(key, quick=ctx.quick, batch=ctx.batch, reps=ctx.compile_reps, timeout_s=left)
        if res.get("status") == "ok":
            p = res["paired"]
            cache = res.get("inductor_cache", {})
            hits, misses = cache.get("fxgraph_cache_hit", 0), cache.get("fxgraph_cache_miss", 0)
            state = "warm" if hits and not misses else "partly warm" if hits else "cold"
            rows.append(Row("a", key, "eager ÷ torch.compile (speed-up)", p["median"], "×", noise=p["half_iqr"],
                            note=f"compile {res['compile_s']:.0f} s "
                                 f"excluded ({state} inductor cache); "
                                 f"{res.get('graph_breaks', 0)} graph breaks",
                            extra=res))
        else:
            rows.append(Row("a", key, "eager ÷ torch.compile (speed-up)", None, "×", status="n/a",
                            note=res.get("error", "")[:160], extra=res))
    return rows
