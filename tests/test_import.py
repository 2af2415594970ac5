"""`ddaepp import`: foreign checkpoints in their exact on-disk layout → ddaepp runs (importers/).

Every test writes the family's file the way its train.py writes it (nesting, prefixes, optimizer
state, metadata) from a reference network built to the family's code (import_refs.py), imports it
through the CLI and compares ddaepp's prediction with the family's own computation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import import_refs as R

torch.set_num_threads(1)

DDAE_SET = ["--set", "model.channels=32", "--set", "model.ch_mults=[1,2]", "--set", "model.n_blocks=1",
            "--set", "model.attn_resolutions=[16]"]
UVIT_SET = ["--set", "model.width=64", "--set", "model.depth=2", "--set", "model.heads=2"]
LDIT_SET = ["--set", "model.width=64", "--set", "model.depth=2", "--set", "model.heads=2",
            "--set", "model.num_classes=10", "--set", "data.latent_channels=4", "--set", "data.image_size=4",
            "--set", "data.root=/nonexistent-latents"]


class NotWeights:
    """Any class: its pickle needs arbitrary unpickling, which the import refuses."""


def cli(*args):
    from ddaepp_cli.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, [ln for ln in r.stderr.splitlines() if ln.strip()], r.stdout


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            unit = 1.0 if name.endswith("weight") and p.ndim == 1 else 0.0  # norm scales around 1
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + unit)
    return module


def ddae_checkpoint(path: Path, *, biggan: bool, augment_dim: int = 0, seed: int = 0) -> tuple[R.DDAEUNet, R.DDAEUNet]:
    """{'MODEL', 'EMA', 'opt'} exactly as ddae train.py: DDP(module.nn_model.*), ema_pytorch EMA, Adam state."""
    raw = randomize(R.DDAEUNet(biggan=biggan, augment_dim=augment_dim), seed)
    ema = randomize(R.DDAEUNet(biggan=biggan, augment_dim=augment_dim), seed + 1)
    diff = R.DDAEWrapper(raw)
    opt = torch.optim.Adam(diff.parameters(), lr=1e-4)
    diff.nn_model.image_proj.weight.sum().backward()
    opt.step()
    model_sd = {f"module.{k}": v for k, v in diff.state_dict().items()}
    ema_sd = {f"ema_model.{k}": v for k, v in R.DDAEWrapper(ema).state_dict().items()}
    ema_sd.update({f"online_model.{k}": v for k, v in diff.state_dict().items()})
    ema_sd.update({"initted": torch.tensor(True), "step": torch.tensor(1234)})
    torch.save({"MODEL": model_sd, "EMA": ema_sd, "opt": opt.state_dict()}, path)
    return raw, ema


@pytest.fixture(scope="module")
def ddae_edm(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddae")
    src = root / "model_1999.pth"
    raw, ema = ddae_checkpoint(src, biggan=True, augment_dim=9)
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
                              len(R.DDAEWrapper(ddae_edm["raw"]).state_dict()),
                              "EMA: ema_pytorch bookkeeping (initted, step)": 2}
    torch.manual_seed(0)
    x, sigma = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 7.0])
    aug = torch.randn(2, 9)
    for weights, ref in (("ema", ddae_edm["ema"]), ("raw", ddae_edm["raw"])):
        recipe, net, _ = load_model(ddae_edm["run"], weights=weights)
        f = build_formulation(recipe)
        with torch.no_grad():
            ours = f.predict(net, x, sigma, aug_label=aug).x0
            theirs = R.ddae_edm_denoise(ref.eval(), x, sigma, aug=aug)
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    assert (ddae_edm["run"] / "import.json").is_file() and (ddae_edm["run"] / "recipe.yaml").is_file()


def test_ddae_ddpm_conv_unet_forward_equals_ddae(tmp_path):
    from ddaepp_cli.build import build_formulation
    from ddaepp_cli.sample import load_model

    src = tmp_path / "model_99.pth"
    raw, ema = ddae_checkpoint(src, biggan=False)
    code, err, _ = cli("import", src, "--from", "ddae", "--recipe", "cifar10_ddpm_ddpm", "--out", tmp_path / "run",
                       *DDAE_SET)
    assert code == 0, err
    recipe, net, _ = load_model(tmp_path / "run")
    f = build_formulation(recipe)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([11, 700])
    with torch.no_grad():
        eps = f.predict(net, x, t).eps
        ref = ema.eval()(x, t / 1000.0)  # ddae model/DDPM.py: nn_model(x, t / n_T)
    torch.testing.assert_close(eps, ref, atol=2e-5, rtol=1e-4)
    # --weights model: the raw weights (MODEL) become what every command reads by default
    code, err, out = cli("import", src, "--from", "ddae", "--recipe", "cifar10_ddpm_ddpm", "--out", tmp_path / "raw",
                         *DDAE_SET, "--weights", "model", "--json")
    assert code == 0, err
    assert json.loads(out)["dropped"]["EMA weights (--weights model imports the raw weights)"] == len(ema.state_dict())
    _, net, _ = load_model(tmp_path / "raw")
    with torch.no_grad():
        torch.testing.assert_close(f.predict(net, x, t).eps, raw.eval()(x, t / 1000.0), atol=2e-5, rtol=1e-4)


def test_ddae_tampered_files_exit_2_with_one_line(tmp_path):
    src = tmp_path / "model.pth"
    ddae_checkpoint(src, biggan=False)
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

    ref = randomize(R.UViT(), 3).eval()
    src = tmp_path / "cifar10_uvit_small.pth"
    torch.save(ref.state_dict(), src)  # U-ViT train.py: torch.save(nnet_ema.state_dict(), 'nnet_ema.pth')
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


# ------------------------------------------------------------------------------------------------
# LightningDiT
# ------------------------------------------------------------------------------------------------


def test_lightningdit_import_maps_every_key_and_checks_rope(tmp_path):
    from ddaepp_cli.sample import load_model

    ema = R.lightningdit_state_dict(seed=1)
    model = {f"module.{k}": v for k, v in R.lightningdit_state_dict(seed=2).items()}
    src = tmp_path / "0100000.pt"
    torch.save({"model": model, "ema": ema, "opt": {"state": {}, "param_groups": [{"lr": 2e-4}]},
                "config": {"model": {"model_type": "LightningDiT-B/1"}}}, src)
    code, err, out = cli("import", src, "--from", "lightningdit", "--recipe", "imagenet256_rf_ditb_cond",
                         "--out", tmp_path / "run", *LDIT_SET, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["recipe_overrides"] == ["diffusion.net_convention=sit"]
    assert res["dropped"] == {"optimizer state": 1, "training metadata": 1,
                              "ema: RoPE tables (computed by ddaepp; checked equal)": 2,
                              "raw: RoPE tables (computed by ddaepp; checked equal)": 2}
    for weights, sd in (("ema", ema), ("raw", {k[7:]: v for k, v in model.items()})):
        _, net, _ = load_model(tmp_path / "run", weights=weights)
        own = net.state_dict()
        assert torch.equal(own["x_embedder.weight"], sd["x_embedder.proj.weight"])
        assert torch.equal(own["y_embedder.weight"], sd["y_embedder.embedding_table.weight"])
        assert torch.equal(own["blocks.1.mlp.w3.weight"], sd["blocks.1.mlp.w3.weight"])
        assert len(own) == len(sd) - 2
    # the imported network computes what LightningDiT's forward computes on the same weights, and the
    # formulation hands it LightningDiT's time 1 − t and reads its output as −v
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

DIT_SET = ["--set", "model.width=64", "--set", "model.depth=2", "--set", "model.heads=2",
           "--set", "model.num_classes=10", "--set", "data.image_size=8", "--set", "data.root=/nonexistent-latents"]


def train_py_checkpoint(path: Path, ema: dict, raw: dict, *, head: dict | None = None, steps: int = 400000) -> None:
    """REPA / SRA train.py: {'model', 'ema', 'opt', 'args', 'steps'}; the heads live in both networks."""
    ema, raw = dict(ema), dict(raw)
    for k, v in (head or {}).items():
        ema[k], raw[k] = v, v + 1
    args = argparse.Namespace(model="SiT-B/2", proj_coeff=0.5, encoder_depth=4)
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "args": args,
                "steps": steps}, path)


def test_dit_import_maps_every_key_and_forward_equals_dit(tmp_path):
    from ddaepp_cli.build import build_formulation
    from ddaepp_cli.sample import load_model

    sd = R.sit_state_dict(learn_sigma=True, seed=5)
    src = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save(sd, src)  # DiT download.py: the released file is the EMA state dict alone
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
    written in the family's own convention (and not from the other family's)."""
    from ddaepp_cli.build import build_formulation
    from ddaepp_cli.sample import load_model

    sd = R.sit_state_dict(seed=6)
    src = tmp_path / "ckpt.pt"
    head = {"repa": {"projectors.0.0.weight": torch.randn(8, 64)},
            "sra": {"ap_head.linear1.weight": torch.randn(128, 64)}}.get(family)
    if family == "sit":
        torch.save(sd, src)  # SiT-XL-2-256x256.pt: the EMA state dict alone
    else:
        train_py_checkpoint(src, sd, R.sit_state_dict(seed=7), head=head)
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
    # the imported network is the family's forward at the time the family feeds it
    y = torch.tensor([0, 3, 9])
    with torch.no_grad():
        theirs = R.dit_forward(sd, x, 1 - t if family == "sit" else t, y, heads=2)
        torch.testing.assert_close(net(x, f.net_time(t), class_labels=y), theirs, atol=1e-5, rtol=1e-4)
    if family != "sit":
        name = next(iter(head))
        reason = {"repa": "REPA alignment projectors (projectors.*)", "sra": "SRA self-alignment head (ap_head.*)"}[family]
        assert res["dropped"] == {reason: 2, "optimizer state": 1, "training metadata": 2} and res["step"] == 400000
        assert json.loads((tmp_path / "run" / "import.json").read_text())["dropped"][reason] == [f"ema/{name}",
                                                                                             f"model/{name}"]
        _, raw_net, _ = load_model(tmp_path / "run", weights="raw")
        key = "blocks.1.mlp.fc2.weight"
        assert torch.equal(raw_net.state_dict()[key], R.sit_state_dict(seed=7)[key])
        assert "nothing converted" in res["conventions"][0]
    else:
        assert res["conventions"][0].startswith("time direction: SiT")


def test_sra_dit_checkpoint_imports_under_ddpm_with_learned_sigma(tmp_path):
    from ddaepp_cli.build import build_formulation
    from ddaepp_cli.sample import load_model

    sd = R.sit_state_dict(learn_sigma=True, seed=8)
    src = tmp_path / "0400000.pt"
    train_py_checkpoint(src, sd, sd, head={"ap_head.linear1.weight": torch.randn(128, 64),
                                           "ap_head.linear2.bias": torch.randn(64)})
    code, err, out = cli("import", src, "--from", "sra", "--recipe", "imagenet256_sra_ditxl", "--out", tmp_path / "run",
                         *DIT_SET, "--json")
    assert code == 0, err
    assert json.loads(out)["dropped"]["SRA self-alignment head (ap_head.*)"] == 4
    recipe, net, _ = load_model(tmp_path / "run")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 999]), torch.tensor([2, 5])
    with torch.no_grad():
        eps = build_formulation(recipe).predict(net, x, t, class_labels=y).eps
        torch.testing.assert_close(eps, R.dit_forward(sd, x, t - 1, y, heads=2)[:, :4], atol=1e-5, rtol=1e-4)
    # the same file under the SiT recipe (no learned Σ) names the setting to change
    code, err, _ = cli("import", src, "--from", "sra", "--recipe", "imagenet256_sra_sitxl", "--out", tmp_path / "r2",
                       *DIT_SET)
    assert code == 2 and len(err) == 1 and "model.learn_sigma: true" in err[0]
    # the reverse: a file without learned Σ under the DiT recipe
    torch.save(R.sit_state_dict(), tmp_path / "plain.pt")
    code, err, _ = cli("import", tmp_path / "plain.pt", "--from", "dit", "--recipe", "imagenet256_sra_ditxl",
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
    sd = R.sit_state_dict(learn_sigma=learn)
    cases = {"missing.pt": ({k: v for k, v in sd.items() if k != "blocks.1.attn.proj.bias"}, "blocks.1.attn.proj.bias"),
             "shape.pt": (dict(sd, **{"blocks.0.mlp.fc1.weight": torch.zeros(100, 64)}), "blocks.0.mlp.fc1.weight"),
             "extra.pt": (dict(sd, **{"blocks.2.attn.qkv.weight": torch.zeros(192, 64)}), "blocks.2.attn.qkv.weight"),
             "pos.pt": (dict(sd, pos_embed=R.mae_sincos_pos_embed(64, 4).flip(1)), "pos_embed"),
             "labels.pt": (dict(sd, **{"y_embedder.embedding_table.weight": torch.zeros(10, 64)}),
                           "y_embedder.embedding_table.weight")}
    for name, (obj, needle) in cases.items():
        if family in ("repa", "sra"):
            train_py_checkpoint(tmp_path / name, obj, obj)
        else:
            torch.save(obj, tmp_path / name)
    torch.save({"model": sd, "ema": sd, "opt": NotWeights(), "args": None}, tmp_path / "pickle.pt")
    cases["pickle.pt"] = (None, "arbitrary unpickling")
    for name, (_, needle) in cases.items():
        out = tmp_path / f"run-{name}"
        code, err, _ = cli("import", tmp_path / name, "--from", family, "--recipe", recipe, "--out", out, *DIT_SET)
        assert code == 2 and len(err) == 1 and needle in err[0], (name, err)
        assert not out.exists()


@pytest.mark.parametrize("family", ["dit", "sit"])
def test_sample_on_imported_dit_sit_run_decodes_with_its_vae(tmp_path, family):
    from test_latents import write_tiny_vae

    vae = tmp_path / "sd-vae-ft-ema.safetensors"
    write_tiny_vae(vae, z=4)  # 4 latent channels as SD-VAE
    src = tmp_path / f"{family}-B-2.pt"
    torch.save(R.sit_state_dict(learn_sigma=family == "dit", seed=9), src)
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

    assert Image.open(tmp_path / "s" / "000001.png").size == (32, 32)  # 8×8 latents through an f4 decoder


# ------------------------------------------------------------------------------------------------
# VAEs in diffusers' layout; a latent import that samples through its own statistics and VAE
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory):
    from test_latents import write_tiny_vae

    from ddaepp_cli.data.vae import load_vae

    root = tmp_path_factory.mktemp("vae")
    write_tiny_vae(root / "ldm.safetensors", extra_training_keys=False)
    ldm = load_vae(root / "ldm.safetensors")
    ldm.model.save_pretrained(root / "hf")  # diffusers' own layout: config.json + diffusion_pytorch_model.safetensors
    return root, ldm


def test_diffusers_layout_vae_loads_like_the_ldm_file(diffusers_vae, tmp_path):
    import shutil

    from ddaepp_cli.data.vae import load_vae

    root, ldm = diffusers_vae
    alone = tmp_path / "vae.safetensors"  # the weights file without its config.json: architecture from shapes
    shutil.copy(root / "hf" / "diffusion_pytorch_model.safetensors", alone)
    z = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    for path in (root / "hf", root / "hf" / "diffusion_pytorch_model.safetensors", alone):
        vae = load_vae(path)
        assert vae.config["latent_channels"] == 8 and vae.config["block_out_channels"] == ldm.config["block_out_channels"]
        torch.testing.assert_close(vae.decode(z), ldm.decode(z))
    from safetensors.torch import load_file, save_file

    sd = load_file(str(alone))
    del sd["decoder.up_blocks.0.resnets.0.conv1.bias"]
    save_file(sd, str(tmp_path / "missing.safetensors"))
    with pytest.raises(Exception, match="missing.safetensors does not match the autoencoder: keys 1 missing"):
        load_vae(tmp_path / "missing.safetensors")


def test_lightningdit_latent_import_samples_with_its_stats_and_vae(diffusers_vae, tmp_path):
    root, _ = diffusers_vae
    src = tmp_path / "lightningdit-b1.pt"
    torch.save(R.lightningdit_state_dict(in_ch=8, seed=4), src)  # a released file: the EMA state dict alone
    stats = tmp_path / "latents_stats.pt"
    torch.save({"mean": torch.randn(1, 8, 1, 1), "std": torch.rand(1, 8, 1, 1) + 0.5}, stats)
    run = tmp_path / "run"
    args = ["import", src, "--from", "lightningdit", "--recipe", "imagenet256_rf_ditb_cond", "--out", run,
            *LDIT_SET, "--set", "data.latent_channels=8"]
    code, err, _ = cli(*args, "--vae", root / "hf")
    assert code == 2 and "--latent-stats and --vae go together" in err[0]
    code, err, out = cli(*args, "--vae", root / "hf", "--latent-stats", stats, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["latents"]["stats_file"] == "latents_stats.pt" and res["latents"]["vae"]["kind"] == "custom"
    manifest = json.loads((run / "latents" / "manifest.json").read_text())
    assert manifest["latent_shape"] == [8, 4, 4]
    code, err, _ = cli("sample", run, "--seeds", "0-1", "--steps", "2", "--class-label", "3", "--out", tmp_path / "s",
                       "--format", "png")
    assert code == 0, err
    from PIL import Image

    assert Image.open(tmp_path / "s" / "000001.png").size == (16, 16)  # 4×4 latents through an f4 decoder


# ------------------------------------------------------------------------------------------------
# The real layouts at their published sizes (meta device: shapes and names, no memory)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,recipe,make,params", [
    ("ddae", "cifar10_ddpm_ddpm", lambda: R.DDAEUNet(128, (1, 2, 2, 2), (False, True, False, False), 2), 35_746_307),
    ("ddae", "cifar10_edm_ddpmpp", lambda: R.DDAEUNet(128, (2, 2, 2), (False, True, False), 4, biggan=True), 56_524_291),
    ("uvit", "cifar10_ddpm_uvit", lambda: R.UViT(32, 2, 512, 12, 8), 44_255_328),
    ("lightningdit", "imagenet256_rf_ditxl_cond", None, 675_256_736),
    ("dit", "imagenet256_sra_ditxl", "dit", 675_129_632),  # DiT-XL/2 with learned Σ (DiT README)
    ("sit", "imagenet256_sra_sitxl", "sit", 675_111_184),  # SiT-XL/2
])
def test_published_sizes_map_completely(tmp_path, family, recipe, make, params):
    from ddaepp_cli.build import build_backbone
    from ddaepp_cli.cli import resolve_recipe_path
    from ddaepp_cli.importers import FAMILIES
    from ddaepp_cli.importers.common import check_against
    from ddaepp_cli.recipe import load_recipe, replace

    rec = load_recipe(resolve_recipe_path(recipe), ["data.root=/nonexistent"])
    fam = FAMILIES[family]
    rec = replace(rec, fam.overrides(rec))
    model = build_backbone(rec, device="meta")
    if make in ("dit", "sit"):
        sd = R.sit_state_dict(width=1152, depth=28, in_ch=4, grid=16, num_classes=1000, learn_sigma=make == "dit",
                              device="meta")
    elif make is None:
        sd = R.lightningdit_state_dict(width=1152, depth=28, heads=16, in_ch=32, grid=16, num_classes=1000, device="meta")
    else:
        with torch.device("meta"):
            sd = make().state_dict()
    mapped = fam.convert(sd, model, tmp_path / "file.pt")
    state = check_against(model, mapped, tmp_path / "file.pt", "EMA weights")
    assert sum(v.numel() for k, v in state.items() if k in dict(model.named_parameters())) == params
    assert len(mapped.tensors) + sum(len(v) for v in mapped.dropped.values()) == len(sd)


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
