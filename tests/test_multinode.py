"""Multi-node launch and the shipped Accelerate configs (issue 7.1).

Two `torchrun` launchers on this machine stand in for two nodes (`--nnodes 2 --node_rank 0|1`, one
process each, a TCP rendezvous on 127.0.0.1): ranks differ across nodes while LOCAL_RANK is 0 on both,
so anything that keyed its writes on the local rank would write twice. The run must equal one process
and hold exactly one writer's files.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, run_cli

CONFIGS = ROOT / "configs" / "accelerate"
STEPS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_nodes_equal_one_process(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    r = run_cli("train", recipe, "--run-dir", tmp_path / "one", "--max-steps", STEPS)
    assert r.returncode == 0, r.stderr
    port = str(free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
         "-m", "ddaepp_cli", "train", str(recipe), "--run-dir", str(tmp_path / "two"), "--max-steps", str(STEPS)],
        cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    two = tmp_path / "two"
    assert json.loads((two / "meta.json").read_text())["world_size"] == 2
    assert losses(two) == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    assert len(losses(two)) == STEPS  # one writer: no duplicated metric lines
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [f"step-{STEPS:07d}"]
    assert "trained to step" in outs[0] and "trained to step" not in outs[1]  # node 1 prints nothing of its own


@pytest.mark.parametrize("name,processes,machines", [("1gpu", 1, 1), ("8gpu", 8, 1), ("2nodes_8gpu", 16, 2)])
def test_shipped_accelerate_configs_parse(name, processes, machines):
    from accelerate.commands.config.config_args import load_config_from_file

    c = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert (c.num_processes, c.num_machines) == (processes, machines)
    assert c.mixed_precision == "no"  # precision is the recipe's (train.precision), not the launcher's
    assert (c.distributed_type.value == "NO") == (processes == 1)


@pytest.mark.slow
def test_one_gpu_config_launches(tmp_path):
    """`accelerate launch --config_file configs/accelerate/1gpu.yaml` really runs ddaepp (with --cpu here)."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "1gpu.yaml"), "--cpu",
           "-m", "ddaepp_cli", "train", str(recipe), "--run-dir", str(tmp_path / "run"), "--max-steps", "1"]
    r = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "run" / "checkpoints" / "step-0000001" / "ema.safetensors").is_file()
