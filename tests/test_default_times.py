"""Every default evaluation time is a valid time of the run's own formulation, for every shipped recipe
(issue 20, item 3): latent runs probe at DDAE++ Tab. 9's RF t = 0.25, converted to the same
noise-to-signal ratio σ/α under DDPM (the `imagenet256_sra_dit*` recipes and every DiT import) and EDM."""

from __future__ import annotations

import math

import pytest

from conftest import ROOT
from ddaepp_cli.build import build_formulation
from ddaepp_cli.eval import features as F
from ddaepp_cli.eval import segprobe as S
from ddaepp_cli.recipe import load_recipe

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def nsr(formulation, value: float) -> float:
    """σ/α of a parsed time (paper convention) in each formulation."""
    import torch

    if formulation.name == "rf":
        return value / (1 - value)
    if formulation.name == "edm":
        return value
    k = torch.tensor([int(round(value))])
    return float(formulation.sigma(k) / formulation.alpha(k))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_default_probe_and_cka_times_parse_under_the_recipe_formulation(path):
    recipe = load_recipe(path)
    form = build_formulation(recipe)
    t = form.parse_time(F.default_time(recipe, form))
    grid = [form.parse_time(x) for x in F.default_grid(recipe, form)]
    assert grid and all(math.isfinite(g) for g in grid)
    if recipe.data.dataset == "latents":
        # the same noise level as RF t = 0.25 (σ/α = 1/3), to the resolution of DDPM's 1000 steps
        assert nsr(form, t) == pytest.approx(1 / 3, rel=0.01)
        assert grid == [t]


@pytest.mark.parametrize("formulation_recipe", ["imagenet256_sra_ditb", "imagenet256_rf_ditb", "cifar10_edm_ddpm"])
def test_segprobe_and_probe_share_one_conversion(formulation_recipe):
    recipe = load_recipe(ROOT / "recipes" / f"{formulation_recipe}.yaml")
    form = build_formulation(recipe)
    for dataset, t in S.RF_TIME.items():
        assert S.default_time(form, dataset) == F.rf_time_in(form, t)
        assert nsr(form, form.parse_time(S.default_time(form, dataset))) == pytest.approx(t / (1 - t), rel=0.01)
