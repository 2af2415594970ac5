"""benchmarks/quickstart_quality.py: the digits transform is inverted exactly, real held-out digits
written as samples score a ratio of about 1 with all ten labels, noise scores about 0, bad input is
one line and exit 2, and a run folder is sampled before it is judged."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "quickstart_quality.py"
sys.path.insert(0, str(SCRIPT.parent))

import quickstart_quality as qq  # noqa: E402


def _run(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def _held_out(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The digits `test` split as the recipe feeds it at `size` (uint8 N×1×S×S) and sklearn's 8×8 rows."""
    from sklearn.datasets import load_digits

    from ddaepp_cli.data.datasets import digits_split_indices, load_dataset

    ds = load_dataset("digits", split="test", image_size=size)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    bunch = load_digits()
    return images, bunch.data[digits_split_indices(bunch.target, "test")]


def _write_samples(images: torch.Tensor, out: Path, formats=("png", "npz", "grid")) -> Path:
    """A folder exactly as `ddaepp sample` writes it (its own writer)."""
    from ddaepp_cli.sample import write_outputs

    write_outputs(images, list(range(len(images))), out, list(formats), {"command": "sample"})
    return out


@pytest.mark.parametrize("size", [8, 12, 16])
def test_inverse_recovers_the_8x8_digits(size):
    images, x8 = _held_out(size)
    assert images.dtype == torch.uint8 and images.shape[-1] == size
    back = qq.to_digits(images[:, 0].numpy())
    # within the uint8 rounding of the upsampled image (0.5 · 16/255 = 0.03 per pixel, spread by A⁺)
    assert np.abs(back - x8).max() < 0.1
    if size > 8:  # plain subsampling (what a wrong inverse might do) is far off
        idx = (np.arange(8) * size) // 8
        naive = images[:, 0].numpy()[:, idx][:, :, idx].reshape(len(x8), 64) * (16 / 255)
        assert np.abs(naive - x8).max() > 1.0


def test_real_digits_score_one_and_noise_zero(tmp_path, capsys):
    images, _ = _held_out(12)
    real = _write_samples(images[:64], tmp_path / "real")
    r = _run(real, "--json", "--check")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["classifier"]["held_out_accuracy"] > 0.97
    assert res["samples"]["n"] == 64 and res["image_size"] == 12
    assert 0.9 <= res["ratio"] <= 1.1
    assert res["label_entropy"] > 0.95 and min(res["samples"]["label_counts"]) > 0
    assert res["met"] and all(t["met"] for t in res["targets"].values())
    # 64 held-out digits against all 355: as varied, as far from the training set
    assert 0.85 <= res["spread_ratio"] <= 1.15 and 0.85 <= res["nearest_train_ratio"] <= 1.15

    g = torch.Generator().manual_seed(0)
    noise = _write_samples(torch.randint(0, 256, (64, 1, 12, 12), generator=g, dtype=torch.uint8),
                           tmp_path / "noise", formats=("png",))  # PNGs only: the folder reader
    capsys.readouterr()
    assert qq.main([str(noise), "--json", "--check"]) == 1  # --check: targets missed
    res = json.loads(capsys.readouterr().out)
    assert res["ratio"] < 0.1 and not res["met"] and not res["targets"]["ratio"]["met"]

    assert qq.main([str(real / "samples.npz")]) == 0  # the table
    out = capsys.readouterr().out
    assert "ratio ≥ 0.9" in out and "targets met" in out, out


def test_diversity_sees_copies_and_collapse():
    """Training digits handed in as samples sit at distance ~0 from the training set; one image repeated
    has no spread; `spread` and `nearest_distance` are what their docstrings say."""
    from sklearn.datasets import load_digits

    from ddaepp_cli.data.datasets import digits_split_indices

    bunch = load_digits()
    train = bunch.data[digits_split_indices(bunch.target, "train")][:64]
    as_uint8 = np.round(train * (255 / 16)).astype(np.uint8).reshape(64, 8, 8)  # how `sample` stores 0..16
    copied = qq.measure(as_uint8)
    assert copied["samples"]["nearest_train"] < 0.1 and copied["nearest_train_ratio"] < 0.01
    assert 0.7 < copied["spread_ratio"] < 1.3  # real digits, just not new ones
    collapsed = qq.measure(np.repeat(as_uint8[:1], 64, axis=0))  # one digit, 64 times
    assert collapsed["samples"]["spread"] == 0.0 and collapsed["spread_ratio"] == 0.0
    x = np.random.default_rng(0).uniform(0, 16, (50, 64))
    assert qq.spread(x, np.zeros(50, int)) == pytest.approx(
        np.mean([np.linalg.norm(x[i] - x[j]) for i in range(50) for j in range(50) if i != j]))
    assert qq.nearest_distance(x[:5], x) == 0.0 and np.isnan(qq.spread(x[:3], np.arange(3)))


@pytest.mark.parametrize("case", ["missing", "empty", "color", "tiny", "txt"])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, case):
    path = tmp_path / "x"
    if case == "empty":
        path.mkdir()
    elif case == "color":
        np.savez(path.with_suffix(".npz"), arr_0=np.zeros((4, 12, 12, 3), np.uint8))
        path = path.with_suffix(".npz")
    elif case == "tiny":
        np.savez(path.with_suffix(".npz"), arr_0=np.zeros((4, 4, 4), np.uint8))
        path = path.with_suffix(".npz")
    elif case == "txt":
        path = path.with_suffix(".txt")
        path.write_text("x")
    assert qq.main([str(path)]) == 2
    r = capsys.readouterr()
    assert len(r.err.strip().splitlines()) == 1 and r.err.startswith("error: "), r.err
    assert not r.out


@pytest.mark.slow
def test_a_run_is_sampled_then_judged(tmp_path, tiny_recipe):
    from conftest import run_cli

    run = tmp_path / "run"
    r = run_cli("train", tiny_recipe, "--run-dir", run, "--max-steps", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run(run, "--n", "6", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["samples"]["n"] == 6 and res["image_size"] == 8 and "sampled" in res["source"]
    assert res["ratio"] < 0.9  # two training steps make no digits
    # the same seeds written by `ddaepp sample` give the same verdict
    r = run_cli("sample", run, "--n", "6", "--out", tmp_path / "s")
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads(_run(tmp_path / "s", "--json").stdout)
    assert again["samples"] == res["samples"]
