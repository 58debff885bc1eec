"""One slide of a cohort run: start it (lock, state `running`), execute the job, finish it (state, unlock).

`execute` runs in the driver or in a Dask worker and returns a plain, picklable result dict; only the driver
writes state files.
"""

from __future__ import annotations

import errno
import os
import socket
import time
import traceback
import warnings
from dataclasses import dataclass

from wsi_vssm import __version__
from wsi_vssm.errors import WARNING_LINE_LIMIT, WsiVssmError, one_line
from wsi_vssm.runs.state import (
    NO_SPACE,
    OutOfMemory,
    OutputFull,
    OutputNotWritable,
    SlideLock,
    Status,
    clear_temporaries,
    input_fingerprint,
    now,
    read_state,
    write_state,
)


@dataclass(frozen=True)
class SlideTask:
    name: str  # output key: OUT/<name>/ (predict) or OUT/<name>.zarr (extract)
    path: str | None  # the slide file (None when a cohort row names no file)
    error: str | None = None  # known to fail before running (e.g. slide file not found)
    mpp: float | None = None  # this slide's level-0 mpp from its manifest row (over the job's --mpp)


@dataclass
class Outcome:
    task: SlideTask
    status: str  # done | skipped | failed | locked
    message: str = ""  # the error line, or why the slide was skipped
    state: dict | None = None
    out_of_space: bool = False  # the output disk is full: the runner stops the run (`state.OutputFull`)

    @property
    def ok(self) -> bool:
        return self.status in ("done", "skipped")

    def record(self, job) -> dict:
        """The slide's `--json` line: name, status (`done`, `up_to_date`, `failed`, `in_progress` when another
        run holds it), its output paths (null unless done or up to date), its result and timings as its state
        records them (null where none), and the error or why it was not done."""
        state = self.state or {}
        status = {"skipped": "up_to_date", "locked": "in_progress"}.get(self.status, self.status)
        return {"slide": self.task.name, "status": status, "outputs": job.outputs(self.task.name) if self.ok else None,
                "result": state.get("result"), "timings": state.get("timings"),
                "error": None if self.ok else self.message}


def start_slide(task: SlideTask, job) -> tuple[SlideLock | None, Outcome | None, dict | None]:
    """Lock the slide, clear a killed run's temporaries and mark it running (recording what the slide file is:
    `input`, see `state.input_fingerprint`); or say why it cannot start."""
    lock = SlideLock(job.out, job.kind, task.name)
    try:
        killed = lock.path.exists()  # a lock left by a killed run (acquire breaks it), or one still held
        if not lock.acquire():
            return None, Outcome(task, "locked", lock.describe()), None
        # Only a killed run leaves temporaries (writers remove theirs on any exception), and it leaves its lock
        # or a `running` state: looking in OUT, h5_files/ and .state for every slide made a run quadratic.
        if killed or (read_state(job.out, job.kind, task.name) or {}).get("status") == Status.RUNNING:
            clear_temporaries(task.name, job)
        state = {"slide": task.name, "path": task.path, "abspath": abspath(task.path), "kind": job.kind,
                 "status": Status.RUNNING.value, "error": None, "error_type": None, "model_id": job.model_id,
                 "model_hash": job.model_hash, "params_hash": job.task_hash(task), "params": job.task_params(task),
                 "fallback_mpp": job.fallback_mpp,
                 "started": now(), "finished": None, "timings": {}, "host": socket.gethostname(),
                 "pid": os.getpid(), "version": __version__, "input": input_fingerprint(task.path)}
        write_state(job.out, job.kind, task.name, state)
    except (OSError, WsiVssmError) as e:
        lock.release()
        return None, Outcome(task, "failed", f"{task.name}: cannot start: {oserror_line(e)}",
                             out_of_space=_no_space(e)), None
    return lock, None, state


def finish_slide(task: SlideTask, job, lock: SlideLock, state: dict, res: dict) -> Outcome:
    """Write the final state from a worker's result dict and release the lock (only the driver writes states)."""
    state = {**state, "status": Status.DONE.value if res["ok"] else Status.FAILED.value, "error": res["error"],
             "error_type": res["error_type"], "finished": now(), "timings": res["timings"],
             "worker": res.get("worker"), "warnings": res["warnings"], "result": res["result"]}
    if res.get("traceback"):
        state["traceback"] = res["traceback"]
    try:
        write_state(job.out, job.kind, task.name, state)
    except (OSError, WsiVssmError) as e:
        return Outcome(task, "failed", f"{task.name}: cannot record its state: {oserror_line(e)}", state,
                       out_of_space=_no_space(e))
    finally:
        lock.release()
    return Outcome(task, "done" if res["ok"] else "failed", res["error"] or "", state,
                   out_of_space=res["error_type"] == OutputFull.__name__)


def _unexpected(e: BaseException, task: SlideTask) -> dict:
    return {"error": with_path(f"unexpected {type(e).__name__}: {one_line(e)} (a bug: please report it with the "
                               "output of --debug)", task),
            "error_type": type(e).__name__, "traceback": traceback.format_exc()}


def _out_of_memory_result(e: BaseException, task: SlideTask) -> dict:
    """The traceback is kept: an absurd allocation (a slide's bad metadata, a bug) reads the same way."""
    return {"error": with_path(f"out of memory ({type(e).__name__}: {one_line(e) or 'no details'}): free memory, "
                               "or lower --region-px or --reader-threads, then run the same command again", task),
            "error_type": OutOfMemory.__name__, "traceback": traceback.format_exc()}


def _out_of_memory(e: BaseException) -> bool:
    """A MemoryError; torch's RuntimeErrors for a refused allocation (its CPU allocator's "can't allocate memory",
    torch.OutOfMemoryError on a GPU); the thread a library could not start (CPython's RuntimeError when the
    system refuses one: memory or a process limit)."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and any(s in str(e) for s in ("can't allocate memory",
                                                                       "can't start new thread"))


def _about_output(e: OSError, job) -> bool:
    """Whether the failing path lies in the run's output folder (OUT/<slide>, OUT/h5_files/...)."""
    out = os.path.abspath(job.out)
    paths = [p for p in (e.filename, getattr(e, "filename2", None)) if isinstance(p, (str, bytes, os.PathLike))]
    return any(os.path.commonpath([out, os.path.abspath(os.fsdecode(p))]) == out for p in paths)


def _no_space(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in NO_SPACE


def execute(job, task: SlideTask, region_progress=None, run_regions=None) -> dict:
    """Run one slide (in the driver or a Dask worker) and return a plain, picklable result dict.

    `run_regions(plan)`, when given, computes the slide's region cells (on Dask, for a split slide)."""
    t0, started = time.perf_counter(), now()
    res = {"ok": False, "result": None, "error": None, "error_type": None, "warnings": [], "timings": {},
           "worker": {"host": socket.gethostname(), "pid": os.getpid(), "started": started}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = job.run(task, region_progress, run_regions)
            res.update(ok=True, result=result, timings=dict(result.pop("timings", {})))
        except WsiVssmError as e:
            res.update(error=with_path(one_line(e), task), error_type=type(e).__name__)
        except OSError as e:
            if e.errno == errno.ENOMEM:
                res.update(_out_of_memory_result(e, task))
            elif e.errno in NO_SPACE:  # the output disk, not the slide: the runner stops the run
                res.update(error=f"{task.name}: cannot write its outputs: {e.filename or job.out}: {e.strerror}",
                           error_type=OutputFull.__name__)
            elif _about_output(e, job):  # the output folder's fault (a file in the way, no permission): a plain
                # rerun tries the slide again once the folder is mended, as after a full disk
                res.update(error=f"{task.name}: cannot write its outputs: {oserror_line(e)}",
                           error_type=OutputNotWritable.__name__)
            else:  # permission, I/O error reading the slide: the slide fails, the run goes on
                res.update(error=with_path(oserror_line(e), task), error_type=type(e).__name__)
        except (MemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                res.update(_unexpected(e, task))
            else:  # the machine's limit, not a bug: said so, and tried again by a rerun
                res.update(_out_of_memory_result(e, task))
        except Exception as e:  # noqa: BLE001 -- the per-slide isolation boundary: a bug in one slide is recorded
            res.update(_unexpected(e, task))
    # once each: the slide is opened more than once (tissue, regions), and each open repeats its warnings
    res["warnings"] = list(dict.fromkeys(one_line(w.message, WARNING_LINE_LIMIT) for w in caught
                                         if _for_users(w.category)))  # the reasons after a long path: kept
    res["timings"]["total"] = time.perf_counter() - t0
    return res


def _for_users(category: type[Warning]) -> bool:
    """A warning about the slide or the run, not a library's deprecation notice for its developers (pyparsing's
    are UserWarning and DeprecationWarning at once: an old matplotlib printed them as the slide's warnings)."""
    return issubclass(category, UserWarning) and not issubclass(category, (DeprecationWarning,
                                                                          PendingDeprecationWarning))


def abspath(path: str | None) -> str | None:
    """The slide's absolute path, recorded so that a later run can tell another slide of the same name from
    this one (`runner.name_taken`)."""
    return None if path is None else os.path.abspath(path)


def with_path(text: str, task: SlideTask) -> str:
    where = task.path or task.name
    return text if (where in text or task.name in text) else f"{where}: {text}"


def oserror_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return one_line(e)
