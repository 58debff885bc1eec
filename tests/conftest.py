"""Shared test set-up: few threads (2 CI cores), the real data beside the checkout when present."""

from __future__ import annotations

import os
import sys

# one thread per pytest-xdist worker (`-n 2` on 2 cores: two workers of two threads each fight over the cores)
_THREADS = "1" if os.environ.get("PYTEST_XDIST_WORKER") else None
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    if _THREADS:
        os.environ[_var] = _THREADS
    else:
        os.environ.setdefault(_var, "2")
if "numba" in sys.modules:
    # A pytest plugin imported numba before this file, so numba has read its pool size: a NUMBA_NUM_THREADS that
    # differs makes its next compile raise once the pool runs. The kernels use min(it, torch's threads) anyway.
    os.environ["NUMBA_NUM_THREADS"] = str(sys.modules["numba"].config.NUMBA_NUM_THREADS)
else:
    os.environ.setdefault("NUMBA_NUM_THREADS", "2")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (developers' machines and CI); a user's clone does not have it.
SHARED_DATA = Path(os.environ.get("WSI_VSSM_SHARED_DATA", REPO.parent / "shared" / "data"))


def load_bench(name: str):
    """The script bench/NAME.py as a module (bench/ is not a package), for tests of a benchmark's pieces."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    path = list(sys.path)
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = path  # a bench script puts the checkout on sys.path to run alone: not for the later tests
    return mod


def shared_file(*parts: str) -> Path:
    """A file under ../shared/data, or a clean skip when it is not there."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not present: {p}")
    return p


@pytest.fixture(scope="session", autouse=True)
def _few_torch_threads():
    try:
        import torch
    except ImportError:
        yield
        return
    torch.set_num_threads(int(_THREADS or 2))
    # Triton bundles its own LLVM; loading it after napari's OpenGL stack (Mesa's llvmpipe, also LLVM) segfaults
    # the process. torch imports triton lazily (e.g. when an optimizer is built), so load it first when present.
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401
    yield


@pytest.fixture(scope="session")
def model_file(tmp_path_factory) -> Path:
    """A tiny random micro model file, shared by the pipeline, runner and CLI tests (read-only)."""
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.pt", purpose="test")


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """A synthetic CAMELYON16-style cohort of 3 small slides (normal_001, tumor_001, normal_002) with its
    reference.csv and annotations; shared read-only by the pipeline and runner tests."""
    from wsi_vssm.synth import make_cohort

    out = tmp_path_factory.mktemp("cohort")
    make_cohort(out, 3, seed=1, size=1024, mpp=2.0, workers=1)
    return out


def run_cli_captured(args, capsys) -> tuple[int, str, str]:
    """`wsi-vssm ARGS` in this process: (exit code, stdout, stderr)."""
    from wsi_vssm.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(args, capsys, code: int, *parts: str) -> tuple[str, str]:
    """`wsi-vssm ARGS` fails with exit `code` and exactly one stderr line, `wsi-vssm: error: ...`, holding each of
    `parts`, no traceback; returns (stdout, stderr) for further checks."""
    got, out, err = run_cli_captured(args, capsys)
    assert got == code, (args, out, err)
    assert err.count("\n") == 1 and err.startswith("wsi-vssm: error: ") and "Traceback" not in err, err
    for part in parts:
        assert part in err, (part, err)
    return out, err


def write_tiny_model(path: Path, **metadata) -> Path:
    """A seeded random micro SlideModel file (fast CPU scan), for pipeline tests that need any model."""
    import torch

    from wsi_vssm.models.slide_model import SlideModel, save_model

    torch.manual_seed(0)
    meta = {"slide_threshold": 0.5, "cell_threshold": 0.5, **metadata}
    save_model(SlideModel.create("micro", scan="cpu").eval(), path, metadata=meta)
    return path


def write_patch_folder(root: Path, n_per_class: int, seed: int, ext: str = ".jpg") -> None:
    """An ImageFolder of plain pink 96 px patches; class 1 has a dark (nuclei-like) 32 x 32 centre."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label in (0, 1):
        d = root / str(label)
        d.mkdir(parents=True)
        for i in range(n_per_class):
            a = (np.array([225, 170, 205]) + rng.integers(-25, 25, (96, 96, 3))).clip(0, 255).astype(np.uint8)
            if label:
                a[32:64, 32:64] = (a[32:64, 32:64] * 0.45).astype(np.uint8)
            Image.fromarray(a).save(d / f"p{i}{ext}")


def run_recipe_on_patches(tmp_path: Path, out: Path, recipe_text: str, n_train: int, n_valid: int):
    """`wsi-vssm run` of `recipe_text` into `out` (a model file may already wait there) on tiny patch folders
    written under `tmp_path` (train: `n_train` per class, seed 1; valid: `n_valid`, seed 2); click's result."""
    from click.testing import CliRunner

    from wsi_vssm.cli import cli

    write_patch_folder(tmp_path / "train", n_train, seed=1)
    write_patch_folder(tmp_path / "valid", n_valid, seed=2)
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text)
    return CliRunner().invoke(cli, ["run", str(recipe), "--out", str(out), "--set", f"data.train={tmp_path / 'train'}",
                                    "--set", f"data.valid={tmp_path / 'valid'}"])
