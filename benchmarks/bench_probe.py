"""Probe and CKA benchmarks (SPEC §5, issue 4), ratios measured in one run.

    python benchmarks/bench_probe.py            # paper `ddpm` UNet at 32×32 (use a GPU)
    python benchmarks/bench_probe.py --quick    # channels-64 3-level UNet at 16×16, 256 images (CPU, minutes)

1. Linear-probe grid: wall time of training every (layer, time) head in one pass (`probe.run_bank`:
   one backbone forward per time per batch, stopping after the deepest layer, all heads in batched
   matmuls) against a single (layer, time) probe with the same epochs and data. Variants, interleaved
   round-robin so load drifts hit all alike:
     single@paper   one head at the paper's probe layer (out_6 of 12, DDAE++ Tab. 9), one time
     single@deep    one head at the deepest grid layer, one time
     grid L×1       every out_k, one time
     grid L×K       every out_k, K = 3 times (DDAE's grid)
   plus the L×K separate single probes the grid replaces (measured per layer at one time, × K: a
   probe's cost does not depend on the time value). Noise differs per time, so K times need K
   forwards per batch: the grid costs ≈ K × (a probe at its deepest layer), never less.
2. CKA: feature-space form against the Gram form at large N (same result, checked).
Results: one table on stdout, JSON in benchmarks/results/probe-<cpu|gpu>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import machine  # noqa: E402

from ddaepp_cli.cka import cka_feature_space, cka_gram  # noqa: E402
from ddaepp_cli.data import InMemoryImages  # noqa: E402
from ddaepp_cli.diffusion import build_formulation  # noqa: E402
from ddaepp_cli.features import parse_times, precision_for  # noqa: E402
from ddaepp_cli.nets import build_backbone  # noqa: E402
from ddaepp_cli.probe import PROTOCOLS, run_bank  # noqa: E402


def synthetic(n: int, channels: int, size: int, classes: int, seed: int) -> InMemoryImages:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, classes, (n,), generator=g)
    return InMemoryImages(images, labels, name="synthetic", split="train", root=None, num_classes=classes,
                          class_names=None)


def bench_probe(args, device) -> dict:
    torch.manual_seed(0)
    kw = dict(dropout=0.0)
    size = 32
    if args.quick:  # the quickstart's width at 16×16, three levels: nine decoder blocks
        size = 16
        kw.update(channels=64, ch_mults=(1, 2, 2), image_size=size, attn_resolutions=(8,))
    net = build_backbone("ddpm", **kw).to(device).eval().requires_grad_(False)
    form = build_formulation("ddpm")
    train = synthetic(args.n, 3, size, 10, 0)
    val = synthetic(args.batch, 3, size, 10, 1)
    outs = [n for n in net.layer_names if n.startswith("out_")]
    paper = outs[len(outs) // 2 - 1]  # out_6 of 12 (DDAE++ Tab. 9, DDPM); out_4 of 9 in --quick
    times = parse_times(form, "1,11,21", default=())
    common = dict(num_classes=10, protocol=PROTOCOLS["ddae++"], epochs=args.epochs, batch_size=args.batch, lr=4e-3,
                  seed=0, hflip=True, crop_pad=0, cache=False, device=device, precision=precision_for(device),
                  eval_stream=1 << 31)

    def run(layers, ts):
        def fn():
            run_bank(net, form, layers, ts, train, val, **common)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return fn

    variants = {"single@paper": run([paper], times[1:2]), "single@deep": run([outs[-1]], times[1:2]),
                f"grid {len(outs)}x1": run(outs, times[1:2]), f"grid {len(outs)}x{len(times)}": run(outs, times)}
    per_layer = {f"single {layer}": run([layer], times[1:2]) for layer in outs}
    samples = {k: [] for k in [*variants, *per_layer]}
    variants["single@paper"]()  # warm-up (allocator, kernels)
    for _ in range(args.reps):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    for k, fn in per_layer.items():  # the separate probes: one repetition each (there are L of them)
        t0 = time.perf_counter()
        fn()
        samples[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in samples.items()}
    separate = len(times) * sum(med[k] for k in per_layer)  # L × K separate probes
    grid_lk = med[f"grid {len(outs)}x{len(times)}"]
    return {
        "backbone": "ddpm" + (" (channels 64, mults 1-2-2, 16×16)" if args.quick else " (32×32)"),
        "paper_layer": paper, "images": args.n, "batch": args.batch,
        "epochs": args.epochs, "layers": outs, "times": [t.text for t in times], "seconds": med,
        "ratio_to_single_paper": {k: med[k] / med["single@paper"] for k in variants},
        "ratio_to_single_deep": {k: med[k] / med["single@deep"] for k in variants},
        "grid_LxK_per_time_vs_single_deep": grid_lk / len(times) / med["single@deep"],
        "separate_LxK_s": separate, "speedup_vs_separate": separate / grid_lk,
    }


def bench_cka(args) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.cka_n, 256, generator=g)
    y = x @ torch.randn(256, 256, generator=g) + torch.randn(args.cka_n, 256, generator=g)
    out = {"n": args.cka_n, "d": 256}
    for name, fn in (("feature_space", cka_feature_space), ("gram", cka_gram)):
        fn(x[:64], y[:64])
        t0 = time.perf_counter()
        out[f"{name}_value"] = fn(x, y)
        out[f"{name}_s"] = time.perf_counter() - t0
    assert abs(out["feature_space_value"] - out["gram_value"]) < 1e-8
    out["gram_over_feature"] = out["gram_s"] / out["feature_space_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="channels-64 3-level UNet at 16×16, fewer images (CPU)")
    ap.add_argument("--n", type=int, default=None, help="training images (default 4096, quick 256)")
    ap.add_argument("--batch", type=int, default=None, help="batch (default 512, quick 64)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cka-n", type=int, default=None, help="images for the CKA timing (default 16384, quick 4096)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    args.n = args.n or (256 if args.quick else 4096)
    args.batch = args.batch or (64 if args.quick else 512)
    args.cka_n = args.cka_n or (4096 if args.quick else 16384)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {"machine": machine(), "probe": bench_probe(args, device), "cka": bench_cka(args)}

    from rich.console import Console
    from rich.table import Table

    p = results["probe"]
    table = Table(title=f"probe grid ({device.type}, {p['backbone']}, {p['images']} images, batch {p['batch']}, "
                        f"{p['epochs']} epoch) — ratio to one probe")
    for col in ("variant", "seconds", f"÷ single@paper ({p['paper_layer']})", "÷ single@deep"):
        table.add_column(col)
    for k, s in p["seconds"].items():
        if k in p["ratio_to_single_paper"]:
            table.add_row(k, f"{s:.2f}", f"{p['ratio_to_single_paper'][k]:.2f}×", f"{p['ratio_to_single_deep'][k]:.2f}×")
    Console().print(table)
    c = results["cka"]
    print(f"grid L×K per time ÷ single@deep: {p['grid_LxK_per_time_vs_single_deep']:.2f}× (target ≤ 1.5×); "
          f"L×K separate probes {p['separate_LxK_s']:.1f} s = {p['speedup_vs_separate']:.1f}× the one-pass grid")
    print(f"CKA at N={c['n']}, D={c['d']}: feature space {c['feature_space_s']:.3f} s, Gram {c['gram_s']:.3f} s "
          f"({c['gram_over_feature']:.1f}× slower), same value {c['feature_space_value']:.6f}")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out / f"probe-{'gpu' if device.type == 'cuda' else 'cpu'}-{stamp}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
