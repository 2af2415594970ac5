"""The original DiT/SiT backbone (nets/dit_orig.py) and the SRA paper recipes (recipes/imagenet256_sra_*):
parameter counts, taps and the teacher's early exit, each backbone's time input, SRA with λ = 0, and
every paper recipe training two steps and sampling decoded images on CPU through a tiny random VAE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddaepp_cli.build import build_formulation
from ddaepp_cli.errors import UsageError
from ddaepp_cli.nets import build_backbone as build_net
from ddaepp_cli.recipe import load_recipe
from ddaepp_cli.training.train import dry_run, train
from test_sra import check_teacher_early_exit

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
PAPER = [f"imagenet256_sra_{a}{s}" for a in ("sit", "dit") for s in ("b", "l", "xl")]

# All parameters, frozen positional embedding included; SRA head (D → 2D → D) on top (aux_params).
COUNTS = {"imagenet256_sra_ditxl": (675_129_632, 5_311_872), "imagenet256_sra_ditb": (130_512_416, 2_361_600),
          "imagenet256_sra_sitxl": (675_111_184, 5_311_872), "imagenet256_sra_sitb": (130_500_112, 2_361_600)}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_paper_recipe_parameter_counts(name):
    info = dry_run(load_recipe(RECIPES / f"{name}.yaml"))
    assert (info["params"], info["aux_params"]) == COUNTS[name]


@pytest.mark.slow
def test_dry_run_cli_reports_dit_xl_2():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "ddaepp_cli", "train", str(RECIPES / "imagenet256_sra_ditxl.yaml"),
                        "--dry-run", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["params"] == 675_129_632 and info["aux_params"] == 5_311_872


def test_paper_recipes_carry_the_paper_settings():
    for name in PAPER:
        rec = load_recipe(RECIPES / f"{name}.yaml")
        sit = "_sit" in name
        assert rec.model.backbone == "dit_orig" and rec.model.patch_size == 2 and not rec.data.hflip
        assert rec.data.latent_channels == 4 and rec.model.learn_sigma == (not sit)
        assert rec.diffusion.formulation == ("rf" if sit else "ddpm")
        assert (rec.sample.sampler, rec.sample.steps) == (("sde", 250) if sit else ("ddpm", 250))
        assert rec.sample.cfg_scale == (1.8 if name.endswith("sitxl") else 1.0)
        assert sit or rec.sample.clip_x0 is False  # DiT samples latents unclipped
        assert rec.data.latent_scale == 0.18215
        assert rec.sra.enabled and rec.sra.loss == "smooth_l1" and rec.sra.beta == 0.05
        assert rec.train.ema.decay == 0.9999 and rec.train.lr == 1e-4 and rec.train.weight_decay == 0
    xl = load_recipe(RECIPES / "imagenet256_sra_sitxl.yaml")
    assert tuple(xl.sample.cfg_interval) == (0.0, 0.7) and (xl.sra.student_layer, xl.sra.teacher_layer) == ("8", "20")
    assert build_formulation(load_recipe(RECIPES / "imagenet256_sra_ditb.yaml")).time_grid("ddpm", 250)[0] == 1000


def test_sizes_patches_and_errors():
    with torch.device("meta"):
        for size, (d, n) in {"S": (384, 12), "B": (768, 12), "L": (1024, 24), "XL": (1152, 28)}.items():
            for p in (2, 4, 8):
                m = build_net("dit_orig", size=size, patch_size=p, in_channels=4, image_size=32, num_classes=1000)
                assert m.width == d and len(m.blocks) == n and m.x_embedder.num_patches == (32 // p) ** 2
                assert m.layer_names == tuple(str(k) for k in range(1, n + 1))
        m = build_net("dit_orig", size="B", learn_sigma=True, in_channels=4, image_size=32)
        assert m.final_layer.linear.out_features == 2 * 2 * 8 and m.y_embedder.num_embeddings == 1
    with pytest.raises(UsageError, match="valid: S, B, L, XL"):
        build_net("dit_orig", size="M")
    with pytest.raises(UsageError, match="not divisible"):
        build_net("dit_orig", size="S", patch_size=3, image_size=32)
    with pytest.raises(UsageError, match="learn_sigma"):
        load_recipe(RECIPES / "imagenet256_sra_sitb.yaml", ["model.learn_sigma=true"])


def tiny_net(**kw):
    torch.manual_seed(0)
    m = build_net("dit_orig", size="S", width=32, depth=4, heads=2, patch_size=2, in_channels=4, image_size=8,
                  num_classes=10, **kw)
    for blk in m.blocks:  # leave adaLN-Zero's identity start so every block does something
        torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.05)
    torch.nn.init.normal_(m.final_layer.linear.weight, std=0.05)
    return m


def test_taps_early_exit_and_output_layout():
    m = tiny_net(learn_sigma=True)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 499.0, 999.0]), torch.tensor([1, 2, 10])
    out, feats = m.forward_with_features(x, t, "2-3", class_labels=y)
    assert out.shape == (3, 8, 8, 8) and feats["2"].shape == (3, 16, 32)
    early = m.forward_features(x, t, ["3"], class_labels=y)
    assert torch.equal(early["3"], feats["3"])
    calls = []
    m.blocks[3].register_forward_hook(lambda *a: calls.append(1))
    m.forward_features(x, t, ["3"], class_labels=y)
    assert calls == []
    assert torch.equal(m(x, t), m(x, t, class_labels=torch.full((3,), 10)))  # None = the null class


def test_timm_layers_and_tanh_gelu():
    from timm.models.vision_transformer import Attention, Mlp, PatchEmbed

    m = tiny_net()
    assert isinstance(m.x_embedder, PatchEmbed) and isinstance(m.blocks[0].attn, Attention)
    assert isinstance(m.blocks[0].mlp, Mlp) and m.blocks[0].mlp.act.approximate == "tanh"
    assert not m.blocks[0].norm1.elementwise_affine and not m.pos_embed.requires_grad


def test_selfcond_starts_as_the_baseline():
    base, sc = tiny_net(), tiny_net(selfcond_layer="2")
    sc.load_state_dict(base.state_dict(), strict=False)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0])
    assert torch.equal(base(x, t), sc(x, t))
    with pytest.raises(UsageError, match="valid: 1, 2, 3"):
        tiny_net(selfcond_layer="4")


@pytest.mark.parametrize("backbone, formulation, expect", [
    ("dit_orig", "ddpm", "index"), ("dit", "ddpm", "index"), ("ddpm", "ddpm", "fraction"),
    ("dit_orig", "rf", None)])
def test_each_backbone_gets_its_papers_time_input(backbone, formulation, expect):
    """DiT (both layouts) embeds the integer step 0…999 under DDPM, the DDAE UNet t/T, SiT raw t ∈ [0, 1]."""
    sets = [f"model={{backbone: {backbone}}}", f"diffusion={{formulation: {formulation}}}", "data.dataset=digits",
            "sample.s_churn=0"]  # the quickstart's stochastic Heun is EDM's
    f = build_formulation(load_recipe(RECIPES / "quickstart.yaml", sets))
    t = torch.tensor([1.0, 11.0, 1000.0]) if formulation == "ddpm" else torch.tensor([0.0, 0.25, 1.0])
    want = {"index": t - 1, "fraction": t / 1000, None: t}[expect]
    assert torch.equal(f.net_time(t), want)


TINY_SRA = ["data.dataset=digits", "data.image_size=8", "data.num_workers=0", "model.width=32", "model.depth=4",
            "model.heads=2", "model.num_classes=10", "sra.student_layer=1", "sra.teacher_layer=3",
            "train.global_batch=8", "train.batch_per_process=null", "train.precision=fp32", "train.log_every=1",
            "train.checkpoint_every=1000", "train.milestones=[]", "train.sample_every=0", "train.ema.decay=0.5"]


@pytest.mark.parametrize("name", ["imagenet256_sra_ditb", "imagenet256_sra_sitb"])
def test_sra_teacher_early_exit_on_the_original_network(name):
    check_teacher_early_exit(load_recipe(RECIPES / f"{name}.yaml", TINY_SRA))


@pytest.mark.parametrize("name", ["imagenet256_sra_ditb", "imagenet256_sra_sitb"])
def test_sra_weight_zero_is_exactly_the_plain_step(name, tmp_path):
    runs = {}
    for tag, sets in (("sra0", ["sra.weight=0"]), ("plain", ["sra.enabled=false"])):
        train(load_recipe(RECIPES / f"{name}.yaml", TINY_SRA + sets), tmp_path / tag, max_steps=1)
        runs[tag] = load_file(next((tmp_path / tag / "checkpoints").iterdir()) / "model.safetensors")
    assert runs["sra0"].keys() == runs["plain"].keys()
    assert all(torch.equal(runs["sra0"][k], runs["plain"][k]) for k in runs["plain"])


# ------------------------------------------------------------------------------------------------
# Every paper recipe end to end on CPU: tiny random 4-channel VAE → cache → 2 steps → decoded samples


@pytest.fixture(scope="module")
def latent_cache(tmp_path_factory):
    from ddaepp_cli.data import latents as L
    from test_latents import make_image_folder, write_tiny_vae

    base = tmp_path_factory.mktemp("sra_lat")
    vae = base / "tiny-sdvae.safetensors"
    write_tiny_vae(vae, z=4)  # 4 latent channels as SD-VAE; 32×32 images → 4×8×8 latents
    images = make_image_folder(base / "images")
    # posterior moments: the SRA recipes draw a new latent per step (data.latent_posterior: per_step)
    L.cache_latents(images, vae, base / "cache", image_size=32, batch_size=4, shard_size=8, num_workers=0, moments=True)
    return base / "cache"


def test_latent_scale_normalises_and_decodes_as_dit(latent_cache, tmp_path, monkeypatch):
    """`data.latent_scale`: model-space latents are z·scale (no statistics), and decoding divides by it."""
    from ddaepp_cli.data import latents as L

    monkeypatch.setenv("DDAEPP_CACHE", str(tmp_path))
    stats_ds, scaled_ds = L.LatentDataset(latent_cache), L.LatentDataset(latent_cache, scale=0.18215)
    (pair_stats, y1), (pair_scaled, y2) = stats_ds[5], scaled_ds[5]
    raw = stats_ds.denormalise(pair_stats)
    assert y1 == y2 and pair_scaled.dtype == torch.float32
    torch.testing.assert_close(pair_scaled, raw * 0.18215, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scaled_ds.denormalise(pair_scaled), raw, rtol=1e-5, atol=1e-5)
    z = pair_scaled[:1]
    dec_scaled = L.load_decoder(latent_cache, scale=0.18215)(z)
    dec_stats = L.load_decoder(latent_cache)(pair_stats[:1])  # the same VAE latent through the statistics
    torch.testing.assert_close(dec_scaled, dec_stats, rtol=1e-4, atol=1e-4)
    with pytest.raises(UsageError, match="latent_scale must be positive"):
        load_recipe(RECIPES / "imagenet256_sra_sitb.yaml", ["data.latent_scale=0"])


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipe_trains_and_samples_decoded_images(name, latent_cache, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ddaepp_cli.cli import app

    monkeypatch.setenv("DDAEPP_CACHE", str(tmp_path / "ddaepp-cache"))
    sets = [f"data.root={latent_cache}", "data.num_workers=0", "model.width=32", "model.depth=4", "model.heads=2",
            "model.num_classes=2", "sra.student_layer=1", "sra.teacher_layer=3", "train.global_batch=4",
            "train.batch_per_process=null", "train.precision=fp32", "train.log_every=1",
            "train.checkpoint_every=1000", "train.milestones=[]", "train.sample_every=0", "sample.steps=3",
            "sample.batch_size=4"]
    result = train(load_recipe(RECIPES / f"{name}.yaml", sets), tmp_path / "run", max_steps=2)
    assert result["step"] == 2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_sra"] > 0 for r in lines)
    out = tmp_path / "samples"
    r = CliRunner().invoke(app, ["sample", str(tmp_path / "run"), "--n", "3", "--out", str(out), "--format", "npz"])
    assert r.exit_code == 0, r.output
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape == (3, 32, 32, 3) and arr.dtype == np.uint8
    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["sampler"] == ("sde" if "_sit" in name else "ddpm")
    assert protocol["cfg_scale"] == (1.8 if name.endswith("sitxl") else 1.0)
