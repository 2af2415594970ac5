"""Every shipped recipe loads, builds and trains: two tiny steps on CPU each, shrunk with `--set`-style
overrides (test the registry, not a hand-picked case)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conformance import shrink_model
from ddaepp_cli.recipe import load_recipe
from ddaepp_cli.training.train import dry_run, train

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))

# What a shrunk run keeps from its recipe: formulation, self-conditioning, augmentation, contrastive
# learning and every option of theirs; what it changes: data, sizes, schedule and bookkeeping.
COMMON = ["data.dataset=digits", "data.image_size=8", "data.num_workers=0", "data.download=false",
          "train.global_batch=8", "train.batch_per_process=null", "train.precision=fp32",
          "train.compile=false", "train.warmup_epochs=0.05", "train.log_every=1", "train.checkpoint_every=1000",
          "train.milestones=[]", "train.sample_every=0"]


def shrink(path: Path) -> list[str]:
    rec = load_recipe(path)
    sets = list(COMMON)
    sets += shrink_model(rec)
    if rec.model.backbone in ("dit", "dit_orig"):  # classes stay (labels < 1000)
        sets.append("sample.steps=2")
    return sets


def test_there_is_a_recipe_for_every_paper_row():
    names = {p.stem for p in RECIPES}
    for ds in ("cifar10", "cifar100"):
        assert {f"{ds}_ddpm_uvit", f"{ds}_ddpm_uvit_sc"} <= names  # Table 2
        for stem in (f"{ds}_edm_ddpm", f"{ds}_edm_ddpmpp", f"{ds}_ddpm_uvit"):  # Table 3
            assert {f"{stem}_aug", f"{stem}_aug_cl", f"{stem}_sc_aug", f"{stem}_sc_aug_cl"} <= names
    ablations = {"cifar10_ddpm_ddpmpp_sc_addition", "cifar10_edm_ddpmpp_sc_addition", "cifar10_rf_ddpmpp_sc_addition",
                 "cifar100_edm_ddpm_sc_aug_cl_mocohead", "cifar100_edm_ddpm_sc_aug_cl_minnoise",
                 "cifar100_edm_ddpm_sc_aug_cl_gamma1e-1", "cifar100_edm_ddpm_sc_aug_cl_gamma1e-3",
                 "cifar100_ddpm_uvit_sc_aug_cl_pooled"}  # Table 6
    assert ablations <= names
    for name in ablations:
        assert load_recipe(RECIPES[0].parent / f"{name}.yaml").train.epochs == 1200  # Tab. 6: 1200 epochs
    for size, epochs in (("b", 400), ("l", 400)):  # Table 4: unconditional 400, class-conditional 100, XL 40
        assert load_recipe(RECIPES[0].parent / f"imagenet256_rf_dit{size}_sc.yaml").train.epochs == epochs
    for stem, epochs in (("ditb_cond", 100), ("ditl_cond", 100), ("ditxl_cond", 40)):
        for name in (f"imagenet256_rf_{stem}", f"imagenet256_rf_{stem}_sc"):
            assert load_recipe(RECIPES[0].parent / f"{name}.yaml").train.epochs == epochs
    for arch in ("sit", "dit"):  # SRA paper rows: the original networks, and the LightningDiT-block variants
        assert {f"imagenet256_sra_{arch}{s}" for s in ("b", "l", "xl")} <= names
        assert {f"imagenet256_sra_lightning_{arch}{s}" for s in ("b", "l", "xl")} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_builds_and_trains_two_steps(path, tmp_path):
    rec = load_recipe(path)
    header = path.read_text(encoding="utf-8").splitlines()
    assert header[0].startswith("# ") and any("Run:" in line for line in header if line.startswith("#"))
    if rec.data.dataset != "digits":
        assert dry_run(rec)["params"] > 0  # the full-size network builds (on the meta device)
    small = load_recipe(path, shrink(path))
    result = train(small, tmp_path / "run", max_steps=2)
    assert result["step"] == 2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and all(math.isfinite(r["loss"]) for r in lines)
    if rec.contrastive.enabled:
        assert all(r["loss_moco"] > 0 for r in lines)
    if rec.sra.enabled:
        assert all(r["loss_sra"] > 0 for r in lines)
