"""pixi.toml (Pixi users) and pyproject.toml (pip, CI) must declare the same dependencies."""

import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent


def _split(req: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req)
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def _pixi_spec(v) -> str:
    return (v if isinstance(v, str) else v.get("version", "")).replace(" ", "")


def test_pixi_and_pyproject_agree():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    px = tomllib.loads((ROOT / "pixi.toml").read_text())
    deps = dict(_split(r) for r in py["project"]["dependencies"])
    pixi_deps = {k.lower(): _pixi_spec(v) for k, v in px["pypi-dependencies"].items() if k != "ddaepp"}
    assert pixi_deps == deps
    test = dict(_split(r) for r in py["project"]["optional-dependencies"]["test"])
    pixi_test = {k.lower(): _pixi_spec(v) for k, v in px["feature"]["test"]["pypi-dependencies"].items()}
    assert pixi_test == test
    # the package itself is installed editable from the checkout
    assert px["pypi-dependencies"]["ddaepp"] == {"path": ".", "editable": True}


def test_pixi_tasks_and_environments():
    px = tomllib.loads((ROOT / "pixi.toml").read_text())
    assert {"quickstart", "test", "train", "bench"} <= set(px["tasks"])
    assert {"default", "cuda"} <= set(px["environments"])
    # the tasks call things that exist
    assert (ROOT / "recipes" / "quickstart.yaml").is_file()
    assert (ROOT / px["tasks"]["bench"].split()[1]).is_file()
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert py["project"]["scripts"]["ddaepp"] == "ddaepp_cli.cli:main"


def test_torch_spec_excludes_the_local_cpu_wheel():
    # The local torch 2.13.0+cpu wheel breaks torchvision; never let pip pick it.
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_spec = dict(_split(r) for r in py["project"]["dependencies"])["torch"]
    assert "!=2.13.0" in torch_spec


def test_ci_installs_as_the_readme_says():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in readme and 'pip install -e ".[test]"' in ci
    assert "pytest -n 2" in readme and "pytest -n 2" in ci
    assert "import torchvision" in ci


def test_passing_tests_do_not_leave_run_folders_on_disk(pytestconfig):
    # The suite writes ~7 GB of run folders; a CI run once died of ENOSPC because earlier
    # sessions' folders were kept. A passing test's tmp_path must be deleted when it ends.
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
    assert int(pytestconfig.getini("tmp_path_retention_count")) <= 1
