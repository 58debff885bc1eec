"""Shared test set-up: few threads (2 CI cores), the real data beside the checkout when present."""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "2")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (developers' machines and CI); a user's clone does not have it.
SHARED_DATA = Path(os.environ.get("WSI_VSSM_SHARED_DATA", REPO.parent / "shared" / "data"))


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
    torch.set_num_threads(2)
    # Triton bundles its own LLVM; loading it after napari's OpenGL stack (Mesa's llvmpipe, also LLVM) segfaults
    # the process. torch imports triton lazily (e.g. when an optimizer is built), so load it first when present.
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401
    yield
