"""Atomic writes: a file or directory appears complete under its final name, or not at all.

Every writer builds its output under a hidden temporary name in the same directory (so the final rename stays on
one file system and is atomic), flushes it to disk, and renames it into place. A failure part-way leaves the
previous version (if any) untouched and removes the temporary. Readers therefore never see half a file, and a
cohort run that is killed keeps every output it finished.
"""

from __future__ import annotations

import contextlib
import contextvars
import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from wsi_vssm.errors import UsageError

_WINDOWS = os.name == "nt"

_TMP_PREFIX = ".tmp-"  # hidden, and recognisable for clean-up after a crash
_TMP_NAME_BYTES = 200  # of the final name kept in a temporary's: with the prefix and suffixes, under 255 bytes


def short_name(name: str, limit: int) -> str:
    """`name` itself, or past `limit` bytes its first bytes, `~` and a hash of all of it (`limit` bytes in all):
    for file names built from a slide's name plus a prefix or suffix, so that a name near the file system's
    255-byte limit still fits, and two long names sharing their start stay apart."""
    raw = os.fsencode(name)
    if len(raw) <= limit:
        return name
    return f"{os.fsdecode(raw[:limit - 17])}~{hashlib.sha256(raw).hexdigest()[:16]}"


def _tmp_stem(name: str) -> str:
    """`name` as a temporary's name holds it (the temporary adds a prefix and a random suffix)."""
    return short_name(name, _TMP_NAME_BYTES)


def in_the_way(folder: str | os.PathLike) -> str | None:
    """What stands where `folder` should be ("a file", "a broken symbolic link"), or None."""
    if os.path.lexists(folder) and not os.path.isdir(folder):
        return "a file" if os.path.exists(folder) else "a broken symbolic link"
    return None


def prove_writable(folder: str | os.PathLike) -> None:
    """Create `folder` (and its parents) and write and remove a probe file in it; OSError when that fails."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".probe-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temporary file beside it, fsync, rename). Creates parent folders."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


FIGURE_DPI = 300  # the report figures (ROC, calibration, FROC, stages) at print resolution for a journal column
VECTOR_FORMATS = ("pdf", "svg")
# the vector copies every report figure also gets (`evaluate --vector`), for one run: set by `vector_copies`
_VECTOR_COPIES: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("wsi_vssm_vector", default=())
# no creation date and fixed SVG ids: a rerun writes the same bytes (a workflow manager's checksum holds)
_VECTOR_SAVE = {"pdf": {"metadata": {"CreationDate": None}}, "svg": {"metadata": {"Date": None}}}


@contextlib.contextmanager
def vector_copies(formats) -> Iterator[None]:
    """Within the block, `atomic_write_figure` also writes each figure as `<stem>.<format>` for each of `formats`
    (`VECTOR_FORMATS`), vector graphics a journal takes."""
    unknown = sorted(set(formats) - set(VECTOR_FORMATS))
    if unknown:
        raise UsageError(f"vector formats are {', '.join(VECTOR_FORMATS)}; got {', '.join(unknown)}")
    token = _VECTOR_COPIES.set(tuple(dict.fromkeys(formats)))
    try:
        yield
    finally:
        _VECTOR_COPIES.reset(token)


def vector_formats() -> tuple[str, ...]:
    """The vector formats report figures are being copied into now (`vector_copies`); () outside it."""
    return _VECTOR_COPIES.get()


def atomic_write_figure(path: str | os.PathLike, fig, dpi: float = FIGURE_DPI) -> None:
    """A matplotlib Figure as a PNG at `path`, `dpi` dots per inch, atomically (rendered in memory, then written in
    one go); within `vector_copies`, also as `path` with each vector format's suffix."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
    if not _VECTOR_COPIES.get():
        return
    from matplotlib import rc_context

    for fmt in _VECTOR_COPIES.get():
        buf = io.BytesIO()
        with rc_context({"svg.hashsalt": "wsi-vssm"}):
            fig.savefig(buf, format=fmt, **_VECTOR_SAVE[fmt])
        atomic_write_bytes(Path(path).with_suffix(f".{fmt}"), buf.getvalue())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary file beside `path` for a writer that wants a file name (h5py, torch.save); on
    exit it is fsynced and renamed to `path`, or removed if the block raised. Creates parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _naming(path):
        fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{_tmp_stem(path.name)}.", dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
            _replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    _fsync_dir(path.parent)


REPLACE_TRIES = 10  # 0.2 s apart


def _replace(tmp: str, path: Path) -> None:
    """os.replace. Windows refuses to replace a file another program holds open (a spreadsheet showing
    predictions.csv; `info OUT` reading it at that instant): tried for 2 s, then said so, naming the file."""
    for attempt in range(REPLACE_TRIES):
        try:
            os.replace(tmp, path)
            return
        except PermissionError as err:
            if not _WINDOWS:
                raise
            if attempt + 1 == REPLACE_TRIES:
                raise PermissionError(err.errno, "another program holds it open (a spreadsheet?): close it there "
                                                 f"and run again ({err.strerror})", str(path)) from None
            time.sleep(0.2)


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OSError about a temporary, or about no file (a write or fsync on the open temporary: a full disk said
    only "No space left on device"), names the file being written instead (the user never asked for
    `.tmp-m.log.csv.x3loa0dn`); errno, and so the exception's class, are kept."""
    try:
        yield
    except OSError as err:
        about_tmp = err.filename is not None and os.path.basename(os.fsdecode(err.filename)).startswith(_TMP_PREFIX)
        if not (about_tmp or (err.filename is None and err.errno is not None)):
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` as UTF-8 to `path` atomically. A file name that is not valid UTF-8 reaches Python with its
    stray bytes as lone surrogates, which UTF-8 cannot encode: they are written as `\\udcXX` escapes (readable in
    a CSV, and the same string again when JSON is read back) rather than failing the run."""
    atomic_write_bytes(path, text.encode("utf-8", "backslashreplace"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as JSON (insertion order, indent 2, trailing newline) atomically.

    NaN and infinities become `null` (strict JSON has no NaN); numpy scalars and arrays, tuples and paths are
    converted. Anything else that JSON cannot hold raises `UsageError` before the file is touched.
    """
    try:
        text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise UsageError(f"cannot write {os.fspath(path)} as JSON: {err}") from err
    atomic_write_text(path, text + "\n")


def to_jsonable(obj):
    """`obj` with NaN/inf -> None, numpy values -> Python values, tuples -> lists, paths -> strings."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy array or scalar, without importing numpy
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory (e.g. a zarr store) under a temporary name beside `path`; rename it into place on exit.

    Yields the temporary directory to fill. On success an existing `path` is first moved aside, the new one
    renamed in, and the old one deleted, so `path` is always either the old or the new complete directory
    (between the two renames it is briefly absent; a crash there leaves the old one under a `.tmp-` name).
    On error the temporary directory is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _naming(path):
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{_tmp_stem(path.name)}.", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; outputs are meant to be shared, as atomic_write_bytes's files
        yield tmp
        _fsync_tree(tmp)
        if path.is_dir() and not path.is_symlink():
            old = path.parent / f"{_TMP_PREFIX}{_tmp_stem(path.name)}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # put the previous version back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            if path.exists() or path.is_symlink():
                path.unlink()  # a stale file or link where the directory goes
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


# Windows flushes a file only through a handle that may write to it (on a read-only one: "Bad file descriptor")
_FSYNC_FLAGS = os.O_RDWR | getattr(os, "O_BINARY", 0) if _WINDOWS else os.O_RDONLY


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root`, so the rename never publishes unwritten data."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), _FSYNC_FLAGS)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    """Make a rename durable. Not every platform or file system lets a directory be opened or fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_rows(path: str | os.PathLike, rows: list[dict], columns: tuple[str, ...]) -> None:
    """A table (e.g. a per-epoch training log) as JSON when `path` ends in .json, else CSV; written atomically.

    CSV cells: booleans as 0/1, floats to 6 significant digits, NaN as empty.
    """
    if str(path).lower().endswith(".json"):
        atomic_write_json(path, [{c: r[c] for c in columns} for r in rows])
        return
    lines = [",".join(columns)] + [",".join(_csv_cell(r[c]) for c in columns) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _csv_cell(v) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def remove_temporaries(folder: str | os.PathLike, stem: str) -> None:
    """Remove `.tmp-<stem>*` leftovers of a killed run (this module's temporaries); the caller
makes sure no live writer is using them (the cohort runner holds the slide's lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    one_file = stem.endswith(".")  # `<name>.`: one file's temporaries, `<name>.` + a random part with no dot
    # a long stem names one file (`<name>.zarr.`): its temporaries carry that name's hashed stem
    key = stem if len(os.fsencode(stem)) <= _TMP_NAME_BYTES else f"{_tmp_stem(stem.rstrip('.'))}."
    start = len(_TMP_PREFIX) + len(key)
    for p in folder.glob(f"{_TMP_PREFIX}{glob.escape(key)}*"):
        if one_file and "." in p.name[start:]:
            continue  # another file's: `x.h5.` must spare `.tmp-x.h5.h5.*`, slide `x.h5`'s h5 file's
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
