"""What pip installs: one version, package data that exists, every imported library declared (a packaging review
found numcodecs imported but not declared, and a package-data entry naming a file that was never there)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import wsi_vssm

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# import name -> the requirement that brings it (when the names differ or it arrives with another package)
PROVIDED_BY = {"PIL": "pillow", "openslide": "openslide-python", "distributed": "dask", "llvmlite": "numba",
               "mamba_ssm": "mamba-ssm", "qtpy": "napari", "superqt": "napari"}


def _requirement_names() -> set[str]:
    project = PYPROJECT["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower() for r in reqs}


def _third_party_imports() -> dict[str, str]:
    """Top-level third-party module -> a file importing it, over the package and its kernels."""
    found: dict[str, str] = {}
    for folder in ("wsi_vssm", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                         else [])
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and not top.startswith("wsi_vssm"):
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_one_version():
    assert PYPROJECT["project"]["version"] == wsi_vssm.__version__


def test_every_imported_library_is_declared():
    declared = _requirement_names()
    missing = {m: f for m, f in _third_party_imports().items()
               if PROVIDED_BY.get(m, m).lower().replace("_", "-") not in declared}
    assert not missing, f"imported but not in pyproject's dependencies or extras: {missing}"


def test_package_data_and_license_files_exist():
    for package, patterns in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        for pattern in patterns:
            assert list((ROOT / package).glob(pattern)), f"package-data {package}/{pattern} matches no file"
    for name in PYPROJECT["project"]["license-files"]:
        assert (ROOT / name).is_file(), name
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")[:200]


def test_requires_python_is_what_the_code_needs():
    """The code imports tomllib (3.11) and depends on zarr 3 (3.11): ">=3.10" promised an install that failed."""
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py311"


def test_the_citation_file_names_the_package_version():
    """CITATION.cff says which version to cite: it must move with the package's."""
    from wsi_vssm import __version__

    root = Path(__file__).resolve().parents[1]
    lines = (root / "CITATION.cff").read_text(encoding="utf-8").splitlines()
    assert f"version: {__version__}" in lines
    assert "cff-version: 1.2.0" in lines and any(ln.startswith("title: ") for ln in lines)
