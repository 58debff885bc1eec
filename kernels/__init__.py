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


def _private_folder(name: str = "numba-cache") -> str:
    """This user's cache folder `wsi-vssm-<name>-<uid>` in the temporary directory, kept between runs, when it is a
    real folder only this user can write (numba unpickles what it finds there, matplotlib reads its font list:
    another user's planted files must not be read); else a fresh private one."""
    uid = getattr(os, "getuid", lambda: None)()
    folder = os.path.join(tempfile.gettempdir(), f"wsi-vssm-{name}-{uid if uid is not None else 'user'}")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.lstat(folder)
        private = stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o022 and (uid is None or st.st_uid == uid)
    except OSError:
        private = False
    return folder if private else tempfile.mkdtemp(prefix=f"wsi-vssm-{name}-")


def use_writable_matplotlib_config(writable=None) -> str | None:
    """Point matplotlib at a private folder in the temporary directory (`MPLCONFIGDIR`, kept between runs) when its
    own config or cache folder ($XDG_CONFIG_HOME / $XDG_CACHE_HOME or ~/.config, ~/.cache) cannot be written, as
    under a read-only home; otherwise matplotlib makes a new temporary folder each run, rebuilds its font list
    there and prints a two-line note. Call before matplotlib is imported. Returns the folder set, or None.
    `writable` (a path -> bool test) is for tests."""
    import sys

    if os.environ.get("MPLCONFIGDIR") or not sys.platform.startswith("linux"):
        return None  # the user chose a folder; elsewhere matplotlib's folders are not the XDG ones checked here
    writable = writable or _writable
    home = os.path.expanduser("~")
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    if writable(os.path.join(config, "matplotlib")) and writable(os.path.join(cache, "matplotlib")):
        return None
    os.environ["MPLCONFIGDIR"] = folder = _private_folder("matplotlib")
    return folder


def _writable(folder: str) -> bool:
    """Whether `folder` (or, when it does not exist yet, its nearest existing parent) takes new files. A path
    through a file (a HOME that is no folder) takes none."""
    while folder and not os.path.lexists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            return False
        folder = parent
    return bool(folder) and os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)
