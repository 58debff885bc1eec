"""Fused kernels (installed as the package `wsi_vssm_kernels`): the selective scan for CPU (numba) and GPU
(Triton). Each has a plain PyTorch reference in `wsi_vssm.ops` that is its spec; `wsi_vssm.ops` dispatches here."""

from __future__ import annotations

import os
import tempfile


def use_writable_numba_cache(source_file: str, writable=None) -> str | None:
    """Point numba's on-disk cache at a private temporary folder when neither the kernel source's folder (numba's
    first choice: a read-only install) nor the user cache folder ($XDG_CACHE_HOME or ~/.cache: a read-only or
    missing home, as in locked-down containers) can be written; otherwise `cache=True` raises "no locator
    available" at import. Returns the folder chosen, or None when numba's own choice works. Call it before
    any `njit(cache=True)` runs. `writable` (a path -> bool test) is for tests."""
    import numba

    if os.environ.get("NUMBA_CACHE_DIR") or numba.config.CACHE_DIR:
        return None  # the user chose a folder
    writable = writable or _writable
    user = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if writable(os.path.dirname(os.path.abspath(source_file))) or writable(user):
        return None
    folder = os.path.join(tempfile.gettempdir(), f"wsi-vssm-numba-cache-{os.getuid()}")
    numba.config.CACHE_DIR = folder  # numba reads it each time a cached function is created
    return folder


def _writable(folder: str) -> bool:
    """Whether `folder` (or, when it does not exist yet, its nearest existing parent) takes new files."""
    while folder and not os.path.isdir(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            return False
        folder = parent
    return bool(folder) and os.access(folder, os.W_OK | os.X_OK)
