"""The training core's correctness (issue 13): fp16 scaling, compile coverage, latent clipping, metrics after a
restart, checkpoint re-save, DiT-SRA's teacher time, one VAE load per run. Many processes: test_multiprocess.py."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from ddaepp_cli.build import build_formulation
from ddaepp_cli.checkpoint import latest_checkpoint, list_checkpoints, prune_checkpoints, save_checkpoint
from ddaepp_cli.recipe import load_recipe, recipe_from_dict
from ddaepp_cli.training.train import make_plan, train
from ddaepp_cli.training.state import TrainState
from ddaepp_cli.training.step import train_step

from conftest import ROOT, TINY

RECIPES = ROOT / "recipes"
CONTRASTIVE = {
    "name": "tiny_cl", "data": {"dataset": "digits", "image_size": 8, "num_workers": 0},
    "model": {"backbone": "ddpm", "channels": 32, "ch_mults": [1, 1], "n_blocks": 1, "attn_resolutions": [4],
              "dropout": 0.0, "augment_dim": 9, "selfcond": {"layer": "out_2"}},
    "diffusion": {"formulation": "ddpm"}, "augment": {"enabled": True},
    "contrastive": {"enabled": True, "hidden": 32, "dim": 16},
    "train": {"global_batch": 8, "precision": "fp32", "log_every": 1, "sample_every": 0, "ema": {"decay": 0.9}},
}
SRA = {
    "name": "tiny_sra", "data": {"dataset": "digits", "image_size": 8, "num_workers": 0},
    "model": {"backbone": "dit", "width": 32, "depth": 4, "heads": 2, "patch_size": 2, "num_classes": 10},
    "diffusion": {"formulation": "rf", "t_max": 1.0},
    "sra": {"enabled": True, "student_layer": "1", "teacher_layer": "3"},
    "train": {"global_batch": 8, "optimizer": "adamw", "precision": "fp32", "log_every": 1, "sample_every": 0,
              "ema": {"decay": 0.9}},
}


def batch_of(rec, ts):
    from ddaepp_cli.build import load_training_data
    from ddaepp_cli.data import to_model_range

    ds = load_training_data(rec)
    n = rec.train.global_batch
    x = to_model_range(torch.stack([ds[i][0] for i in range(n)]))
    return x, torch.tensor([int(ds[i][1]) for i in range(n)])


# ------------------------------------------------------------------------------------------------
# fp16: the scaler backs off after an overflow and training goes on
# ------------------------------------------------------------------------------------------------


def test_fp16_overflow_is_skipped_the_scale_backs_off_and_training_continues():
    """Before: a skipped step never called scaler.update(), so the next clip raised "unscale_() has already
    been called" and the scale never backed off."""
    rec = recipe_from_dict(CONTRASTIVE | {"contrastive": {"enabled": False}, "augment": {"enabled": False},
                                          "model": CONTRASTIVE["model"] | {"augment_dim": 0}})
    ts = TrainState(rec, device=torch.device("cpu"), precision="fp16")  # CPU GradScaler + fp16 autocast
    ts.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 32)  # fp16 backward overflows at first
    plan = make_plan(rec, 1, 1000)
    x, y = batch_of(rec, ts)
    before = [p.detach().clone() for p in ts.model.parameters()]
    results = [train_step(ts, x, y, plan=plan, warmup_steps=0) for _ in range(30)]
    assert not results[0].applied and results[0].overflow  # an overflow, not a NaN loss
    assert ts.scaler.get_scale() < 2.0 ** 32  # backed off (halved per overflow)
    applied = [r.applied for r in results]
    assert any(applied) and applied.index(True) > 0
    assert all(applied[applied.index(True):])  # once in range it steps every time
    assert ts.nonfinite_total == applied.index(True) and ts.step == 30
    assert any(not torch.equal(a, b) for a, b in zip(before, ts.model.parameters()))


def test_fp16_nan_loss_counts_towards_the_abort():
    rec = recipe_from_dict(SRA)
    ts = TrainState(rec, device=torch.device("cpu"), precision="fp16")
    plan = make_plan(rec, 1, 1000)
    x, y = batch_of(rec, ts)
    from ddaepp_cli.training.faults import Faults

    r = train_step(ts, x, y, plan=plan, warmup_steps=0, faults=Faults(nan=frozenset({ts.step})))
    assert not r.applied and not r.overflow  # a NaN loss is not an overflow
    r = train_step(ts, x, y, plan=plan, warmup_steps=0)  # and the scaler still works afterwards
    assert r.applied


# ------------------------------------------------------------------------------------------------
# train.compile compiles what the step calls
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [CONTRASTIVE, SRA], ids=["contrastive", "sra"])
def test_compile_covers_the_student_taps_and_the_teacher(raw):
    """Before: torch.compile(model) compiled `forward` only; contrastive and SRA steps call the student's
    `forward_with_features` and the teacher's `forward_features`, which ran eager (0 graphs captured)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    rec = recipe_from_dict(raw)
    student, teacher = CompileCounter(), CompileCounter()
    ts = TrainState(rec, device=torch.device("cpu"), compile_kw={"backend": student})
    ts.teacher._compiled = {k: torch.compile(getattr(ts.ema.module, k), backend=teacher)
                            for k in ts.teacher._compiled}  # count the teacher's graphs separately
    plan = make_plan(rec, 1, 1000)
    x, y = batch_of(rec, ts)
    r = train_step(ts, x, y, plan=plan, warmup_steps=0)
    assert r.applied and torch.isfinite(r.loss)
    assert student.frame_count >= 1 and student.op_count > 0  # forward_with_features was captured
    assert teacher.frame_count >= 1  # the EMA teacher's early-exit forward_features too
    assert ts.objective.net.layer_names == ts.model.layer_names  # the wrapper forwards backbone attributes
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# Latents are never clipped as pixels
# ------------------------------------------------------------------------------------------------


class GaussianOracle(torch.nn.Module):
    """The exact ε-prediction network of N(0, I) data under DDPM: ε̂ = √(1 − ᾱ_t)·x_t, whichever time input
    (t/T, or DiT's step index t − 1); with a learned variance also v = 1 (σ² = β, exact for N(0, I) data)."""

    num_classes = 0

    def __init__(self, formulation):
        super().__init__()
        self.f = formulation

    def forward(self, x, t_net, **cond):
        t = (t_net.double() + 1) if self.f.time_input == "index" else (t_net.double() * self.f.T).round()
        eps = (self.f.sigma(t).reshape(-1, 1, 1, 1) * x).to(x.dtype)
        return torch.cat((eps, torch.ones_like(eps)), 1) if self.f.learn_sigma else eps


@pytest.mark.parametrize("name", ["imagenet256_sra_ditb.yaml", "imagenet256_sra_lightning_ditb.yaml"])
def test_latent_recipes_sample_unclipped_gaussian_oracle(name):
    """Before: the latent DDPM recipes inherited clip_x0 = True; with the exact denoiser of unit-variance
    data, 250 ancestral steps gave samples of std 0.68 instead of 1."""
    from ddaepp_cli.sample import generate

    rec = load_recipe(RECIPES / name)
    f = build_formulation(rec)
    assert f.clip_x0 is False
    oracle = GaussianOracle(f)
    seeds = list(range(256))

    def std(clip):
        x = []
        for i in range(0, len(seeds), 128):  # decode = identity: look at the sampler's latents
            x.append(generate(oracle, f, seeds[i:i + 128], shape=(4, 4, 4), sampler=rec.sample.sampler,
                              steps=rec.sample.steps, clip=clip, batch_size=128, decode=lambda z: z / 8))
        img = torch.cat(x).float()  # uint8 of z/8 in [−1, 1] → [0, 255]
        return ((img / 255 * 2 - 1) * 8).std().item()

    assert std(None) == pytest.approx(1.0, abs=0.05)  # the recipe's default
    assert std(True) < 0.8  # the negative control: pixel clipping shrinks the latents
    with pytest.raises(Exception, match="pixel range"):
        load_recipe(RECIPES / name, ["sample.clip_x0=true"])


# ------------------------------------------------------------------------------------------------
# Restarts and checkpoint re-saves
# ------------------------------------------------------------------------------------------------


def test_restart_before_the_first_checkpoint_logs_each_step_once(tmp_path, tiny_recipe):
    """Before: a run killed before its first checkpoint restarted at step 0 and appended: 1,2,3,1,2,...,6."""
    rec = load_recipe(tiny_recipe, ["train.checkpoint_every=1000"])
    run = tmp_path / "run"
    train(rec, run, max_steps=3)
    shutil.rmtree(run / "checkpoints")  # as a kill before the first checkpoint leaves it
    train(rec, run, max_steps=6)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_crash_between_the_two_renames_of_a_resave_loses_nothing(tmp_path, monkeypatch):
    """Before: re-saving step N renamed step-N away, crashed before renaming the new copy in, and pruning
    then deleted the complete temporary copy: with keep_last 1 the run restarted from scratch."""
    from ddaepp_cli import atomic
    from ddaepp_cli.build import build_backbone

    rec = recipe_from_dict(__import__("yaml").safe_load(TINY))
    net = build_backbone(rec)
    run = tmp_path / "run"
    save_checkpoint(run, 4, recipe=rec, model=net, ema=net, state={"step": 4}, keep_last=1)
    real_rename = os.rename
    calls = []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the two renames")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(run, 4, recipe=rec, model=net, ema=net, state={"step": 4}, keep_last=1)
    monkeypatch.setattr(atomic.os, "rename", real_rename)
    root = run / "checkpoints"
    assert not (root / "step-0000004").exists()  # the crash window
    assert [s for s, _ in list_checkpoints(run)] == [4]  # readers still find the displaced copy
    # the next process (another pid) prunes with keep_last 1: the step survives and is back in place
    for p in list(root.iterdir()):
        real_rename(p, root / p.name.replace(str(os.getpid()), "999999"))
    prune_checkpoints(run, keep_last=1)
    assert latest_checkpoint(run) == root / "step-0000004"
    assert {p.name for p in root.iterdir()} == {"step-0000004"}
    assert (root / "step-0000004" / "model.safetensors").is_file()


def test_no_old_folders_are_left_after_a_resave(tmp_path):
    from ddaepp_cli.build import build_backbone

    rec = recipe_from_dict(__import__("yaml").safe_load(TINY))
    net = build_backbone(rec)
    for _ in range(2):
        save_checkpoint(tmp_path, 4, recipe=rec, model=net, ema=net, state={"step": 4})
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000004"]


# ------------------------------------------------------------------------------------------------
# DiT-SRA's teacher time
# ------------------------------------------------------------------------------------------------


def test_ddpm_sra_teacher_time_is_dit_sras():
    """DiT-SRA: i' = clamp(i − U{0..Δ·T−1}, 1, T−1) on the step index i = t − 1, so t' >= 2."""
    from ddaepp_cli.losses.sra import SRAHead

    f = build_formulation(recipe_from_dict({"diffusion": {"formulation": "ddpm"}}))
    head = SRAHead(8, student_layer="1", teacher_layer="2", interval=0.1)
    t = torch.tensor([1.0, 2.0, 3.0, 500.0, 500.0, 1000.0])
    u = torch.tensor([0.0, 0.0, 0.999, 0.0, 0.999, 0.5])
    assert head.teacher_time(f, t, u).tolist() == [2.0, 2.0, 2.0, 500.0, 401.0, 950.0]


# ------------------------------------------------------------------------------------------------
# One VAE load per run for the training sample grids
# ------------------------------------------------------------------------------------------------


def test_training_grids_load_the_vae_once(tmp_path, monkeypatch):
    """Before: every sample grid of a latent run reloaded (and re-hashed) the VAE."""
    from ddaepp_cli.data import latents
    from test_latents import make_image_folder, write_tiny_vae

    monkeypatch.setenv("DDAEPP_CACHE", str(tmp_path / "cache-home"))
    vae = tmp_path / "vae.safetensors"
    write_tiny_vae(vae)
    images = make_image_folder(tmp_path / "images", per_class=2)
    cache = tmp_path / "latents"
    latents.cache_latents(images, vae, cache, image_size=32, batch_size=4, shard_size=8, num_workers=0,
                          moments=True)  # the SRA recipes draw a new latent per step
    calls = []
    real = latents.load_decoder
    monkeypatch.setattr(latents, "load_decoder", lambda *a, **k: calls.append(1) or real(*a, **k))
    rec = load_recipe(RECIPES / "imagenet256_sra_ditb.yaml", [
        f"data.root={cache}", "data.latent_channels=8", "data.num_workers=0", "model.width=32", "model.depth=8", "model.heads=2",
        "model.num_classes=2", "train.global_batch=4", "train.precision=fp32", "train.log_every=1",
        "train.checkpoint_every=1000", "train.sample_every=1", "train.sample_grid=2", "sample.steps=2",
        "sample.batch_size=2"])
    train(rec, tmp_path / "run", max_steps=3)
    assert len(list((tmp_path / "run" / "samples").glob("grid-*.png"))) == 3
    assert len(calls) == 1
