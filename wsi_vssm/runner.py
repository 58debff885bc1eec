"""Cohort runner: the one loop over slides for `extract`, `predict` and `evaluate`.

Per slide it keeps a state file, `OUT/.state/<slide>.<job>.json` (job: `predict`, shared by predict and
evaluate, or `extract`), written atomically:

    pending -> running -> done | failed

with the error text and type, timings, model id and hash, the parameter hash, start/finish times, host and pid.
A rerun skips a slide whose state is `done` with the same parameter hash and whose outputs are still there; a
`failed` slide is retried only with `--retry-failed`. Anything else (no state, `running` left by a killed run,
another hash, outputs gone) is redone. Outputs are written atomically and `done` is written only after the
last of them, so a SIGKILL between any two writes leaves a state that the rerun redoes.

A lock file per slide (`OUT/.state/<slide>.<job>.lock`, created with O_CREAT|O_EXCL, holding pid, host and
time) keeps two runs on the same folder off each other's slides. A lock whose process is gone (same host) is
broken safely; a live one makes this run skip the slide as "locked by another run".

Execution is serial in this process, or on Dask distributed (`workers`: a LocalCluster of that many processes;
`scheduler`: an existing cluster). Workers receive the job (paths and parameters), never open handles; each
worker process loads the model once (cached by path). Only the driver writes state files.

A slide whose region grid has more than `split_regions` regions is split on Dask: the driver opens it, computes
its plan once (tissue mask, region grid, cell plan: `features.plan_slide`), sends batches of `split_regions`
regions to the workers as tasks (`features.extract_regions` on the slide's path), gathers the cells, and finishes
the slide itself (assembly, MIL, outputs, state) exactly as a per-slide task would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

from wsi_vssm import __version__
from wsi_vssm.errors import UsageError, WsiVssmError
from wsi_vssm.progress import Progress

STATE_FORMAT = "wsi-vssm-state/1"
STATE_DIR = ".state"
DEFAULT_SPLIT_REGIONS = 64  # Dask: a slide of more regions runs as tasks of this many regions (docs/cohorts.md)
BREAK_STALE_AFTER_S = 60.0  # a lock-breaking marker older than this was left by a killed run
_MODELS: dict = {}  # per process (driver or Dask worker): model cache, key -> loaded model
_THREADS_SET = False
_TOKEN = os.urandom(8).hex()  # this process's mark in its locks: tells its own locks from a dead run's reused pid


class Status(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class WorkerFailed(WsiVssmError):
    """A Dask worker running a split slide's regions died or was lost."""


class OutputNotWritable(WsiVssmError):
    """The output folder cannot be written (read-only, missing permission, not a folder)."""


@dataclass(frozen=True)
class SlideTask:
    name: str  # output key: OUT/<name>/ (predict) or OUT/<name>.zarr (extract)
    path: str | None  # the slide file (None when a cohort row names no file)
    error: str | None = None  # known to fail before running (e.g. slide file not found)


@dataclass
class RunOptions:
    workers: int | None = None  # Dask LocalCluster processes; None: serial in this process
    scheduler: str | None = None  # tcp://host:port of an existing Dask scheduler
    retry_failed: bool = False
    overwrite: bool = False  # redo slides that are done
    debug: bool = False  # print the traceback of unexpected per-slide errors
    split_regions: int = DEFAULT_SPLIT_REGIONS  # Dask only: a slide of more regions runs as region tasks (0: never)


@dataclass
class Outcome:
    task: SlideTask
    status: str  # done | skipped | failed | locked
    message: str = ""  # the error line, or why the slide was skipped
    state: dict | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("done", "skipped")


@dataclass
class RunSummary:
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, *statuses: str) -> int:
        return sum(o.status in statuses for o in self.outcomes)

    @property
    def n_not_done(self) -> int:
        return self.count("failed", "locked")


def slide_key(path: str | os.PathLike) -> str:
    """A slide's output name: `wsi_vssm.io.base.slide_name`, the rule `SlideReader.name` follows (outputs are
    written under that name)."""
    from wsi_vssm.io.base import slide_name  # imported here: the runner module stays free of numpy

    return slide_name(path)


def params_hash(resolved: dict) -> str:
    """A short hash of everything that changes a slide's outputs (the caller decides what that is)."""
    text = json.dumps(resolved, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- state files ---------------------------------------------------------------------------------------------
def state_path(out: str | os.PathLike, kind: str, name: str) -> Path:
    return Path(out) / STATE_DIR / f"{name}.{kind}.json"


def read_state(out: str | os.PathLike, kind: str, name: str) -> dict | None:
    """The slide's state, or None when there is none or it cannot be read (then the slide is simply redone)."""
    try:
        state = json.loads(state_path(out, kind, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("format") == STATE_FORMAT else None


def write_state(out: str | os.PathLike, kind: str, name: str, state: dict) -> None:
    from wsi_vssm.atomic import atomic_write_json

    atomic_write_json(state_path(out, kind, name), {"format": STATE_FORMAT, **state})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# ---- locks ---------------------------------------------------------------------------------------------------
class SlideLock:
    """An O_CREAT|O_EXCL lock file per slide holding {pid, host, time}; stale ones (pid gone here) are broken."""

    def __init__(self, out: str | os.PathLike, kind: str, name: str):
        self.path = Path(out) / STATE_DIR / f"{name}.{kind}.lock"
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
        info = {"pid": os.getpid(), "host": socket.gethostname(), "time": _now(), "token": _TOKEN}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
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
        h = self.holder or {}
        return f"locked by another run (pid {h.get('pid', '?')} on {h.get('host', '?')} since {h.get('time', '?')})"


def _read_lock(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # half-written by a run killed between create and write: stale if old enough
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return None
        return {"pid": None, "host": socket.gethostname(), "time": None, "age": age}
    return info if isinstance(info, dict) else {}


def _is_stale(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return False  # another machine: its pid means nothing here; see docs/cohorts.md
    pid = holder.get("pid")
    if pid is None:
        return holder.get("age", 0.0) > BREAK_STALE_AFTER_S
    if not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return holder.get("token") != _TOKEN  # ours, or a killed run's whose pid this process got again
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False


# ---- the run -------------------------------------------------------------------------------------------------
def check_output_folder(out: str | os.PathLike) -> None:
    """Create OUT/.state and prove it can be written; one clear line (exit 1) otherwise."""
    d = Path(out) / STATE_DIR
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputNotWritable(f"{out}: cannot write to the output folder ({e.strerror or e})") from e


def run_slides(tasks: Iterable[SlideTask], job, opts: RunOptions | None = None, progress: Progress | None = None,
               on_outcome: Callable[[Outcome], None] | None = None) -> RunSummary:
    """Run `job` over `tasks` with state, locks, skip/retry rules, serially or on Dask; never raises for a slide.

    `on_outcome(outcome)` is called in this process after each slide (done, skipped, failed or locked).
    """
    opts, progress = opts or RunOptions(), progress or Progress()
    tasks = list(tasks)
    check_output_folder(job.out)
    progress.detail(f"{job.kind}: model {job.model_id}, parameters {job.params_hash}, {len(tasks)} slide(s)")
    summary = RunSummary()

    def record(o: Outcome) -> None:
        summary.outcomes.append(o)
        _report(o, job, progress, opts.debug)
        if on_outcome is not None:
            on_outcome(o)

    with progress.bar(len(tasks), f"{job.kind} slides", unit="slide") as tick:
        def finish(o: Outcome) -> None:
            record(o)
            tick(len(summary.outcomes))

        todo = _triage(tasks, job, opts, finish)
        if todo and (opts.workers or opts.scheduler):
            _run_dask(todo, job, opts, progress, finish)
        else:
            for task in todo:
                _run_serial(task, job, progress, finish)
    order = {id(t): i for i, t in enumerate(tasks)}
    summary.outcomes.sort(key=lambda o: order.get(id(o.task), 0))
    return summary


def _triage(tasks: list[SlideTask], job, opts: RunOptions, finish) -> list[SlideTask]:
    """Slides that need running; the others (known failures, duplicates, done, failed before) are finished."""
    todo, seen = [], set()
    for task in tasks:
        if task.error is not None:
            finish(Outcome(task, "failed", task.error))
            continue
        if task.name in seen:
            finish(Outcome(task, "failed", f"{task.path}: another slide of this run has the name {task.name!r} "
                                           "(their outputs would collide); rename one"))
            continue
        seen.add(task.name)
        state = read_state(job.out, job.kind, task.name)
        same = state is not None and state.get("params_hash") == job.params_hash
        if same and not opts.overwrite and state.get("status") == Status.DONE and job.outputs_ok(task.name):
            _tidy_done(task, job)
            finish(Outcome(task, "skipped", "up to date", state))
        elif same and not (opts.overwrite or opts.retry_failed) and state.get("status") == Status.FAILED:
            finish(Outcome(task, "failed", f"{state.get('error')} [failed in an earlier run; --retry-failed "
                                           "tries again]", state))
        else:
            todo.append(task)
    return todo


def _tidy_done(task: SlideTask, job) -> None:
    """A run killed after writing `done` may leave its lock and temporaries: clear them if the lock is free."""
    lock = SlideLock(job.out, job.kind, task.name)
    try:
        if lock.acquire():
            _clear_temporaries(task.name, job)
    except OSError:
        pass  # a read-only leftover is harmless: the slide is done
    finally:
        lock.release()


def _clear_temporaries(name: str, job) -> None:
    job.clear_partial(name)
    remove_temporaries(Path(job.out) / STATE_DIR, f"{name}.{job.kind}.json.")


def _start(task: SlideTask, job) -> tuple[SlideLock | None, Outcome | None, dict | None]:
    """Lock the slide, clear a killed run's temporaries and mark it running; or say why it cannot start."""
    lock = SlideLock(job.out, job.kind, task.name)
    try:
        if not lock.acquire():
            return None, Outcome(task, "locked", lock.describe()), None
        _clear_temporaries(task.name, job)
        state = {"slide": task.name, "path": task.path, "kind": job.kind, "status": Status.RUNNING.value,
                 "error": None, "error_type": None, "model_id": job.model_id, "model_hash": job.model_hash,
                 "params_hash": job.params_hash, "params": job.params_dict(), "started": _now(), "finished": None,
                 "timings": {}, "host": socket.gethostname(), "pid": os.getpid(), "version": __version__}
        write_state(job.out, job.kind, task.name, state)
    except (OSError, WsiVssmError) as e:
        lock.release()
        return None, Outcome(task, "failed", f"{task.name}: cannot start: {_oserror_line(e)}"), None
    return lock, None, state


def _finish(task: SlideTask, job, lock: SlideLock, state: dict, res: dict) -> Outcome:
    """Write the final state from a worker's result dict and release the lock (only the driver writes states)."""
    state = {**state, "status": Status.DONE.value if res["ok"] else Status.FAILED.value, "error": res["error"],
             "error_type": res["error_type"], "finished": _now(), "timings": res["timings"],
             "worker": res.get("worker"), "warnings": res["warnings"], "result": res["result"]}
    if res.get("traceback"):
        state["traceback"] = res["traceback"]
    try:
        write_state(job.out, job.kind, task.name, state)
    except (OSError, WsiVssmError) as e:
        return Outcome(task, "failed", f"{task.name}: cannot record its state: {_oserror_line(e)}", state)
    finally:
        lock.release()
    return Outcome(task, "done" if res["ok"] else "failed", res["error"] or "", state)


def _run_serial(task: SlideTask, job, progress: Progress, finish) -> None:
    lock, refused, state = _start(task, job)
    if refused is not None:
        finish(refused)
        return
    try:
        with progress.regions(task.name) as cb:
            res = execute(job, task, cb)
    except BaseException:
        lock.release()  # Ctrl-C: the state stays "running", so the next run redoes the slide
        raise
    finish(_finish(task, job, lock, state, res))


def execute(job, task: SlideTask, region_progress=None, run_regions=None) -> dict:
    """Run one slide (in the driver or a Dask worker) and return a plain, picklable result dict.

    `run_regions(plan)`, when given, computes the slide's region cells (on Dask, for a split slide)."""
    t0, started = time.perf_counter(), _now()
    res = {"ok": False, "result": None, "error": None, "error_type": None, "warnings": [], "timings": {},
           "worker": {"host": socket.gethostname(), "pid": os.getpid(), "started": started}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = job.run(task, region_progress, run_regions)
            res.update(ok=True, result=result, timings=dict(result.pop("timings", {})))
        except WsiVssmError as e:
            res.update(error=_with_path(_one_line(e), task), error_type=type(e).__name__)
        except OSError as e:  # disk full, permission, I/O error: the slide fails, the run goes on
            res.update(error=_with_path(_oserror_line(e), task), error_type=type(e).__name__)
        except Exception as e:  # noqa: BLE001 -- the per-slide isolation boundary: a bug in one slide is recorded
            res.update(error=_with_path(f"unexpected {type(e).__name__}: {_one_line(e)} (a bug: please report it "
                                        "with the output of --debug)", task),
                       error_type=type(e).__name__, traceback=traceback.format_exc())
    res["warnings"] = [_one_line(w.message) for w in caught if issubclass(w.category, UserWarning)]
    res["timings"]["total"] = time.perf_counter() - t0
    return res


def _report(o: Outcome, job, progress: Progress, debug: bool) -> None:
    state = o.state or {}
    if o.status == "done":
        for w in state.get("warnings") or []:
            progress.warn(w)
        progress.result(job.describe(o.task.name, state.get("result") or {}, state.get("timings") or {}))
    elif o.status == "skipped":
        progress.result(f"{o.task.name}: up to date ({job.where(o.task.name)})")
    elif o.status == "locked":
        progress.warn(f"{o.task.name}: {o.message}; skipped")
    else:
        for w in state.get("warnings") or []:
            progress.warn(w)
        progress.error(o.message)
        if debug and state.get("traceback"):
            progress._write(state["traceback"].rstrip(), err=True)


def _with_path(text: str, task: SlideTask) -> str:
    where = task.path or task.name
    return text if (where in text or task.name in text) else f"{where}: {text}"


def _one_line(e) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) < 500 else text[:497] + "..."


def _oserror_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return _one_line(e)


# ---- Dask ----------------------------------------------------------------------------------------------------
def _run_dask(todo: list[SlideTask], job, opts: RunOptions, progress: Progress, finish) -> None:
    """One task per slide on a Dask cluster; a bounded window in flight, so locks are taken as work starts and
    two runs on one folder share the slides instead of one run locking them all up front."""
    from distributed import as_completed

    client, cluster = _client(opts, progress)
    try:
        window = 2 * max(1, len(client.scheduler_info().get("workers", {})) or (opts.workers or 1))
        pending = iter(todo)
        inflight: dict = {}
        done = as_completed()

        def submit_next() -> None:
            for task in pending:
                lock, refused, state = _start(task, job)
                if refused is not None:
                    finish(refused)
                    continue
                if _should_split(job, task, opts.split_regions):
                    _run_split(client, task, job, lock, state, opts.split_regions, progress, finish)
                    continue
                fut = client.submit(_dask_execute, job, task, pure=False, key=f"{job.kind}-{task.name}-{id(task)}")
                inflight[fut.key] = (task, lock, state)
                done.add(fut)
                return

        for _ in range(window):
            submit_next()
        for fut in done:
            task, lock, state = inflight.pop(fut.key)
            try:
                res = fut.result()
            except Exception as e:  # noqa: BLE001 -- a worker that died (KilledWorker) or lost: the slide fails
                res = {"ok": False, "result": None, "error": f"{task.path}: the Dask worker failed: "
                       f"{type(e).__name__}: {_one_line(e)}", "error_type": type(e).__name__, "warnings": [],
                       "timings": {}}
            finish(_finish(task, job, lock, state, res))
            submit_next()
    finally:
        for _task, lock, _state in inflight.values():
            lock.release()
        client.close()
        if cluster is not None:
            cluster.close()


def _client(opts: RunOptions, progress: Progress):
    import logging

    from distributed import Client, LocalCluster

    if opts.scheduler:
        try:
            client = Client(opts.scheduler, timeout=30)
        except (OSError, TimeoutError, ValueError) as e:  # ValueError: not an address (no scheme or port)
            raise UsageError(f"cannot reach the Dask scheduler at {opts.scheduler}: {_one_line(e)}") from e
        progress.detail(f"dask: connected to {opts.scheduler}")
        return client, None
    threads = str(max(1, (os.cpu_count() or 1) // opts.workers))
    env = {v: threads for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
    cluster = LocalCluster(n_workers=opts.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR, env=env)
    progress.detail(f"dask: LocalCluster of {opts.workers} processes, {threads} thread(s) each")
    return Client(cluster), cluster


def _limit_threads() -> None:
    """In a Dask worker: torch's intra-op threads from OMP_NUM_THREADS, once per process."""
    global _THREADS_SET
    if not _THREADS_SET:
        n = os.environ.get("OMP_NUM_THREADS")
        if n and n.isdigit():
            import torch

            torch.set_num_threads(int(n))  # OMP_NUM_THREADS alone does not reach torch's intra-op pool here
        _THREADS_SET = True


def _dask_execute(job, task: SlideTask) -> dict:
    """What a Dask worker runs: limit its threads once, then the slide (no progress callback: no terminal)."""
    _limit_threads()
    return execute(job, task)


def _should_split(job, task: SlideTask, split_regions: int) -> bool:
    """Whether the slide's full region grid has more than `split_regions` regions (0: never split). A slide the
    driver cannot open or size runs as one task, whose worker reports the error."""
    if not split_regions or task.path is None:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the slide's own run reports them
            n = job.grid_size(task)
    except (WsiVssmError, OSError, ValueError):
        return False
    return n > split_regions


def _run_split(client, task: SlideTask, job, lock, state: dict, split_regions: int, progress: Progress,
               finish) -> None:
    """Run one large slide in the driver with its regions as Dask tasks of `split_regions` regions each."""
    import asyncio
    import concurrent.futures

    from distributed import KilledWorker

    used: dict = {"tasks": 0, "pids": []}

    def run_regions(plan) -> list[tuple]:
        n = len(plan)
        if n == 0:
            return []
        batches = [list(range(i, min(n, i + split_regions))) for i in range(0, n, split_regions)]
        shipped = client.scatter(plan, hash=False)  # once per slide, not once per task
        futs = [client.submit(_dask_regions, job, task, shipped, idx, pure=False,
                              key=f"{job.kind}-{task.name}-regions-{i}-{id(task)}") for i, idx in enumerate(batches)]
        try:
            results = client.gather(futs)  # a worker's own error (an unreadable region...) is re-raised as is
        except (KilledWorker, asyncio.CancelledError, concurrent.futures.CancelledError) as e:
            raise WorkerFailed(f"{task.path}: a Dask worker failed: {type(e).__name__}: {_one_line(e)}") from e
        finally:
            client.cancel(futs + [shipped])
        used["tasks"] = len(batches)
        used["pids"] = sorted({pid for pid, _ in results})
        return [part for _, parts in results for part in parts]

    progress.detail(f"{task.name}: split into region tasks of {split_regions} regions")
    try:
        res = execute(job, task, None, run_regions)
    except BaseException:
        lock.release()  # Ctrl-C: the state stays "running", so the next run redoes the slide
        raise
    res["worker"]["split"] = {"region_tasks": used["tasks"], "split_regions": split_regions,
                              "pids": list(used["pids"])}
    finish(_finish(task, job, lock, state, res))


def _dask_regions(job, task: SlideTask, plan, region_indices: list[int]) -> tuple[int, list[tuple]]:
    """What a Dask worker runs for a batch of a split slide's regions: (its pid, the regions' cell parts)."""
    from wsi_vssm.features import extract_regions

    _limit_threads()
    backbone = job.region_backbone()
    with job.open_slide(task) as slide:
        parts = extract_regions(slide, backbone, plan, region_indices, **job.region_params())
    return os.getpid(), parts


# ---- jobs ----------------------------------------------------------------------------------------------------
def cached_model(key: str, load: Callable):
    """The model for `key` in this process, loaded once (the driver preloads it; Dask workers load on first use)."""
    if key not in _MODELS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # shown once by the driver already
            _MODELS[key] = load()
    return _MODELS[key]


@dataclass
class PredictJob:
    """predict_slide for each slide into OUT/<slide>/ (used by predict and evaluate)."""

    out: str
    model_path: str
    params: object  # PredictParams
    params_hash: str
    model_id: str
    model_hash: str
    resolved: dict = field(default_factory=dict)  # what the hash covers
    kind: str = "predict"

    def params_dict(self) -> dict:
        return dict(self.resolved)

    def model(self):
        from wsi_vssm.models.slide_model import load_model

        return cached_model(f"predict:{self.model_path}", lambda: load_model(self.model_path))

    def run(self, task: SlideTask, region_progress=None, run_regions=None) -> dict:
        from wsi_vssm.predict import _predict

        cb = None if region_progress is None else (lambda done, total, stage: region_progress(done, total))
        rec = _predict(task.path, self.model(), self.out, self.params, progress=cb, run_regions=run_regions)
        return {"probability": rec["probability"], "label": rec["label"], "reason": rec["reason"],
                "n_cells": rec["parameters"]["n_cells"], "timings": rec["timings"]}

    def open_slide(self, task: SlideTask):
        from wsi_vssm.io import open_slide

        return open_slide(task.path, backend=self.params.backend, mpp=self.params.mpp)

    def grid_size(self, task: SlideTask) -> int:
        from wsi_vssm.features import grid_size

        r = self.resolved  # the geometry predict_job resolved once (defaults, device) for every slide
        with self.open_slide(task) as slide:
            return grid_size(slide, r["analysis_mpp"], r["region_px"], r["overlap_px"])

    def region_backbone(self):
        return self.model().backbone

    def region_params(self) -> dict:
        return {"batch_size": self.params.batch_size, "workers": self.params.reader_threads, "amp": self.params.amp}

    def outputs_ok(self, name: str) -> bool:
        """prediction.json and the heatmap's metadata parse, the overlay and contours exist (a cheap check)."""
        folder = Path(self.out) / name
        try:
            rec = json.loads((folder / "prediction.json").read_text(encoding="utf-8"))
            json.loads((folder / "heatmap.ome.zarr" / ".zattrs").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        need = ("overlay.png", "contours.geojson")
        return isinstance(rec, dict) and "probability" in rec and all((folder / n).is_file() for n in need)

    def clear_partial(self, name: str) -> None:
        remove_temporaries(Path(self.out) / name, "")

    def where(self, name: str) -> str:
        return f"{Path(self.out) / name}/"

    def describe(self, name: str, result: dict, timings: dict) -> str:
        p = result.get("probability")
        verdict = (f"probability {p:.3f} -> {'tumor' if result.get('label') else 'normal'}" if p is not None
                   else f"no prediction ({result.get('reason')})")
        return f"{name}: {verdict} [{result.get('n_cells')} cells, {timings.get('total', 0.0):.1f} s] -> " \
               f"{self.where(name)}"


@dataclass
class ExtractJob:
    """extract_slide for each slide into OUT/<slide>.zarr."""

    out: str
    model: str  # model file or registry name
    mpp_override: float | None
    extract_params: dict  # extract_slide keyword arguments
    params_hash: str
    model_id: str
    model_hash: str
    resolved: dict = field(default_factory=dict)
    kind: str = "extract"

    def params_dict(self) -> dict:
        return dict(self.resolved)

    def backbone(self):
        from wsi_vssm.features import load_backbone

        return cached_model(f"extract:{self.model}", lambda: load_backbone(self.model))

    def run(self, task: SlideTask, region_progress=None, run_regions=None) -> dict:
        from wsi_vssm.features import FeatureStore, extract_slide

        backbone, info = self.backbone()
        slide = self.open_slide(task)
        with slide:
            slide.require_mpp()  # MissingMpp: "...state it with --mpp"
            t = time.perf_counter()
            cells = extract_slide(slide, backbone, info=info, progress=region_progress, run_regions=run_regions,
                                  **self.extract_params)
            t_extract = time.perf_counter() - t
        t = time.perf_counter()
        FeatureStore.write(self.target(task.name), cells)
        return {"n_cells": len(cells), "n_regions": len(set(cells.region_id.tolist())),
                "timings": {"extract": t_extract, "write": time.perf_counter() - t}}

    def open_slide(self, task: SlideTask):
        from wsi_vssm.io import open_slide

        return open_slide(task.path, mpp=self.mpp_override)

    def grid_size(self, task: SlideTask) -> int:
        from wsi_vssm.features import grid_size

        p = self.extract_params
        with self.open_slide(task) as slide:
            return grid_size(slide, p["mpp"], p["region_px"], p["overlap_px"])

    def region_backbone(self):
        return self.backbone()[0]

    def region_params(self) -> dict:
        p = self.extract_params
        return {"batch_size": p.get("batch_size", 1), "workers": p.get("workers", 2), "amp": p.get("amp", False)}

    def target(self, name: str) -> Path:
        return Path(self.out) / f"{name}.zarr"

    def outputs_ok(self, name: str) -> bool:
        from wsi_vssm.features import FeatureStore, FeatureStoreError

        try:
            FeatureStore.open(self.target(name))
        except FeatureStoreError:
            return False
        return True

    def clear_partial(self, name: str) -> None:
        remove_temporaries(Path(self.out), f"{name}.zarr.")

    def where(self, name: str) -> str:
        return str(self.target(name))

    def describe(self, name: str, result: dict, timings: dict) -> str:
        return (f"{name}: {result.get('n_cells')} cells from {result.get('n_regions')} region(s) in "
                f"{timings.get('total', 0.0):.1f} s -> {self.target(name)}")


def predict_job(out: str | os.PathLike, model_path: str | os.PathLike, model, params) -> PredictJob:
    """A PredictJob whose hash covers everything that changes predict's outputs.

    Covered: the weights (hash), analysis mpp, token size, region and overlap (after defaults), slide and cell
    thresholds, reader backend, a slide mpp override, bfloat16 autocast and the package version. Not covered:
    reader threads, batch size and device (CPU and GPU agree within ~1e-5; a slide done on one is not redone
    on the other).
    """
    from wsi_vssm.features import DEFAULT_OVERLAP_PX, default_region_px, resolve_device, state_dict_hash
    from wsi_vssm.predict import slide_threshold

    device = resolve_device(params.device)
    model_hash = state_dict_hash(model.state_dict())
    resolved = {
        "job": "predict", "model_hash": model_hash, "analysis_mpp": float(params.target_mpp or model.mpp),
        "token_px": model.token_px, "region_px": params.region_px or default_region_px(device, model.token_px),
        "overlap_px": DEFAULT_OVERLAP_PX if params.overlap_px is None else params.overlap_px,
        "threshold": slide_threshold(model, params), "cell_threshold": params.cell_threshold,
        "backend": params.backend, "slide_mpp": params.mpp, "amp": bool(params.amp and device == "cuda"),
        "version": __version__,
    }  # fmt: skip
    path = os.fspath(model_path)
    _MODELS[f"predict:{path}"] = model  # serial runs use the model already loaded
    return PredictJob(os.fspath(out), path, params, params_hash(resolved), f"{model.name} ({path})", model_hash,
                      resolved)


def extract_job(out: str | os.PathLike, model: str, backbone, info, mpp_override: float | None,
                extract_params: dict) -> ExtractJob:
    """An ExtractJob; its hash covers the weights, the geometry (mpp, token, region, overlap, min tissue),
    a slide mpp override, autocast and the package version (not threads, batch size or device)."""
    keys = ("mpp", "token_px", "region_px", "overlap_px", "min_tissue")
    resolved = {"job": "extract", "model_hash": info.model_hash, **{k: extract_params[k] for k in keys},
                "slide_mpp": mpp_override, "amp": bool(extract_params.get("amp") and
                                                       extract_params.get("device") == "cuda"),
                "version": __version__}
    _MODELS[f"extract:{model}"] = (backbone, info)
    return ExtractJob(os.fspath(out), model, mpp_override, dict(extract_params), params_hash(resolved),
                      info.model_id, info.model_hash, resolved)


def remove_temporaries(folder: Path, stem: str) -> None:
    """Remove `.tmp-<stem>*` leftovers of a killed run (atomic writers' temporaries); the slide is locked."""
    from wsi_vssm.atomic import _TMP_PREFIX

    if not folder.is_dir():
        return
    for p in folder.glob(f"{_TMP_PREFIX}{stem}*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
