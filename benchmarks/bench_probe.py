"""Probe grid and CKA benchmark on its own, with the L separate probes the grid replaces (slow).

    python benchmarks/bench_probe.py            # paper `ddpm` UNet at 32×32, 4096 images (use a GPU)
    python benchmarks/bench_probe.py --quick    # channels-64 3-level UNet at 16×16, 256 images (CPU, minutes)

The same measurement, without the separate probes, is group d of `bench.py` (group_probe.py holds
the code). Results: one table on stdout, JSON in benchmarks/results/probe-<cpu|gpu>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from group_probe import ProbeConfig, bench_cka, bench_probe  # noqa: E402
from report import machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="channels-64 3-level UNet at 16×16, fewer images (CPU)")
    ap.add_argument("--n", type=int, default=None, help="training images (default 4096, quick 256)")
    ap.add_argument("--batch", type=int, default=None, help="batch (default 512, quick 64)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cka-n", type=int, default=None, help="images for the CKA timing (default 16384, quick 4096)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        net = dict(channels=64, ch_mults=(1, 2, 2), image_size=16, attn_resolutions=(8,))
        cfg = ProbeConfig("ddpm (channels 64, mults 1-2-2, 16×16)", net, size=16, n=256, batch=64, cka_n=4096)
    else:
        cfg = ProbeConfig("ddpm (32×32)")
    cfg.n, cfg.batch, cfg.cka_n = args.n or cfg.n, args.batch or cfg.batch, args.cka_n or cfg.cka_n
    cfg.epochs, cfg.reps, cfg.separate = args.epochs, args.reps, True
    results = {"machine": machine(), "probe": bench_probe(cfg, device, quiet=False), "cka": bench_cka(cfg.cka_n)}

    from rich.console import Console
    from rich.table import Table

    p = results["probe"]
    table = Table(title=f"probe grid ({device.type}, {p['backbone']}, {p['images']} images, batch {p['batch']}, "
                        f"{p['epochs']} epoch) — ratio to one probe")
    for col in ("variant", "seconds", f"÷ single@paper ({p['paper_layer']})", "÷ single@deep"):
        table.add_column(col)
    for k, s in p["seconds"].items():
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
