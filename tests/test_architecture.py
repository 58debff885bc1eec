"""The package's walls, checked from the source with ast (docs/architecture.md says why each exists).

Every `import` counts, at module level or inside a function: a lazy import still couples two modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wsi_vssm"
UTILITIES = {"wsi_vssm.errors", "wsi_vssm.atomic", "wsi_vssm.progress", "wsi_vssm.resources"}
ROOT_LIMIT = 8  # modules at the package root, compatibility modules included
MAX_LINES = 500


def _ours(module: str) -> bool:
    return module == "wsi_vssm" or module.startswith("wsi_vssm.")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import in module `name`, relative ones resolved."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, None) if sub in MODULES else (base, a.name))
    return out


def _internal_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _ in _imports(m):
            if target in MODULES and target != m:
                edges[m].add(target)
    return edges


def _is_own_child(parent: str, child: str) -> bool:
    return MODULES[parent].name == "__init__.py" and child.startswith(parent + ".")


def test_io_imports_only_itself_and_utilities():
    bad = [
        f"{m} imports {t}"
        for m in MODULES
        if m.startswith("wsi_vssm.io")
        for t, _ in _imports(m)
        if _ours(t) and not (t.startswith("wsi_vssm.io") or t in UTILITIES)
    ]
    assert not bad, bad


def test_models_and_ops_import_only_each_other_and_utilities():
    allowed = ("wsi_vssm.models", "wsi_vssm.ops")
    bad = [
        f"{m} imports {t}"
        for m in MODULES
        if m.startswith(allowed)
        for t, _ in _imports(m)
        if _ours(t) and not (t.startswith(allowed) or t in UTILITIES)
    ]
    assert not bad, bad


def test_only_the_entry_point_imports_the_cli():
    entry = {"wsi_vssm.__main__", "wsi_vssm.cli"}
    bad = [
        f"{m} imports {t}"
        for m in MODULES
        if m not in entry and not m.startswith("wsi_vssm.commands")
        for t, _ in _imports(m)
        if t == "wsi_vssm.cli" or t.startswith("wsi_vssm.commands")
    ]
    assert not bad, bad


def test_no_private_name_crosses_a_folder():
    """`from X import _name` (or a `_module`) only from a module in the same folder; root modules count as
    separate folders."""
    bad = []
    for m in MODULES:
        here = MODULES[m].parent
        for target, name in _imports(m):
            if not _ours(target):
                continue
            private = (name or "").startswith("_") or target.rpartition(".")[2].startswith("_")
            if not private or name == "__version__":
                continue
            tpath = MODULES.get(target)
            same_folder = tpath is not None and tpath.parent == here and here != PACKAGE
            if not same_folder:
                bad.append(f"{m} imports {target}.{name or ''}")
    assert not bad, bad


def test_no_import_cycles():
    edges = _internal_edges()
    for parent in MODULES:  # a package __init__ importing its own children is exempt
        edges[parent] = {c for c in edges[parent] if not _is_own_child(parent, c)}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_napari_plugin_uses_only_public_names_of_the_package():
    bad = [
        f"{m} imports {t}.{n}"
        for m in MODULES
        if m.startswith("wsi_vssm.napari_plugin")
        for t, n in _imports(m)
        if _ours(t) and not t.startswith("wsi_vssm.napari_plugin") and (n or "").startswith("_")
    ]
    assert not bad, bad


def test_at_most_eight_modules_at_the_package_root():
    root = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(root) <= ROOT_LIMIT, root


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_has_at_most_500_lines(path):
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{path.name}: {n} lines"


def test_the_checks_see_the_imports_they_guard():
    """The walls above are only as good as the import graph: check it finds known edges, including imports
    inside functions, so a parser mistake cannot make every wall pass vacuously."""
    edges = _internal_edges()
    assert "wsi_vssm.io.base" in edges["wsi_vssm.io.backends.tiff_backend"]
    assert "wsi_vssm.pipeline.predict" in edges["wsi_vssm.runs.jobs"]  # a function-level import
    assert any(t == "wsi_vssm.errors" for t, _ in _imports("wsi_vssm.io.base"))


def test_old_readme_import_path_still_works_with_a_deprecation_warning():
    import importlib
    import sys

    from wsi_vssm.pipeline.predict import predict_slide

    sys.modules.pop("wsi_vssm.predict", None)
    with pytest.warns(DeprecationWarning, match="wsi_vssm.pipeline.predict"):
        old = importlib.import_module("wsi_vssm.predict")
    assert old.predict_slide is predict_slide


def test_test_files_have_unique_basenames():
    """Test folders have no __init__.py (tests import `conftest` helpers by name), so two test files with one
    basename would shadow each other at collection."""
    names = [p.name for p in (PACKAGE.parent / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})


def test_the_entry_points_are_at_the_top_level_and_importing_the_package_stays_light():
    import subprocess
    import sys

    code = ("import sys, wsi_vssm\nlight = 'numpy' not in sys.modules\n"
            "from wsi_vssm.pipeline.predict import predict_slide\nfrom wsi_vssm.io import open_slide\n"
            "assert wsi_vssm.predict_slide is predict_slide and wsi_vssm.open_slide is open_slide\n"
            "assert all(getattr(wsi_vssm, n) is not None for n in wsi_vssm.__all__)\n"
            # every name README's Python API block imports (its line says they are at the top level too)
            "assert {'open_slide', 'create_model', 'load_model', 'predict_slide'} <= set(wsi_vssm.__all__)\n"
            "assert set(wsi_vssm.__all__) <= set(dir(wsi_vssm))\nprint('light', light)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "light True", proc.stdout + proc.stderr
    import wsi_vssm

    with pytest.raises(AttributeError, match="no attribute 'nonesuch'"):
        wsi_vssm.nonesuch  # noqa: B018
