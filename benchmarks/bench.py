"""Ratio benchmarks measured in one run (SPEC §5): machines are noisy, ratios are not.

    python benchmarks/bench.py               # paper-size UNets, batch 2, CPU or GPU
    python benchmarks/bench.py --quick       # smaller nets (smoke test)

Per backbone (`ddpm`, `ddpmpp`) it times one training step (forward + backward + Adam) of
variants that are interleaved round-robin, and reports each as a ratio to the plain eager step:
* channels-last vs default memory format;
* feature-tap path (`forward_with_features` at the self-conditioning layer) vs plain forward —
  taps must cost nothing when unused and next to nothing when used;
* self-conditioning: parameter overhead (target ≤ 1.5 %) and step-time overhead (target ≤ 3 %).
Results are printed as one table and written to benchmarks/results/<machine>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ddaepp_cli.nets import build_backbone  # noqa: E402

SC_LAYER = {"ddpm": "out_6", "ddpmpp": "out_9"}  # DDAE++ Tab. 9 (CIFAR-10, DDPM/EDM)


def machine() -> dict:
    d = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
         "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
    return d


def make_step(name: str, *, device, batch: int, small: bool, selfcond: bool = False,
              channels_last: bool = False, taps: bool = False):
    kw = dict(dropout=0.0)
    if small:
        kw.update(channels=32)
    if selfcond:
        kw.update(selfcond_layer=SC_LAYER[name])
    torch.manual_seed(0)
    net = build_backbone(name, **kw).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.rand(batch, device=device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, foreach=True)
    layer = SC_LAYER[name]

    def step():
        if taps:
            out, feats = net.forward_with_features(x, t, [layer])
            loss = out.square().mean() + 0.0 * feats[layer].mean()
        else:
            loss = net(x, t).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    params = sum(p.numel() for p in net.parameters())
    return step, params


def time_interleaved(steps: dict, reps: int, warmup: int = 2) -> dict[str, float]:
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in steps}
    for _ in range(reps):
        for k, fn in steps.items():  # round-robin: drifts in machine load hit every variant alike
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="channels=32 nets (seconds, for smoke tests)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, results = [], {"machine": machine(), "batch": args.batch, "quick": args.quick, "backbones": {}}
    for name in ("ddpm", "ddpmpp"):
        variants, params = {}, {}
        for key, opts in {"eager": {}, "channels_last": {"channels_last": True}, "taps": {"taps": True},
                          "selfcond": {"selfcond": True}}.items():
            variants[key], params[key] = make_step(name, device=device, batch=args.batch, small=args.quick, **opts)
        times = time_interleaved(variants, args.reps)
        base = times["eager"]
        r = {"step_s": times, "ratio": {k: v / base for k, v in times.items()},
             "params": params["eager"], "selfcond_params": params["selfcond"] - params["eager"],
             "selfcond_param_pct": 100.0 * (params["selfcond"] - params["eager"]) / params["eager"]}
        results["backbones"][name] = r
        rows.append((name, r))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ddaepp benchmark ratios ({device.type}, batch {args.batch}"
                        f"{', quick' if args.quick else ''}) — lower is faster; 1.00 = plain eager step")
    for col in ("backbone", "params", "channels-last", "taps used", "self-cond step", "self-cond params"):
        table.add_column(col)
    for name, r in rows:
        table.add_row(name, f"{r['params']:,}", f"{r['ratio']['channels_last']:.2f}×", f"{r['ratio']['taps']:.2f}×",
                      f"{r['ratio']['selfcond']:.3f}× (target ≤ 1.03)",
                      f"+{r['selfcond_params']:,} ({r['selfcond_param_pct']:.2f} %, target ≤ 1.5 %)")
    Console().print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    tag = "gpu" if device.type == "cuda" else "cpu"
    out = args.out / f"bench-{tag}-{stamp}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
