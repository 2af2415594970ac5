"""Linear CKA (Kornblith et al., 2019): identities, invariances, an independent implementation, the command."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import TINY
from ddaepp_cli.eval.cka import cka_feature_space, cka_gram, cka_matrix, linear_cka


def reference_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Straight from the definition: HSIC(K, L) = tr(K H L H) / (n − 1)² with H = I − 11ᵀ/n."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    k, l = x @ x.T, y @ y.T

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h) / (n - 1) ** 2

    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


def rand(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g)


def orthogonal(d, seed):
    q, r = torch.linalg.qr(rand(d, d, seed).double())
    return (q * torch.sign(torch.diagonal(r))).float()


@pytest.mark.parametrize("n, dx, dy", [(200, 16, 40), (30, 64, 100), (50, 50, 7)])
def test_both_forms_match_an_independent_implementation(n, dx, dy):
    x = rand(n, dx, 0)
    y = x[:, :min(dx, dy)].repeat(1, math.ceil(dy / dx))[:, :dy] * 0.5 + rand(n, dy, 1)  # related, not equal
    ref = reference_cka(x, y)
    assert 0.05 < ref < 0.99  # a non-trivial case
    assert cka_feature_space(x, y) == pytest.approx(ref, abs=1e-9)
    assert cka_gram(x, y) == pytest.approx(ref, abs=1e-9)
    assert linear_cka(x, y) == pytest.approx(ref, abs=1e-9)


@pytest.mark.parametrize("n, d", [(100, 20), (20, 100)])
def test_self_similarity_is_one(n, d):
    x = rand(n, d, 2)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cka_feature_space(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cka_gram(x, x) == pytest.approx(1.0, abs=1e-12)


def test_invariant_to_orthogonal_maps_and_isotropic_scaling_not_to_general_linear_maps():
    n, d = 300, 24
    x, y = rand(n, d, 3), rand(n, d, 4)
    y = y + 0.8 * x  # correlated with x
    base = linear_cka(x, y)
    q = orthogonal(d, 5)
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-6)
    assert linear_cka(x, y @ orthogonal(d, 6)) == pytest.approx(base, abs=1e-6)
    assert linear_cka(7.5 * x, 0.01 * y) == pytest.approx(base, abs=1e-9)
    assert linear_cka(x + 3.0, y - 1.0) == pytest.approx(base, abs=1e-6)  # centring: translations too
    # an invertible but anisotropic map (singular values 1 … 100) changes CKA
    s = torch.logspace(0, 2, d)
    a = orthogonal(d, 7) @ torch.diag(s) @ orthogonal(d, 8)
    assert torch.linalg.matrix_rank(a.double()) == d
    assert abs(linear_cka(x @ a, y) - base) > 0.05


def test_matrix_within_and_between_models():
    n = 64
    base = rand(n, 8, 9)
    feats = [base @ rand(8, 12, 10), rand(n, 32, 11), base @ rand(8, 100, 12)]  # the last is wider than N
    m = cka_matrix(feats)
    assert m.shape == (3, 3)
    assert torch.allclose(m, m.T)
    assert torch.allclose(torch.diagonal(m), torch.ones(3, dtype=torch.float64))
    for i in range(3):
        for j in range(3):
            assert m[i, j].item() == pytest.approx(reference_cka(feats[i], feats[j]), abs=1e-6)
    other = [feats[0] * 2.0, rand(n, 5, 13)]
    c = cka_matrix(feats, other)
    assert c.shape == (3, 2)
    assert c[0, 0].item() == pytest.approx(1.0, abs=1e-9)
    assert c[2, 1].item() == pytest.approx(reference_cka(feats[2], other[1]), abs=1e-6)


# ------------------------------------------------------------------------------------------------
# The command, on tiny random-weight checkpoints
# ------------------------------------------------------------------------------------------------


def make_checkpoint(folder, seed: int):
    from ddaepp_cli.build import build_backbone
    from ddaepp_cli.checkpoint import save_checkpoint
    from ddaepp_cli.recipe import load_recipe

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.yaml").write_text(TINY)
    recipe = load_recipe(folder / "tiny.yaml")
    torch.manual_seed(seed)
    model = build_backbone(recipe)
    return save_checkpoint(folder / "run", 1, recipe=recipe, model=model, ema=model, state={})


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("cka")
    return make_checkpoint(d / "a", 0), make_checkpoint(d / "b", 1)


def test_cka_command_one_model_and_two(two_checkpoints, tmp_path):
    from ddaepp_cli.eval.cka import cka_command

    a, b = two_checkpoints
    one = cka_command(str(a), layers="out_1-4", n=160, device="cpu")
    m = torch.tensor(one["matrix"], dtype=torch.float64)
    assert one["layers"] == ["out_1", "out_2", "out_3", "out_4"] and m.shape == (4, 4)
    assert torch.allclose(torch.diagonal(m), torch.ones(4, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(m, m.T) and bool((m > 0).all() and (m <= 1 + 1e-9).all())
    assert set(one["form"].values()) == {"feature space"}  # 64-128 channels < 160 images: no N × N matrix
    record = json.loads(open(one["eval_record"]).read())
    assert record["matrix"] == one["matrix"] and record["protocol"]["n"] == 160
    assert record["protocol"]["models"][0]["weights_sha256"]
    assert open(one["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    same = cka_command(str(a), str(a), layers="out_3,out_4", n=48, device="cpu", record=False,
                       plot=str(tmp_path / "same.png"))
    assert same["layerwise"] == pytest.approx({"out_3": 1.0, "out_4": 1.0}, abs=1e-9)  # same noise for both
    full = cka_command(str(a), str(b), layers="out_3,out_4", n=48, features="full", device="cpu", record=False,
                       plot=str(tmp_path / "ab.png"))
    assert set(full["form"].values()) == {"gram"}  # 64 × 8 × 8 values per image > 48 images
    assert all(0.0 < v < 0.999 for v in full["layerwise"].values())  # different weights, different features


def invoke(*args):
    """The CLI in-process (real exit codes and separate stdout/stderr, without a second torch import)."""
    from typer.testing import CliRunner

    from ddaepp_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cka_cli_json_and_bad_usage(two_checkpoints, tmp_path):
    a, _ = two_checkpoints
    r = invoke("cka", a, "--layers", "out_4,mid", "--n", 40, "--timestep", "21", "--json", "--plot", tmp_path / "c.png")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)  # exactly one JSON object on stdout
    assert out["layers"] == ["mid", "out_4"] and out["timestep"] == {"text": "21", "value": 21.0}
    assert (tmp_path / "c.png").is_file()
    for args, word in ((("--layers", "out_9"), "out_9"), (("--timestep", "1001"), "1..1000"),
                       (("--features", "maps"), "pooled"), (("--plot", tmp_path / "x.jpg"), ".png")):
        r = invoke("cka", a, *args)
        assert r.exit_code == 2, r.stderr
        assert r.stderr.strip().count("\n") == 0 and word in r.stderr  # one line naming the valid choices
