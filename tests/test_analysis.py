"""Shared feature extraction, DDAE's alignment/uniformity (Eqs. 3–4), the noise-conditional classifier
(Eq. 5) and the evaluation records."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import TINY

SMALL = TINY.replace("ch_mults: [1, 2]", "ch_mults: [1, 1]")  # same taps as TINY, a third of the cost


def invoke(*args):
    """The CLI in-process (real exit codes and separate stdout/stderr, without a second torch import)."""
    from typer.testing import CliRunner

    from ddaepp_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def make_checkpoint(folder, seed: int, step: int = 1, text: str = SMALL):
    from ddaepp_cli.build import build_backbone
    from ddaepp_cli.checkpoint import save_checkpoint
    from ddaepp_cli.recipe import load_recipe

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "small.yaml").write_text(text)
    recipe = load_recipe(folder / "small.yaml")
    torch.manual_seed(seed)
    model = build_backbone(recipe)
    return save_checkpoint(folder / "run", step, recipe=recipe, model=model, ema=model, state={}, keep_last=5)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("analysis")
    return make_checkpoint(d, 0, step=1), make_checkpoint(d, 1, step=2)


# ------------------------------------------------------------------------------------------------
# Features are what the network sees in training
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, t", [("ddpm", 11.0), ("edm", 0.06), ("rf", 0.25)])
def test_noised_features_equal_the_training_loss_taps(name, t):
    """Same x0, t and ε: the probe's features are the ones `Formulation.loss` feeds through the net
    (EDM's c_in scaling and ln σ / 4 time included), from an early-exit forward."""
    from ddaepp_cli.diffusion import build_formulation
    from ddaepp_cli.eval.features import noised_features
    from ddaepp_cli.nets import build_backbone

    torch.manual_seed(0)
    net = build_backbone("ddpm", in_channels=1, image_size=8, channels=64, ch_mults=(1, 1), n_blocks=1,
                         attn_resolutions=(4,), dropout=0.0).eval()
    form = build_formulation(name)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.randn(4, 1, 8, 8, generator=g)
    ours = noised_features(net, form, x0, t, ["out_2"], noise=noise, pooled=False)["out_2"]
    with torch.no_grad():
        theirs = form.loss(net, x0, t=torch.full((4,), t), noise=noise, feature_layers=["out_2"]).features["out_2"]
    assert torch.allclose(ours, theirs, atol=1e-6)
    pooled = noised_features(net, form, x0, t, ["out_2"], noise=noise)["out_2"]
    assert pooled.shape == (4, 64) and torch.allclose(pooled, theirs.mean(dim=(2, 3)), atol=1e-6)
    other = noised_features(net, form, x0, t * 2, ["out_2"], noise=noise)["out_2"]
    assert not torch.allclose(pooled, other, atol=1e-4)  # the time really reaches the network


def test_time_lists_follow_the_paper_conventions():
    from ddaepp_cli.diffusion import build_formulation
    from ddaepp_cli.errors import UsageError
    from ddaepp_cli.eval.features import DEFAULT_GRID, parse_times

    edm = build_formulation("edm")
    times = parse_times(edm, None, default=DEFAULT_GRID["edm"])
    assert [x.text for x in times] == ["idx:3", "idx:4", "idx:5"]
    assert [round(x.value, 4) for x in times] == [0.0229, 0.0599, 0.1395]  # EDM 18-step schedule, NVlabs/edm `generate.py`
    same = parse_times(edm, f"idx:4,{times[1].value!r},0.06", default=())  # one σ written two ways: kept once
    assert [x.text for x in same] == ["idx:4", "0.06"]
    with pytest.raises(UsageError, match=r"idx:1\.\.18"):
        parse_times(edm, "idx:19", default=())
    with pytest.raises(UsageError, match="empty"):
        parse_times(build_formulation("rf"), "0.1,,0.2", default=())


# ------------------------------------------------------------------------------------------------
# Alignment and uniformity
# ------------------------------------------------------------------------------------------------


def test_alignment_and_uniformity_match_their_definitions():
    from ddaepp_cli.eval.analysis import alignment, uniformity

    g = torch.Generator().manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(12, 5, generator=g), dim=1)
    h = torch.nn.functional.normalize(f + 0.1 * torch.randn(12, 5, generator=g), dim=1)
    assert float(alignment(f, f)) == 0.0
    assert float(alignment(f, h)) == pytest.approx(sum(float((a - b).norm() ** 2) for a, b in zip(f, h)) / 12)
    pairs = [math.exp(-2 * float((f[i] - f[j]).norm() ** 2)) for i in range(12) for j in range(i + 1, 12)]
    assert float(uniformity(f)) == pytest.approx(math.log(sum(pairs) / len(pairs)), rel=1e-5)
    collapsed = torch.nn.functional.normalize(torch.ones(12, 5), dim=1)
    assert float(uniformity(collapsed)) == pytest.approx(0.0, abs=1e-6)  # all on one point: the worst
    assert float(uniformity(f)) < -0.5


def test_align_command_over_a_trajectory(checkpoints, tmp_path):
    a, b = checkpoints
    plot = tmp_path / "align.png"
    r = invoke("align", a, b, "--layers", "out_2,out_4", "--n", 96, "--batch-size", 48, "--plot", plot, "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["layers"] == ["out_2", "out_4"] and out["n"] == 96 and out["timestep"]["text"] == "11"
    assert [c["step"] for c in out["checkpoints"]] == [1, 2]
    for run in out["checkpoints"]:
        for m in run["metrics"].values():
            assert 0.0 < m["alignment"] < 4.0 and -4.0 <= m["uniformity"] < 0.0  # unit vectors: ‖a − b‖² ≤ 4
    assert out["metrics"] == out["checkpoints"][-1]["metrics"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    record = json.loads(open(out["eval_record"]).read())
    assert record["protocol"]["batch_size"] == 48 and record["protocol"]["dataset"]["split"] == "train"
    # at t = 1 the two noisy views are nearly the same image: alignment shrinks
    near = invoke("align", a, "--layers", "out_2", "--n", 96, "--batch-size", 48, "--timestep", "1", "--json",
                  "--plot", tmp_path / "near.png")
    assert near.exit_code == 0, near.stderr
    assert json.loads(near.stdout)["metrics"]["out_2"]["alignment"] < out["checkpoints"][0]["metrics"]["out_2"]["alignment"]


# ------------------------------------------------------------------------------------------------
# Noise-conditional classifier
# ------------------------------------------------------------------------------------------------


def test_noise_levels_and_classifier_shape():
    from ddaepp_cli.eval.analysis import NoiseLevels, NoisyClassifier
    from ddaepp_cli.diffusion import build_formulation

    ddpm = NoiseLevels(build_formulation("ddpm"))
    assert [x[1] for x in ddpm.grid()] == list(range(1, 1000, 50))  # DDAE: 1, 51, …, 951
    edm = NoiseLevels(build_formulation("edm"))
    grid = edm.grid()
    assert len(grid) == 18 and grid[3][0] == "idx:4" and grid[3][1] == pytest.approx(0.0599, abs=1e-4)
    assert all(a[1] < b[1] for a, b in zip(grid, grid[1:])) and grid[-1][1] == pytest.approx(80.0)
    t, raw = edm.sample(256, torch.Generator().manual_seed(0), "cpu")
    assert set(raw.long().tolist()) <= set(range(1, 19)) and torch.all(t > 0)
    rf = NoiseLevels(build_formulation("rf"))
    t, raw = rf.sample(64, torch.Generator().manual_seed(0), "cpu")
    assert torch.allclose(raw, 1000 * t) and float(t.max()) < 1.0
    clf = NoisyClassifier(256, 10)
    # TimeEmbedding(256): 64 → 256 → 256; head 256 → 512 → 10 (FutureXiang/ddae `noisy_classifier_DDAE.py`)
    expected = (64 * 256 + 256) + (256 * 256 + 256) + (256 * 512 + 512) + (512 * 10 + 10)
    assert sum(p.numel() for p in clf.parameters()) == expected
    assert clf(torch.randn(3, 256), torch.tensor([1.0, 500.0, 999.0])).shape == (3, 10)


def test_noisy_classifier_command(tmp_path):
    # EDM: half of its 18 training levels keep a digit legible (σ < 1); under DDPM most of the 1000
    # steps erase an 8×8 digit, and a few CPU steps teach the head little.
    ckpt = make_checkpoint(tmp_path / "edm", 0, text=SMALL.replace("formulation: ddpm", "formulation: edm"))
    r = invoke("noisy-classifier", ckpt, "--layer", "out_2", "--epochs", 3, "--batch-size", 32, "--no-crop",
               "--n-test", 96, "--plot", tmp_path / "noisy.png", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    curve = out["curve"]
    assert [c["timestep"] for c in curve] == [f"idx:{k}" for k in range(1, 19)]
    low, high = [sum(c["accuracy"] for c in part) / 4 for part in (curve[:4], curve[-4:])]
    assert low > 0.25 and low > high + 0.15, (low, high)  # 10 classes; σ ≥ 20 leaves noise only
    assert out["protocol"]["crop_pad"] == 0 and out["protocol"]["dataset"]["num_test"] == 96
    assert out["protocol"]["time_embedding_input"] == "schedule index"
    assert (tmp_path / "noisy.png").read_bytes()[:4] == b"\x89PNG"
    bad = invoke("noisy-classifier", ckpt, "--layer", "out_1-2")
    assert bad.exit_code == 2 and "one layer" in bad.stderr


# ------------------------------------------------------------------------------------------------
# Evaluation records
# ------------------------------------------------------------------------------------------------


def test_record_paths_and_atomic_writes(tmp_path):
    from ddaepp_cli.eval.evalrecord import new_record_path, run_folder, save_record

    ckpt = tmp_path / "run" / "checkpoints" / "step-0000100"
    assert run_folder(ckpt) == tmp_path / "run"
    assert run_folder(tmp_path / "loose") == tmp_path
    first = new_record_path(ckpt, "probe")
    assert first.parent == tmp_path / "run" / "eval" and first.name.startswith("probe-")
    save_record(first, {"a": 1})
    second = new_record_path(ckpt, "probe")
    assert second != first  # the same second: a suffix, never an overwrite
    assert json.loads(first.read_text()) == {"a": 1}
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary file left behind
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "eval").write_text("a file where the folder should be")
    assert save_record(tmp_path / "ro" / "eval" / "x.json", {"a": 1}) is None  # a warning, not a crash


def test_transformer_tokens_are_averaged_and_conditional_models_get_the_null_class():
    """A class-conditional DiT is probed with the null label (DDAE's DiT probe; DDAE++ App. B); its
    (B, N, D) block tokens are averaged over the tokens."""
    from ddaepp_cli.diffusion import build_formulation
    from ddaepp_cli.eval.features import network_inputs, noised_features
    from ddaepp_cli.nets import build_backbone

    torch.manual_seed(0)
    net = build_backbone("dit", width=64, depth=3, heads=4, in_channels=4, image_size=8, num_classes=5).eval()
    with torch.no_grad():  # adaLN-Zero starts with closed gates: open them so the label reaches the tokens
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    form = build_formulation("rf")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    ours = noised_features(net, form, x0, 0.25, ["2"], noise=noise)["2"]
    x_in, t_net = network_inputs(form, x0, 0.25, noise)
    with torch.no_grad():
        null = net.forward_features(x_in, t_net, ["2"], class_labels=torch.full((3,), 5))["2"]  # row 5 = null
        real = net.forward_features(x_in, t_net, ["2"], class_labels=torch.zeros(3, dtype=torch.long))["2"]
    assert null.shape == (3, 64, 64) and ours.shape == (3, 64)
    assert torch.allclose(ours, null.mean(dim=1), atol=1e-6)
    assert not torch.allclose(ours, real.mean(dim=1), atol=1e-4)
