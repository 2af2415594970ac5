"""The conformance matrix (tests/conformance.py, docs/conformance.md): every shipped recipe belongs to a family with
a representative, and each family's tiny run answers every command at its defaults as the matrix expects (ok with a
finite result, or a one-line refusal with exit 2); one test per cell, known failures as strict xfails. The cells go
to <pytest base temp>/conformance/ (one JSON per cell, and matrix.md); `python tests/conformance.py --print --from
<that folder>` prints the table again.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

import conformance as C
from ddaepp_cli.recipe import load_recipe


def test_every_shipped_recipe_belongs_to_a_family_with_a_representative():
    families = C.recipe_families()
    assert len(families) == len(C.shipped_recipes()) > 0
    orphans = {stem: fam for stem, fam in families.items() if fam not in C.FAMILIES}
    assert not orphans, (f"recipes of a family the conformance matrix does not know: {orphans}; add the family to "
                         "tests/conformance.py FAMILIES with a representative and its expected answers")
    assert set(C.FAMILIES) == set(families.values()), "a family in FAMILIES has no shipped recipe left"
    for name, spec in C.FAMILIES.items():
        assert families.get(spec["representative"]) == name, (name, spec["representative"])
        assert set(spec["expected"]) == set(C.COMMANDS)
        for cell in spec["expected"].values():
            assert cell in (C.OK, C.REFUSED) or (cell[0] == "xfail" and cell[1]), cell


def test_the_family_comes_from_the_recipe_fields_not_the_file_name(tmp_path):
    base = C.RECIPES_DIR / "cifar10_edm_ddpm.yaml"
    assert C.family_of(load_recipe(base)).name == "ddpm/edm/uncond/none/pixel"
    renamed = tmp_path / "cifar10_edm_ddpm_sc.yaml"  # the name says sc; the fields decide
    renamed.write_text(base.read_text())
    assert C.family_of(load_recipe(renamed)).name == "ddpm/edm/uncond/none/pixel"
    assert C.family_of(load_recipe(base, ["model.selfcond.layer=out_9"])).name == "ddpm/edm/uncond/sc/pixel"
    cond = C.RECIPES_DIR / "imagenet256_rf_ditb_cond.yaml"
    assert C.family_of(load_recipe(cond)).name == "dit/rf/cfg/none/latent"
    assert C.family_of(load_recipe(cond, ["sample.cfg_scale=1.0"])).name == "dit/rf/class/none/latent"
    assert C.family_of(load_recipe(cond, ["data.latent_posterior=per_step"])).name == "dit/rf/cfg/none/latent-per-step"


def test_tiny_versions_keep_their_family(tmp_path):
    """The shrinking overrides change sizes and data only: the tiny run is on its family's code path."""
    shared = C.Shared(tmp_path, tmp_path / "cache", tmp_path / "images", tmp_path / "ref", tmp_path / "latents",
                      tmp_path / "moments", C.VAE["z"], tmp_path / "ade")
    for name, spec in C.FAMILIES.items():
        path = C.RECIPES_DIR / f"{spec['representative']}.yaml"
        full = load_recipe(path)
        tiny = load_recipe(path, C.tiny_overrides(full, shared))
        assert C.family_of(tiny).name == name
        for section in ("diffusion", "augment", "sample"):
            assert getattr(tiny, section) == getattr(full, section), (name, section)
        blocks = {"student_layer": "", "teacher_layer": ""}  # SRA's blocks move into the 4-block tiny network
        assert replace(tiny.sra, **blocks) == replace(full.sra, **blocks), name
        sizes = {"layer": None, "hidden": 0, "dim": 0}  # the contrasted tap and the heads' widths shrink
        assert replace(tiny.contrastive, **sizes) == replace(full.contrastive, **sizes), name
        assert getattr(tiny.model.selfcond, "mode", None) == getattr(full.model.selfcond, "mode", None), name
        assert getattr(tiny.model, "num_classes", 0) == getattr(full.model, "num_classes", 0), name


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    return C.build_shared(tmp_path_factory.mktemp("conformance-shared"))


@pytest.fixture(scope="session")
def matrix_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    return (base.parent if base.name.startswith("popen-gw") else base) / "conformance"  # shared by xdist workers


@pytest.fixture(scope="session")
def family_run(shared, tmp_path_factory):
    """One trained and resumed tiny run per family (per process), shared by the family's commands."""
    runs: dict[str, C.FamilyRun] = {}

    def get(name: str) -> C.FamilyRun:
        if name not in runs:
            runs[name] = C.FamilyRun(name, shared, tmp_path_factory.mktemp(name.replace("/", "_")))
        return runs[name]

    return get


def _cells():
    for name, spec in C.FAMILIES.items():
        for command in C.COMMANDS:
            want = spec["expected"][command]
            marks = [pytest.mark.xfail(strict=True, reason=want[1])] if isinstance(want, tuple) else []
            yield pytest.param(name, command, marks=marks, id=f"{name}:{command}")


@pytest.mark.parametrize("family,command", list(_cells()))
def test_matrix(family, command, family_run, matrix_dir):
    """One cell: the command on the family's tiny run answers as the matrix expects (ok: exit 0 and a finite
    --json result; refused: exit 2 with one line)."""
    cell = family_run(family).cell(command)
    C.write_cell(matrix_dir, family, command, cell, table=command == C.COMMANDS[-1])
    want = C.expected_answer(family, command)
    assert cell["answer"] == want, (f"{command} on {family} ({C.FAMILIES[family]['representative']}): expected "
                                    f"{want}, got {cell['answer']}: {cell['detail']}")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["ddpm/edm/uncond/none/pixel", "dit/rf/cfg/sc/latent"])
def test_fid_with_the_default_float64_extractor(family, shared, tmp_path):
    """The matrix runs Inception in float32 (float64 costs ~2 s per image on one core); here fid runs with no
    extractor option at all, on a pixel run and on a guided latent run."""
    cell = C.FamilyRun(family, shared, tmp_path, fid_extractor=()).cell("fid")
    assert cell["answer"] == C.OK, cell["detail"]
