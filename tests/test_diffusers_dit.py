"""diffusers interoperability of the original DiT (importers/diffusers_dit.py): `ddaepp export RUN --to diffusers
OUT` and `ddaepp import FOLDER --from diffusers-dit`.

The foreign folders are written by diffusers itself (`DiTTransformer2DModel(...).save_pretrained`,
`DiTPipeline.save_pretrained`) and read back by diffusers' own `from_pretrained`; tests/manifests/diffusers_dit.json
records what save_pretrained writes (files, config.json, keys, shapes, dtypes) and the first test checks that the
installed diffusers still writes exactly that. Tiny network: DiT with 2 blocks, width 64, 2 heads, patch 2, 8×8×4
latents, 10 classes, learned Σ.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import manifest_files as M

diffusers = pytest.importorskip("diffusers")
torch.set_num_threads(1)

TINY = ["model.width=64", "model.depth=2", "model.heads=2", "model.num_classes=10", "data.image_size=8",
        "data.root=/nonexistent-latents", "sra.enabled=false"]
RECIPE = "imagenet256_sra_ditxl"


def cli(*args):
    from ddaepp_cli.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, [ln for ln in r.stderr.splitlines() if ln.strip()], r.stdout


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every trainable tensor random (DiT's zero-initialised adaLN would make the outputs trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                x = torch.randn(p.shape, generator=g)
                p.copy_(x / math.sqrt(p.shape[1:].numel()) if p.ndim > 1 else 0.1 * x)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def make_run(tmp: Path, *, shift: int = 0, vae: Path | None = None, name: str = "run") -> Path:
    """A tiny dit_orig DDPM run folder (recipe, checkpoint with different raw and EMA weights), written as
    `ddaepp import` writes runs; with `vae`, its latent folder records that VAE and z·0.18215."""
    from ddaepp_cli.build import build_backbone
    from ddaepp_cli.cli import resolve_recipe_path
    from ddaepp_cli.importers import _latent_folder, _write_run
    from ddaepp_cli.recipe import load_recipe

    recipe = load_recipe(resolve_recipe_path(RECIPE), [*TINY, f"model.time_freq_shift={shift}"])
    model = build_backbone(recipe)
    out = tmp / name
    note = None
    if vae is not None:
        recipe, note = _latent_folder(recipe, out, vae, None)
    randomize(model, 1)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    randomize(model, 2)
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    _write_run(out, recipe, raw, ema, {"step": 7, "source": {"sha256": "0" * 64}, "latents": note})
    return out


@pytest.fixture(scope="module")
def small_vae(tmp_path_factory) -> Path:
    """AutoencoderKL.save_pretrained's folder from tests/manifests/vae_diffusers.json (4 latent channels, f2)."""
    root = tmp_path_factory.mktemp("vae") / "vae"
    M.write(M.load("vae_diffusers")["sizes"]["small"], root)
    return root


def inputs(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 417, 999][:n])
    y = torch.randint(0, 10, (n,), generator=g)
    return x, t, y


# ------------------------------------------------------------------------------------------------
# The format, as the installed diffusers writes it
# ------------------------------------------------------------------------------------------------


def test_installed_diffusers_writes_the_manifest_layout(tmp_path):
    from safetensors import safe_open

    from ddaepp_cli.importers.diffusers_dit import SCHEDULER

    man = M.load("diffusers_dit")
    small = man["sizes"]["small"]
    diffusers.DiTTransformer2DModel(**small["DiTTransformer2DModel"]).save_pretrained(tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == sorted(small["files"])
    strip = lambda c: {k: v for k, v in c.items() if k != "_diffusers_version"}  # noqa: E731
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert strip(config) == strip(small["files"]["config.json"]["content"])
    spec = small["files"]["diffusion_pytorch_model.safetensors"]
    with safe_open(str(tmp_path / "t" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.metadata() == spec["metadata"]
        found = {k: (tuple(f.get_slice(k).get_shape()), "float32") for k in f.keys()}
        assert all(str(f.get_slice(k).get_dtype()) == "F32" for k in f.keys())
    assert found == {k: s for k, s in M.tensors(spec["content"]).items()}
    diffusers.DDPMScheduler(**SCHEDULER).save_pretrained(tmp_path / "s")
    written = json.loads((tmp_path / "s" / "scheduler_config.json").read_text())
    assert strip(written) == strip(man["scheduler"]["files"]["scheduler_config.json"]["content"])


def test_released_dit_xl2_maps_onto_every_diffusers_key():
    """DiT-XL/2 256 (the facebook/DiT-XL-2-256 geometry): ddaepp's network, on the meta device, maps onto
    exactly the manifest's keys and shapes; 27 more copies of the shared embedder than DiT's own count."""
    from ddaepp_cli.importers.diffusers_dit import to_diffusers
    from ddaepp_cli.nets.dit_orig import build_dit_orig

    entry = M.load("diffusers_dit")["sizes"]["released"]
    with torch.device("meta"):
        net = build_dit_orig("XL", patch_size=2, learn_sigma=True, num_classes=1000, in_channels=4, image_size=32)
    mapped = to_diffusers(net.state_dict(), 28)
    listed = M.tensors(entry["files"]["diffusion_pytorch_model.safetensors"]["content"])
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: s for k, (s, _) in listed.items()}
    own = sum(p.numel() for p in net.parameters())
    assert own == 675_129_632  # DiT-XL/2 with learned Σ (nets/dit_orig.py)
    embedder = sum(p.numel() for n, p in net.named_parameters() if n.startswith(("t_embedder", "y_embedder")))
    assert entry["parameters"] == own - net.pos_embed.numel() + 27 * embedder


# ------------------------------------------------------------------------------------------------
# Export: diffusers' own loader and forward
# ------------------------------------------------------------------------------------------------


def test_export_loads_in_diffusers_and_equals_ddaepp_forward(tmp_path):
    from ddaepp_cli.sample import load_model

    run = make_run(tmp_path, shift=1)
    code, err, out = cli("export", run, tmp_path / "hf", "--to", "diffusers", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["pipeline"] is False and res["vae"].startswith("no VAE")  # no latent folder: transformer + scheduler
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["ddaepp_export.json", "scheduler", "transformer"]
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "hf" / "transformer").eval()
    assert theirs.config.norm_eps == 1e-6 and theirs.config.num_embeds_ada_norm == 10
    assert theirs.config.out_channels == 8  # learned Σ
    for weights in ("ema", "raw"):
        _, net, _ = load_model(run, weights=weights)
        x, t, y = inputs()
        with torch.no_grad():
            ours = net(x, t.float(), class_labels=y)
            other = theirs(x, timestep=t, class_labels=y).sample
        if weights == "ema":  # the exported network (--weights ema)
            assert rel(other, ours) <= 1e-5
        else:  # negative control: the raw weights are another network
            assert rel(other, ours) > 1e-2
    code, err, out = cli("export", run, tmp_path / "hf_raw", "--to", "diffusers", "--weights", "raw", "--json")
    assert code == 0 and json.loads(out)["weights"] == "raw"
    raw = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "hf_raw" / "transformer").eval()
    with torch.no_grad():
        torch.testing.assert_close(raw(x, timestep=t, class_labels=y).sample, net(x, t.float(), class_labels=y),
                                   rtol=0, atol=1e-5 * float(net(x, t.float(), class_labels=y).abs().max()))


def test_dit_time_sinusoid_is_the_one_difference_and_is_reported(tmp_path):
    """A run with DiT's time sinusoid (time_freq_shift 0): diffusers' forward equals ddaepp's at t = 0 (where
    the sinusoids agree) and everywhere once diffusers' time projection uses DiT's frequencies; stock diffusers
    differs elsewhere, by the amount the export reports."""
    from ddaepp_cli.sample import load_model

    run = make_run(tmp_path, shift=0)
    code, err, out = cli("export", run, tmp_path / "hf", "--to", "diffusers", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["time_freq_shift"] == 0 and "10000^(-k/127)" in res["time_embedding"]
    assert res["max_relative_difference_t>0"] > 1e-3
    _, net, _ = load_model(run)
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "hf" / "transformer").eval()
    x, t, y = inputs()
    with torch.no_grad():
        ours = net(x, t.float(), class_labels=y)
        stock = theirs(x, timestep=t, class_labels=y).sample
        assert rel(stock[:1], ours[:1]) <= 1e-5  # t = 0
        assert rel(stock[1:], ours[1:]) > 1e-3
        for block in theirs.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0  # DiT's frequencies 10000^(-k/128)
        assert rel(theirs(x, timestep=t, class_labels=y).sample, ours) <= 1e-5


# ------------------------------------------------------------------------------------------------
# Import: a folder diffusers wrote
# ------------------------------------------------------------------------------------------------


def test_import_of_a_diffusers_saved_dit_equals_diffusers_forward(tmp_path):
    from ddaepp_cli.build import build_formulation
    from ddaepp_cli.sample import load_model

    cfg = M.load("diffusers_dit")["sizes"]["small"]["DiTTransformer2DModel"]
    theirs = diffusers.DiTTransformer2DModel(**{**cfg, "norm_eps": 1e-5}).eval()  # diffusers' default eps
    randomize(theirs, 3)
    first = theirs.transformer_blocks[0].norm1.emb
    for block in theirs.transformer_blocks[1:]:  # one DiT embedder, copied into every block as diffusers' DiTs hold it
        block.norm1.emb.load_state_dict(first.state_dict())
    theirs.save_pretrained(tmp_path / "bare")
    code, err, out = cli("import", tmp_path / "bare", "--from", "diffusers-dit", "--out", tmp_path / "run", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["family"] == "diffusers-dit"
    assert any("norm_eps 1e-05" in c for c in res["conventions"])
    assert res["dropped"] == {"per-block copies of the shared time/class embedder (checked equal to block 0's)": 5}
    recipe, net, _ = load_model(tmp_path / "run")
    assert res["mapped_tensors"] == len(net.state_dict())
    m = recipe.model
    assert (m.width, m.depth, m.heads, m.num_classes, m.learn_sigma, m.time_freq_shift) == (64, 2, 2, 10, True, 1)
    assert (recipe.sample.sampler, recipe.sample.steps, recipe.diffusion.respacing) == ("ddpm", 250, "iddpm")
    assert recipe.data.latent_scale == 0.18215 and recipe.data.image_size == 8
    x, t, y = inputs()
    f = build_formulation(recipe)
    with torch.no_grad():
        want = theirs(x, timestep=t, class_labels=y).sample
        assert rel(net(x, t.float(), class_labels=y), want) <= 1e-4  # LayerNorm eps 1e-5 vs DiT's 1e-6 before MLPs
        pred = f.predict(net, x, t + 1, class_labels=y)  # ddaepp's t = 1..1000 is diffusers' 0..999
        assert rel(pred.eps, want[:, :4]) <= 1e-4
        assert rel(pred.var_frac, (want[:, 4:] + 1) / 2) <= 1e-4
    theirs.register_to_config(norm_eps=1e-6)
    for block in theirs.transformer_blocks:
        block.norm3.eps = 1e-6
    with torch.no_grad():  # with DiT's eps the two are the same function
        assert rel(net(x, t.float(), class_labels=y), theirs(x, timestep=t, class_labels=y).sample) <= 1e-5


def test_export_then_import_round_trips_bitwise_with_the_pipeline(tmp_path, small_vae):
    """A run with a VAE → a DiTPipeline folder (model_index.json, transformer/, scheduler/, vae/) that
    DiTPipeline.from_pretrained loads → `ddaepp import` → the same EMA tensors, bit for bit, the run's time
    convention and latent scale, and a run that samples through the VAE."""
    from safetensors.torch import load_file

    from ddaepp_cli.sample import load_model

    run = make_run(tmp_path, shift=0, vae=small_vae)
    code, err, out = cli("export", run, tmp_path / "hf", "--to", "diffusers", "--json")
    assert code == 0, err
    assert json.loads(out)["pipeline"] is True
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {"model_index.json", "transformer", "scheduler", "vae",
                                                            "ddaepp_export.json"}
    pipe = diffusers.DiTPipeline.from_pretrained(tmp_path / "hf")
    assert pipe.vae.config.scaling_factor == 0.18215
    assert type(pipe.scheduler).__name__ == "DDPMScheduler" and pipe.scheduler.config.variance_type == "fixed_small"
    code, err, out = cli("import", tmp_path / "hf", "--from", "diffusers-dit", "--out", tmp_path / "back", "--json")
    assert code == 0, err
    ckpt = next((tmp_path / "back" / "checkpoints").iterdir())
    before = load_file(str(next((run / "checkpoints").iterdir()) / "ema.safetensors"))
    after = load_file(str(ckpt / "ema.safetensors"))
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert ckpt.name == next((run / "checkpoints").iterdir()).name  # the step too
    recipe, _, _ = load_model(tmp_path / "back")
    assert recipe.model.time_freq_shift == 0 and recipe.data.latent_scale == 0.18215
    code, err, _ = cli("sample", tmp_path / "back", "--seeds", "0-1", "--steps", "3", "--out", tmp_path / "s",
                       "--format", "png", "--json")
    assert code == 0, err
    from PIL import Image

    assert Image.open(tmp_path / "s" / "000001.png").size == (16, 16)  # 8×8 latents through the f2 decoder


# ------------------------------------------------------------------------------------------------
# The sampler: diffusers' scheduler step = ddaepp's DDPM step with the same noise
# ------------------------------------------------------------------------------------------------


def test_learned_range_scheduler_step_equals_ddaepp_learned_variance_step(tmp_path):
    """The exported scheduler, loaded with variance_type='learned_range' and given the full 2C output, steps
    exactly as ddaepp's ancestral learned-variance step on DiT's 250-step grid, with the same noise."""
    from ddaepp_cli.build import build_formulation
    from ddaepp_cli.diffusion.samplers import ddpm_ancestral
    from ddaepp_cli.sample import load_model

    run = make_run(tmp_path, shift=1)
    assert cli("export", run, tmp_path / "hf", "--to", "diffusers")[0] == 0
    recipe, net, _ = load_model(run)
    f = build_formulation(recipe)
    transformer = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "hf" / "transformer").eval()
    sched = diffusers.DDPMScheduler.from_pretrained(tmp_path / "hf" / "scheduler", variance_type="learned_range")
    for n in (2, 3, 10, 25, 50, 100, 1000, 250):  # timestep_spacing linspace = DiT's space_timesteps
        sched.set_timesteps(n)
        grid = f.time_grid("ddpm", n)  # ddaepp: DiT's space_timesteps + 1, then 0
        assert torch.equal(grid[:-1].long() - 1, sched.timesteps), n
    x, _, y = inputs(2)
    for i in (0, 120, 248, 249):  # the first step, a middle one, the last noisy one, the step to data
        t = sched.timesteps[i]
        with torch.no_grad():
            out = transformer(x, timestep=t.expand(2), class_labels=y).sample
            theirs = sched.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
            torch.manual_seed(i)  # ddaepp's sampler draws z with randn_like from the global generator
            ours, _ = ddpm_ancestral(f, f.denoiser(net, class_labels=y), x, grid[i:i + 2])
        assert rel(ours, theirs) <= 1e-5, i
    t = sched.timesteps[120]
    with torch.no_grad():  # negative control: ddaepp's fixed variance σ² = β is another step
        out = transformer(x, timestep=t.expand(2), class_labels=y).sample
        theirs = sched.step(out, t, x, generator=torch.Generator().manual_seed(120)).prev_sample
        torch.manual_seed(120)
        ours, _ = ddpm_ancestral(f, lambda x_, t_: dataclasses.replace(f.predict(net, x_, t_, class_labels=y),
                                                                       var_frac=None), x, grid[120:122])
    assert rel(ours, theirs) > 1e-4


def test_dit_pipeline_equals_ddaepp_sampler_with_its_variance(tmp_path, small_vae):
    """DiTPipeline on the exported folder (it drops the learned variance and steps the fixed_small
    DDPMScheduler) = ddaepp's ancestral sampler on DiT's grid with σ² = β̃ (the learned-variance step at
    frac 0), the same initial latents and step noise, decoded by the same VAE."""
    from ddaepp_cli.build import build_formulation
    from ddaepp_cli.data.latentstore import load_decoder
    from ddaepp_cli.diffusion.samplers import ddpm_ancestral
    from ddaepp_cli.sample import load_model

    run = make_run(tmp_path, shift=1, vae=small_vae)
    assert cli("export", run, tmp_path / "hf", "--to", "diffusers")[0] == 0
    pipe = diffusers.DiTPipeline.from_pretrained(tmp_path / "hf")
    pipe.set_progress_bar_config(disable=True)
    labels = [1, 7]
    torch.manual_seed(5)  # DiTPipeline's scheduler.step draws its noise from the global generator
    images = pipe(class_labels=labels, guidance_scale=1.0, num_inference_steps=3, output_type="np",
                  generator=torch.Generator().manual_seed(4)).images
    recipe, net, _ = load_model(run)
    f = build_formulation(recipe)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    y = torch.tensor(labels)

    def fixed_small(x_t, t):
        p = f.predict(net, x_t, t, class_labels=y)
        return dataclasses.replace(p, var_frac=torch.zeros_like(p.var_frac))

    torch.manual_seed(5)
    with torch.no_grad():
        z, _ = ddpm_ancestral(f, fixed_small, x, f.time_grid("ddpm", 3))
        ours = (load_decoder(recipe.data.root, vae=recipe.data.vae, scale=recipe.data.latent_scale)(z) + 1) / 2
    theirs = torch.from_numpy(images).permute(0, 3, 1, 2)
    assert theirs.shape == ours.shape == (2, 3, 16, 16)
    assert float((theirs - ours).abs().max()) <= 1e-5


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2
# ------------------------------------------------------------------------------------------------


def test_bad_input_exits_2_with_one_line(tmp_path):
    run = make_run(tmp_path, shift=0)
    code, err, _ = cli("export", run, tmp_path / "x", "--to", "onnx")
    assert code == 2 and len(err) == 1 and "diffusers" in err[0]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    code, err, _ = cli("export", run, busy, "--to", "diffusers")
    assert code == 2 and len(err) == 1 and "not empty" in err[0]
    assert [p.name for p in busy.iterdir()] == ["keep.txt"] and (busy / "keep.txt").read_text() == "mine"
    # a run that is not dit_orig: the quickstart's UNet
    from ddaepp_cli.build import build_backbone
    from ddaepp_cli.cli import resolve_recipe_path
    from ddaepp_cli.importers import _write_run
    from ddaepp_cli.recipe import load_recipe

    rec = load_recipe(resolve_recipe_path("quickstart"))
    sd = build_backbone(rec).state_dict()
    _write_run(tmp_path / "unet", rec, sd, sd, {"step": 0, "source": {"sha256": "0" * 64}})
    code, err, _ = cli("export", tmp_path / "unet", tmp_path / "y", "--to", "diffusers")
    assert code == 2 and len(err) == 1 and "dit_orig DDPM runs" in err[0] and "model.backbone" in err[0]
    assert not (tmp_path / "y").exists()
    # folders that are not a diffusers DiT
    code, err, _ = cli("import", tmp_path / "unet", "--from", "diffusers-dit", "--out", tmp_path / "r1")
    assert code == 2 and len(err) == 1 and "DiTPipeline folder" in err[0]
    vae_only = tmp_path / "vae"
    M.write(M.load("vae_diffusers")["sizes"]["small"], vae_only)
    code, err, _ = cli("import", vae_only, "--from", "diffusers-dit", "--out", tmp_path / "r2")
    assert code == 2 and len(err) == 1 and "AutoencoderKL, not a DiT transformer" in err[0]
    assert cli("export", make_run(tmp_path, name="ok"), tmp_path / "hf", "--to", "diffusers")[0] == 0
    code, err, _ = cli("import", tmp_path / "hf", "--from", "diffusers-dit", "--out", busy)
    assert code == 2 and len(err) == 1 and "not empty" in err[0]
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "hf" / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"
    kept = sd[key].clone()
    sd[key] = kept + 1.0  # the blocks embed time differently
    save_file(sd, str(weights), metadata={"format": "pt"})
    code, err, _ = cli("import", tmp_path / "hf", "--from", "diffusers-dit", "--out", tmp_path / "r3")
    assert code == 2 and len(err) == 1 and "differs from transformer_blocks.0" in err[0]
    sd[key] = kept
    del sd["proj_out_2.bias"]
    save_file(sd, str(weights), metadata={"format": "pt"})
    code, err, _ = cli("import", tmp_path / "hf", "--from", "diffusers-dit", "--out", tmp_path / "r4")
    assert code == 2 and len(err) == 1 and "proj_out_2.bias" in err[0]
    code, err, _ = cli("import", weights, "--from", "nope", "--recipe", RECIPE, "--out", tmp_path / "r5")
    assert code == 2 and len(err) == 1 and "diffusers-dit" in err[0] and "lightningdit" in err[0]
    code, err, _ = cli("import", weights, "--from", "dit", "--out", tmp_path / "r6")  # file families need a recipe
    assert code == 2 and len(err) == 1 and "--from dit needs --recipe" in err[0]
    assert not any((tmp_path / n).exists() for n in ("r1", "r2", "r3", "r4", "r5", "r6"))
