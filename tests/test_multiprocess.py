"""Two CPU processes (torchrun, gloo) against one: same losses, same images, same probe, FID and latent-cache
results, only rank 0 writes, and a killed 2-process training run resumes exactly (issue 7.1, "Many processes")."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, TINY, run_cli

STEPS = 4
HELPERS = Path(__file__).resolve().parent / "mp_helpers"


def torchrun_cmd(*args, script=None) -> tuple[list[str], dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="",
               ACCELERATE_USE_CPU="true")
    target = [str(script)] if script else ["-m", "ddaepp_cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *target, *map(str, args)]
    return cmd, env


def torchrun(*args, timeout=300, script=None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m ddaepp_cli ARGS` (or SCRIPT ARGS) on the CPU (gloo).

    torchrun's own argument parser takes abbreviations of its options anywhere on the line: `--n 3` (read
    as `--nnodes`/`--nproc-per-node`) cannot be passed through; `fid` gets `--seeds` instead."""
    cmd, env = torchrun_cmd(*args, script=script)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """One test (not three sharing a module fixture): under pytest-xdist a shared fixture would be
    rebuilt on each worker, doubling the cost of the torchrun launches."""
    d = tmp_path
    recipe = d / "tiny.yaml"
    recipe.write_text(TINY)
    r1 = run_cli("train", recipe, "--run-dir", d / "one", "--max-steps", STEPS)
    assert r1.returncode == 0, r1.stderr
    r2 = torchrun("train", recipe, "--run-dir", d / "two", "--max-steps", STEPS)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    one, two = d / "one", d / "two"
    check_losses(one, two)
    check_only_rank_zero_writes(two)
    check_samples(d, one)


def check_losses(one, two):
    a, b = records(one), records(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4), (x, y)
    assert json.loads((two / "meta.json").read_text())["world_size"] == 2
    assert json.loads((one / "meta.json").read_text())["world_size"] == 1


def check_only_rank_zero_writes(two):
    lines = (two / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == STEPS and len(set(lines)) == STEPS  # no duplicated or interleaved lines
    ckpts = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert ckpts == [f"step-{STEPS:07d}"]  # no leftover .tmp-* of another rank, one folder per step
    c = two / "checkpoints" / ckpts[0]
    assert {p.name for p in c.iterdir()} == {"model.safetensors", "ema.safetensors", "state.pt", "recipe.yaml"}
    top = {p.name for p in two.iterdir()}
    assert top <= {"recipe.yaml", "meta.json", "metrics.jsonl", "checkpoints", "samples"}, top


def check_samples(d, one):
    a, b = d / "s1", d / "s2"
    r1 = run_cli("sample", one, "--seeds", "0-5", "--out", a, "--format", "npz")
    r2 = torchrun("sample", one, "--seeds", "0-5", "--out", b, "--format", "npz")
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stdout + r2.stderr
    x, y = np.load(a / "samples.npz")["arr_0"], np.load(b / "samples.npz")["arr_0"]
    assert x.shape == (6, 8, 8, 1)
    assert np.array_equal(x, y)
    assert sorted(p.name for p in b.iterdir()) == sorted(p.name for p in a.iterdir())


# ------------------------------------------------------------------------------------------------
# probe, fid and cache-latents: 2 processes give what 1 process gives
# ------------------------------------------------------------------------------------------------


def save_random_checkpoint(run: Path, recipe_text: str) -> Path:
    """A checkpoint of an untrained network (no training needed to compare feature extraction)."""
    from ddaepp_cli.build import build_backbone
    from ddaepp_cli.checkpoint import save_checkpoint
    from ddaepp_cli.recipe import recipe_from_dict

    rec = recipe_from_dict(yaml.safe_load(recipe_text))
    torch.manual_seed(0)
    net = build_backbone(rec)
    return save_checkpoint(run, 2, recipe=rec, model=net, ema=net, state={})


@pytest.mark.slow
def test_probe_two_processes_match_one(tmp_path):
    """Features (cached, live train with flips/crops/noise, live eval; shares of unequal size and an empty
    one), a head bank trained on live features, and the `probe` library command (grid on a validation
    split, final probe): 2 processes equal 1 up to the backbone's float32 batch-size dependence, and only
    rank 0 writes the record and plot (tests/mp_helpers/probe_features.py)."""
    from mp_helpers.probe_features import main as probe_features

    small = TINY.replace("channels: 64", "channels: 32").replace("ch_mults: [1, 2]", "ch_mults: [1, 1]")
    save_random_checkpoint(tmp_path / "one", small)
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    probe_features(str(tmp_path / "one"), str(tmp_path / "one.pt"))  # one process, in this one
    r = torchrun(tmp_path / "two", tmp_path / "two.pt", script=HELPERS / "probe_features.py")
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in ("one", "two"))
    assert (a["world"], b["world"]) == (1, 2) and a["keys"] == b["keys"]
    for name in ("cache", "cached_train", "live_train", "live_eval"):
        assert len(a[name]) == len(b[name]) == 4, name
        for x, y in zip(a[name], b[name]):
            torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-5, msg=name)
    assert a["bank"]["keys"] == b["bank"]["keys"] and torch.equal(a["bank"]["acc"], b["bank"]["acc"])
    assert b["bank"]["losses"] == pytest.approx(a["bank"]["losses"], rel=1e-5)

    p, q = a["probe"], b["probe"]
    assert q["cells"] == p["cells"] and q["best"] == p["best"] and q["selected_on"] == p["selected_on"] == "val"
    assert q["test_accuracy"] == p["test_accuracy"] and len(p["cells"]) == 4
    assert q["final_losses"] == pytest.approx(p["final_losses"], rel=1e-5)
    assert (p["protocol"]["world_size"], q["protocol"]["world_size"]) == (1, 2)
    for run, result in ((tmp_path / "one", p), (tmp_path / "two", q)):
        written = sorted(f.name for f in (run / "eval").iterdir())
        assert len(written) == 2 and {Path(f).suffix for f in written} == {".json", ".png"}, written
        assert Path(result["eval_record"]).name in written and Path(result["plot"]).name in written
        assert sorted(f.name for f in run.iterdir()) == ["checkpoints", "eval"]
    record = json.loads(Path(q["eval_record"]).read_text())
    assert record["cells"] == q["cells"] and record["protocol"]["world_size"] == 2


@pytest.mark.slow
def test_fid_two_processes_match_one(tmp_path):
    """`ddaepp fid RUN --seeds 0-2 --ref FOLDER`: generated images sharded by seed (strided), reference files
    by contiguous blocks (3 files: 1 + 2), both gathered — the same statistics, FID and saved samples as one
    process; one JSON object on stdout and one record (rank 0)."""
    from ddaepp_cli.eval import inception
    from ddaepp_cli.eval.fid import fid
    from test_fid import TINY_RGB, write_images

    torch.save(inception.random_state_dict(0, active=256), tmp_path / "w.pth")
    write_images(tmp_path / "B", seed=2, n=3, shift=50)
    save_random_checkpoint(tmp_path / "one", TINY_RGB)
    shutil.copytree(tmp_path / "one", tmp_path / "two")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDAEPP_CACHE", str(tmp_path / "cache"))
        one = fid(str(tmp_path / "one"), seeds=[0, 1, 2], batch_size=2, ref=str(tmp_path / "B"),  # one process, here
                  inception_weights=str(tmp_path / "w.pth"), cache=False, save_stats=str(tmp_path / "one.npz"),
                  save_samples=str(tmp_path / "one-samples"))
        r2 = torchrun("fid", tmp_path / "two", "--seeds", "0-2", "--batch-size", 2, "--ref", tmp_path / "B",
                      "--inception-weights", tmp_path / "w.pth", "--no-cache", "--save-stats", tmp_path / "two.npz",
                      "--save-samples", tmp_path / "two-samples", "--json")
    assert r2.returncode == 0, r2.stdout + r2.stderr
    two = json.loads(r2.stdout)  # one JSON object: rank 1 prints nothing
    assert (one["protocol"]["world_size"], two["protocol"]["world_size"]) == (1, 2)
    assert two["n"] == one["n"] == 3
    assert abs(two["metrics"]["fid"] - one["metrics"]["fid"]) <= 1e-9 * one["metrics"]["fid"]
    with np.load(tmp_path / "one.npz") as x, np.load(tmp_path / "two.npz") as y:
        assert int(x["n"]) == int(y["n"]) == 3
        np.testing.assert_allclose(y["mu"], x["mu"], rtol=1e-12, atol=1e-14)  # float64 features
        np.testing.assert_allclose(y["sigma"], x["sigma"], rtol=1e-12, atol=1e-14)
    with np.load(tmp_path / "one-samples" / "samples.npz") as x, np.load(tmp_path / "two-samples" / "samples.npz") as y:
        assert np.array_equal(x["arr_0"], y["arr_0"])
    assert len(list((tmp_path / "two" / "eval").iterdir())) == 1


@pytest.mark.slow
def test_fid_latent_run_two_processes_match_one(tmp_path):
    """`ddaepp fid` of a latent DiT run (CFG from the recipe, VAE decoding) against an ADM-layout reference: the
    FID, sFID and IS statistics of 2 processes equal 1 process's (issue 12)."""
    from ddaepp_cli.eval import inception
    from ddaepp_cli.eval.fid import fid
    from test_fid_latent import make_latent_run, write_adm_reference

    torch.save(inception.random_state_dict(0, active=256), tmp_path / "w.pth")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDAEPP_CACHE", str(tmp_path / "cache"))
        lat = make_latent_run(tmp_path, steps=(1,))
        ref = write_adm_reference(tmp_path, str(tmp_path / "w.pth"))
        kw = dict(ref=str(ref), inception_weights=str(tmp_path / "w.pth"), metrics="fid,sfid,is")
        one = fid(str(lat["run"]), seeds=[0, 1, 2], batch_size=2, save_stats=str(tmp_path / "one.npz"), **kw)
        r2 = torchrun("fid", lat["run"], "--seeds", "0-2", "--batch-size", 2, "--ref", ref, "--metrics", "fid,sfid,is",
                      "--inception-weights", tmp_path / "w.pth", "--save-stats", tmp_path / "two.npz", "--json")
    assert r2.returncode == 0, r2.stdout + r2.stderr
    two = json.loads(r2.stdout)
    assert (one["protocol"]["world_size"], two["protocol"]["world_size"]) == (1, 2)
    assert two["protocol"]["cfg_scale"] == one["protocol"]["cfg_scale"] == 2.0 and two["protocol"]["latent"]
    for k, v in one["metrics"].items():
        assert abs(two["metrics"][k] - v) <= 1e-9 * max(abs(v), 1e-12), (k, two["metrics"][k], v)
    with np.load(tmp_path / "one.npz") as x, np.load(tmp_path / "two.npz") as y:
        assert int(x["n"]) == int(y["n"]) == 3
        for key in ("mu", "sigma", "mu_s", "sigma_s"):
            np.testing.assert_allclose(y[key], x[key], rtol=1e-12, atol=1e-14, err_msg=key)


@pytest.mark.slow
def test_sample_and_fid_gather_to_rank_zero_only(tmp_path):
    """Issue 13.7: images (`sample`) and features (`fid`) travel to the writer, rank 0, not to every rank: rank 1
    receives no payload from the collectives (tests/mp_helpers/gather_to_main.py counts the bytes)."""
    from ddaepp_cli.eval import inception
    from test_fid import TINY_RGB, write_images

    torch.save(inception.random_state_dict(0, active=256), tmp_path / "w.pth")
    write_images(tmp_path / "B", seed=2, n=4, shift=50)
    save_random_checkpoint(tmp_path / "run", TINY_RGB)
    r = torchrun(tmp_path / "run", tmp_path / "B", tmp_path / "w.pth", tmp_path / "out",
                 script=HELPERS / "gather_to_main.py")
    assert r.returncode == 0, r.stdout + r.stderr
    rank0, rank1 = (json.loads((tmp_path / f"out-{k}.json").read_text()) for k in (0, 1))
    share = 4 * 16 * 16 * 3  # rank 1's 4 images of 16×16×3 bytes
    assert rank0["sample"] > share and rank1["sample"] == 0
    assert rank0["fid"] > 4 * (2048 + 2023 + 1008) * 4 and rank1["fid"] < 100  # a cache-agreement flag at most
    with np.load(tmp_path / "out-samples" / "samples.npz") as x, \
            np.load(tmp_path / "out-fid-samples" / "samples.npz") as y:
        assert x["arr_0"].shape == (8, 16, 16, 3) and np.array_equal(x["arr_0"], y["arr_0"])


@pytest.mark.slow
def test_cache_latents_two_processes_match_one(tmp_path):
    """3 shards of 8 images on 2 ranks (shards 0, 2 and 1): every file of the cache byte for byte as one
    process writes it (shards, records, statistics, manifest), and a summary of the whole cache."""
    from test_latents import make_image_folder, write_tiny_vae

    from ddaepp_cli.data.latents import cache_latents

    write_tiny_vae(tmp_path / "vae.safetensors")
    images = make_image_folder(tmp_path / "images")
    one = cache_latents(images, tmp_path / "vae.safetensors", tmp_path / "one", image_size=32, batch_size=2,
                        shard_size=3, num_workers=0)  # one process, here
    r2 = torchrun("cache-latents", "--data", images, "--vae", tmp_path / "vae.safetensors", "--out", tmp_path / "two",
                  "--image-size", 32, "--batch-size", 2, "--shard-size", 3, "--num-workers", 0, "--json")
    assert r2.returncode == 0, r2.stdout + r2.stderr
    two = json.loads(r2.stdout)  # one JSON object: rank 1 prints nothing
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for s in (one, two):
        assert (s["num_shards"], s["encoded_shards"], s["skipped_shards"], s["count"]) == (3, 3, 0, 8)
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == files and len(files) == 8  # no temporary files
    for name in files:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["complete"]


# ------------------------------------------------------------------------------------------------
# A 2-process training run killed mid-run resumes exactly
# ------------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


@pytest.mark.slow
def test_two_process_training_killed_mid_run_resumes_exactly(tmp_path):
    """SIGKILL the whole torchrun job (launcher and workers — torchrun starts each worker in its own
    session) after the step-4 checkpoint; the same command again resumes and reproduces the losses of an
    uninterrupted 2-process run bitwise."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = torchrun("train", recipe, "--run-dir", ref, "--max-steps", 8)
    assert r.returncode == 0, r.stdout + r.stderr

    cmd, env = torchrun_cmd("train", recipe, "--run-dir", run, "--max-steps", 8)
    env["DDAEPP_TEST_STEP_DELAY"] = "0.3"  # train.py's test hook: slow steps, so that the kill lands mid-run
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         start_new_session=True)
    workers = []
    try:
        deadline = time.time() + 180
        while not (run / "checkpoints" / "step-0000004").exists():
            assert p.poll() is None, p.stderr.read().decode()
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # in the middle of the next checkpoint interval
        workers = _children(p.pid)
        assert len(workers) == 2, workers
        os.killpg(p.pid, signal.SIGKILL)  # the launcher
        for w in workers:
            os.killpg(w, signal.SIGKILL)  # each worker and anything it started
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stderr.close()
        for w in workers:
            try:
                os.killpg(w, signal.SIGKILL)
            except ProcessLookupError:
                pass
    done = {rec["step"] for rec in records(run)}
    assert 4 <= max(done) < 8  # it really was cut short, after the first checkpoint
    assert sorted(c.name for c in (run / "checkpoints").iterdir() if not c.name.startswith(".")) == ["step-0000004"]

    r = torchrun("train", recipe, "--run-dir", run, "--max-steps", 8)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming" in r.stderr
    a = {rec["step"]: rec["loss"] for rec in records(run)}
    b = {rec["step"]: rec["loss"] for rec in records(ref)}
    assert a == b and sorted(a) == list(range(1, 9))  # bitwise: JSON floats round-trip exactly


# ------------------------------------------------------------------------------------------------
# Every recipe family with an EMA teacher: 2 processes train what 1 process trains
# ------------------------------------------------------------------------------------------------


def _compare_runs(one: Path, two: Path, keys: tuple[str, ...], steps: int) -> None:
    from safetensors.torch import load_file

    a, b = records(one), records(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (k, x, y)
    c1, c2 = (latest := lambda r: sorted((r / "checkpoints").iterdir())[-1])(one), latest(two)
    for name in ("model.safetensors", "ema.safetensors"):
        w1, w2 = load_file(c1 / name), load_file(c2 / name)
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=f"{name}:{k}")
    s1, s2 = (torch.load(c / "state.pt", weights_only=True) for c in (c1, c2))
    for k in s1["aux_ema"]:  # the teacher's heads (contrastive projector; SRA head)
        torch.testing.assert_close(s1["aux_ema"][k], s2["aux_ema"][k], rtol=1e-4, atol=1e-5, msg=k)


def _write_recipe(path: Path, base: Path, sets: list[str]) -> Path:
    from ddaepp_cli.recipe import load_recipe, recipe_to_yaml

    path.write_text(recipe_to_yaml(load_recipe(base, sets)))
    return path


@pytest.mark.slow
def test_sra_and_contrastive_two_processes_match_one(tmp_path, monkeypatch):
    """Before: each rank built its EMA (the SRA / contrastive teacher) from its own seed before DDP synced
    the online weights; losses (loss_sra) differed from one process while rank 0's checkpoint looked fine."""
    from ddaepp_cli.data import latents
    from ddaepp_cli.recipe import load_recipe
    from ddaepp_cli.training.train import train
    from test_latents import make_image_folder, write_tiny_vae

    monkeypatch.setenv("DDAEPP_CACHE", str(tmp_path / "cache-home"))
    vae = tmp_path / "vae.safetensors"
    write_tiny_vae(vae)
    cache = tmp_path / "latents"
    # posterior moments, as the SRA recipes train: a new latent per step (data.latent_posterior: per_step)
    latents.cache_latents(make_image_folder(tmp_path / "images", per_class=4), vae, cache, image_size=32,
                          batch_size=4, shard_size=8, num_workers=0, moments=True)
    steps = 3
    sra = _write_recipe(tmp_path / "sra.yaml", ROOT / "recipes" / "imagenet256_sra_ditb.yaml", [
        f"data.root={cache}", "data.latent_channels=8", "data.num_workers=0", "model.width=32", "model.depth=8",
        "model.heads=2", "model.num_classes=2", "train.global_batch=4", "train.precision=fp32", "train.log_every=1",
        "train.checkpoint_every=1000", "train.sample_every=0", "train.lr=1e-3"])  # the recipe's EMA 0.9999
    contrastive = _write_recipe(tmp_path / "cl.yaml", ROOT / "recipes" / "cifar100_edm_ddpm_sc_aug_cl.yaml", [
        "data.dataset=digits", "data.image_size=8", "data.num_workers=0", "model.channels=32",
        "model.ch_mults=[1, 1]", "model.n_blocks=1", "model.attn_resolutions=[4]", "model.selfcond.layer=out_2",
        "model.dropout=0.0",  # dropout draws from the per-rank RNG
        "contrastive.hidden=32", "contrastive.dim=16",
        # BatchNorm in the heads is per process on CPU (SyncBatchNorm needs CUDA): without it the step is
        # process-count independent; on GPUs the heads' BN is synchronised.
        "contrastive.norm=none", "train.global_batch=8", "train.batch_per_process=null", "train.precision=fp32",
        "train.log_every=1", "train.checkpoint_every=1000", "train.sample_every=0", "train.ema.decay=0.5",
        "train.ema.warmup=none"])
    env = {"DDAEPP_CACHE": os.environ["DDAEPP_CACHE"]}
    for recipe, keys in ((sra, ("loss", "loss_diff", "loss_sra")), (contrastive, ("loss", "loss_diff", "loss_moco"))):
        one, two = tmp_path / f"{recipe.stem}-one", tmp_path / f"{recipe.stem}-two"
        train(load_recipe(recipe), one, max_steps=steps)  # one process, in this interpreter
        cmd, e = torchrun_cmd("train", recipe, "--run-dir", two, "--max-steps", steps)
        r2 = subprocess.run(cmd, capture_output=True, text=True, env={**e, **env}, timeout=600, cwd=ROOT)
        assert r2.returncode == 0, r2.stdout + r2.stderr
        _compare_runs(one, two, keys, steps)


@pytest.mark.slow
def test_stochastic_heun_two_processes_match_one(tmp_path):
    """EDM's stochastic sampler (sample.s_churn, the quickstart's) draws its per-step noise from the seeds:
    `sample` on 2 processes writes the images 1 process writes."""
    text = (TINY.replace("diffusion: {formulation: ddpm}", "diffusion: {formulation: edm}")
            .replace("sample: {sampler: ddim, steps: 5, batch_size: 16}",
                     "sample: {sampler: heun, steps: 6, batch_size: 16, s_churn: 40, s_min: 0.05, s_max: 50, "
                     "s_noise: 1.003}"))
    assert "s_churn: 40" in text
    one = tmp_path / "one"
    save_random_checkpoint(one, text)
    check_samples(tmp_path, one)
    r = run_cli("sample", one, "--seeds", "0-5", "--out", tmp_path / "alg1", "--format", "npz", "--churn", "0")
    assert r.returncode == 0, r.stderr
    assert not np.array_equal(np.load(tmp_path / "alg1" / "samples.npz")["arr_0"],
                              np.load(tmp_path / "s1" / "samples.npz")["arr_0"])  # the churn was applied
