"""Shared fixtures: a tiny digits recipe that trains in seconds on a 2-core CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)  # tests run in parallel (pytest -n 2) on 2 cores

TINY = """\
name: tiny
data: {dataset: digits, image_size: 8, hflip: true, num_workers: 0}
model:
  backbone: ddpm
  channels: 64
  ch_mults: [1, 2]
  n_blocks: 1
  attn_resolutions: [4]
  dropout: 0.0
diffusion: {formulation: ddpm}
train:
  epochs: 100
  global_batch: 32
  lr: 1.0e-3
  warmup_epochs: 0.5
  ema: {decay: 0.99}
  precision: fp32
  log_every: 1
  checkpoint_every: 4
  keep_last: 2
  sample_every: 0
sample: {sampler: ddim, steps: 5, batch_size: 16}
"""


@pytest.fixture
def tiny_recipe(tmp_path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY)
    return p


def run_cli(*args, env=None, timeout=300, **kw) -> subprocess.CompletedProcess:
    """`python -m ddaepp_cli ARGS` in a subprocess (real exit codes, real stderr)."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "ddaepp_cli", *map(str, args)], capture_output=True,
                          text=True, env=e, timeout=timeout, cwd=kw.pop("cwd", ROOT), **kw)


def cli_inprocess(*args):
    """`ddaepp ARGS` inside this process (Typer's runner): the same command code, exit codes and stdout
    without a new interpreter — for checks that need no real process (dry-runs, parameter counts)."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from ddaepp_cli.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    try:
        stderr = r.stderr
    except ValueError:  # older Click mixes stderr into output
        stderr = ""
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=stderr, output=r.output)
