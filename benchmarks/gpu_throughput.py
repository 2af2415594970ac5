"""GPU training throughput and model-FLOP utilisation (MFU) at the papers' per-GPU batch sizes.

    python benchmarks/gpu_throughput.py                # on an NVIDIA GPU
    python benchmarks/gpu_throughput.py --cpu-check    # tiny configs on the CPU: imports, FLOP counting

1. Peak: a large bf16 matmul (8192³, TFLOP/s) on this device — the MFU denominator.
2. Per network, the training step exactly as `ddaepp train` runs it (trainstep.py: the recipe's
   objective, bf16 autocast, fused Adam(W), grad clip, EMA) at the per-GPU batch of the paper
   (global batch ÷ GPUs the paper used; DDAE++ Tab. 7, 10):
     dit-B/1, dit-L/1   LightningDiT on 16×16×32 latents, global 1024 on 6 GPUs → 171 per GPU (1024/6 = 170.7)
     ddpmpp             CIFAR 32×32×3, global 256 on 4 GPUs → 64 per GPU
     ddpm, uvit         (optional) 512 / 4 → 128 and 256 / 4 → 64
   images/s from the median step; model FLOPs per image counted with torch.utils.flop_counter
   (forward; training = 3 × forward), cross-checked analytically for DiT; MFU = FLOP/s ÷ peak.
3. Sampling: `sample.generate` (the `ddaepp sample` path) with the recipe's sampler for a few steps:
   images/s and image-NFE/s.
Writes benchmarks/results/gpu-<device name>-<UTC stamp>.json. Without a CUDA device it exits with
code 3 and one line (unless --cpu-check).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

# name → (backbone spec in backbones.py, paper global batch, GPUs in the paper)
MODELS = {
    "dit-B/1": ("dit-B/1", 1024, 6),
    "dit-L/1": ("dit-L/1", 1024, 6),
    "ddpmpp": ("ddpmpp", 256, 4),
    "ddpm": ("ddpm", 512, 4),
    "uvit": ("uvit", 256, 4),
}
DEFAULT_MODELS = ("dit-B/1", "dit-L/1", "ddpmpp")


def per_gpu_batch(global_batch: int, gpus: int) -> int:
    return math.ceil(global_batch / gpus)


def matmul_peak(device: torch.device, *, n: int = 8192, dtype=torch.bfloat16, reps: int = 20) -> dict:
    """Best-of TFLOP/s of an n×n×n matmul in `dtype`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "tflops": 2 * n ** 3 / best / 1e12, "best_s": best}


def _sdpa_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    """QKᵀ and AV of scaled-dot-product attention: 2·B·H·Lq·Lk·(Dqk + Dv) (2 per multiply-add)."""
    *bh, lq, d = q_shape
    lk, dv = k_shape[-2], v_shape[-1]
    return 2 * math.prod(bh) * lq * lk * (d + dv)


def _attention_ops() -> dict:
    """Attention kernels FlopCounterMode may not know: which one SDPA dispatches to depends on the torch
    release and the device (torch 2.14's CPU path, `_scaled_dot_product_flash_attention_for_cpu`, has no
    formula and counted 0). Registering the formula for every variant makes the count version-independent."""
    ops = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            ops[packet] = _sdpa_flops  # FlopCounterMode looks formulas up by op packet
    return ops


def count_forward_flops(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, **cond) -> int:
    """Forward FLOPs of one call (matmuls, convolutions, attention) by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_attention_ops()) as fc:
        model(x, t, **cond)
    return int(fc.get_total_flops())


def dit_forward_flops(cfg: dict) -> int:
    """Analytic forward FLOPs per image of ddaepp's LightningDiT (2 per multiply-add; matmuls only)."""
    D, L, p, C = cfg["width"], cfg["depth"], cfg["patch_size"], cfg["in_channels"]
    N = (cfg["image_size"] // p) ** 2
    h = int(2 / 3 * cfg["mlp_ratio"] * D)
    per_block = (2 * D * 6 * D  # adaLN modulation (per image)
                 + 2 * N * D * 3 * D + 2 * 2 * N * N * D + 2 * N * D * D  # qkv, QKᵀ and AV, proj
                 + 2 * N * D * 2 * h + 2 * N * h * D)  # SwiGLU w12, w3
    embed = 2 * N * C * p * p * D + 2 * (256 * D + D * D)  # patch embedding, time MLP
    final = 2 * D * 2 * D + 2 * N * D * p * p * C
    return L * per_block + embed + final


def measure_model(name: str, device: torch.device, *, cpu_check: bool, steps: int, warmup: int,
                  sample_steps: int, log) -> dict:
    from backbones import SPECS, load
    from ddaepp_cli.build import backbone_kwargs
    from ddaepp_cli.sample import generate
    from trainstep import TrainBench

    key, global_batch, gpus = MODELS[name]
    spec = SPECS[key]
    recipe = load(spec.recipe, spec.overrides(cpu_check))
    batch = 2 if cpu_check else per_gpu_batch(global_batch, gpus)
    log(f"{name}: batch {batch} (global {global_batch} on {gpus} GPUs in the paper)")
    bench = TrainBench(recipe, device=device, batch=batch)
    model = bench.model
    cfg = backbone_kwargs(recipe)
    kw = {"class_labels": bench.labels[:1]} if getattr(model, "num_classes", 0) else {}
    fwd = count_forward_flops(model, bench.x[:1], torch.full((1,), 0.5, device=device), **kw)
    out = {"model": name, "recipe": spec.recipe, "params": bench.num_params, "batch": batch,
           "paper_global_batch": global_batch, "paper_gpus": gpus, "precision": bench.precision,
           "forward_flops_per_image": fwd, "train_flops_per_image": 3 * fwd}
    if cfg.get("name") == "dit":
        analytic = dit_forward_flops(model.config)
        out["forward_flops_analytic"] = analytic
        out["counted_over_analytic"] = fwd / analytic
    for _ in range(warmup):
        bench.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        bench.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    out.update(step_s=step_s, step_samples_s=times, img_per_s=batch / step_s,
               train_tflops=3 * fwd * batch / step_s / 1e12)
    if device.type == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    # sampling with the recipe's sampler (RF: Euler; EDM: Heun), a few steps
    sampler = recipe.sample.sampler or bench.formulation.samplers[0]
    if sampler == "rk45":
        sampler = "euler"
    sb = 2 if cpu_check else recipe.sample.batch_size
    ema = bench.ema.module
    nfe = {"n": 0}
    hook = ema.register_forward_pre_hook(lambda m, a: nfe.__setitem__("n", nfe["n"] + 1))
    shape = bench.shape
    generate(ema, bench.formulation, list(range(sb)), shape=shape, sampler=sampler, steps=sample_steps,
             batch_size=sb, device=device)  # warm-up
    nfe["n"] = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate(ema, bench.formulation, list(range(sb)), shape=shape, sampler=sampler, steps=sample_steps,
             batch_size=sb, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    hook.remove()
    out["sampling"] = {"sampler": sampler, "steps": sample_steps, "nfe": nfe["n"], "batch": sb, "seconds": dt,
                       "img_per_s": sb / dt, "img_nfe_per_s": sb * nfe["n"] / dt,
                       "precision": "fp32 (as `ddaepp sample`)"}
    del bench, model, ema
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-check", "--dry-run", action="store_true", dest="cpu_check",
                    help="tiny configs on the CPU: check imports, FLOP counting and the JSON (no GPU needed)")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per model")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    if not args.cpu_check and not torch.cuda.is_available():
        print("gpu_throughput.py: no CUDA device found — this benchmark needs an NVIDIA GPU "
              "(--cpu-check runs a tiny CPU self-test)", file=sys.stderr)
        return 3
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        print(f"gpu_throughput.py: unknown model(s) {', '.join(bad)}; valid: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    from report import machine

    device = torch.device("cpu" if args.cpu_check else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    if args.cpu_check:
        args.steps, args.warmup, args.sample_steps = min(args.steps, 2), min(args.warmup, 1), min(args.sample_steps, 2)
    log("matmul peak")  # bf16 on the GPU; the CPU check uses float32 (CPU bf16 matmuls are emulated)
    peak = (matmul_peak(device, n=512, dtype=torch.float32, reps=3) if args.cpu_check
            else matmul_peak(device, n=8192, dtype=torch.bfloat16, reps=20))
    results = {"machine": machine(), "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
               "cpu_check": args.cpu_check, "peak_matmul": peak, "models": {}}
    for name in models:
        r = measure_model(name, device, cpu_check=args.cpu_check, steps=args.steps, warmup=args.warmup,
                          sample_steps=args.sample_steps, log=log)
        r["mfu"] = r["train_tflops"] / peak["tflops"]
        results["models"][name] = r
        log(f"{name}: {r['img_per_s']:.1f} img/s, {r['train_tflops']:.2f} TFLOP/s, MFU {100 * r['mfu']:.1f} %; "
            f"sampling {r['sampling']['img_nfe_per_s']:.1f} img·NFE/s")
    results["wall_s"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dev = re.sub(r"[^A-Za-z0-9._-]+", "-", results["device"]).strip("-")
    path = args.out / f"gpu-{dev}-{stamp}.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"training throughput on {results['device']} (peak {peak['dtype']} matmul "
                        f"{peak['tflops']:.2f} TFLOP/s)")
    for col in ("model", "params", "batch/GPU", "img/s", "GFLOP/img (train)", "TFLOP/s", "MFU", "sampling img·NFE/s"):
        table.add_column(col, justify="right")
    for name, r in results["models"].items():
        table.add_row(name, f"{r['params'] / 1e6:.1f}M", str(r["batch"]), f"{r['img_per_s']:.1f}",
                      f"{r['train_flops_per_image'] / 1e9:.1f}", f"{r['train_tflops']:.2f}", f"{100 * r['mfu']:.1f} %",
                      f"{r['sampling']['img_nfe_per_s']:.1f}")
    Console().print(table)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
