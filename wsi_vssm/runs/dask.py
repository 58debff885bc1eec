"""Cohort runs on Dask distributed: one task per slide, or a large slide split into region tasks.

A LocalCluster of `workers` processes, or an existing cluster at `scheduler`. Workers receive the job (paths and
parameters), never open handles, and load the model once per process. A slide whose region grid has more than
`split_regions` regions is split: the driver opens it, computes its plan once (tissue mask, region grid, cell
plan: `pipeline.extract.plan_slide`), sends batches of `split_regions` regions to the workers
(`pipeline.extract.extract_regions` on the slide's path), gathers the cells, and finishes the slide itself
(assembly, MIL, outputs, state) exactly as a per-slide task would.
"""

from __future__ import annotations

import contextlib
import gc
import os
import warnings

from wsi_vssm.errors import OptionError, WsiVssmError, one_line
from wsi_vssm.progress import Progress
from wsi_vssm.resources import THREAD_VARIABLES, available_cpus
from wsi_vssm.runs.execute import SlideTask, execute, finish_slide, start_slide
from wsi_vssm.runs.state import clear_temporaries

_THREADS_SET = False
CONNECT_TIMEOUT_S = 30  # how long --scheduler's address may take to answer (distributed retries until then)


class WorkerFailed(WsiVssmError):
    """A Dask worker running a split slide's regions died or was lost."""


def run_dask(todo: list[SlideTask], job, opts, progress: Progress, finish) -> None:
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
                lock, refused, state = start_slide(task, job)
                if refused is not None:
                    finish(refused)
                    continue
                if _should_split(job, task, opts.split_regions):
                    _run_split(client, task, job, lock, state, opts.split_regions, progress, finish)
                    continue
                fut = client.submit(_dask_execute, job, task, pure=False, key=f"{job.kind}-{task.name}-{id(task)}")
                inflight[fut.key] = (task, lock, state, fut)
                done.add(fut)
                return

        for _ in range(window):
            submit_next()
        for fut in done:
            task, lock, state, _ = inflight.pop(fut.key)
            try:
                res = fut.result()
            except Exception as e:  # noqa: BLE001 -- a worker that died (KilledWorker) or lost: the slide fails
                res = {"ok": False, "result": None, "error": f"{task.path}: the Dask worker failed: "
                       f"{type(e).__name__}: {one_line(e)}", "error_type": type(e).__name__, "warnings": [],
                       "timings": {}}
                with contextlib.suppress(OSError):  # what it was writing: no later run looks for it
                    clear_temporaries(task.name, job)
            finish(finish_slide(task, job, lock, state, res))
            submit_next()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep what the workers have already finished
        _record_finished(inflight, job)
        raise
    finally:
        for _task, lock, _state, _fut in inflight.values():
            lock.release()
        client.close()
        if cluster is not None:
            cluster.close()


def _record_finished(inflight: dict, job) -> None:
    """Write the states of slides whose futures have finished but were not gathered yet, so that the rerun after
    an interrupt skips them instead of redoing finished work; the others stay `running` (redone)."""
    for key, (task, lock, state, fut) in list(inflight.items()):
        if fut.status != "finished":
            continue
        try:
            res = fut.result()
        except Exception:  # noqa: BLE001 -- unwinding an interrupt: a result we cannot fetch is simply redone
            continue
        finish_slide(task, job, lock, state, res)
        del inflight[key]


def _client(opts, progress: Progress):
    import logging

    from distributed import Client, LocalCluster

    if opts.scheduler:
        try:
            client = Client(opts.scheduler, timeout=CONNECT_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 -- distributed raises OSError (nothing there), ValueError (not an
            # address), TypeError (tls:// without a TLS config, ucx:// without ucx)...: all mean "not usable"
            reason = f"{type(e).__name__}: {one_line(e)}"
        else:
            progress.detail(f"dask: connected to {opts.scheduler}")
            if not client.scheduler_info().get("workers"):
                # not an error: an adaptive cluster starts its workers only once tasks arrive
                progress.warn(f"--scheduler {opts.scheduler}: no Dask worker has joined yet; the slides wait "
                              "until one does (start one with `dask worker ADDRESS`; Ctrl-C stops)")
            return client, None
        # The failed Client sits in a reference cycle; collected later, its __del__ would take distributed's
        # LoopRunner lock and could deadlock the next Client's start in this process: collect it now.
        gc.collect()
        raise OptionError(f"--scheduler {opts.scheduler}: cannot use this Dask scheduler: {reason}")
    cpus = available_cpus()
    threads = worker_threads(opts.workers, cpus)
    if threads < max(1, cpus // opts.workers):  # the user's OMP_NUM_THREADS caps it (many HPC sites export 1)
        progress.warn(f"--workers {opts.workers}: {threads} thread(s) each, as OMP_NUM_THREADS="
                      f"{os.environ['OMP_NUM_THREADS']} says, of {cpus} CPU(s) this run may use; unset it to use "
                      "them all")
    if opts.workers > cpus:
        progress.warn(f"--workers {opts.workers}: more processes than the {cpus} CPU(s) this run may use (its "
                      "affinity mask and CPU quota): they take turns, and each holds a model and a region")
    env = {v: str(threads) for v in THREAD_VARIABLES}
    with _environment_kept():
        cluster = LocalCluster(n_workers=opts.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.ERROR, env=env)
    progress.detail(f"dask: LocalCluster of {opts.workers} processes, {threads} thread(s) each")
    return Client(cluster), cluster


@contextlib.contextmanager
def _environment_kept():
    """Give this process's environment back as it was: distributed's nanny writes its workers' variables
    (PYTHONHASHSEED, OPENBLAS_NUM_THREADS, MALLOC_TRIM_THRESHOLD_, ...) into `os.environ` before it spawns them,
    so every later subprocess of a program that ran a cohort kept a fixed hash seed and one BLAS thread."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(before):
            os.environ.pop(key, None)
        for key, value in before.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def worker_threads(workers: int, cpus: int | None = None) -> int:
    """Threads for each of `workers` local worker processes: the CPUs this run may use (`cpus`, by default its
    affinity mask and cgroup quota, not the host's cores) shared out, and never more than the user's own
    OMP_NUM_THREADS."""
    threads = max(1, (cpus or available_cpus()) // workers)
    user = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(user)) if user.isdigit() and int(user) > 0 else threads


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
    if not split_regions or task.path is None or task.name in getattr(job, "relabel", ()):  # a relabel reads none
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
            raise WorkerFailed(f"{task.path}: a Dask worker failed: {type(e).__name__}: {one_line(e)}") from e
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
    finish(finish_slide(task, job, lock, state, res))


def _dask_regions(job, task: SlideTask, plan, region_indices: list[int]) -> tuple[int, list[tuple]]:
    """What a Dask worker runs for a batch of a split slide's regions: (its pid, the regions' cell parts)."""
    from wsi_vssm.pipeline.extract import extract_regions

    _limit_threads()
    backbone = job.region_backbone()
    with job.open_slide(task) as slide:
        parts = extract_regions(slide, backbone, plan, region_indices, **job.region_params())
    return os.getpid(), parts
