"""`ddaepp import`: the field's checkpoint files, in their real layouts, → ddaepp runs (importers/).

No test here writes a foreign layout by hand: every file comes from a manifest in tests/manifests/ (built
by manifest_files.py), which records what the official repository's own constructor and save call write —
nesting, wrappers (DDP `module.`, ema-pytorch), optimizer state, argparse Namespaces, metadata, every
tensor's key, shape and dtype — at one small size (real files, random weights) and at the released size
(meta tensors: every tensor mapped or dropped, the published parameter counts). The forward checks load
the manifest-built weights into reference networks written from each family's code (import_refs.py)
and compare ddaepp's prediction with the family's own computation.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import import_refs as R
import manifest_files as M

torch.set_num_threads(1)

DDAE_SET = ["--set", "model.channels=32", "--set", "model.ch_mults=[1,2]", "--set", "model.n_blocks=1",
            "--set", "model.attn_resolutions=[16]"]
UVIT_SET = ["--set", "model.width=64", "--set", "model.depth=2", "--set", "model.heads=2"]
LDIT_SET = ["--set", "model.width=64", "--set", "model.depth=2", "--set", "model.heads=2",
            "--set", "model.num_classes=10", "--set", "data.latent_channels=4", "--set", "data.image_size=4",
            "--set", "data.root=/nonexistent-latents"]
DIT_SET = ["--set", "model.width=64", "--set", "model.depth=2", "--set", "model.heads=2",
           "--set", "model.num_classes=10", "--set", "data.image_size=8", "--set", "data.root=/nonexistent-latents"]
EMA_VERSIONS = ("0.8.3", "0.2.3")  # DDAE's README installs ema-pytorch unpinned: the newest and an older layout


class NotWeights:
    """Any class: its pickle needs arbitrary unpickling, which the import refuses."""


def cli(*args):
    from ddaepp_cli.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, [ln for ln in r.stderr.splitlines() if ln.strip()], r.stdout


def small(name: str, layout: str, size: str = "small", *, variant: str | None = None) -> dict:
    """A manifest's size entry: manifests/<name>.json → [variants/<variant>] → layouts/<layout> → sizes/<size>."""
    m = M.load(name)
    if variant is not None:
        m = m["variants"][variant]
    return m["layouts"][layout]["sizes"][size]


def write_file(tmp: Path, name: str, layout: str, *, variant: str | None = None, seed: int = 0,
               rename: str | None = None) -> Path:
    """The file (the first, for one-file layouts) of a manifest's small size, written into `tmp`."""
    files = M.write(small(name, layout, variant=variant), tmp, seed=seed)
    path = next(iter(files.values()))
    if rename is not None:
        path = path.rename(tmp / rename)
    return path


def strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------------------
# DDAE: {'MODEL', 'EMA', 'opt'} of FutureXiang/ddae train.py (DDP + ema-pytorch)
# ------------------------------------------------------------------------------------------------


def ddae_file(tmp: Path, net: str, ema_version: str = "0.8.3") -> tuple[Path, R.DDAEUNet, R.DDAEUNet]:
    """The manifest-built train.py checkpoint and the reference UNets holding its raw and EMA weights
    (loaded strictly: the reference networks have DDAE's exact key layout)."""
    entry = small("ddae", f"train.py, ema-pytorch {ema_version}", f"small {net}")
    path = M.write(entry, tmp)["model_1999.pth"]
    cfg = entry["network"]
    obj = torch.load(path, weights_only=True)
    nets = []
    for sd, prefix in ((obj["MODEL"], "module.nn_model."), (obj["EMA"], "ema_model.nn_model.")):
        ref = R.DDAEUNet(cfg["n_channels"], tuple(cfg["ch_mults"]), tuple(cfg["is_attn"]), cfg["n_blocks"],
                         biggan=cfg["use_res_for_updown"], augment_dim=cfg.get("augment_dim", 0))
        ref.load_state_dict(strip(sd, prefix), strict=True)
        nets.append(ref.eval())
    return path, nets[0], nets[1]


@pytest.fixture(scope="module")
def ddae_edm(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddae")
    src, raw, ema = ddae_file(root, "edm_biggan_aug")
    run = root / "run"
    code, err, out = cli("import", src, "--from", "ddae", "--recipe", "cifar10_edm_ddpmpp_aug", "--out", run,
                         *DDAE_SET, "--json")
    assert code == 0, err
    return {"src": src, "raw": raw, "ema": ema, "run": run, "result": json.loads(out), "root": root}


def test_ddae_edm_ddpmpp_forward_equals_ddae(ddae_edm):
    from ddaepp_cli.build import build_formulation
    from ddaepp_cli.sample import load_model

    res = ddae_edm["result"]
    assert res["family"] == "ddae" and res["mapping_version"] == 1 and len(res["source"]["sha256"]) == 64
    assert res["dropped"] == {"optimizer state": 1, "EMA: ema_pytorch's copy of the online (raw) weights":
                              len(ddae_edm["raw"].state_dict()),
                              "EMA: ema_pytorch bookkeeping (initted, step)": 2}
    torch.manual_seed(0)
    x, sigma = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 7.0])
    aug = torch.randn(2, 9)
    for weights, ref in (("ema", ddae_edm["ema"]), ("raw", ddae_edm["raw"])):
        recipe, net, _ = load_model(ddae_edm["run"], weights=weights)
        f = build_formulation(recipe)
        with torch.no_grad():
            ours = f.predict(net, x, sigma, aug_label=aug).x0
            theirs = R.ddae_edm_denoise(ref, x, sigma, aug=aug)
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(ddae_edm["ema"](x, sigma, aug), ddae_edm["raw"](x, sigma, aug), atol=1e-3)
    assert (ddae_edm["run"] / "import.json").is_file() and (ddae_edm["run"] / "recipe.yaml").is_file()


@pytest.mark.parametrize("ema_version", EMA_VERSIONS)
def test_ddae_ddpm_conv_unet_forward_equals_ddae(tmp_path, ema_version):
    from ddaepp_cli.build import build_formulation
    from ddaepp_cli.sample import load_model

    src, raw, ema = ddae_file(tmp_path, "ddpm_conv", ema_version)
    code, err, out = cli("import", src, "--from", "ddae", "--recipe", "cifar10_ddpm_ddpm", "--out", tmp_path / "run",
                         *DDAE_SET, "--json")
    assert code == 0, err
    assert json.loads(out)["dropped"]["EMA: ema_pytorch bookkeeping (initted, step)"] == 2  # either version's buffers
    recipe, net, _ = load_model(tmp_path / "run")
    f = build_formulation(recipe)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([11, 700])
    with torch.no_grad():
        eps = f.predict(net, x, t).eps
        ref = ema(x, t / 1000.0)  # ddae model/DDPM.py: nn_model(x, t / n_T)
    torch.testing.assert_close(eps, ref, atol=2e-5, rtol=1e-4)
    # --weights model: the raw weights (MODEL) become what every command reads by default
    code, err, out = cli("import", src, "--from", "ddae", "--recipe", "cifar10_ddpm_ddpm", "--out", tmp_path / "raw",
                         *DDAE_SET, "--weights", "model", "--json")
    assert code == 0, err
    assert json.loads(out)["dropped"]["EMA weights (--weights model imports the raw weights)"] == len(ema.state_dict())
    _, net, _ = load_model(tmp_path / "raw")
    with torch.no_grad():
        torch.testing.assert_close(f.predict(net, x, t).eps, raw(x, t / 1000.0), atol=2e-5, rtol=1e-4)


def test_ddae_tampered_files_exit_2_with_one_line(tmp_path):
    src = ddae_file(tmp_path, "ddpm_conv")[0]
    obj = torch.load(src, weights_only=True)
    cases = {}
    missing = dict(obj, EMA={k: v for k, v in obj["EMA"].items() if k != "ema_model.nn_model.middle.attn.output.weight"})
    torch.save(missing, tmp_path / "missing.pth")
    cases["missing.pth"] = "mid.attn.out.weight"
    shape = dict(obj, EMA=dict(obj["EMA"], **{"ema_model.nn_model.final.bias": torch.zeros(4)}))
    torch.save(shape, tmp_path / "shape.pth")
    cases["shape.pth"] = "final.bias"
    extra = dict(obj, EMA=dict(obj["EMA"], **{"ema_model.nn_model.up.99.res.conv1.weight": torch.zeros(1)}))
    torch.save(extra, tmp_path / "extra.pth")
    cases["extra.pth"] = "up.99"
    torch.save({"MODEL": obj["MODEL"], "EMA": obj["EMA"], "opt": NotWeights()}, tmp_path / "pickle.pth")
    cases["pickle.pth"] = "arbitrary unpickling"
    (tmp_path / "truncated.pth").write_bytes(src.read_bytes()[:1000])
    cases["truncated.pth"] = "weights_only"
    for name, needle in cases.items():
        out = tmp_path / f"run-{name}"
        code, err, _ = cli("import", tmp_path / name, "--from", "ddae", "--recipe", "cifar10_ddpm_ddpm", "--out", out,
                           *DDAE_SET)
        assert code == 2 and len(err) == 1 and needle in err[0], (name, err)
        assert not out.exists()
    # the recipe must describe the checkpoint's network: another width names the first mismatching key
    code, err, _ = cli("import", src, "--from", "ddae", "--recipe", "cifar10_ddpm_ddpm", "--out", tmp_path / "r2")
    assert code == 2 and len(err) == 1 and "the recipe's model section" in err[0]
    # a non-empty --out is never touched
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    code, err, _ = cli("import", src, "--from", "ddae", "--recipe", "cifar10_ddpm_ddpm", "--out", busy, *DDAE_SET)
    assert code == 2 and "not empty" in err[0] and sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    code, err, _ = cli("import", src, "--from", "nope", "--recipe", "cifar10_ddpm_ddpm", "--out", tmp_path / "r3")
    assert code == 2 and "ddae" in err[0] and "lightningdit" in err[0]


def test_sample_probe_fid_on_imported_ddae_run(ddae_edm, tmp_path):
    from test_data import write_cifar10

    from ddaepp_cli.eval import inception

    run = ddae_edm["run"]
    code, err, _ = cli("sample", run, "--seeds", "0-1", "--steps", "2", "--out", tmp_path / "s", "--format", "png")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "s").glob("*.png"))[:2] == ["000000.png", "000001.png"]
    write_cifar10(tmp_path / "cifar")
    code, err, out = cli("probe", run, "--dataset", "cifar10", "--data-root", tmp_path / "cifar", "--layers", "out_1",
                         "--timesteps", "idx:4", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--json")
    assert code == 0, err
    assert "out_1" in out
    weights = tmp_path / "inception.pth"
    torch.save(inception.random_state_dict(0, active=64), weights)
    code, err, out = cli("fid", run, "--ref", tmp_path / "s", "--n", "3", "--steps", "2", "--inception-weights", weights,
                         "--device", "cpu", "--no-cache", "--json")
    assert code == 0, err
    assert json.loads(out)["metrics"]["fid"] >= 0


# ------------------------------------------------------------------------------------------------
# U-ViT
# ------------------------------------------------------------------------------------------------


def test_uvit_import_time_scale_and_forward(tmp_path):
    from ddaepp_cli.build import build_formulation
    from ddaepp_cli.sample import load_model

    # U-ViT's TrainState.save folder; the released cifar10_uvit_small.pth is its nnet_ema.pth
    files = M.write(small("uvit", "TrainState.save"), tmp_path / "500000.ckpt")
    assert sorted(files) == ["lr_scheduler.pth", "nnet.pth", "nnet_ema.pth", "optimizer.pth", "step.pth"]
    src = files["nnet_ema.pth"].rename(tmp_path / "cifar10_uvit_small.pth")
    ref = R.UViT(img=32, p=2, dim=64, depth=2, heads=2)
    ref.load_state_dict(torch.load(src, weights_only=True), strict=True)  # U-ViT's exact key layout
    ref.eval()
    code, err, out = cli("import", src, "--from", "uvit", "--recipe", "cifar10_ddpm_uvit", "--out", tmp_path / "run",
                         *UVIT_SET, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["recipe_overrides"] == ["model.time_scale=999"] and res["dropped"] == {}
    gap = float(res["conventions"][1].rsplit(" ", 1)[1])
    assert 0 < gap < 5e-3  # the discrete table and the VP-SDE agree closely, not exactly
    recipe, net, _ = load_model(tmp_path / "run")
    assert recipe.model.time_scale == 999
    f = build_formulation(recipe)
    x, k = torch.randn(2, 3, 32, 32), torch.tensor([11, 500])
    with torch.no_grad():
        eps = f.predict(net, x, k).eps
        theirs = ref(x, (k / 1000.0) * 999)  # U-ViT sde.py: nnet(x, t * 999), t = k / T
    torch.testing.assert_close(eps, theirs, atol=2e-5, rtol=1e-4)
    # without the conversion (time_scale 1000) the prediction differs: the check can fail
    net.time_scale = 1000.0
    with torch.no_grad():
        assert not torch.allclose(f.predict(net, x, k).eps, theirs, atol=1e-3)
    # the raw network of the same folder (nnet.pth) imports with --weights model
    code, err, _ = cli("import", files["nnet.pth"], "--from", "uvit", "--recipe", "cifar10_ddpm_uvit", "--weights",
                       "model", "--out", tmp_path / "raw", *UVIT_SET)
    assert code == 0, err
    _, raw_net, _ = load_model(tmp_path / "raw")
    raw = torch.load(files["nnet.pth"], weights_only=True)
    assert torch.equal(raw_net.state_dict()["norm.weight"], raw["norm.weight"])


# ------------------------------------------------------------------------------------------------
# LightningDiT
# ------------------------------------------------------------------------------------------------


def test_lightningdit_import_maps_every_key_and_checks_rope(tmp_path):
    from ddaepp_cli.sample import load_model

    src = write_file(tmp_path, "lightningdit", "train.py")  # {'model', 'ema', 'opt', 'config'}
    obj = torch.load(src, weights_only=True)
    ema, raw = obj["ema"], obj["model"]
    code, err, out = cli("import", src, "--from", "lightningdit", "--recipe", "imagenet256_rf_ditb_cond",
                         "--out", tmp_path / "run", *LDIT_SET, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["recipe_overrides"] == ["diffusion.net_convention=sit"]
    assert res["dropped"] == {"optimizer state": 1, "training metadata": 1,
                              "ema: RoPE tables (computed by ddaepp; checked equal)": 2,
                              "raw: RoPE tables (computed by ddaepp; checked equal)": 2}
    for weights, sd in (("ema", ema), ("raw", raw)):
        _, net, _ = load_model(tmp_path / "run", weights=weights)
        own = net.state_dict()
        assert torch.equal(own["x_embedder.weight"], sd["x_embedder.proj.weight"])
        assert torch.equal(own["y_embedder.weight"], sd["y_embedder.embedding_table.weight"])
        assert torch.equal(own["blocks.1.mlp.w3.weight"], sd["blocks.1.mlp.w3.weight"])
        assert len(own) == len(sd) - 2
    # the imported network computes what LightningDiT's forward computes on the same weights (with the RoPE
    # tables LightningDiT's own code stored), and the formulation hands it LightningDiT's time 1 − t and
    # reads its output as −v
    from ddaepp_cli.build import build_formulation

    recipe, net, _ = load_model(tmp_path / "run")
    f = build_formulation(recipe)
    x, t, y = torch.randn(3, 4, 4, 4), torch.tensor([0.05, 0.5, 0.9]), torch.tensor([1, 7, 3])
    with torch.no_grad():
        v_ldit = R.lightningdit_forward(ema, x, 1 - t, y, heads=2)
        torch.testing.assert_close(net(x, 1 - t, class_labels=y), v_ldit, atol=1e-5, rtol=1e-4)
        pred = f.predict(net, x, t, class_labels=y)
    torch.testing.assert_close(pred.x0, x + t.reshape(-1, 1, 1, 1) * v_ldit, atol=1e-5, rtol=1e-4)
    # RoPE tables of another geometry (here: another head width) are refused, naming the key
    bad = dict(ema, **{"feat_rope.freqs_cos": R.eva_rope_tables(16, 4)[0].repeat(1, 2)})
    torch.save(bad, tmp_path / "bad.pt")
    code, err, _ = cli("import", tmp_path / "bad.pt", "--from", "lightningdit", "--recipe", "imagenet256_rf_ditb_cond",
                       "--out", tmp_path / "run2", *LDIT_SET)
    assert code == 2 and len(err) == 1 and "feat_rope.freqs_cos" in err[0]


class GaussianOracleLDiT(torch.nn.Module):
    """LightningDiT's exact velocity for Gaussian data N(0, s²): x = τ·x1 + (1 − τ)·n (τ = 1 is data),
    E[x1 − n | x] = (τ·s² − (1 − τ)) / (τ²·s² + (1 − τ)²) · x — in LightningDiT's own convention."""

    def __init__(self, s: float):
        super().__init__()
        self.s2 = s * s

    def forward(self, x, tau, class_labels=None, aug_label=None):
        tau = tau.double().reshape(-1, 1, 1, 1)
        return ((tau * self.s2 - (1 - tau)) / (tau**2 * self.s2 + (1 - tau) ** 2) * x.double()).float()


def test_lightningdit_convention_gaussian_oracle():
    from ddaepp_cli.diffusion import RF

    s = 0.5
    oracle = GaussianOracleLDiT(s)
    x, t = torch.randn(3, 4, 4, 4), torch.tensor([0.1, 0.5, 0.9])
    # ddaepp paper convention, closed form: x_t = (1 − t)·x0 + t·ε → E[x0 | x_t] = (1 − t)s²/var · x_t
    var = ((1 - t) ** 2 * s * s + t**2).reshape(-1, 1, 1, 1)
    x0_true = ((1 - t).reshape(-1, 1, 1, 1) * s * s / var) * x
    eps_true = (t.reshape(-1, 1, 1, 1) / var) * x
    pred = RF(t_max=1.0, net_convention="sit").predict(oracle, x, t)
    torch.testing.assert_close(pred.x0, x0_true, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred.eps, eps_true, atol=1e-5, rtol=1e-5)
    wrong = RF(t_max=1.0).predict(oracle, x, t)  # negative control: no conversion
    assert not torch.allclose(wrong.x0, x0_true, atol=1e-2)
    # a full Euler run from noise reaches the data distribution's variance only with the conversion
    from ddaepp_cli.diffusion import sample

    f = RF(t_max=1.0, net_convention="sit")
    z = torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    out = sample(f, f.denoiser(oracle), z, sampler="euler", steps=50)
    assert abs(out.float().std().item() - s) < 0.03
    # training target: the oracle's loss is the Bayes error, lower than with the convention flipped
    x0 = torch.randn(4000, 1, 1, 1) * s
    t = torch.rand(4000)
    noise = torch.randn_like(x0)
    good = f.loss(oracle, x0, t=t, noise=noise).loss.mean()
    bad = RF(t_max=1.0).loss(oracle, x0, t=t, noise=noise).loss.mean()
    assert good < 0.5 * bad


# ------------------------------------------------------------------------------------------------
# DiT / SiT / REPA / SRA → dit_orig
# ------------------------------------------------------------------------------------------------


# where each family's files come from: (manifest, variant) of its code base
DIT_FAMILY = {"dit": ("dit", None), "sit": ("sit", None), "repa": ("repa", None), "sra": ("sra", "sra-sit"),
              "sra-dit": ("sra", "sra-dit")}
HEADS = {"repa": ("projectors.", "REPA alignment projectors (projectors.*)"),
         "sra": ("ap_head.", "SRA self-alignment head (ap_head.*)"),
         "sra-dit": ("ap_head.", "SRA self-alignment head (ap_head.*)")}


def dit_family_file(tmp: Path, key: str, layout: str, **kw) -> tuple[Path, dict]:
    """A DiT / SiT / REPA / SRA file from its manifest and the object it holds."""
    name, variant = DIT_FAMILY[key]
    path = write_file(tmp, name, layout, variant=variant, **kw)
    with torch.serialization.safe_globals([argparse.Namespace]):  # REPA's and SRA's args
        return path, torch.load(path, weights_only=True)


def test_dit_import_maps_every_key_and_forward_equals_dit(tmp_path):
    from ddaepp_cli.build import build_formulation
    from ddaepp_cli.sample import load_model

    src, sd = dit_family_file(tmp_path, "dit", "released", rename="DiT-XL-2-256x256.pt")  # the EMA state dict alone
    assert sd["final_layer.linear.weight"].shape[0] == 2 * 4 * 4  # DiT's default learn_sigma=True
    code, err, out = cli("import", src, "--from", "dit", "--recipe", "imagenet256_sra_ditxl", "--out", tmp_path / "run",
                         *DIT_SET, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["recipe_overrides"] == ["sra.enabled=false"] and res["dropped"] == {}
    assert res["mapped_tensors"] == len(sd) and "integer step 0..999" in res["conventions"][0]
    recipe, net, _ = load_model(tmp_path / "run")
    own = net.state_dict()
    assert torch.equal(own["t_embedder.2.weight"], sd["t_embedder.mlp.2.weight"])
    assert torch.equal(own["y_embedder.weight"], sd["y_embedder.embedding_table.weight"])  # 11 rows: null class last
    f = build_formulation(recipe)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 400, 1000]), torch.tensor([1, 7, 10])
    with torch.no_grad():
        theirs = R.dit_forward(sd, x, t - 1, y, heads=2)  # DiT: the integer step 0..999
        pred = f.predict(net, x, t, class_labels=y)
        torch.testing.assert_close(pred.eps, theirs[:, :4], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(pred.var_frac, (theirs[:, 4:] + 1) / 2, atol=1e-5, rtol=1e-4)  # improved DDPM v
        # negative control: the fraction t/T that DDAE's UNets embed gives another ε
        assert not torch.allclose(net(x, t / 1000.0, class_labels=y)[:, :4], theirs[:, :4], atol=1e-3)
        # class_labels=None is DiT's null class (row num_classes)
        torch.testing.assert_close(net(x, t - 1.0), R.dit_forward(sd, x, t - 1, torch.full((3,), 10), heads=2),
                                   atol=1e-5, rtol=1e-4)


class GaussianOracleREPA(torch.nn.Module):
    """REPA/SRA's exact velocity for Gaussian data N(0, s²): x_t = (1 − t)·x + t·ε (t = 0 is data),
    E[ε − x | x_t] = (t − (1 − t)·s²) / ((1 − t)²·s² + t²) · x_t."""

    def __init__(self, s: float):
        super().__init__()
        self.s2 = s * s

    def forward(self, x, t, class_labels=None, aug_label=None):
        t = t.double().reshape(-1, 1, 1, 1)
        return ((t - (1 - t) * self.s2) / ((1 - t) ** 2 * self.s2 + t**2) * x.double()).float()


@pytest.mark.parametrize("family", ["sit", "repa", "sra"])
def test_sit_repa_sra_time_and_velocity_conventions(tmp_path, family):
    """SiT runs t = 1 at data and predicts data − noise; REPA and SRA-SiT run ddaepp's direction. Each import
    records its convention, and the formulation it builds recovers the exact posterior mean from the oracle
    written in the family's own convention (and not from the other family's). SiT's file is the released
    layout (the EMA state dict alone, learned Σ); REPA's and SRA's are their train.py checkpoints."""
    from ddaepp_cli.build import build_formulation
    from ddaepp_cli.sample import load_model

    layout = "released" if family == "sit" else "train.py"
    src, obj = dit_family_file(tmp_path, family, layout)
    sd = obj if family == "sit" else obj["ema"]
    code, err, out = cli("import", src, "--from", family, "--recipe", "imagenet256_sra_sitxl",
                         "--out", tmp_path / "run", *DIT_SET, "--json")
    assert code == 0, err
    res = json.loads(out)
    sit_time = ["diffusion.net_convention=sit"] if family == "sit" else []
    assert res["recipe_overrides"] == ["sra.enabled=false"] + sit_time
    recipe, net, _ = load_model(tmp_path / "run")
    f = build_formulation(recipe)
    s, x, t = 0.5, torch.randn(3, 4, 8, 8), torch.tensor([0.1, 0.5, 0.9])
    var = ((1 - t) ** 2 * s * s + t**2).reshape(-1, 1, 1, 1)
    x0_true = ((1 - t).reshape(-1, 1, 1, 1) * s * s / var) * x
    own, other = (GaussianOracleLDiT(s), GaussianOracleREPA(s)) if family == "sit" else \
        (GaussianOracleREPA(s), GaussianOracleLDiT(s))
    torch.testing.assert_close(f.predict(own, x, t).x0, x0_true, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(f.predict(other, x, t).x0, x0_true, atol=1e-2)
    # the imported network is the family's forward at the time the family feeds it (SiT: the first C of its
    # 2C output channels, which SiT's forward keeps)
    y = torch.tensor([0, 3, 9])
    with torch.no_grad():
        theirs = R.dit_forward({k: v for k, v in sd.items() if not k.startswith(("projectors.", "ap_head."))},
                               x, 1 - t if family == "sit" else t, y, heads=2)[:, :4]
        torch.testing.assert_close(net(x, f.net_time(t), class_labels=y), theirs, atol=1e-5, rtol=1e-4)
    if family != "sit":
        prefix, reason = HEADS[family]
        heads = [k for k in sd if k.startswith(prefix)]
        metadata = [k for k in obj if k not in ("model", "ema", "opt")]  # args, steps (REPA); args, epoch, steps (SRA)
        assert res["dropped"] == {reason: 2 * len(heads), "optimizer state": 1, "training metadata": len(metadata)}
        assert res["step"] == obj["steps"] and len(metadata) == (2 if family == "repa" else 3)
        assert json.loads((tmp_path / "run" / "import.json").read_text())["dropped"][reason] == \
            [f"ema/{k}" for k in heads] + [f"model/{k}" for k in heads]
        _, raw_net, _ = load_model(tmp_path / "run", weights="raw")
        key = "blocks.1.mlp.fc2.weight"
        assert torch.equal(raw_net.state_dict()[key], obj["model"][key])
        assert "nothing converted" in res["conventions"][0]
    else:
        assert res["conventions"][0].startswith("time direction: SiT")


def test_sit_learned_sigma_layout_imports_under_rf(tmp_path):
    """willisma/SiT builds every network with learn_sigma=True (models.py default; train.py and the released
    SiT-XL-2-256x256.pt keep it) and its forward drops the variance channels after unpatchify. The import
    drops the matching rows of the final layer — interleaved per pixel, not the second half — and lists them."""
    from ddaepp_cli.sample import load_model

    src, obj = dit_family_file(tmp_path, "sit", "train.py")  # {'model', 'ema', 'opt', 'args'}, both networks 2C
    c, p = 4, 2
    rows = 2 * c * p * p
    assert obj["ema"]["final_layer.linear.weight"].shape[0] == obj["model"]["final_layer.linear.bias"].shape[0] == rows
    code, err, out = cli("import", src, "--from", "sit", "--recipe", "imagenet256_sra_sitxl", "--out", tmp_path / "run",
                         *DIT_SET, "--json")
    assert code == 0, err
    record = json.loads((tmp_path / "run" / "import.json").read_text())
    why = [r for r in record["dropped"] if r.startswith("SiT learned-Σ")]
    assert len(why) == 1 and "r mod 8 ≥ 4 (16 of 32)" in why[0]
    assert record["dropped"][why[0]] == ["ema/final_layer.linear.weight", "ema/final_layer.linear.bias",
                                         "model/final_layer.linear.weight", "model/final_layer.linear.bias"]
    assert record["dropped"]["optimizer state"] == ["opt"] and record["dropped"]["training metadata"] == ["args"]
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8]), torch.tensor([2, 10])
    for weights, sd in (("ema", obj["ema"]), ("raw", obj["model"])):
        _, net, _ = load_model(tmp_path / "run", weights=weights)
        with torch.no_grad():
            full = R.dit_forward(sd, x, t, y, heads=2)  # 2C channels as SiT computes them before its chunk
            torch.testing.assert_close(net(x, t, class_labels=y), full[:, :c], atol=1e-5, rtol=1e-4)
    # the rows are interleaved: keeping the first half of the rows instead would give another network
    half = dict(obj["ema"])
    half["final_layer.linear.weight"] = half["final_layer.linear.weight"][: c * p * p]
    half["final_layer.linear.bias"] = half["final_layer.linear.bias"][: c * p * p]
    with torch.no_grad():
        assert not torch.allclose(R.dit_forward(half, x, t, y, heads=2), full[:, :c], atol=1e-3)
    # the parameters SiT's forward uses are all there: the run's count is the C-output network's
    assert record["parameters"] == sum(v.numel() for k, v in obj["ema"].items()) - (c * p * p) * (64 + 1)


def test_sra_dit_checkpoint_imports_under_ddpm_with_learned_sigma(tmp_path):
    from ddaepp_cli.build import build_formulation
    from ddaepp_cli.sample import load_model

    src, obj = dit_family_file(tmp_path, "sra-dit", "train.py")  # DiT-SRA train.py: learn_sigma=True (default)
    sd = obj["ema"]
    code, err, out = cli("import", src, "--from", "sra", "--recipe", "imagenet256_sra_ditxl", "--out", tmp_path / "run",
                         *DIT_SET, "--json")
    assert code == 0, err
    heads = [k for k in sd if k.startswith("ap_head.")]
    assert json.loads(out)["dropped"]["SRA self-alignment head (ap_head.*)"] == 2 * len(heads) == 8
    recipe, net, _ = load_model(tmp_path / "run")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 999]), torch.tensor([2, 5])
    core = {k: v for k, v in sd.items() if not k.startswith("ap_head.")}
    with torch.no_grad():
        eps = build_formulation(recipe).predict(net, x, t, class_labels=y).eps
        torch.testing.assert_close(eps, R.dit_forward(core, x, t - 1, y, heads=2)[:, :4], atol=1e-5, rtol=1e-4)
    # the same file under the SiT recipe (no learned Σ) names the setting to change: SRA's DiT keeps its
    # variance (it trains and samples with it), unlike SiT's
    code, err, _ = cli("import", src, "--from", "sra", "--recipe", "imagenet256_sra_sitxl", "--out", tmp_path / "r2",
                       *DIT_SET)
    assert code == 2 and len(err) == 1 and "model.learn_sigma: true" in err[0]
    # the reverse: SiT-SRA's file (C outputs: SRA's SiT has no learned Σ) under the DiT recipe
    sit_src, _ = dit_family_file(tmp_path / "sit", "sra", "train.py")
    code, err, _ = cli("import", sit_src, "--from", "sra", "--recipe", "imagenet256_sra_ditxl",
                       "--out", tmp_path / "r4", *DIT_SET)
    assert code == 2 and len(err) == 1 and "model.learn_sigma: false" in err[0]
    # and a DiT file under an RF recipe is refused by formulation
    code, err, _ = cli("import", src, "--from", "dit", "--recipe", "imagenet256_sra_sitxl", "--out", tmp_path / "r3",
                       *DIT_SET)
    assert code == 2 and len(err) == 1 and "diffusion.formulation" in err[0]


@pytest.mark.parametrize("family", ["dit", "sit", "repa", "sra"])
def test_dit_family_tampered_files_exit_2_with_one_line(tmp_path, family):
    learn = family == "dit"
    recipe = "imagenet256_sra_ditxl" if learn else "imagenet256_sra_sitxl"
    layout = "released" if family in ("dit", "sit") else "train.py"
    _, obj = dit_family_file(tmp_path / "src", family, layout)
    sd = obj if layout == "released" else obj["ema"]
    width = sd["x_embedder.proj.bias"].shape[0]
    cases = {"missing.pt": ({k: v for k, v in sd.items() if k != "blocks.1.attn.proj.bias"}, "blocks.1.attn.proj.bias"),
             "shape.pt": (dict(sd, **{"blocks.0.mlp.fc1.weight": torch.zeros(100, width)}), "blocks.0.mlp.fc1.weight"),
             "extra.pt": (dict(sd, **{"blocks.2.attn.qkv.weight": torch.zeros(3 * width, width)}),
                          "blocks.2.attn.qkv.weight"),
             "pos.pt": (dict(sd, pos_embed=sd["pos_embed"].flip(1)), "pos_embed"),
             "labels.pt": (dict(sd, **{"y_embedder.embedding_table.weight": torch.zeros(10, width)}),
                           "y_embedder.embedding_table.weight")}
    for name, (tampered, needle) in cases.items():
        torch.save(tampered if layout == "released" else dict(obj, ema=tampered, model=tampered), tmp_path / name)
    pickled = dict(obj if layout == "train.py" else {"model": sd, "ema": sd}, opt=NotWeights())
    torch.save(pickled, tmp_path / "pickle.pt")
    cases["pickle.pt"] = (None, "arbitrary unpickling")
    for name, (_, needle) in cases.items():
        out = tmp_path / f"run-{name}"
        code, err, _ = cli("import", tmp_path / name, "--from", family, "--recipe", recipe, "--out", out, *DIT_SET)
        assert code == 2 and len(err) == 1 and needle in err[0], (name, err)
        assert not out.exists()


def ldm_vae(tmp: Path, variant: str = "klf8") -> Path:
    """A small KL autoencoder in the LDM layout, as its Lightning training code checkpoints it."""
    return next(iter(M.write(M.load("vae_ldm")["variants"][variant]["sizes"]["small"], tmp).values()))


@pytest.mark.parametrize("family", ["dit", "sit"])
def test_sample_on_imported_dit_sit_run_decodes_with_its_vae(tmp_path, family):
    vae = ldm_vae(tmp_path / "vae")  # 4 latent channels as SD-VAE, one downsampling level
    src, _ = dit_family_file(tmp_path, family, "released", rename=f"{family}-B-2.pt")
    recipe = "imagenet256_sra_ditxl" if family == "dit" else "imagenet256_sra_sitxl"
    args = ["import", src, "--from", family, "--recipe", recipe, "--out", tmp_path / "run", *DIT_SET,
            "--set", "sample.cfg_channels=first3" if family == "dit" else "sample.cfg_channels=all"]
    code, err, _ = cli(*args, "--vae", vae, "--latent-stats", vae)
    assert code == 2 and len(err) == 1 and "give --vae alone" in err[0]
    code, err, out = cli(*args, "--vae", vae, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["latents"]["latent_scale"] == 0.18215 and res["latents"]["vae"]["sha256"]
    code, err, _ = cli("sample", tmp_path / "run", "--seeds", "0-1", "--steps", "3", "--cfg-scale", "1.5",
                       "--out", tmp_path / "s", "--format", "png", "--json")
    assert code == 0, err
    protocol = json.loads((tmp_path / "s" / "protocol.json").read_text())
    assert protocol["sampler"] == ("ddpm" if family == "dit" else "sde") and protocol["cfg_scale"] == 1.5
    assert protocol["cfg_channels"] == ("first3" if family == "dit" else "all")  # DiT forward_with_cfg: eps[:, :3]
    from PIL import Image

    assert Image.open(tmp_path / "s" / "000001.png").size == (16, 16)  # 8×8 latents through an f2 decoder


# ------------------------------------------------------------------------------------------------
# VAEs: diffusers' folder and the LDM layout; a latent import that samples through its own statistics and VAE
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory):
    """AutoencoderKL.save_pretrained's folder (config.json + diffusion_pytorch_model.safetensors)."""
    root = tmp_path_factory.mktemp("vae")
    files = M.write(M.load("vae_diffusers")["sizes"]["small"], root / "hf")
    assert sorted(files) == ["config.json", "diffusion_pytorch_model.safetensors"]
    return root / "hf"


def test_diffusers_layout_vae_loads_as_diffusers_loads_it(diffusers_vae, tmp_path):
    import shutil

    from diffusers import AutoencoderKL

    from ddaepp_cli.data.vae import load_vae

    theirs = AutoencoderKL.from_pretrained(diffusers_vae).eval()  # diffusers' own loader
    alone = tmp_path / "vae.safetensors"  # the weights file without its config.json: architecture from shapes
    shutil.copy(diffusers_vae / "diffusion_pytorch_model.safetensors", alone)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = theirs.decode(z).sample
    for path in (diffusers_vae, diffusers_vae / "diffusion_pytorch_model.safetensors", alone):
        vae = load_vae(path)
        assert vae.config["latent_channels"] == 4 and vae.config["block_out_channels"] == [32, 64]
        torch.testing.assert_close(vae.decode(z), want)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(alone))
    del sd["decoder.up_blocks.0.resnets.0.conv1.bias"]
    save_file(sd, str(tmp_path / "missing.safetensors"))
    with pytest.raises(Exception, match="missing.safetensors does not match the autoencoder: keys 1 missing"):
        load_vae(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("variant", ["vavae", "klf8"])
def test_ldm_layout_lightning_checkpoint_loads(tmp_path, variant):
    """The Lightning checkpoint of LightningDiT's VA-VAE / CompVis latent-diffusion's AutoencoderKL training
    code ({'state_dict', 'epoch', 'global_step', 'pytorch-lightning_version', 'loops', …}): every autoencoder
    tensor lands in diffusers' AutoencoderKL, the in-level attention (level 1 here) included."""
    from ddaepp_cli.data.vae import load_vae

    path = ldm_vae(tmp_path, variant)
    sd = torch.load(path, weights_only=True)["state_dict"]
    vae = load_vae(path)
    assert vae.config["latent_channels"] == 4 and vae.config["block_out_channels"] == [32, 64]
    assert vae.config["down_block_types"] == ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    own = vae.model.state_dict()
    assert torch.equal(own["decoder.conv_in.weight"], sd["decoder.conv_in.weight"])
    assert torch.equal(own["encoder.down_blocks.1.attentions.0.to_q.weight"],
                       sd["encoder.down.1.attn.0.q.weight"][:, :, 0, 0])
    assert torch.equal(own["decoder.up_blocks.0.attentions.1.to_out.0.weight"],
                       sd["decoder.up.1.attn.1.proj_out.weight"][:, :, 0, 0])
    assert sum(v.numel() for v in own.values()) == sum(v.numel() for v in sd.values())
    assert torch.isfinite(vae.decode(torch.randn(1, 4, 4, 4))).all()


def test_lightningdit_latent_import_samples_with_its_stats_and_vae(diffusers_vae, tmp_path):
    src = write_file(tmp_path, "lightningdit", "released", rename="lightningdit-b1.pt")  # the EMA state dict alone
    stats = write_file(tmp_path, "lightningdit", "latents_stats")  # ImgLatentDataset's latents_stats.pt
    run = tmp_path / "run"
    args = ["import", src, "--from", "lightningdit", "--recipe", "imagenet256_rf_ditb_cond", "--out", run, *LDIT_SET]
    code, err, _ = cli(*args, "--vae", diffusers_vae)
    assert code == 2 and "--latent-stats and --vae go together" in err[0]
    code, err, out = cli(*args, "--vae", diffusers_vae, "--latent-stats", stats, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["latents"]["stats_file"] == "latents_stats.pt" and res["latents"]["vae"]["kind"] == "custom"
    manifest = json.loads((run / "latents" / "manifest.json").read_text())
    assert manifest["latent_shape"] == [4, 4, 4]
    official = torch.load(stats, weights_only=True)
    assert manifest["stats_values"]["std"] == pytest.approx(official["std"].flatten().tolist())
    code, err, _ = cli("sample", run, "--seeds", "0-1", "--steps", "2", "--class-label", "3", "--out", tmp_path / "s",
                       "--format", "png")
    assert code == 0, err
    from PIL import Image

    assert Image.open(tmp_path / "s" / "000001.png").size == (8, 8)  # 4×4 latents through an f2 decoder


# ------------------------------------------------------------------------------------------------
# The real layouts at their released sizes (meta tensors: names and shapes, no memory)
# ------------------------------------------------------------------------------------------------


def derived_tables(path: str, shape: tuple, dtype) -> torch.Tensor | None:
    """Real values for the tables the importers check (frozen sin-cos positions, EVA RoPE), from the
    reference implementations in import_refs.py; every other tensor stays on the meta device."""
    square = len(shape) == 3 and math.isqrt(shape[1]) ** 2 == shape[1]  # U-ViT's positions (time token) are learned
    if path.endswith("pos_embed") and square:
        return R.mae_sincos_pos_embed(shape[2], math.isqrt(shape[1]))
    if path.endswith(("feat_rope.freqs_cos", "feat_rope.freqs_sin")):
        cos, sin = R.eva_rope_tables(shape[1], math.isqrt(shape[0]))
        return cos if path.endswith("cos") else sin
    return None


DDAE_LAYOUT = "train.py, ema-pytorch 0.8.3"
# (manifest, variant, layout, size, --from, recipe, the ddaepp network's parameters, the file's network)
RELEASED = [
    ("ddae", None, DDAE_LAYOUT, "released DDPM_ddpm", "ddae", "cifar10_ddpm_ddpm", 35_746_307, None),
    ("ddae", None, DDAE_LAYOUT, "released EDM_ddpmpp", "ddae", "cifar10_edm_ddpmpp", 56_524_291, None),
    ("uvit", None, "released", "released", "uvit", "cifar10_ddpm_uvit", 44_255_328, None),
    ("uvit", None, "TrainState.save", "released", "uvit", "cifar10_ddpm_uvit", 44_255_328, None),
    ("lightningdit", None, "train.py", "released", "lightningdit", "imagenet256_rf_ditxl_cond", 675_256_736, None),
    ("lightningdit", None, "released", "released", "lightningdit", "imagenet256_rf_ditxl_cond", 675_256_736, None),
    ("dit", None, "released", "released", "dit", "imagenet256_sra_ditxl", 675_129_632, 675_129_632),
    ("dit", None, "train.py", "released", "dit", "imagenet256_sra_ditxl", 675_129_632, 675_129_632),
    # SiT-XL/2: the file holds learned Σ (675,129,632); SiT's forward uses 675,111,184 of them
    ("sit", None, "released", "released", "sit", "imagenet256_sra_sitxl", 675_111_184, 675_129_632),
    ("sit", None, "train.py", "released", "sit", "imagenet256_sra_sitxl", 675_111_184, 675_129_632),
    ("repa", None, "released", "released", "repa", "imagenet256_sra_sitxl", 675_111_184, 683_242_512),
    ("repa", None, "train.py", "released", "repa", "imagenet256_sra_sitxl", 675_111_184, 683_242_512),
    ("sra", "sra-sit", "released", "released", "sra", "imagenet256_sra_sitxl", 675_111_184, 680_423_056),
    ("sra", "sra-sit", "train.py", "released", "sra", "imagenet256_sra_sitxl", 675_111_184, 680_423_056),
    ("sra", "sra-dit", "released", "released", "sra", "imagenet256_sra_ditxl", 675_129_632, 680_441_504),
    ("sra", "sra-dit", "train.py", "released", "sra", "imagenet256_sra_ditxl", 675_129_632, 680_441_504),
]


# the train.py layouts of the transformer families wrap the same network as their released files (their
# wrappers are covered at the small size): slow tier
@pytest.mark.parametrize("name,variant,layout,size,family,recipe,params,file_params", [
    pytest.param(*r, id=f"{r[1] or r[0]}-{r[2]}-{r[3]}",
                 marks=[pytest.mark.slow] if r[2] == "train.py" else []) for r in RELEASED])
def test_released_layouts_map_completely(tmp_path, name, variant, layout, size, family, recipe, params, file_params):
    """The released-size file, written with meta tensors as the official code lays it out, read by the
    importer (weights-only loader), every tensor mapped onto the recipe's network or dropped with a reason."""
    from ddaepp_cli.build import build_backbone
    from ddaepp_cli.cli import resolve_recipe_path
    from ddaepp_cli.importers import FAMILIES
    from ddaepp_cli.importers.common import check_against, read_source
    from ddaepp_cli.recipe import load_recipe, replace

    m = M.load(name)
    m = m["variants"][variant] if variant else m
    entry = m["layouts"][layout]["sizes"][size]
    if file_params is not None:
        assert entry["parameters"] == file_params  # the official constructor's count, recorded
    files = M.write(entry, tmp_path, device="meta", fill=derived_tables,
                    only=None if layout != "TrainState.save" else ("nnet_ema.pth",))
    path = next(iter(files.values()))
    fam = FAMILIES[family]
    rec = load_recipe(resolve_recipe_path(recipe), ["data.root=/nonexistent"])
    rec = replace(rec, fam.overrides(rec))
    model = build_backbone(rec, device="meta")
    source = fam.extract(read_source(path), path, "ema")
    n_dropped = sum(len(v) for v in source.dropped.values())
    for sd in (source.ema, source.raw):
        if sd is None:
            continue
        mapped = fam.convert(sd, model, path)
        state = check_against(model, mapped, path, "EMA weights")
        assert sum(v.numel() for k, v in state.items() if k in dict(model.named_parameters())) == params
        assert len(mapped.tensors) + sum(len(v) for v in mapped.dropped.values()) == len(sd)
    assert n_dropped >= (1 if isinstance(read_source(path), dict) and "opt" in read_source(path) else 0)


@pytest.mark.parametrize("variant,kind", [("vavae", "vavae"), ("klf8", "sdvae")])
def test_released_ldm_vae_layouts_map_completely(tmp_path, variant, kind):
    """VA-VAE's and kl-f8's Lightning training checkpoints at their released sizes (meta tensors, with the
    training modules' loss.* / foundation_model.* / linear_proj.* keys): read, recognised, every autoencoder
    tensor converted onto diffusers' AutoencoderKL with its shape."""
    from ddaepp_cli.data.vae import (KINDS, build_autoencoder, convert_ldm_to_diffusers, infer_config, kind_of,
                                     read_ldm_state_dict)

    entry = M.load("vae_ldm")["variants"][variant]["sizes"]["released"]
    path = next(iter(M.write(entry, tmp_path, device="meta").values()))
    sd = read_ldm_state_dict(path)
    config = infer_config(sd, path)
    assert kind_of(config) == kind
    model = build_autoencoder(config, device="meta")
    converted = convert_ldm_to_diffusers(sd, config)
    own = model.state_dict()
    assert sorted(converted) == sorted(own)
    assert all(tuple(converted[k].shape) == tuple(v.shape) for k, v in own.items())
    assert sum(v.numel() for v in own.values()) == KINDS[kind].params == entry["autoencoder_parameters"]


def test_released_diffusers_vae_layout_maps_completely(tmp_path):
    from ddaepp_cli.data.vae import KINDS, build_autoencoder, kind_of
    from ddaepp_cli.data.vae_diffusers import diffusers_config

    entry = M.load("vae_diffusers")["sizes"]["released"]
    files = M.write(entry, tmp_path, device="meta", only=("config.json",))
    config = diffusers_config({}, files["config.json"].parent / "diffusion_pytorch_model.safetensors")
    assert kind_of(config) == "sdvae"
    own = build_autoencoder(config, device="meta").state_dict()
    listed = M.tensors(entry["files"]["diffusion_pytorch_model.safetensors"]["content"])
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: s for k, (s, _) in listed.items()}
    assert sum(v.numel() for v in own.values()) == KINDS["sdvae"].params == entry["parameters"]


def test_every_manifest_names_its_source():
    """Each manifest says which repository, commit and call produced it, and has a released and a small size."""
    for path in sorted(M.MANIFESTS.glob("*.json")):
        m = json.loads(path.read_text(encoding="utf-8"))
        parts = list(m["variants"].values()) if "variants" in m else [m]
        for part in parts:
            assert part["repository"] and ("commit" in part or "version" in part), path.name
            assert "call" in part or all("call" in lay for lay in part["layouts"].values()), path.name
            sizes = [s for lay in part.get("layouts", {"": part}).values() for s in lay["sizes"]]
            assert any(s.startswith("released") for s in sizes) and any(s.startswith("small") for s in sizes), path.name
    assert {p.stem for p in M.MANIFESTS.glob("*.json")} >= {"ddae", "uvit", "lightningdit", "dit", "sit", "repa", "sra",
                                                            "vae_ldm", "vae_diffusers"}


def test_rf_net_convention_is_a_recipe_option():
    from ddaepp_cli.build import build_formulation
    from ddaepp_cli.cli import resolve_recipe_path
    from ddaepp_cli.errors import UsageError
    from ddaepp_cli.recipe import load_recipe

    path = resolve_recipe_path("imagenet256_rf_ditb_cond")
    assert build_formulation(load_recipe(path)).net_convention == "ddaepp"
    f = build_formulation(load_recipe(path, ["diffusion.net_convention=sit"]))
    t = torch.tensor([0.0, 0.25, 1.0])
    assert f.net_convention == "sit" and torch.equal(f.net_time(t), 1 - t)
    with pytest.raises(UsageError, match="net_convention"):
        load_recipe(path, ["diffusion.net_convention=lightning"])
