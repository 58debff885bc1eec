"""Per-slide state and locks of a cohort run, in `OUT/.state/`.

State file `OUT/.state/<slide>.<job>.json` (job: `predict`, shared by predict and evaluate, or `extract`),
written atomically: pending -> running -> done | failed, with the error text and type, timings, model id and
hash, the parameter hash, start/finish times, host and pid, and `input`: what the slide file was when it ran
(`input_fingerprint`: size, mtime and a sha256 of its first and last MiB; of its metadata files for a folder
slide such as OME-Zarr), so a slide replaced under the same name is redone (`input_changed`).

A lock file per slide (`OUT/.state/<slide>.<job>.lock`, created with O_CREAT|O_EXCL, holding pid, host and
time) keeps two runs on the same folder off each other's slides. A lock whose process is gone (same host) is
broken safely; a live one makes the other run skip the slide as "locked by another run".
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import time
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path

from wsi_vssm.atomic import atomic_write_json, in_the_way, prove_writable, remove_temporaries, short_name
from wsi_vssm.errors import MissingDependency, WsiVssmError

STATE_FORMAT = "wsi-vssm-state/1"
STATE_DIR = ".state"
FINGERPRINT_BYTES = 1 << 20  # the fingerprint hashes this much from each end of a slide file
ZARR_METADATA = (".zattrs", ".zgroup", ".zarray", ".zmetadata", "zarr.json")  # a folder slide's fingerprint
BREAK_STALE_AFTER_S = 60.0  # a lock-breaking marker older than this was left by a killed run
_TOKEN = os.urandom(8).hex()  # this process's mark in its locks: tells its own locks from a dead run's reused pid


class Status(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class OutputNotWritable(WsiVssmError):
    """The output folder cannot be written (read-only, missing permission, not a folder)."""


class OutputFull(WsiVssmError):
    """The disk (or quota) of the output folder is full: no later slide could be written, so the run stops. The
    slide it stopped on is recorded as failed with this type, and a rerun tries it again unasked."""


class OutOfMemory(WsiVssmError):
    """The machine refused memory (or a thread) while a slide ran: recorded as this slide's failure, in words
    that say so rather than "a bug"; the run goes on (a smaller slide may fit) and a rerun tries it again unasked."""


# failures of the machine, not of the slide: a rerun tries such a slide again without --retry-failed (a package
# installed after a run failed for want of it, say)
NOT_THE_SLIDES_FAULT = (OutputFull.__name__, OutOfMemory.__name__, OutputNotWritable.__name__,
                        MissingDependency.__name__)
KNOWN_FAILURE_NOTE = "[failed in an earlier run; --retry-failed tries again]"


def known_failure(state: dict, changed: bool) -> str | None:
    """The error a rerun reports again for a slide whose state (with this run's parameters) says it failed,
    when its file has not `changed` and the failure was the slide's own, not the machine's; else None. Without
    --retry-failed or --overwrite the runner does not try such a slide again, and an interrupted run's table
    shows it failed, not pending."""
    if state.get("status") != Status.FAILED or changed or state.get("error_type") in NOT_THE_SLIDES_FAULT:
        return None
    return f"{state.get('error')} {KNOWN_FAILURE_NOTE}"


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# where a done slide's resolution came from when a new --fallback-mpp changes it: the old fallback, or an
# objective-power estimate that a fallback replaces
FALLBACK_SOURCES = ("fallback", "objective-power")
# failures a new --fallback-mpp may cure: no resolution at all, or one far too coarse (20 typed for 0.20)
FALLBACK_FAILURES = ("MissingMpp", "TooCoarse")


def fallback_changed(state: dict, fallback_mpp: float | None, mpp_source: str | None = None) -> bool:
    """Whether a run's `--fallback-mpp` (not in the parameters' hash: most slides state their own resolution)
    is another than the one a slide last ran with, and would change it: a slide that failed for want of a
    resolution, once one is given, or was refused as far too coarse (TooCoarse: 20 typed for 0.20); a done
    slide read at another fallback, or at an objective-power estimate that the fallback replaces (`mpp_source`:
    the caller's, for states written before it was recorded). A run that gives no fallback keeps the slides done
    at one (it could only fail them). Such a slide is run again."""
    if fallback_mpp is None or state.get("fallback_mpp") == fallback_mpp:
        return False
    if state.get("status") == Status.FAILED:
        return state.get("error_type") in FALLBACK_FAILURES
    return ((state.get("result") or {}).get("mpp_source") or mpp_source) in FALLBACK_SOURCES


def settings_change(old, new: dict, most: int = 4) -> str:
    """What differs between the settings a result was made with (`old`, a state's or a score file's record) and
    this run's: `another model, version 0.1.0 -> 0.1.1`; '' when no recorded setting differs."""
    old = old if isinstance(old, dict) else {}
    said = ["another model" if k == "model_hash" else f"{k} changed" if isinstance(new[k], dict) else
            f"{k} {old.get(k, 'unrecorded')} -> {new[k]}" for k in new if old.get(k) != new[k]]
    return ", ".join(said[:most]) + (f" and {len(said) - most} more" if len(said) > most else "")


def params_hash(resolved: dict) -> str:
    """A short hash of everything that changes a slide's outputs (the caller decides what that is)."""
    text = json.dumps(resolved, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def state_path(out: str | os.PathLike, kind: str, name: str) -> Path:
    return Path(out) / STATE_DIR / f"{state_stem(name)}.{kind}.json"


def lock_path(out: str | os.PathLike, kind: str, name: str) -> Path:
    return Path(out) / STATE_DIR / f"{state_stem(name)}.{kind}.lock"


STATE_NAME_BYTES = 200  # a longer slide name is shortened in its state files' names (they add `.predict.lock`)


def state_stem(name: str) -> str:
    """The slide's name as its state and lock files carry it (`atomic.short_name`): a legal name near the file
    system's 255-byte limit would not fit with `.predict.json` after it."""
    return short_name(name, STATE_NAME_BYTES)


def read_state(out: str | os.PathLike, kind: str, name: str) -> dict | None:
    """The slide's state, or None when there is none or it cannot be read (then the slide is simply redone)."""
    try:
        state = json.loads(state_path(out, kind, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("format") == STATE_FORMAT else None


def write_state(out: str | os.PathLike, kind: str, name: str, state: dict) -> None:
    atomic_write_json(state_path(out, kind, name), {"format": STATE_FORMAT, **state})


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def input_fingerprint(path: str | os.PathLike | None) -> dict | None:
    """What a slide input is, cheaply: {size, mtime_ns, sha256}. For a file: sha256 of its size and its first
    and last `FINGERPRINT_BYTES`; for a folder (OME-Zarr): of the names, sizes and contents of its metadata files
    (root and one level down; chunks are never read). For a file of a DICOM series, also `series`: the name, size
    and a content hash of each of the series' other files, and `series_times`: their names, sizes and mtimes. None
    when the path cannot be read."""
    if path is None:
        return None
    p = Path(path)
    h = hashlib.sha256()
    try:
        if p.is_dir():
            size, mtime = 0, 0
            for f in _metadata_files(p):
                data, st = f.read_bytes(), f.stat()
                size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
                h.update(f"{f.relative_to(p).as_posix()}\0{len(data)}\0".encode())
                h.update(data)
        else:
            with open(p, "rb") as f:
                st = os.fstat(f.fileno())
                size, mtime = st.st_size, st.st_mtime_ns
                h.update(f"{size}\0".encode())
                h.update(f.read(FINGERPRINT_BYTES))
                if size > FINGERPRINT_BYTES:
                    f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
                    h.update(f.read(FINGERPRINT_BYTES))
    except OSError:
        return None
    out = {"size": size, "mtime_ns": mtime, "sha256": h.hexdigest()}
    others = _series_others(p)
    if others is None:
        return out
    from wsi_vssm.io.dicom import files_stamps, files_times

    times = files_times(others)  # before the contents: a file changed in between is then read again next time
    return {**out, "series": files_stamps(others), "series_times": times}


def _series_others(p: Path) -> list[Path] | None:
    """The other files of a DICOM series read through `p` (`io.dicom.series_others`), else None (at once for a
    name no DICOM file has)."""
    from wsi_vssm.io.dicom import series_others  # here: the io package loads numpy, and this module stays light

    return series_others(p)


def _series_same(recorded: dict, path: Path, same_mtime: bool) -> bool:
    """Whether the other files of the slide's DICOM series are as recorded: by name, size and mtime when the slide
    file's own mtime is unchanged too (nothing is read), else by their content stamps."""
    others = _series_others(path)
    if others is None:
        return recorded.get("series") is None
    from wsi_vssm.io.dicom import files_stamps, files_times

    times = recorded.get("series_times")
    if same_mtime and times is not None and times == files_times(others):
        return True
    return recorded.get("series") == files_stamps(others)


def _metadata_files(root: Path) -> list[Path]:
    found = [root / n for n in ZARR_METADATA if (root / n).is_file()]
    for child in sorted(root.iterdir()):  # the root's entries only: arrays, groups (a few), never chunk listings
        if child.is_dir() and not child.name.startswith("."):
            found += [child / n for n in ZARR_METADATA if (child / n).is_file()]
    return found


def input_changed(recorded: dict | None, path: str | os.PathLike | None) -> bool:
    """Whether the slide at `path` differs from the `recorded` fingerprint. The same size and mtime mean the
    same file (nothing is read); another mtime with the same size is settled by the content fingerprint, so a
    copy or `touch` does not redo a slide. Nothing recorded (a state from an older version) counts as changed."""
    if not isinstance(recorded, dict) or path is None:
        return True
    try:
        st = os.stat(path)
    except OSError:
        return True
    if Path(path).is_dir():
        now_fp = input_fingerprint(path)
        return now_fp is None or now_fp["sha256"] != recorded.get("sha256")
    if st.st_size != recorded.get("size"):
        return True
    same_mtime = st.st_mtime_ns == recorded.get("mtime_ns")
    if not _series_same(recorded, Path(path), same_mtime):  # a level or label of its DICOM series changed
        return True
    if same_mtime:
        return False
    now_fp = input_fingerprint(path)
    return now_fp is None or now_fp["sha256"] != recorded.get("sha256")


class SlideLock:
    """An O_CREAT|O_EXCL lock file per slide holding {pid, host, time}; stale ones (pid gone here) are broken."""

    def __init__(self, out: str | os.PathLike, kind: str, name: str):
        self.path = lock_path(out, kind, name)
        self.held = False
        self.holder: dict | None = None  # who holds it, when acquire() failed

    def acquire(self) -> bool:
        for _ in range(3):  # a lost race with another run breaking the same stale lock: look again
            if self._create():
                return True
            self.holder = _read_lock(self.path)
            if self.holder is None or not _is_stale(self.holder):
                return False
            self._break(self.holder)
        return False

    def _create(self) -> bool:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "time": now(), "token": _TOKEN}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
        except BaseException:  # Ctrl-C (a cohort run takes the report lock after every slide) or a full disk while
            with contextlib.suppress(OSError):  # writing: no orphan for every later report write to give up at
                self.path.unlink()
            raise
        self.held = True
        return True

    def _break(self, seen: dict) -> None:
        # Only one breaker at a time (its own O_EXCL marker), and only if the lock is still the stale one seen:
        # otherwise two runs could both delete, and one of them would delete the other's fresh lock.
        marker = self.path.with_suffix(".lock.break")
        with contextlib.suppress(FileNotFoundError):
            if time.time() - marker.stat().st_mtime > BREAK_STALE_AFTER_S:
                marker.unlink()
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return
        os.close(fd)
        try:
            if _read_lock(self.path) == seen:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        finally:
            marker.unlink()

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False

    def describe(self) -> str:
        return describe_holder(self.holder)


def live_lock(out: str | os.PathLike, kind: str, name: str) -> dict | None:
    """The holder of the slide's lock when a live run holds it (or one that cannot be checked from here: another
    host); None when the slide is not locked or its lock is stale (the next `acquire` breaks it)."""
    holder = _read_lock(lock_path(out, kind, name))
    if holder is None or _is_stale(holder):
        return None
    return holder


def describe_holder(holder: dict | None) -> str:
    h = holder or {}
    return f"locked by another run (pid {h.get('pid', '?')} on {h.get('host', '?')} since {h.get('time', '?')})"


def _read_lock(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # half-written by a run killed between create and write: stale if old enough. Its mtime, not its age:
        # breaking compares two reads, and an age grows between them (such a lock was never broken)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None
        return {"pid": None, "host": socket.gethostname(), "time": None, "mtime": mtime}
    return info if isinstance(info, dict) else {}


def _is_stale(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return False  # another machine: its pid means nothing here; see docs/cohorts.md
    pid = holder.get("pid")
    if pid is None:
        return time.time() - holder.get("mtime", time.time()) > BREAK_STALE_AFTER_S
    if not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return holder.get("token") != _TOKEN  # ours, or a killed run's whose pid this process got again
    return not _pid_alive(pid)


_WINDOWS = os.name == "nt"


def _pid_alive(pid: int) -> bool:
    """Whether a process of this host runs `pid`. POSIX: signal 0 tests it. Not on Windows, where os.kill(pid, 0)
    sends Ctrl+C to a console group or fails with "The parameter is incorrect": the process is asked there."""
    if _WINDOWS:
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def _windows_pid_alive(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() == 5  # access denied: alive, another user's; else no such process
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def check_output_folder(out: str | os.PathLike) -> None:
    """Create OUT/.state (the folder of the per-slide state and lock files) and prove it can be written; one clear
    line (exit 1) otherwise."""
    d = Path(out) / STATE_DIR
    try:
        prove_writable(d)
    except OSError as e:
        what = in_the_way(d)
        if what:  # mkdir's "File exists" blamed OUT, which is a folder
            raise OutputNotWritable(f"{d} is {what}, not a folder: the run keeps each slide's state and lock in a "
                                    "folder of that name; move it away or use another --out") from e
        raise OutputNotWritable(f"{out}: cannot write to the output folder ({e.strerror or e})") from e


def clear_temporaries(name: str, job) -> None:
    job.clear_partial(name)
    remove_temporaries(Path(job.out) / STATE_DIR, f"{state_stem(name)}.{job.kind}.json.")
