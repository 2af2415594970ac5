"""`ddaepp import` records each family's published sampler; `sample` at the imported run's defaults runs it.

For every family, the source file is the family's own file layout, built by manifest_files.py from its
manifest in tests/manifests/ (the small size: what the official train.py or released file holds, real
random weights), and `import_checkpoint` — the `ddaepp import` entry — reads it onto the shipped recipe
with the manifest's small network set by `--set` (the family's recipe overrides and
`importers/published.py` applied as for any user). Then `sample_command` — the `ddaepp sample` entry —
runs at the run's defaults. Its sampler output is compared with a reference written here, independently,
from each official sampler's algorithm (files cited), with the official settings as constants, the same
network (the imported one, called in the official convention: time input, output convention; its forward
equals each family's forward in tests/test_import.py), the same labels and the same noise (ddaepp's
per-seed streams). The reference with one setting changed (what the README recommended before, or a
neighbouring value) must differ: each check can fail.

The official code itself was run against `ddaepp sample` outside this repository (tiny official networks,
files as their train.py saves them, noise injected): max relative differences 2e-7 … 2e-6, U-ViT bitwise,
DDAE DDPM 8e-5 at a few pixels (its float32 ᾱ table); see the README's "Released checkpoints".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ddaepp_cli.recipe import load_recipe, replace
from ddaepp_cli.seeding import per_sample_randn

import manifest_files as M

torch.set_num_threads(1)

SEEDS = [3, 8]
# Relative to the largest |value|: float32 arithmetic in another order. DDAE builds its DDIM ᾱ table and
# steps in float32 (ddaepp's table is float64); at t = 991 x̂0 = (x − σ·ε̂)/α amplifies rounding ×1/α ≈ 150.
TOL = {"default": 5e-6, "ddae_ddpm": 1e-4}
NC = 10  # tiny class-conditional models; the null label is NC


def source_file(folder: Path, source: tuple, seed: int) -> Path:
    """The family's file: (manifest, variant, layout, size) of tests/manifests/, written by manifest_files.py
    as the official code writes it (random weights: deterministic per key path and `seed`)."""
    name, variant, layout, size = source
    m = M.load(name)
    m = m["variants"][variant] if variant else m
    files = M.write(m["layouts"][layout]["sizes"][size], folder, seed=seed)
    assert len(files) == 1, sorted(files)
    return next(iter(files.values()))


def imported_run(tmp_path, case: str, *, seed: int, explicit=()):
    """`ddaepp import SOURCE --from FAMILY --recipe RECIPE --set SETS --set EXPLICIT` through
    `import_checkpoint` (the command passes every `--set` as explicit), SOURCE the family's file built from
    its manifest; returns (run, the `sampling` record, the imported network)."""
    from ddaepp_cli.cli.base import resolve_recipe_path
    from ddaepp_cli.importers import import_checkpoint
    from ddaepp_cli.sample import load_model

    family, recipe, source, sets = CASES[case][:4]
    path = source_file(tmp_path / "source", source, seed)
    sets = list(sets) + list(explicit)
    rec = load_recipe(resolve_recipe_path(recipe), sets)
    res = import_checkpoint(path, family=family, recipe=rec, out=tmp_path / "run", explicit=tuple(sets))
    return tmp_path / "run", res["sampling"], load_model(tmp_path / "run")[1]


def sample_at_defaults(run, monkeypatch, tmp_path):
    """`sample_command` at the run's defaults; returns (sampler output before decoding, x_T, class labels,
    the sample record). The VAE decoder of latent runs is replaced (decoding is not under test)."""
    import ddaepp_cli.data.latents as latents
    import ddaepp_cli.diffusion.cfg as cfg
    import ddaepp_cli.diffusion.samplers as samplers
    from ddaepp_cli.sample import sample_command

    seen = {}
    run_sampler, guided = samplers.sample, cfg.guided_denoiser

    def capture_sampler(formulation, denoise, x_T, **kw):
        seen["x_T"] = x_T.clone()
        seen["x0"] = run_sampler(formulation, denoise, x_T, **kw)
        return seen["x0"]

    def capture_labels(formulation, net, class_labels, **kw):
        seen["y"] = class_labels.clone()
        return guided(formulation, net, class_labels, **kw)

    monkeypatch.setattr(samplers, "sample", capture_sampler)
    monkeypatch.setattr(cfg, "guided_denoiser", capture_labels)
    monkeypatch.setattr(latents, "load_decoder", lambda *a, **k: (lambda z: torch.zeros(z.shape[0], 3, 4, 4)))
    out = sample_command(str(run), seeds=SEEDS, out=str(tmp_path / "samples"), sampler=None, steps=None,
                         weights="ema", formats=["npz"], batch_size=None, clip=None)
    return seen["x0"].double(), seen["x_T"], seen.get("y"), out


def noise(stream: int, like: torch.Tensor) -> torch.Tensor:
    """The noise ddaepp's stochastic samplers draw for `stream` (per-seed generators, seeding.py)."""
    return per_sample_randn(SEEDS, like.shape[1:], dtype=torch.float32, stream=stream)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def guide(model, x, t, y, scale: float, channels: str, active: bool = True):
    """The official forward_with_cfg: one call on [x; x] with labels [y; null]; `first3` guides channels
    [:3] and passes the conditional output for the rest (DiT/SiT/LightningDiT models*.py), `all` guides
    every channel (REPA samplers.py)."""
    if scale == 1.0 or not active:
        return model(x, t, class_labels=y)
    out = model(torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([y, torch.full_like(y, NC)]))
    cond, uncond = out.chunk(2)
    g = uncond + scale * (cond - uncond)
    return torch.cat([g[:, :3], cond[:, 3:]], 1) if channels == "first3" else g


# ------------------------------------------------------------------------------------------------
# References, each from its official sampler
# ------------------------------------------------------------------------------------------------


def ref_dit(model, x_T, y, *, steps=250, cfg=1.5, channels="first3"):
    """facebookresearch/DiT sample_ddp.py: create_diffusion(str(steps)) (diffusion/__init__.py, linear β,
    learned range), respace.py space_timesteps / SpacedDiffusion, gaussian_diffusion.py p_sample_loop with
    clip_denoised=False; coefficients from float64 tables cast to float32 (_extract_into_tensor)."""
    T = 1000
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)  # get_named_beta_schedule("linear", 1000)
    abar = np.cumprod(1.0 - betas)
    stride, cur, use = (T - 1) / (steps - 1), 0.0, set()  # space_timesteps(1000, [steps])
    for _ in range(steps):
        use.add(round(cur))
        cur += stride
    last, new_betas, tmap = 1.0, [], []
    for i, a in enumerate(abar):  # SpacedDiffusion.__init__
        if i in use:
            new_betas.append(1 - a / last)
            last, tmap = a, tmap + [i]
    b = np.array(new_betas)
    a_ = np.cumprod(1.0 - b)
    a_prev = np.append(1.0, a_[:-1])
    post_var = b * (1.0 - a_prev) / (1.0 - a_)
    log_var_clipped = np.log(np.append(post_var[1], post_var[1:]))
    c1, c2 = b * np.sqrt(a_prev) / (1.0 - a_), (1.0 - a_prev) * np.sqrt(1.0 - b) / (1.0 - a_)
    f = lambda arr, i: float(torch.tensor(arr[i]).float())  # noqa: E731
    x, C = x_T.clone(), x_T.shape[1]
    for i in reversed(range(len(tmap))):
        t = torch.full((x.shape[0],), float(tmap[i]))
        out = guide(model, x, t, y, cfg, channels)
        eps, v = out[:, :C], out[:, C:]
        frac = (v + 1) / 2
        log_var = frac * f(np.log(b), i) + (1 - frac) * f(log_var_clipped, i)
        x0 = f(np.sqrt(1.0 / a_), i) * x - f(np.sqrt(1.0 / a_ - 1), i) * eps
        mean = f(c1, i) * x0 + f(c2, i) * x
        x = mean + (torch.exp(0.5 * log_var) * noise(tmap[i] + 1, x) if i > 0 else 0.0)  # ddaepp step t = index + 1
    return x


def ref_sit(model, x_T, y, *, steps=250, cfg=1.5, channels="first3"):
    """willisma/SiT sample_ddp.py SDE with train_utils.py parse_sde_args defaults: transport/transport.py
    sample_sde (Euler, diffusion_form "sigma", last_step "Mean", 0.04), integrators.py sde, path.py ICPlan
    get_score_from_velocity; SiT time t (1 = data), the network predicts data − noise."""
    ts = torch.linspace(0.0, 0.96, steps)
    dt = ts[1] - ts[0]

    def drift(x, t):
        tt = torch.full((x.shape[0],), float(t))
        v = guide(model, x, tt, y, cfg, channels)
        score = (t * v - x) / ((1 - t) ** 2 + t * (1 - t))  # α = t, σ = 1 − t
        return v + (1 - t) * score  # w = σ

    x = x_T.clone()
    for k, t in enumerate(ts[:-1]):
        x = x + drift(x, t) * dt + torch.sqrt(2 * (1 - t)) * torch.sqrt(dt) * noise(k + 1, x)
    return x + drift(x, ts[-1]) * 0.04  # last step "Mean"


def ref_repa(model, x_T, y, *, steps=250, cfg=1.8, high=0.7, channels="all"):
    """sihyun-yu/REPA samplers.py euler_maruyama_sampler (= vvvvvjdy/SRA SiT-SRA/samplers.py), README
    settings --mode sde --num-steps 250 --cfg-scale 1.8 --guidance-high 0.7: paper time (1 = noise), the
    network predicts ε − x, float64 state; guidance on the drift v − ½·2t·s for guidance_low ≤ t ≤ high."""
    ts = torch.cat([torch.linspace(1.0, 0.04, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = x_T.double()

    def drift(x, t):
        tt = torch.full((x.shape[0],), float(t))
        v = guide(model, x.float(), tt, y, cfg, channels, active=bool(t <= high)).double()
        s = (-(1 - t) * v - x) / (t**2 + (1 - t) * t)  # get_score_from_velocity, path "linear"
        return v - 0.5 * (2 * t) * s

    for k, (t, t_next) in enumerate(zip(ts[:-2], ts[1:-1])):
        dt = t_next - t
        x = x + drift(x, t) * dt + torch.sqrt(2 * t) * noise(k + 1, x).double() * torch.sqrt(dt.abs())
    return x + (ts[-1] - ts[-2]) * drift(x, ts[-2])


def ref_lightningdit(model, x_T, y, *, points=250, shift=0.3, cfg=6.7, start=0.125):
    """hustvl/LightningDiT inference.py with configs/reproductions/lightningdit_xl_vavae_f16d32_800ep_cfg.yaml:
    transport/integrators.py ode (linspace(0, 1, num_sampling_steps), timestep shift r·t/(1 + (r − 1)·t),
    torchdiffeq fixed-grid Euler), models/lightningdit.py forward_with_cfg (channels [:3], unguided while
    t < cfg_interval_start); LightningDiT time (1 = data), the network predicts data − noise."""
    grid = torch.linspace(0.0, 1.0, points)
    grid = torch.tensor([shift * t / (1 + (shift - 1) * t) for t in grid])
    x = x_T.clone()
    for t0, t1 in zip(grid[:-1], grid[1:]):
        tt = torch.full((x.shape[0],), float(t0))
        x = x + (t1 - t0) * guide(model, x, tt, y, cfg, "first3", active=bool(t0 >= start))
    return x


def ref_ddae_ddim(model, x_T, *, steps=100, quirk=True):
    """FutureXiang/ddae model/DDPM.py ddim_sample (η = 0) on schedules(..., 'DDIM') — β = linspace(β_1, β_T,
    T + 1), ᾱ = exp(cumsum(log(1 − β))) in float32 — with pred_eps_(clip_x=True); the net gets t/T."""
    T = 1000
    beta = torch.linspace(1e-4, 0.02, T + 1) if quirk else torch.cat([torch.zeros(1), torch.linspace(1e-4, 0.02, T)])
    abar = torch.cumsum(torch.log(1 - beta), 0).exp()
    times = list(reversed((torch.arange(0, T, T // steps) + 1).tolist())) + [0]
    x = x_T.clone()
    for t, t_next in zip(times[:-1], times[1:]):
        a, a_next = abar[t], abar[t_next]
        eps = model(x, torch.full((x.shape[0],), t / T))
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clip(-1, 1)
        eps = (x - x0 * a.sqrt()) / (1 - a).sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x


def ref_ddae_edm(model, x_T, *, steps=18):
    """FutureXiang/ddae model/EDM.py edm_sample (η = 0: S_churn 0) with sample_schedule (σ 0.002…80, ρ 7),
    D_x (EDM Table 1 preconditioning, σ_data 0.5), pred_eps_(clip_x=True); float64 state."""
    smin, smax, rho, sd = 0.002, 80.0, 7.0, 0.5
    i = torch.arange(steps, dtype=torch.float64)
    ts = torch.cat([(smax ** (1 / rho) + i / (steps - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho,
                    torch.zeros(1, dtype=torch.float64)])

    def d(x, s):
        s32 = s.float()
        c_skip, c_out, c_in = sd**2 / (s32**2 + sd**2), s32 * sd / (s32**2 + sd**2).sqrt(), 1 / (s32**2 + sd**2).sqrt()
        xf = x.float()
        D = (c_skip * xf + c_out * model(c_in * xf, torch.full((x.shape[0],), float(s32.log() / 4)))).double()
        return (x - D.clip(-1, 1)) / s

    x = x_T.double()  # the sampler's x_T: σ_max·N(0, I) (DDAE: randn(…).to(float64)·times[0])
    for k, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        d_cur = d(x, t)
        x_next = x + (t_next - t) * d_cur
        if k < steps - 1:
            x_next = x + (t_next - t) * (0.5 * d_cur + 0.5 * d(x_next, t_next))
        x = x_next
    return x


def ref_uvit(model, x_T, *, steps=1000):
    """baofff/U-ViT configs/cifar10_uvit_small.py (euler_maruyama_sde, 1000 steps), sde.py euler_maruyama on
    ReverseSDE(ScoreModel(noise_pred, VPSDE(0.1, 20))): grid [0, linspace(1e-3, 1, 1000)] (float32), the
    network gets 999·t (ddaepp's uvit multiplies its time input by model.time_scale = 999)."""
    ts = torch.tensor(np.append(0.0, np.linspace(1e-3, 1, steps))).float()
    x = x_T.clone()
    for k in range(steps, 0, -1):
        s, t = ts[k - 1], ts[k]
        beta = 0.1 + t * (20 - 0.1)
        cum_beta = 1.0 - (-(0.1 * t + (20 - 0.1) * t**2 * 0.5)).exp()
        score = -cum_beta.rsqrt() * model(x, torch.full((x.shape[0],), float(t)))
        x = x + (-0.5 * beta * x - beta.sqrt() ** 2 * score) * (s - t)
        if s != 0:
            x = x + beta.sqrt() * (t - s).sqrt() * noise(k, x)
    return x


# ------------------------------------------------------------------------------------------------
# The families
# ------------------------------------------------------------------------------------------------

# `--set`s giving the shipped recipe each manifest's small network (tests/manifests/*.json, sizes "small…"):
# DiT / SiT / REPA / SRA: input_size 8, patch 2, 4 channels, hidden 64, depth 2, 2 heads, 10 classes;
# LightningDiT: input_size 4, patch 1, 4 channels, hidden 64, depth 2, 2 heads, 10 classes; DDAE: 32
# channels, ch_mults [1, 2], one block, attention at level 1 (16×16 of 32×32); U-ViT: 32×32, patch 2,
# embed_dim 64, depth 2, 2 heads.
DIT = ["model.width=64", "model.depth=2", "model.heads=2", f"model.num_classes={NC}", "data.image_size=8",
       "data.root=/nonexistent-latents"]
LDIT = ["model.width=64", "model.depth=2", "model.heads=2", f"model.num_classes={NC}", "data.latent_channels=4",
        "data.image_size=4", "data.root=/nonexistent-latents"]
UNET = ["model.channels=32", "model.ch_mults=[1,2]", "model.n_blocks=1", "model.attn_resolutions=[16]"]
UVIT = ["model.width=64", "model.depth=2", "model.heads=2"]
DDAE_LAYOUT = "train.py, ema-pytorch 0.8.3"  # DDAE's files, released ones included, are train.py checkpoints

# family, shipped recipe, (manifest, variant, layout, size) of the source file, the small network's sets,
# reference at the official settings, the same with one setting changed. The released layouts where one
# exists (the EMA state dict alone); DiT-SRA's train.py checkpoint, whose 'ema' its generate.py reads.
# The shipped recipes of repa, sra and ddae_edm already sample with the published settings: there the
# record's non-empty overrides are what fails without importers/published.py.
CASES = {
    "dit": ("dit", "imagenet256_sra_ditxl", ("dit", None, "released", "small"), DIT, ref_dit,
            dict(channels="all")),
    "sit": ("sit", "imagenet256_sra_sitxl", ("sit", None, "released", "small"), DIT, ref_sit,
            dict(channels="all")),  # the README's old command
    "lightningdit": ("lightningdit", "imagenet256_rf_ditxl_cond", ("lightningdit", None, "released", "small"), LDIT,
                     ref_lightningdit, dict(points=251)),
    "repa": ("repa", "imagenet256_sra_sitxl", ("repa", None, "released", "small"), DIT, ref_repa, dict(high=1.0)),
    "sra_sit": ("sra", "imagenet256_sra_sitxl", ("sra", "sra-sit", "released", "small"), DIT, ref_repa,
                dict(channels="first3")),
    "sra_dit": ("sra", "imagenet256_sra_ditxl", ("sra", "sra-dit", "train.py", "small"), DIT,
                lambda *a, **k: ref_dit(*a, **{"cfg": 1.0, **k}), dict(steps=200)),
    # DDAE's small sizes: DDPM_ddpm.yaml's conv UNet and EDM_ddpmpp_aug.yaml's BigGAN UNet with augment labels
    "ddae_ddpm": ("ddae", "cifar10_ddpm_ddpm", ("ddae", None, DDAE_LAYOUT, "small ddpm_conv"), UNET, ref_ddae_ddim,
                  dict(quirk=False)),
    "ddae_edm": ("ddae", "cifar10_edm_ddpmpp_aug", ("ddae", None, DDAE_LAYOUT, "small edm_biggan_aug"), UNET,
                 ref_ddae_edm, dict(steps=17)),
    "uvit": ("uvit", "cifar10_ddpm_uvit", ("uvit", None, "released", "small"), UVIT, ref_uvit, dict(steps=999)),
}


# U-ViT's file fixes 32×32 inputs (learned positions of 256 patches) and its published sampler takes 1000
# steps: three 1000-call runs, about a minute on one core, so the slow tier (the VP-SDE step itself is
# checked fast by test_vp_sde_sampler_is_uvit_euler_maruyama, its settings by test_published_targets…).
@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow] if c == "uvit" else []) for c in CASES])
def test_sample_at_imported_defaults_is_the_official_sampler(case, tmp_path, monkeypatch):
    ref, changed = CASES[case][4:]
    run, record, model = imported_run(tmp_path, case, seed=list(CASES).index(case))
    x0, x_T, y, out = sample_at_defaults(run, monkeypatch, tmp_path)
    args = (model, x_T, y) if y is not None else (model, x_T)
    expected = ref(*args)
    tol = TOL.get(case, TOL["default"])
    assert rel(x0, expected) < tol, (case, rel(x0, expected), record["overrides"])
    # the check can fail: one official setting changed moves the samples well beyond the tolerance
    assert rel(x0, ref(*args, **changed)) > 10 * tol, (case, changed, rel(x0, ref(*args, **changed)))
    on_disk = json.loads((run / "import.json").read_text())["sampling"]
    assert on_disk == record and record["overrides"] and record["source"]


def test_published_targets_and_conversions():
    """import.json's `sampling` record: the FID each import targets, the exact conversions."""
    from ddaepp_cli.cli.base import resolve_recipe_path
    from ddaepp_cli.importers import FAMILIES, published

    def settings(family, recipe, sets=()):
        rec = load_recipe(resolve_recipe_path(recipe), list(sets))
        rec = replace(rec, FAMILIES[family].overrides(rec))
        return published.apply(family, rec)

    rec, r = settings("lightningdit", "imagenet256_rf_ditxl_cond")
    assert rec.diffusion.shift == 1 / 0.3 and rec.sample.steps == 249 and rec.sample.cfg_interval == (0.0, 0.875)
    assert (rec.sample.cfg_scale, rec.sample.cfg_channels, r["published_fid"], r["target_matches_recipe"]) == \
        (6.7, "first3", 1.35, True)
    _, r = settings("lightningdit", "imagenet256_rf_ditb_cond")
    assert r["published_fid"] == 1.35 and not r["target_matches_recipe"]  # published for XL/1 only
    rec, r = settings("lightningdit", "imagenet256_rf_ditb")  # unconditional: no guidance
    assert rec.sample.cfg_scale == 1.0 and not any(o.startswith("sample.cfg") for o in r["overrides"])
    for family, recipe, fid in (("dit", "imagenet256_sra_ditxl", 2.27), ("sit", "imagenet256_sra_sitxl", 2.06),
                                ("repa", "imagenet256_sra_sitxl", 1.42), ("sra", "imagenet256_sra_sitxl", 1.58),
                                ("sra", "imagenet256_sra_ditxl", None), ("uvit", "cifar10_ddpm_uvit", 3.11),
                                ("ddae", "cifar10_edm_ddpmpp", 2.23), ("ddae", "cifar10_ddpm_ddpm", 3.62)):
        _, r = settings(family, recipe)
        assert r["published_fid"] == fid and r["target_matches_recipe"] == (fid is not None), (family, recipe, r)
    rec, _ = settings("sit", "imagenet256_sra_sitxl")
    assert (rec.sample.sampler, rec.sample.steps, rec.sample.cfg_scale, rec.sample.cfg_interval,
            rec.sample.cfg_channels) == ("sde", 250, 1.5, (0.0, 1.0), "first3")
    rec, _ = settings("ddae", "cifar10_ddpm_ddpmpp")
    assert rec.diffusion.ddae_ddim_quirk and rec.sample.clip_x0
    assert (rec.sample.sampler, rec.sample.steps) == ("ddim", 100)


def test_explicit_set_wins_over_published_settings(tmp_path):
    """A user's `--set` of a published key is kept (and listed), the other published settings still apply."""
    from ddaepp_cli.cli.base import resolve_recipe_path
    from ddaepp_cli.importers import published
    from ddaepp_cli.sample import load_model

    sets = ["sample.cfg_scale=4.0", "sample.cfg_channels=all"]
    run, r, _ = imported_run(tmp_path, "sit", seed=0, explicit=sets)
    rec = load_model(run)[0]
    assert (rec.sample.cfg_scale, rec.sample.cfg_channels, rec.sample.cfg_interval) == (4.0, "all", (0.0, 1.0))
    assert (rec.sample.sampler, rec.sample.steps, rec.diffusion.net_convention) == ("sde", 250, "sit")
    assert sorted(r["kept_from_set"]) == ["sample.cfg_channels", "sample.cfg_scale"]
    assert "sample.cfg_interval=[0.0,1.0]" in r["overrides"]
    base = load_recipe(resolve_recipe_path("imagenet256_sra_sitxl"))
    _, r2 = published.apply("sit", base, ["sample={}"])  # a whole section set: nothing in it overridden
    assert r2["overrides"] and all(not o.startswith("sample.") for o in r2["overrides"])


def test_import_command_applies_published_settings_and_keeps_set(tmp_path):
    """`ddaepp import SiT-XL-2-256x256.pt … --set sample.cfg_scale=4.0` (the released layout, small size): the
    published settings apply, the user's key wins, and the command says what it set."""
    from conftest import cli_inprocess
    from ddaepp_cli.sample import load_model

    src = source_file(tmp_path / "source", CASES["sit"][2], seed=0)
    sets = [a for kv in DIT + ["sample.cfg_scale=4.0"] for a in ("--set", kv)]
    r = cli_inprocess("import", src, "--from", "sit", "--recipe", "imagenet256_sra_sitxl", "--out", tmp_path / "run",
                      *sets)
    assert r.returncode == 0, r.output
    rec = load_model(tmp_path / "run")[0]
    assert (rec.sample.cfg_scale, rec.sample.cfg_channels, rec.sample.cfg_interval) == (4.0, "first3", (0.0, 1.0))
    assert "sampling as published: sample.sampler=sde" in r.stderr and "targets FID 2.06" in r.stderr
    record = json.loads((tmp_path / "run" / "import.json").read_text())["sampling"]
    assert record["kept_from_set"] == ["sample.cfg_scale"] and record["published_fid"] == 2.06


def test_vp_sde_sampler_is_uvit_euler_maruyama():
    """samplers.vp_euler_maruyama on the DDPM formulation = U-ViT's sde.py euler_maruyama (the reference
    above) for an analytic ε-network, bitwise in float32; the DDPM ancestral sampler is not."""
    from ddaepp_cli.diffusion import build_formulation
    from ddaepp_cli.diffusion.samplers import sample

    class Net(torch.nn.Module):  # ε̂(x, t) with a strong time dependence, called as U-ViT's nnet(x, 999·t)
        def forward(self, x, t, **kw):
            return torch.tanh(x) * (1 + 3 * t[:, None, None, None]) + 0.3 * torch.sin(7 * t)[:, None, None, None]

    f = build_formulation("ddpm")
    x_T = per_sample_randn(SEEDS, (2, 4, 4), stream=0)
    denoise = lambda x, t: f.predict(Net(), x, t)  # noqa: E731  net time t/T
    ours = sample(f, denoise, x_T, sampler="sde", steps=1000, seeds=SEEDS, clip=False)
    expected = ref_uvit(Net(), x_T)
    assert torch.equal(ours, expected)
    assert rel(sample(f, denoise, x_T, sampler="ddpm", steps=1000, seeds=SEEDS, clip=False), expected) > 1e-3
    assert f.default_steps["sde"] == 1000 and "sde" in f.samplers
