"""The scores an `evaluate` of a patch folder has made so far, kept in `OUT/.patch_scores.jsonl` so that an
interrupted run resumes where it stopped (a 300,000-patch folder is about 20 minutes on 2 cores).

Line 1 names the format and the hash of what changes a patch's logit (the weights, the patch calibration, the
model's and the patches' resolution, precision, test-time augmentation, the package version); each later line is
one patch: its name, the digest of its file's bytes, its logit and its size as given (so that a resumed run need
not decode a patch it holds a score of). Each batch's lines are appended and flushed
together (forced to disk at most every SYNC_S seconds: a fsync per batch could cost more than the batch on a
network mount), so a killed run loses at most the batch it was scoring; a line torn by the kill is cut off before the
next run appends, and a line that is not a name, a digest and a finite logit is skipped (that patch is scored
again). A score is reused only when both the name and the file's digest match (an image replaced under its name
is scored again); another hash starts the file anew, with a word on what changed. `--overwrite` starts it anew
too, and leaves `OUT/.patch_scores.overwrite` until its report is written, so that the same command after an
interrupt goes on rather than over. A run holds an exclusive lock on the file while it scores: a second run on
the same folder stops at once instead of mixing its lines in, and `info OUT` tells a run in progress from an
interrupted one (on Windows msvcrt's byte-range lock stands in for flock; on a file system with neither, the
run goes on unguarded, with a warning). The file sits beside metrics.json, not in `OUT/.state/`, which marks a
folder of slide runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import time
import warnings
from pathlib import Path

from wsi_vssm.atomic import atomic_write_json
from wsi_vssm.errors import WsiVssmError
from wsi_vssm.runs.state import OutputNotWritable, settings_change

try:
    import fcntl
except ImportError:  # Windows: no flock; msvcrt's byte-range lock stands in (`_windows_lock`)
    fcntl = None
try:
    import msvcrt
except ImportError:
    msvcrt = None

PATCH_SCORES = ".patch_scores.jsonl"
# Windows locks byte ranges, and a locked byte cannot be read by another process: the lock is taken on one byte
# far past the file's end, so that `info OUT` and a rerun still read the scores
WINDOWS_LOCK_BYTE = 1 << 40
OVERWRITE_MARKER = ".patch_scores.overwrite"  # an --overwrite run under way: its rerun goes on, not over
SYNC_S = 10.0  # scores are flushed per batch (a killed run keeps them) and forced to disk at most this often
SCORES_FORMAT = "wsi-vssm-patch-scores/1"


class PatchFolderBusy(WsiVssmError):
    """Another run is scoring a patch folder into the same output folder."""

    exit_code = 4  # as a cohort whose slides another run holds: not done, not failed; rerun when it ends


EVALUATE_LOCK = ".evaluate.lock"
PATCHES_BUSY = "another evaluate is scoring patches into this folder; wait for it to finish or give another --out"


class EvaluationBusy(WsiVssmError):
    """An evaluate of the other kind (slides, or a patch folder) is writing into the same output folder."""

    exit_code = 4  # not done, not failed: run it when the other has finished


@contextlib.contextmanager
def evaluation_lock(out: Path, patches: bool):
    """OUT/.evaluate.lock for the length of an evaluate: slide evaluations share it (several may work through one
    cohort together, each slide under its own lock), a patch evaluation holds it alone. A slide report and a
    patch report in one folder mixed (one's metrics.json beside the other's predictions.csv, each run saying it
    was done). Where the file system or platform has no flock, the run goes on unguarded (as the scores do)."""
    try:
        fd = os.open(out / EVALUATE_LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError:  # an OUT that cannot be written: the run says so itself
        yield
        return
    try:
        try:  # msvcrt has no shared lock: on Windows only the score file is locked
            held = _lock(fd, exclusive=patches) if fcntl is not None else None
        except OSError:  # no flock on this file system
            held = None
        if held is False:
            if patches and (kept_scores(out) or {}).get("in_progress"):  # a patch run: as PatchScores says
                raise PatchFolderBusy(f"{out}: {PATCHES_BUSY}")
            other = "slides" if patches else "a patch folder"
            raise EvaluationBusy(f"{out}: another evaluate, of {other}, is writing into this folder (the two "
                                 "reports would mix): wait for it to finish or give another --out")
        yield
    finally:
        os.close(fd)


class PatchScores:
    """The score file of one run, open and locked; `get` a kept logit, `add` a scored batch, `finished` once the
    report is written, then `close`. `dropped` says why an earlier run's scores were set aside (other settings)."""

    def __init__(self, out: str | os.PathLike, params_hash: str, params: dict, overwrite: bool = False):
        self.path, self._marker = Path(out) / PATCH_SCORES, Path(out) / OVERWRITE_MARKER
        try:  # not through a link: the file is truncated and rewritten in place
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            link = e.errno == errno.ELOOP
            raise OutputNotWritable(f"{self.path} {'is a symbolic link: remove it' if link else 'cannot be written'}"
                                    f"{'' if link else f' ({e.strerror or e})'}") from None
        self._file = os.fdopen(fd, "a+b")
        self._synced = time.monotonic()
        try:
            locked = _lock(self._file)
        except OSError as e:  # a file system without flock (some network mounts): scored, but unguarded
            locked = None
            warnings.warn(f"{self.path}: cannot be locked ({e.strerror or e}); a second run into this folder at the "
                          "same time would not be stopped", stacklevel=3)
        if locked is False:
            self._file.close()
            raise PatchFolderBusy(f"{Path(out)}: {PATCHES_BUSY}")
        # name -> (digest, logit, (h, w) as given or None: a line without it) from an earlier run
        self.earlier: dict[str, tuple[int, float, tuple[int, int] | None]] = {}
        self.dropped: str | None = None
        # an --overwrite run begun and interrupted: the same command goes on with what it scored since it began
        self.going_on = overwrite and _read_json(self._marker).get("params_hash") == params_hash
        start_over = overwrite and not self.going_on
        try:
            if start_over or not self._load(params_hash, params):
                self.earlier.clear()
                self._file.truncate(0)
                self._write([{"format": SCORES_FORMAT, "params_hash": params_hash, "params": params}])
            if start_over:
                atomic_write_json(self._marker, {"params_hash": params_hash})
        except OSError as e:  # an append-only or full file system: one line that names the file
            self._file.close()
            raise OutputNotWritable(f"{self.path} cannot be written ({e.strerror or e})") from None

    def _load(self, params_hash: str, params: dict) -> bool:
        """Read an earlier run's scores when they were made with `params_hash` (else say in `dropped` what
        differed); cut a torn last line off; skip lines that are not a name, a digest and a finite logit."""
        self._file.seek(0)
        raw = self._file.read()
        if not raw:
            return False
        end = raw.rfind(b"\n") + 1
        if end < len(raw):  # the kill came mid-line: what follows the last whole line goes
            self._file.truncate(end)
        lines = raw[:end].splitlines()
        header = _json(lines[0]) if lines else None
        if not isinstance(header, dict) or header.get("format") != SCORES_FORMAT:
            return False
        if header.get("params_hash") != params_hash:
            self.dropped = _what_changed(header.get("params"), params, len(lines) - 1)
            return False
        for line in lines[1:]:
            entry = _json(line)
            if not isinstance(entry, dict):
                continue
            name, digest, logit = entry.get("name"), entry.get("digest"), entry.get("logit")
            # a damaged (or edited) line costs that patch a new score: an inf or NaN was taken as a score
            if isinstance(name, str) and _number(digest, int) and _number(logit, (int, float)) and \
                    math.isfinite(logit):
                self.earlier[name] = (digest, float(logit), _size(entry.get("size")))
        return True

    def kept(self, name: str, digest: int) -> tuple[float, tuple[int, int] | None] | None:
        """(logit, (h, w) as given or None) an earlier run recorded for this very file, or None."""
        earlier = self.earlier.get(name)
        return earlier[1:] if earlier is not None and earlier[0] == digest else None

    def add(self, scored: list[tuple]) -> None:
        """Keep a batch's (name, digest, logit[, (h, w) as given]), on disk before the next batch is scored."""
        self._write([{"name": n, "digest": d, "logit": z, **({"size": list(size[0])} if size else {})}
                     for n, d, z, *size in scored])

    def finished(self) -> None:
        """The run's report is written: a later --overwrite starts over again."""
        with contextlib.suppress(FileNotFoundError):
            self._marker.unlink()

    def _write(self, entries: list[dict]) -> None:
        self._file.seek(0, os.SEEK_END)
        self._file.write("".join(json.dumps(e) + "\n" for e in entries).encode("utf-8"))
        self._file.flush()  # in the kernel: a killed run keeps it; on disk within SYNC_S, for a machine that fails
        if time.monotonic() - self._synced > SYNC_S:
            os.fsync(self._file.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.fsync(self._file.fileno())
        if fcntl is None and msvcrt is not None:  # Windows frees a closed file's locks in its own time: now
            with contextlib.suppress(OSError, ValueError):
                _windows_lock(self._file, msvcrt.LK_UNLCK)
        with contextlib.suppress(OSError):
            self._file.close()  # closing releases the lock

    def __enter__(self) -> PatchScores:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def kept_scores(out: str | os.PathLike) -> dict | None:
    """What an output folder's score file holds, for `info OUT`: {scores (lines), params (what they were made
    with), in_progress (a run holds it now)}, or None when there is none."""
    try:
        with open(Path(out) / PATCH_SCORES, "rb") as f:
            first = f.readline()
            scores = sum(line.endswith(b"\n") for line in f)  # counted as read: 300,000 lines are ~25 MB
            try:
                _flock(f, exclusive=False)
                busy = False
            except BlockingIOError:
                busy = True
            except OSError:  # no flock on this file system: whether a run is at work is not known
                busy = False
    except OSError:
        return None
    header = _json(first) if first.endswith(b"\n") else None
    params = header.get("params") if isinstance(header, dict) else None
    return {"scores": scores, "params": params if isinstance(params, dict) else {}, "in_progress": busy}


def _lock(file, tries: int = 20, exclusive: bool = True) -> bool:
    """The score file (or the evaluate lock, a descriptor) locked for this run; False when another run holds it
    (OSError when the file system has no flock). `info OUT` takes a shared lock for an instant to see whether a
    run is at work: a run starting then tries again for up to a second."""
    for i in range(tries):
        try:
            _flock(file, exclusive=exclusive)
            return True
        except BlockingIOError:
            if i + 1 < tries:
                time.sleep(0.05)
    return False


def _flock(file, exclusive: bool) -> None:
    """A non-blocking flock (BlockingIOError when another holds it); OSError where the platform or the file
    system has none. Windows has no shared lock: a look (`exclusive` False) takes the exclusive one and gives it
    back at once."""
    if fcntl is not None:
        fcntl.flock(file, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    elif msvcrt is not None:
        _windows_lock(file, msvcrt.LK_NBLCK)
        if not exclusive:
            _windows_lock(file, msvcrt.LK_UNLCK)
    else:
        raise OSError(errno.ENOSYS, "file locks are not available on this platform")


def _windows_lock(file, mode: int) -> None:
    """msvcrt.locking on WINDOWS_LOCK_BYTE (it locks from the file's position, which is put back after)."""
    where = file.tell()
    file.seek(WINDOWS_LOCK_BYTE)
    try:
        msvcrt.locking(file.fileno(), mode, 1)
    except OSError as e:
        if mode == msvcrt.LK_NBLCK and e.errno in (errno.EACCES, errno.EDEADLOCK):  # another process holds it
            raise BlockingIOError(errno.EAGAIN, "the file is locked by another process") from None
        raise
    finally:
        file.seek(where)


def _what_changed(old, new: dict, n: int) -> str:
    """`N scores were made with other settings (tta False -> True)`: why they are not reused."""
    shown = settings_change(old, new, most=len(new))
    return f"its {n} score(s) were made with other settings ({shown or 'an older format'}): every patch is scored again"


def _json(line: bytes):
    try:
        return json.loads(line)
    except ValueError:
        return None


def _read_json(path: Path) -> dict:
    try:
        value = _json(path.read_bytes())
    except OSError:
        return {}
    return value if isinstance(value, dict) else {}


def _size(value) -> tuple[int, int] | None:
    """A line's `size` [h, w] as a tuple of two positive ints; None for anything else (a line of an older run)."""
    if isinstance(value, list) and len(value) == 2 and all(_number(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    return None


def _number(value, kinds) -> bool:
    return isinstance(value, kinds) and not isinstance(value, bool)
