"""`ddaepp fid` through the real torch-fidelity Inception path on a CPU (issue 6).

The official Inception weights cannot be downloaded here, so the extractor gets random weights
written in its exact state-dict layout (`inception.random_state_dict`, 256 live pool3 features so
that torch-fidelity's own 2048×2048 eigvals stays fast). Everything else is the path users run:
torch-fidelity's `inception-v3-compat` class, its TF1 resize, its IS/KID/PRC functions.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import run_cli
from ddaepp_cli.eval import fid as F
from ddaepp_cli.eval import inception
from ddaepp_cli.errors import UnavailableError, UsageError

TINY_RGB = """\
name: tinyrgb
data: {dataset: imagefolder, image_size: 16, num_workers: 0}
model: {backbone: ddpm, channels: 32, ch_mults: [1, 2], n_blocks: 1, attn_resolutions: [8], dropout: 0.0}
diffusion: {formulation: ddpm}
sample: {sampler: ddim, steps: 4, batch_size: 16}
"""


def write_images(folder, seed, n=3, size=16, shift=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = []
    for i in range(n):
        arr = np.clip(rng.integers(0, 200, (size, size, 3)) + shift, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
        arrays.append(arr)
    return np.stack(arrays)  # (n, H, W, 3)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    weights = root / "weights.pth"
    torch.save(inception.random_state_dict(0, active=256), weights)
    a = write_images(root / "A", seed=1)
    write_images(root / "B", seed=2, shift=50)
    np.savez(root / "A.npz", arr_0=a)  # the ADM / `ddaepp sample` format of the same images
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDAEPP_CACHE", str(root / "cache"))
        yield {"root": root, "w": str(weights), "A": str(root / "A"), "B": str(root / "B"),
               "A_npz": str(root / "A.npz")}


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def test_equals_torch_fidelitys_own_fid(fx):
    import torch_fidelity

    theirs = torch_fidelity.calculate_metrics(
        input1=fx["A"], input2=fx["B"], fid=True, cuda=False, feature_extractor_weights_path=fx["w"], cache=False,
        verbose=False, save_cpu_ram=True)["frechet_inception_distance"]
    # The real command in a real process: one JSON object on stdout, progress on stderr.
    r = run_cli("fid", fx["A"], "--ref", fx["B"], "--inception-weights", fx["w"], "--json", "--no-cache",
                env={"DDAEPP_CACHE": str(fx["root"] / "cache-cli")})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["metrics"]["fid"] > 0.1
    # float64 extractor vs torch-fidelity's float32 one: the same up to float32 rounding of the features
    assert rel(out["metrics"]["fid"], theirs) < 2e-5, (out["metrics"]["fid"], theirs)
    assert out["protocol"]["extractor"]["internal_dtype"] == "float64"
    assert out["protocol"]["extractor"]["weights_sha256"] == inception.sha256_of(fx["root"] / "weights.pth")
    assert any("not the official" in w for w in out["warnings"])
    # with torch-fidelity's own float32 extractor: equal up to the float32 mean (torch-fidelity's μ is float32)
    ours32 = F.fid(fx["A"], ref=fx["B"], inception_weights=fx["w"], extractor_dtype="float32", cache=False)
    assert rel(ours32["metrics"]["fid"], theirs) < 1e-6, (ours32["metrics"]["fid"], theirs)


def test_self_npz_batch_size_and_stats_file_equivalences(fx):
    w = fx["w"]
    stats_a = str(fx["root"] / "A-stats.npz")
    r1 = F.fid(fx["A"], ref=fx["B"], inception_weights=w, batch_size=3)
    assert r1["reference"]["cache"] in ("miss", "hit") and r1["eval_record"] is None
    # the .npz of the same images, one image per batch, reference from the cache; also write A's statistics
    r2 = F.fid(fx["A_npz"], ref=fx["B"], inception_weights=w, batch_size=1, save_stats=stats_a)
    assert r2["reference"]["cache"] == "hit" and r2["input"]["kind"] == "npz"
    assert rel(r2["metrics"]["fid"], r1["metrics"]["fid"]) < 1e-9
    # swapped roles, other batch size: B at batch 2 vs A's statistics file (float64 mu/sigma round trip)
    r3 = F.fid(fx["B"], ref=stats_a, inception_weights=w, batch_size=2)
    assert r3["reference"]["kind"] == "stats" and r3["reference"]["n"] == 3
    assert rel(r3["metrics"]["fid"], r1["metrics"]["fid"]) < 1e-9
    # a folder against itself
    r4 = F.fid(fx["A"], ref=fx["A"], inception_weights=w, batch_size=2)
    assert abs(r4["metrics"]["fid"]) < 1e-9 * max(1.0, r1["metrics"]["fid"])
    with np.load(stats_a) as z:
        assert z["mu"].dtype == np.float64 and z["sigma"].shape == (2048, 2048) and int(z["n"]) == 3
        assert json.loads(str(z["meta"]))["extractor"]["internal_dtype"] == "float64"


def test_run_input_equals_its_written_samples(fx, tmp_path):
    import yaml

    from ddaepp_cli.build import build_backbone
    from ddaepp_cli.checkpoint import save_checkpoint
    from ddaepp_cli.recipe import recipe_from_dict
    from ddaepp_cli.sample import sample_command

    rec = recipe_from_dict(yaml.safe_load(TINY_RGB))
    torch.manual_seed(0)
    net = build_backbone(rec)
    save_checkpoint(tmp_path / "run", 2, recipe=rec, model=net, ema=net, state={})
    # generated on the fly, 2 per batch, never written ...
    w32 = dict(inception_weights=fx["w"], extractor_dtype="float32")  # the property holds in either precision
    live = F.fid(str(tmp_path / "run"), ref=fx["B"], n=3, batch_size=2, save_samples=str(tmp_path / "kept"), **w32)
    assert live["input"]["kind"] == "run" and live["protocol"]["samples"]["seeds"] == [0, 2]
    assert live["protocol"]["weights"] == "ema" and live["protocol"]["checkpoint"].endswith("step-0000002")
    record = json.loads(open(live["eval_record"]).read())
    assert os.path.dirname(live["eval_record"]) == str(tmp_path / "run" / "eval")
    assert record["metrics"] == live["metrics"] and record["protocol"]["extractor"]["name"] == "inception-v3-compat"
    # ... equal to `ddaepp sample` of the same seeds written as PNGs (pixel for pixel) and their FID
    sample_command(str(tmp_path / "run"), seeds=[0, 1, 2], out=str(tmp_path / "s"), sampler=None, steps=None,
                   weights="ema", formats=["png"], batch_size=3, clip=None)
    for i in range(3):
        assert np.array_equal(np.array(Image.open(tmp_path / "s" / f"{i:06d}.png")),
                              np.array(Image.open(tmp_path / "kept" / f"{i:06d}.png")))
    disk = F.fid(str(tmp_path / "s"), ref=fx["B"], batch_size=2, **w32)
    assert rel(disk["metrics"]["fid"], live["metrics"]["fid"]) < 1e-9
    assert disk["eval_record"] and "sample_protocol" in disk["input"]  # recorded next to the run that sampled it


def test_is_kid_prc_through_torch_fidelity(fx, tmp_path):
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    g = torch.Generator().manual_seed(0)
    D = 32  # the metrics do not care about the width; 2048 only makes torch-fidelity's KID loop slower
    feats = {"2048": torch.randn(40, D, generator=g), "logits_unbiased": torch.randn(40, 1008, generator=g)}
    ref = torch.randn(30, D, generator=g) + 0.5
    stats = F.stats_from_features(feats["2048"])
    values, settings = F.compute_metrics(["fid", "is", "kid", "prc"], feats, stats, F.stats_from_features(ref), ref)
    assert values["is_mean"] == isc_features_to_metric(feats["logits_unbiased"], 10, True, 2020)["inception_score_mean"]
    kid = kid_features_to_metric(feats["2048"], ref, kid_subsets=100, kid_subset_size=30, rng_seed=2020, verbose=False)
    assert values["kid_mean"] == kid["kernel_inception_distance_mean"] and settings["kid"]["subset_size"] == 30
    prc = prc_features_to_metric(feats["2048"], ref, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=False,
                                 verbose=False)
    assert (values["precision"], values["recall"]) == (prc["precision"], prc["recall"])
    assert values["fid"] > 4  # shifted by 0.5 in 32 dimensions: ‖Δμ‖² alone is ~8


@pytest.mark.parametrize("n1, n2", [(20, 30), (300, 200)])
def test_frechet_distance_matches_sqrtm_and_torch_fidelity(n1, n2):
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    g = torch.Generator().manual_seed(n1)
    D = 64  # small enough for scipy's sqrtm; n < D uses the low-rank factor, n > D the eigh path
    x = torch.randn(n1, D, generator=g) @ torch.randn(D, D, generator=g) * 0.3
    y = torch.randn(n2, D, generator=g) * 1.3 + 0.2
    s1, s2 = F.stats_from_features(x), F.stats_from_features(y)
    assert (s1.factor is not None) == (n1 < D)
    ours = F.frechet_distance(s1, s2)
    ref_sqrtm = F.frechet_distance(s1, s2, method="sqrtm")
    theirs = fid_statistics_to_metric({"mu": s1.mu, "sigma": s1.sigma}, {"mu": s2.mu, "sigma": s2.sigma},
                                      False)["frechet_inception_distance"]
    # sqrtm / eigvals of a rank-deficient Σ1Σ2 take square roots of round-off eigenvalues (~1e-7 each);
    # the factor form has none of them, so the references are the less exact side here
    tol = 1e-7 if n1 < D else 1e-9
    assert rel(ours, ref_sqrtm) < tol and rel(ours, theirs) < tol, (ours, ref_sqrtm, theirs)
    assert np.allclose(s1.sigma, np.cov(x.double().numpy(), rowvar=False), rtol=1e-12, atol=1e-12)
    assert abs(F.frechet_distance(s1, s1)) < 1e-9 * np.trace(s1.sigma)
    bad = F.Stats(s1.mu.copy(), s1.sigma.copy(), n1)
    bad.mu[0] = np.nan
    with pytest.raises(UsageError, match="NaN"):
        F.frechet_distance(bad, s2)


def test_reference_cache_key_is_the_content(fx, tmp_path):
    copy = tmp_path / "B-copy"
    shutil.copytree(fx["B"], copy)
    a, b = F.FolderSource(fx["B"]), F.FolderSource(copy)
    assert a.fingerprint() == b.fingerprint()  # same content elsewhere: same key
    arr = np.array(Image.open(copy / "001.png"))
    arr[0, 0, 0] ^= 1  # one bit of one pixel; the PNG size may even stay the same
    Image.fromarray(arr).save(copy / "001.png")
    assert F.FolderSource(copy).fingerprint() != a.fingerprint()
    ext = inception.describe(fx["root"] / "weights.pth", "float64")
    key = F.cache_key(a.fingerprint(), ext)
    assert key != F.cache_key(a.fingerprint(), {**ext, "weights_sha256": "0" * 64})
    assert key != F.cache_key(a.fingerprint(), {**ext, "internal_dtype": "float32"})


def test_inputs_and_statistics_files(fx, tmp_path):
    src = F.NpzSource(fx["A_npz"])
    folder = F.FolderSource(fx["A"])
    assert torch.equal(src.read([2, 0]), folder.read([2, 0]))  # (2, 3, 16, 16) uint8, any index order
    np.savez(tmp_path / "gray.npz", arr_0=np.zeros((2, 8, 8), np.uint8))
    assert F.NpzSource(tmp_path / "gray.npz").read([0, 1]).shape == (2, 3, 8, 8)
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(UsageError, match="expected uint8"):
        F.NpzSource(tmp_path / "float.npz")
    # ADM / EDM reference statistics: {mu, sigma} only
    mu, sigma = np.random.default_rng(0).random(2048), np.eye(2048)
    np.savez(tmp_path / "edm.npz", mu=mu.astype(np.float32), sigma=sigma)
    st = F.load_stats(tmp_path / "edm.npz")
    assert st.mu.dtype == np.float64 and st.n is None and np.array_equal(st.sigma, sigma)
    np.savez(tmp_path / "small.npz", mu=mu[:64], sigma=sigma[:64, :64])
    with pytest.raises(UsageError, match="not Inception pool3"):
        F.load_stats(tmp_path / "small.npz")
    # a ddaepp sample folder contributes its per-seed images only (not grid.png)
    s = tmp_path / "samples"
    write_images(s, seed=3, n=2)
    for i in range(2):
        os.rename(s / f"{i:03d}.png", s / f"{i:06d}.png")
    Image.new("RGB", (40, 40)).save(s / "grid.png")
    (s / "protocol.json").write_text(json.dumps({"command": "sample", "checkpoint": "/nowhere"}))
    assert [os.path.basename(f) for f in F.FolderSource(s).files] == ["000000.png", "000001.png"]


def cli(args, env=None):
    from ddaepp_cli.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args], env=env)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    return r.exit_code, lines, r.stdout


def test_bad_inputs_exit_2_with_one_line(fx, tmp_path):
    mixed = tmp_path / "mixed"
    write_images(mixed, seed=0, n=2)
    Image.new("RGB", (20, 16)).save(mixed / "002.png")
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    write_images(broken, seed=0, n=2)
    (broken / "001.png").write_bytes(b"\x89PNG not really")
    w = ["--inception-weights", fx["w"]]
    cases = [
        ([mixed, "--ref", fx["B"], *w], "images differ in size"),
        ([tmp_path / "empty", "--ref", fx["B"], *w], "holds no images"),
        ([broken, "--ref", fx["B"], *w], "cannot read image"),
        ([fx["A"], "--ref", "cifar11-train", *w], "cifar10-train"),
        ([fx["A"], "--ref", fx["B"], "--metrics", "fid,lpips", *w], "choose from fid, is, kid, prc"),
        ([fx["A"], "--ref", fx["B"], "--preset", "fid70k", *w], "fid10k, fid50k"),
        ([fx["A"], "--ref", fx["B"], "--n", "10", *w], "holds 3 images"),
        ([fx["A"], "--ref", fx["B"], "--seeds", "0-3", *w], "apply to a run"),
    ]
    for args, fragment in cases:
        code, lines, out = cli(["fid", *args, "--json"])
        assert code == 2 and len(lines) == 1 and fragment in lines[0], (args, code, lines)
        assert out == ""


def test_missing_weights_exit_3_with_instructions(fx, tmp_path):
    env = {"DDAEPP_CACHE": str(tmp_path / "cache"), "TORCH_HOME": str(tmp_path / "torch")}
    code, lines, out = cli(["fid", fx["A"], "--ref", fx["B"], "--json"], env=env)
    assert code == 3 and len(lines) == 1 and out == "", lines
    msg = lines[0]
    assert inception.WEIGHTS_NAME in msg and "sha256 6726825d" in msg and inception.WEIGHTS_URL in msg
    assert str(tmp_path / "cache" / "weights" / inception.WEIGHTS_NAME) in msg  # where to put it
    with pytest.raises(UnavailableError, match="no such file"):
        inception.find_weights(tmp_path / "nope.pth")
    code, lines, _ = cli(["fid", fx["A"], "--ref", fx["A_npz"], "--inception-weights", fx["A_npz"]])
    assert code == 2 and "not a plain PyTorch state dict" in lines[0]


def test_the_fid_table_goes_to_stdout_and_notes_to_stderr(capsys):
    """Results tables go to stdout like probe's, so `ddaepp fid RUN > fid.txt` keeps them."""
    from ddaepp_cli.eval.fid.report import print_fid

    print_fid({"metrics": {"fid": 12.5}, "n": 10, "input": {"path": "samples"}, "warnings": ["w1"],
               "protocol": {"reference": "cifar10-train"}, "eval_record": "/x/eval/fid.json"})
    got = capsys.readouterr()
    assert "12.5" in got.out and "w1" not in got.out and "fid.json" not in got.out
    assert "warning: w1" in got.err and "record: /x/eval/fid.json" in got.err
