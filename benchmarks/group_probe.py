"""Group d: the linear-probe grid in one pass against single probes, and CKA's two forms.

1. Probe grid (`probe.run_bank`: one backbone forward per time per batch, stopping after the deepest
   layer, all heads in batched matmuls) against one (layer, time) probe with the same epochs and data:
     single@paper   one head at the paper's probe layer (out_6 of 12, DDAE++ Tab. 9), one time
     single@deep    one head at the deepest grid layer, one time
     grid Lx1       every out_k, one time
     grid LxK       every out_k, K = 3 times (DDAE's grid)
   Noise differs per time, so K times need K forwards per batch: the grid costs ≈ K × (a probe at its
   deepest layer). Target: grid L×K per time ÷ single@deep ≤ 1.5. Optionally (`separate=True`, the
   standalone bench_probe.py) also the L separate single probes the grid replaces.
2. CKA: feature-space form against the Gram form at large N (same value, checked).
3. Latent probe features (`probe.LiveFeatures` on cached-latent pairs, as `ddaepp probe` runs on a DiT):
   one batch's pooled features against one full forward of the same batch — DiT-B/1 at paper size
   (32×16×16 VA-VAE latents, 256 tokens, width 768, 12 blocks; DDAE++ Tab. 8). Early exit makes block
   9 (Tab. 9's probe layer) cost about 9/12 of a forward, every block about one forward, and K times K
   forwards. Target: every-block features at one time ÷ full forward ≤ 1.1.

Sizes: GPU — the paper `ddpm` UNet at 32×32, 4096 images, batch 512; CPU — a channels-64 3-level UNet
at 16×16 on a few hundred images; --quick — a 2-level channels-32 UNet on 64 images.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field

import torch

import ddaepp_cli.eval.probe as probe_module
from ddaepp_cli.eval.cka import cka_feature_space, cka_gram
from ddaepp_cli.data import InMemoryImages
from ddaepp_cli.diffusion import build_formulation
from ddaepp_cli.eval.features import parse_times, precision_for
from ddaepp_cli.nets import build_backbone
from ddaepp_cli.eval.probe import PROTOCOLS, run_bank
from report import Row


@dataclass
class ProbeConfig:
    label: str
    net: dict = field(default_factory=dict)
    size: int = 32
    n: int = 4096
    batch: int = 512
    epochs: int = 1
    reps: int = 3
    cka_n: int = 16384
    separate: bool = False


def config_for(device: torch.device, quick: bool) -> ProbeConfig:
    if quick:
        return ProbeConfig("ddpm (channels 32, mults 1-2, 16×16)", dict(channels=32, ch_mults=(1, 2), n_blocks=1,
                           image_size=16, attn_resolutions=(8,)), size=16, n=64, batch=32, reps=2, cka_n=1024)
    if device.type == "cuda":
        return ProbeConfig("ddpm (32×32, paper size)")
    return ProbeConfig("ddpm (channels 64, mults 1-2-2, 16×16)", dict(channels=64, ch_mults=(1, 2, 2),
                       image_size=16, attn_resolutions=(8,)), size=16, n=128, batch=64, reps=3, cka_n=8192)


def synthetic(n: int, channels: int, size: int, classes: int, seed: int) -> InMemoryImages:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, classes, (n,), generator=g)
    return InMemoryImages(images, labels, name="synthetic", split="train", root=None, num_classes=classes,
                          class_names=None)


class _Silent:
    def update(self, n: int = 1, extra: str = "") -> None:
        pass


@contextlib.contextmanager
def quiet_progress():
    """Silence the probe's progress lines (dozens per measurement) while timing."""
    saved = probe_module.progress
    probe_module.progress = lambda *a, **k: contextlib.nullcontext(_Silent())
    try:
        yield
    finally:
        probe_module.progress = saved


def bench_probe(cfg: ProbeConfig, device: torch.device, quiet: bool = True) -> dict:
    torch.manual_seed(0)
    net = build_backbone("ddpm", dropout=0.0, **cfg.net).to(device).eval().requires_grad_(False)
    form = build_formulation("ddpm")
    train = synthetic(cfg.n, 3, cfg.size, 10, 0)
    val = synthetic(cfg.batch, 3, cfg.size, 10, 1)
    outs = [n for n in net.layer_names if n.startswith("out_")]
    paper = outs[len(outs) // 2 - 1]  # out_6 of 12 (DDAE++ Tab. 9, DDPM)
    times = parse_times(form, "1,11,21", default=())
    common = dict(num_classes=10, protocol=PROTOCOLS["ddae++"], epochs=cfg.epochs, batch_size=cfg.batch, lr=4e-3,
                  seed=0, hflip=True, crop_pad=0, cache=False, device=device, precision=precision_for(device),
                  eval_stream=1 << 31)

    def run(layers, ts):
        def fn():
            with quiet_progress() if quiet else contextlib.nullcontext():
                run_bank(net, form, layers, ts, train, val, **common)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return fn

    L, K = len(outs), len(times)
    variants = {"single@paper": run([paper], times[1:2]), "single@deep": run([outs[-1]], times[1:2]),
                f"grid {L}x1": run(outs, times[1:2]), f"grid {L}x{K}": run(outs, times)}
    samples = {k: [] for k in variants}
    variants["single@paper"]()  # warm-up (allocator, kernels)
    for _ in range(cfg.reps):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in samples.items()}
    out = {"backbone": cfg.label, "paper_layer": paper, "images": cfg.n, "batch": cfg.batch, "epochs": cfg.epochs,
           "layers": outs, "times": [t.text for t in times], "seconds": med, "samples_s": samples,
           "ratio_to_single_paper": {k: med[k] / med["single@paper"] for k in variants},
           "ratio_to_single_deep": {k: med[k] / med["single@deep"] for k in variants},
           "grid_LxK_per_time_vs_single_deep": med[f"grid {L}x{K}"] / K / med["single@deep"],
           "grid_Lx1_vs_single_deep": med[f"grid {L}x1"] / med["single@deep"], "L": L, "K": K}
    if cfg.separate:  # the L separate probes the grid replaces (one repetition each), × K times
        per_layer = {}
        for layer in outs:
            t0 = time.perf_counter()
            run([layer], times[1:2])()
            per_layer[layer] = time.perf_counter() - t0
        out["separate_LxK_s"] = K * sum(per_layer.values())
        out["speedup_vs_separate"] = out["separate_LxK_s"] / med[f"grid {L}x{K}"]
    return out


def bench_cka(n: int, d: int = 256) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, d, generator=g) + torch.randn(n, d, generator=g)
    out = {"n": n, "d": d}
    for name, fn in (("feature_space", cka_feature_space), ("gram", cka_gram)):
        fn(x[:64], y[:64])
        t0 = time.perf_counter()
        out[f"{name}_value"] = fn(x, y)
        out[f"{name}_s"] = time.perf_counter() - t0
    if abs(out["feature_space_value"] - out["gram_value"]) > 1e-8:
        raise AssertionError(f"CKA forms disagree: {out['feature_space_value']} vs {out['gram_value']}")
    out["gram_over_feature"] = out["gram_s"] / out["feature_space_s"]
    return out


def bench_latent_features(device: torch.device, quick: bool, batch: int | None = None, reps: int = 3) -> dict:
    """Seconds per batch: latent probe features (LiveFeatures, cached-mirror flips, noise) vs a forward."""
    from ddaepp_cli.nets.dit import build_dit
    from ddaepp_cli.eval.probe import LiveFeatures

    width, depth = (96, 4) if quick else (None, None)
    net = build_dit("B", in_channels=32, image_size=16, patch_size=1,
                    **({"width": width, "depth": depth, "heads": 4} if quick else {}))
    net = net.to(device).eval().requires_grad_(False)
    form = build_formulation("rf")
    batch = batch or (64 if device.type == "cuda" else (4 if quick else 2))
    prec = precision_for(device)
    g = torch.Generator().manual_seed(0)
    pairs = torch.randn(batch, 2, 32, 16, 16, generator=g).to(device)  # cached (latent, mirror latent) pairs
    blocks = list(net.layer_names)
    paper = blocks[round(len(blocks) * 9 / 12) - 1]  # Tab. 9: DiT-B block 9 of 12
    t_net = torch.full((batch,), 0.25, device=device)

    def features(layers, times):
        live = LiveFeatures(net, form, layers, parse_times(form, times, default=()), device=device, precision=prec,
                            hflip=True, crop_pad=0, seed=0)
        return lambda: live.train_batch(pairs, 0)

    def forward():
        from ddaepp_cli.eval.features import autocast

        with torch.inference_mode(), autocast(device, prec):
            net(pairs[:, 0], t_net)

    K = 3
    variants = {"forward": forward, f"block {paper}": features([paper], "0.25"),
                f"all {len(blocks)} blocks": features(blocks, "0.25"),
                f"all blocks x{K} times": features(blocks, "0.15,0.25,0.35")}
    for fn in variants.values():  # warm-up
        fn()
    samples = {k: [] for k in variants}
    for _ in range(reps):
        for k, fn in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"backbone": f"DiT-B/1 {'(quick: width 96, 4 blocks)' if quick else '(paper size)'}, 32×16×16 latents",
            "batch": batch, "paper_block": paper, "blocks": len(blocks), "K": K, "seconds": med, "samples_s": samples,
            "ratio": {k: med[k] / med["forward"] for k in variants}}


def latent_rows(ctx) -> list[Row]:
    lf = bench_latent_features(ctx.device, ctx.quick)
    r, L, K = lf["ratio"], lf["blocks"], lf["K"]
    note = f"{lf['backbone']}, batch {lf['batch']}; forward {lf['seconds']['forward']:.3f} s"
    return [
        Row("d", "latent probe features", f"all {L} blocks, 1 time ÷ one full forward", r[f"all {L} blocks"], "×",
            ("<=", 1.1), note=note, extra={"latent_features": lf}),
        Row("d", "latent probe features", f"block {lf['paper_block']} (early exit) ÷ one full forward",
            r[f"block {lf['paper_block']}"], "×", ("<=", 0.9), note="Tab. 9's DiT-B probe block"),
        Row("d", "latent probe features", f"all blocks, {K} times, per time ÷ one full forward",
            r[f"all blocks x{K} times"] / K, "×", ("<=", 1.1), note="one forward per time per batch"),
    ]


def run(ctx) -> list[Row]:
    cfg = config_for(ctx.device, ctx.quick)
    ctx.log(f"[d] probe grid: {cfg.label}, {cfg.n} images")
    p = bench_probe(cfg, ctx.device)
    L, K = p["L"], p["K"]
    ctx.log(f"[d] CKA at N={cfg.cka_n}")
    c = bench_cka(cfg.cka_n)
    extra = {"probe": p}
    return [
        Row("d", "probe grid", f"grid {L}×{K} per time ÷ single@deep", p["grid_LxK_per_time_vs_single_deep"], "×",
            ("<=", 1.5),
            note=f"{cfg.label}, {cfg.n} img, batch {cfg.batch}; grid {p['seconds'][f'grid {L}x{K}']:.1f} s",
            extra=extra),
        Row("d", "probe grid", f"grid {L}×1 ÷ single@deep", p["grid_Lx1_vs_single_deep"], "×",
            note="L heads at one time vs one head"),
        Row("d", "probe grid", f"grid {L}×{K} ÷ single@paper ({p['paper_layer']})",
            p["ratio_to_single_paper"][f"grid {L}x{K}"], "×", note=f"replaces {L * K} separate probes"),
        Row("d", "CKA", f"Gram ÷ feature-space form (N={c['n']}, D={c['d']})", c["gram_over_feature"], "×",
            note=f"feature space {c['feature_space_s']:.3f} s; same value {c['feature_space_value']:.6f}", extra=c),
        *latent_rows(ctx),
    ]
