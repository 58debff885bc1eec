"""Fused kernels (installed as the package `wsi_vssm_kernels`): the selective scan for CPU (numba) and GPU
(Triton). Each has a plain PyTorch reference in `wsi_vssm.ops` that is its spec; `wsi_vssm.ops` dispatches here."""

from __future__ import annotations

import os
import stat
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
    beside = os.path.join(os.path.dirname(os.path.abspath(source_file)), "__pycache__")  # where numba writes
    if writable(beside) or writable(user):
        return None
    numba.config.CACHE_DIR = folder = _private_folder()  # numba reads it each time a cached function is created
    return folder


def _private_folder() -> str:
    """This user's cache folder in the temporary directory, kept between runs, when it is a real folder only this
    user can write (numba unpickles what it finds there: another user's planted files must not be read); else a
    fresh private one."""
    uid = getattr(os, "getuid", lambda: None)()
    folder = os.path.join(tempfile.gettempdir(), f"wsi-vssm-numba-cache-{uid if uid is not None else 'user'}")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.lstat(folder)
        private = stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o022 and (uid is None or st.st_uid == uid)
    except OSError:
        private = False
    return folder if private else tempfile.mkdtemp(prefix="wsi-vssm-numba-cache-")


def _writable(folder: str) -> bool:
    """Whether `folder` (or, when it does not exist yet, its nearest existing parent) takes new files."""
    while folder and not os.path.isdir(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            return False
        folder = parent
    return bool(folder) and os.access(folder, os.W_OK | os.X_OK)
