"""torch.compile vs eager training step of one backbone, in a child process with a deadline.

A cold inductor compile of a UNet's forward + backward takes minutes on a small CPU (C++ kernels built
one by one; warm cache: seconds), so it runs in its own process group that the driver kills at the
deadline; the row then reads 'n/a' with the reason. The child measures eager and compiled steps of
the same weights interleaved (so the ratio is one run's) and prints one JSON line:

    python benchmarks/compile_worker.py ddpm --batch 2 --reps 4 [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_compile(spec_key: str, *, quick: bool, batch: int, reps: int, timeout_s: float) -> dict:
    """Driver side: the child's JSON, or {"status": "timeout" | "error", "error": …}."""
    if timeout_s < 10:
        return {"status": "skipped", "error": f"no time left in the budget ({timeout_s:.0f} s)"}
    cmd = [sys.executable, str(HERE / "compile_worker.py"), spec_key, "--batch", str(batch), "--reps", str(reps)]
    if quick:
        cmd.append("--quick")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and its inductor compile workers (its own group)
        proc.communicate()
        why = f"compile + measurement did not finish within {timeout_s:.0f} s (cold inductor cache on a small CPU)"
        return {"status": "timeout", "error": why, "wall_s": time.perf_counter() - t0}
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " ".join(err.strip().splitlines()[-1:]) or f"exit code {proc.returncode}"
        return {"status": "error", "error": tail[:500], "wall_s": time.perf_counter() - t0}
    res = json.loads(lines[-1])
    res["wall_s"] = time.perf_counter() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE))
    import torch

    from backbones import SPECS, load
    from timing import sync, time_interleaved
    from trainstep import TrainBench

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = SPECS[args.spec]
    bench = TrainBench(load(spec.recipe, spec.overrides(args.quick)), device=device, batch=args.batch)
    eager = bench.step_fn()
    for _ in range(2):
        eager()
    try:
        from torch._dynamo.utils import counters

        compiled_obj = bench.compiled_objective()
        t0 = time.perf_counter()
        bench.step(compiled_obj)
        sync(device)
        first = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 — the row records why compile is unavailable here
        msg = " ".join(f"{type(e).__name__}: {e}".split())[:500]
        print(json.dumps({"status": "error", "error": msg}))
        return
    t = time_interleaved({"eager": eager, "compiled": bench.step_fn(compiled_obj)}, args.reps, warmup=1, device=device)
    med = t.median
    inductor = {k: v for k, v in counters["inductor"].items() if "cache" in k}
    print(json.dumps({
        "status": "ok", "eager_s": med["eager"], "compiled_s": med["compiled"], "first_call_s": first,
        "compile_s": max(0.0, first - med["compiled"]), "speedup": med["eager"] / med["compiled"],
        "paired": t.paired("eager", "compiled"), "samples": t.samples, "inductor_cache": inductor,
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }))


if __name__ == "__main__":
    main()
