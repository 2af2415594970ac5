"""The benchmark scripts run and report sane numbers: `bench.py --quick` (every group, finite positive
values, targets recorded), `gpu_throughput.py`'s CPU self-check (FLOP counting) and its no-GPU exit."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _run(args, tmp_path, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=tmp_path)


@pytest.mark.slow
def test_bench_quick_reports_every_group(tmp_path):
    out = tmp_path / "results"
    r = _run([BENCH / "bench.py", "--quick", "--out", out], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = out.glob("bench-*.json")
    assert path.name.startswith("bench-gpu-" if torch.cuda.is_available() else "bench-cpu-")
    res = json.loads(path.read_text())
    assert not res["errors"]
    for key in ("platform", "cpu", "threads", "torch"):
        assert res["machine"][key] not in (None, "")
    assert set(res["groups"]) == set("abcdef")
    for group, rows in res["groups"].items():
        ok = [row for row in rows if row["status"] == "ok"]
        assert ok, f"group {group} has no measured row"
        for row in ok:
            assert row["value"] is not None and math.isfinite(row["value"]) and row["value"] > 0, row
            if row["target"] is not None:
                assert row["target"]["op"] in ("<=", ">=") and isinstance(row["met"], bool), row
    a = res["groups"]["a"]
    for backbone in ("ddpm", "ddpmpp", "uvit", "dit-B/1"):
        naive = [row for row in a if row["subject"] == backbone and row["metric"].startswith("naive")]
        assert len(naive) == 2 and all(row["target"]["op"] == ">=" for row in naive)  # the step and the op
        step = next(row for row in naive if "training step" in row["metric"])
        assert step["extra"]["max_abs_diff_out"] < 1e-4  # the reference computes the same network
        compiled = [row for row in a if row["subject"] == backbone and "compile" in row["metric"]]
        assert len(compiled) == 1 and compiled[0]["status"] in ("ok", "n/a")  # --quick skips compiling
    b = {(row["subject"], row["unit"]) for row in res["groups"]["b"]}
    assert {("ddpm", "%"), ("ddpm", "×"), ("dit-B/1", "%"), ("uvit", "×")} <= b
    f = res["groups"]["f"]
    assert all(row["value"] > 1 for row in f if row["unit"] == "×")  # loaders outpace training
    assert "bench-" in r.stderr and "targets met" in r.stdout


@pytest.mark.slow
def test_gpu_throughput_cpu_check_counts_flops(tmp_path):
    r = _run([BENCH / "gpu_throughput.py", "--cpu-check", "--models", "dit-B/1,ddpmpp", "--out", tmp_path], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = tmp_path.glob("gpu-cpu-*.json")
    res = json.loads(path.read_text())
    dit, unet = res["models"]["dit-B/1"], res["models"]["ddpmpp"]
    assert dit["forward_flops_per_image"] == dit["forward_flops_analytic"] > 0  # FlopCounterMode = the formula
    assert unet["forward_flops_per_image"] > 0 and unet["train_flops_per_image"] == 3 * unet["forward_flops_per_image"]
    for m in (dit, unet):
        assert m["img_per_s"] > 0 and m["mfu"] > 0 and m["sampling"]["nfe"] > 0
    assert res["peak_matmul"]["tflops"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_gpu_throughput_without_cuda_exits_3(tmp_path):
    r = _run([BENCH / "gpu_throughput.py", "--out", tmp_path], tmp_path, timeout=120)
    assert r.returncode == 3
    assert len(r.stderr.strip().splitlines()) == 1 and "no CUDA device" in r.stderr
    assert not list(tmp_path.glob("*.json"))


def test_naive_attention_equals_sdpa():
    sys.path.insert(0, str(BENCH))
    from naive_attention import naive_attention, naive_sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    mask = torch.rand(7, 7, generator=g) > 0.3
    mask.fill_diagonal_(True)
    F = torch.nn.functional
    for kw in ({}, {"attn_mask": mask}, {"is_causal": True}, {"scale": 0.5}):
        torch.testing.assert_close(naive_sdpa(q, k, v, **kw), F.scaled_dot_product_attention(q, k, v, **kw))
    fused = F.scaled_dot_product_attention
    with naive_attention():
        assert F.scaled_dot_product_attention is naive_sdpa
    assert F.scaled_dot_product_attention is fused
