"""Cohort runner: the one loop over slides for `extract`, `predict` and `evaluate`.

Per slide it keeps a state file, `OUT/.state/<slide>.<job>.json` (job: `predict`, shared by predict and
evaluate, or `extract`), written atomically:

    pending -> running -> done | failed

with the error text and type, timings, model id and hash, the parameter hash, start/finish times, host and pid.
A rerun skips a slide whose state is `done` with the same parameter hash, whose outputs are still there and
whose file is unchanged (size, mtime, content fingerprint: `state.input_changed`); a `failed` slide is retried
only with `--retry-failed` or when its file changed. Anything else (no state, `running` left by a killed run,
another hash, outputs gone, another file under the same name) is redone. A slide whose name is held by another
slide file that still exists elsewhere (`a/x.tif` done, now `b/x.svs`) fails without touching those results,
unless `--overwrite` (`name_taken`). A path that does not exist, or is no file or folder (a pipe, a loop of
links: `io.slide.path_problem`), fails at once (one line) and writes no state. A file named twice on one command
line runs once (`slide_tasks`). `--overwrite` redoes every slide, and is itself resumable: the run's start is
kept in a marker per set of slides until a run has been through every slide of the set, so the same command
after an interruption keeps the slides that run finished (`runs.overwrite`). Outputs are written atomically and `done`
is written only after the last of them, so a SIGKILL between any two writes leaves a state that the rerun
redoes.

A lock file per slide (`OUT/.state/<slide>.<job>.lock`, created with O_CREAT|O_EXCL, holding pid, host and
time) keeps two runs on the same folder off each other's slides. A lock whose process is gone (same host) is
broken safely. A slide locked by a live run is set aside and, once every other slide is through, waited for
(polling its lock, up to `wait_locked` seconds): when the other run releases it, it is triaged again (usually
"up to date": the other run did it) or run here; still locked at the deadline, it ends as "locked" (not done,
not failed: the command exits `EXIT_INCOMPLETE`).

Execution is serial in this process, or on Dask distributed (`workers`: a LocalCluster of that many processes;
`scheduler`: an existing cluster). Workers receive the job (paths and parameters), never open handles; each
worker process loads the model once (cached by path). Only the driver writes state files.

A slide whose region grid has more than `split_regions` regions is split on Dask (`runs.dask`): the driver opens
it, computes its plan once (tissue mask, region grid, cell plan: `pipeline.extract.plan_slide`), sends batches of
`split_regions` regions to the workers as tasks (`pipeline.extract.extract_regions` on the slide's path), gathers
the cells, and finishes the slide itself (assembly, MIL, outputs, state) exactly as a per-slide task would.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from wsi_vssm.outputs.files import (
    COHORT_FILES,
    CONFUSION_PNG,
    FROC_DETECTIONS,
    FROC_PNG,
    PREDICTION_JSON,
    ROC_SUBGROUPS_PNG,
    STAGES_CSV,
    VECTOR_COPIES,
    name_key,
)
from wsi_vssm.progress import Progress
from wsi_vssm.runs.execute import Outcome, SlideTask, execute, finish_slide, start_slide
from wsi_vssm.runs.overwrite import end_overwrite, overwrite_since
from wsi_vssm.runs.remake import remake_reason
from wsi_vssm.runs.state import (
    STATE_DIR,
    OutputFull,
    SlideLock,
    Status,
    check_output_folder,
    clear_temporaries,
    fallback_changed,
    input_changed,
    known_failure,
    live_lock,
    read_state,
    settings_change,
)

DEFAULT_SPLIT_REGIONS = 64  # Dask: a slide of more regions runs as tasks of this many regions (docs/cohorts.md)
DEFAULT_WAIT_LOCKED_S = 600.0  # how long a run waits for slides locked by another run (docs/cohorts.md)
LOCK_POLL_S = 0.5  # how often a waiting run looks at the locks it waits for
EXIT_INCOMPLETE = 4  # exit code: some slides are still locked by another run (not done yet, not failed)


@dataclass
class RunOptions:
    workers: int | None = None  # Dask LocalCluster processes; None: serial in this process
    scheduler: str | None = None  # tcp://host:port of an existing Dask scheduler
    retry_failed: bool = False
    overwrite: bool = False  # redo slides that are done
    debug: bool = False  # print the traceback of unexpected per-slide errors
    split_regions: int = DEFAULT_SPLIT_REGIONS  # Dask only: a slide of more regions runs as region tasks (0: never)
    wait_locked: float = DEFAULT_WAIT_LOCKED_S  # seconds to wait for slides locked by another run (0: none)


@dataclass
class RunSummary:
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, *statuses: str) -> int:
        return sum(o.status in statuses for o in self.outcomes)


def slide_tasks(paths: Iterable[str | tuple[str, float | None]], progress: Progress | None = None) -> list[SlideTask]:
    """One task per slide path given on a command line, or (path, mpp) from a slide list's row. The same file
    named twice under the same name (overlapping globs: `*.svs a*.svs`) runs once, with a note, and so do the
    files of one DICOM series (each stands for the file its series is opened through, `io.dicom.series_slide`);
    two different files of one name still fail (their outputs would collide)."""
    tasks, first = [], {}
    given_for: dict[Path, list[str]] = {}  # the file a slide is opened through -> the paths given for it
    for item in paths:
        path, mpp = item if isinstance(item, tuple) else (item, None)
        given, path = path, _series_slide_path(path)
        given_for.setdefault(Path(path), []).append(given)
        name = slide_key(path)
        try:
            st = os.stat(path)
            key = (name, st.st_dev, st.st_ino)
        except OSError:  # missing and unreadable paths fail in the run, with their reason
            key = None
        if key is not None and key in first:
            kept_path, kept_mpp = first[key]
            if progress is not None and kept_mpp != mpp:  # two slide-list rows that disagree: not a harmless repeat
                progress.warn(f"{given}: given twice with different mpp ({_mpp_text(kept_mpp)} and "
                              f"{_mpp_text(mpp)}); analysed once, with the first: {_mpp_text(kept_mpp)}")
            elif progress is not None and {Path(g) for g in given_for[Path(path)]} == {Path(path)}:  # else: below
                also = "" if kept_path == path else f" (also as {kept_path})"
                progress.info(f"{path}: given twice{also}; analysed once")
            continue
        if key is not None:
            first[key] = (path, mpp)
        tasks.append(SlideTask(name, path, mpp=mpp))
    for path, given in given_for.items():
        files = sorted({Path(g).name for g in given})
        if progress is not None and any(Path(g) != path for g in given):
            shown = ", ".join(files[:2]) + (", ..." if len(files) > 2 else "")
            progress.info(f"{path}: one slide, run once, for the {len(files)} file(s) of its DICOM series given "
                          f"({shown})")
    return tasks


def _series_slide_path(path: str) -> str:
    """A file of a DICOM series given by itself (`predict S/*.dcm`, a table's row) stands for its series' slide."""
    from wsi_vssm.io.dicom import series_slide  # at once for a name no DICOM file has: nothing is opened

    return path if (slide := series_slide(path)) == Path(path) else str(slide)


def _mpp_text(mpp: float | None) -> str:
    return "none given" if mpp is None else f"{mpp:g} um/px"


def _not_a_slide_folder(path: str) -> str | None:
    """Why a folder given as a slide is none (an OME-Zarr slide is one): a wsi-vssm heatmap or feature store,
    a folder of them, or a folder whose slides lie deeper (one slide per sub-folder, as GDC downloads are:
    folders given are searched one level)."""
    from wsi_vssm.io.formats import is_zarr_dir
    from wsi_vssm.outputs.files import is_heatmap_zarr
    from wsi_vssm.pipeline.store import holds_feature_stores, is_feature_store

    p = Path(path)
    if not p.is_dir():
        return None
    what = "heatmap" if is_heatmap_zarr(p) else "prediction folder" if (p / "prediction.json").is_file() else None
    if what:
        return f"a wsi-vssm {what} (an output of predict), not a slide: give the slide it was computed from"
    if is_feature_store(p):
        return ("a wsi-vssm feature store (an output of extract), not a slide: give the slide it was computed from "
                "(`train mil --features` reads feature stores)")
    if holds_feature_stores(p):
        return ("a folder of wsi-vssm feature files (an output of extract), not of slides: give the slides they "
                "were computed from (`train mil --features` reads this folder)")
    if is_zarr_dir(p):
        return None
    from wsi_vssm.runs.slide_args import expand_slide_folders, subfolder_hint

    try:
        if not any(p.iterdir()):
            return "an empty folder, not a slide"
    except OSError as e:
        return f"a folder that cannot be listed ({e.strerror or e})"
    slides = [s for s in expand_slide_folders([str(p)]) if s != str(p)]
    if len(slides) == 1:  # a table's row naming a folder: it is a slide only when it holds one DICOM series
        return f"a folder holding one slide ({Path(slides[0]).name}), not a slide itself: name that file"
    if slides:
        return (f"a folder of {len(slides)} slides, named as one slide: name each in a row of its own (a folder "
                "names one slide only when it holds one DICOM series)")
    return (f"a folder with no slide files directly in it, and not an OME-Zarr store (sub-folders are not searched: "
            f"{subfolder_hint(p)}, or list them in a manifest)")


def slide_key(path: str | os.PathLike) -> str:
    """A slide's output name: `wsi_vssm.io.base.output_name`, the rule `SlideReader.name` follows (outputs are
    written under that name)."""
    from wsi_vssm.io.base import output_name  # imported here: the runner module stays free of numpy

    return output_name(path)


def run_slides(tasks: Iterable[SlideTask], job, opts: RunOptions | None = None, progress: Progress | None = None,
               on_outcome: Callable[[Outcome], None] | None = None,
               on_wait: Callable[[], None] | None = None, command: str | None = None) -> RunSummary:
    """Run `job` over `tasks` with state, locks, skip/retry rules, serially or on Dask; never raises for a slide.

    `on_outcome(outcome)` is called in this process after each slide (done, skipped, failed or locked). A slide
    locked by another run is reported once it is through: after up to `opts.wait_locked` seconds of waiting,
    which `on_wait()` is called before. `command` names the run in its progress lines (`evaluate` predicts its
    slides); the job's kind by default.
    """
    opts, progress = opts or RunOptions(), progress or Progress()
    tasks = list(tasks)
    check_output_folder(job.out)
    command = command or job.kind
    progress.detail(f"{command}: model {job.model_id}, parameters {job.params_hash}, {len(tasks)} slide(s)")
    since = overwrite_since(job, progress, [t.name for t in tasks]) if opts.overwrite else None
    summary = RunSummary()
    waiting: list[Outcome] = []  # slides locked by another run, looked at again at the end

    def record(o: Outcome) -> None:
        summary.outcomes.append(o)
        report_outcome(o, job, progress, opts.debug)
        if on_outcome is not None:
            on_outcome(o)

    with progress.bar(len(tasks), f"{command} slides", unit="slide") as tick:
        def finish(o: Outcome) -> None:
            if o.out_of_space:  # every later slide would fail the same way
                raise OutputFull(f"{o.message}; the run stopped: free space in {job.out}, then run the same "
                                 "command again (finished slides are kept)")
            if o.status == "locked" and opts.wait_locked > 0:
                waiting.append(o)
                return
            record(o)
            tick(len(summary.outcomes))

        def run_some(some: list[SlideTask]) -> None:
            seen: dict[str, str] = {}  # name_key -> the name taken
            if opts.workers or opts.scheduler:
                todo = _triage(some, job, opts, finish, progress, seen, since)
                if todo:
                    from wsi_vssm.runs.dask import run_dask

                    run_dask(todo, job, opts, progress, finish)
                return
            for task in some:  # triaged just before it runs: a slide another run has done meanwhile is skipped
                for t in _triage([task], job, opts, finish, progress, seen, since):
                    _run_serial(t, job, progress, finish)

        run_some(tasks)
        if waiting:
            if on_wait is not None:
                on_wait()
            _wait_for_locked(waiting, job, opts, progress, run_some)
            for o in waiting:  # still locked at the deadline: not done, not failed
                o.message = f"{o.message}; still locked after waiting {opts.wait_locked:g} s (--wait-locked)"
                record(o)
    order = {id(t): i for i, t in enumerate(tasks)}
    summary.outcomes.sort(key=lambda o: order.get(id(o.task), 0))
    if not summary.count("locked"):  # through every slide (an --overwrite run, or a plain one that gave it up):
        end_overwrite(job, [t.name for t in tasks])  # the next --overwrite redoes everything
    return summary


def _wait_for_locked(waiting: list[Outcome], job, opts: RunOptions, progress: Progress,
                     run_some: Callable[[list[SlideTask]], None]) -> None:
    """Poll the locks of `waiting` slides until each is released (then triage and run it again, which may put it
    back on the list if yet another run took it) or `opts.wait_locked` seconds have passed."""
    deadline = time.monotonic() + opts.wait_locked
    progress.info(f"waiting up to {opts.wait_locked:g} s for {len(waiting)} slide(s) locked by another run "
                  "(--wait-locked)")
    while waiting:
        free = [o for o in waiting if live_lock(job.out, job.kind, o.task.name) is None]
        if free:
            gone = {id(o) for o in free}
            waiting[:] = [o for o in waiting if id(o) not in gone]
            run_some([o.task for o in free])
            if {o.task.name for o in waiting} & {o.task.name for o in free}:
                time.sleep(LOCK_POLL_S)  # locked again at once (a lock that looks stale but is not broken): no spin
            continue
        if time.monotonic() >= deadline:
            return
        time.sleep(LOCK_POLL_S)


def _triage(tasks: list[SlideTask], job, opts: RunOptions, finish, progress: Progress, seen: dict[str, str],
            since: str | None = None) -> list[SlideTask]:
    """Slides that need running; the others (known failures, missing files, duplicates: names already in `seen`,
    done, failed before with the same file) are finished. A path that does not exist fails here, writing no
    state. With --overwrite, a slide this --overwrite run started after `since` counts as done before."""
    from wsi_vssm.io.slide import path_problem  # here: the runner module stays free of numpy
    from wsi_vssm.pipeline.predict import output_folder_link, output_folder_problem

    todo = []
    for task in tasks:
        if task.error is not None:
            finish(Outcome(task, "failed", task.error))
            continue
        problem = None if task.path is None else path_problem(task.path) or _not_a_slide_folder(task.path)
        if problem is not None:
            finish(Outcome(task, "failed", f"{task.path}: {problem}"))
            continue
        if task.name in ("", ".", ".."):  # `predict .` or `/`: no name to write its outputs (or state) under
            what = "a folder, not a slide file" if task.path and os.path.isdir(task.path) else (
                f"its name {task.name!r} cannot name an output folder: rename it")
            finish(Outcome(task, "failed", f"{task.path}: {what}"))
            continue
        if job.kind == "predict" and task.name.lower() in RESERVED_NAMES:  # its folder would be the report's file
            finish(Outcome(task, "failed", f"{task.path}: its name {task.name!r} is that of a file or folder the run "
                                           f"keeps in {job.out} (its outputs would collide): rename the slide"))
            continue
        problem = (output_folder_link(job.out, task.name) or output_folder_problem(job.out, task.name)
                   if job.kind == "predict" else None)
        if problem:  # here, so no state is written: once the file is moved, a rerun just runs the slide
            finish(Outcome(task, "failed", f"{task.path}: {problem}"))
            continue
        taken = seen.get(name_key(task.name))
        if taken is not None:  # in any case or Unicode form: one folder on macOS's and Windows' file systems
            same = repr(taken) if taken == task.name else \
                f"{taken!r} (the same folder as {task.name!r} on a case-insensitive file system)"
            finish(Outcome(task, "failed", f"{task.path}: another slide of this run has the name {same} (their "
                                           "outputs would collide); rename one"))
            continue
        seen[name_key(task.name)] = task.name
        state = read_state(job.out, job.kind, task.name)
        status = state.get("status") if state else None
        # the --overwrite run being resumed already redid it: no more overwriting than a plain rerun
        overwrite = opts.overwrite and not (since and state and str(state.get("started") or "") >= since)
        other = name_taken(state, task.path)
        if other is not None and not overwrite:
            finish(Outcome(task, "failed", f"{task.path}: {job.where(task.name)} holds the results of another "
                                           f"slide of the same name, {other}; use another --out, rename one, or "
                                           "--overwrite to replace them"))
            continue
        if other is not None:
            progress.info(f"{task.name}: replacing the results of {other} (--overwrite)")
        elif _moved_failure(state, task.path):
            state = None  # the same content failed under another path: run it, so its error names this one
        source = _older_mpp_source(state, job, task) if state is not None else None
        refall = state is not None and fallback_changed(state, job.fallback_mpp, source)
        hashed = state is not None and state.get("params_hash") == job.task_hash(task)
        same = hashed and not refall
        if refall and hashed and state.get("status") == Status.DONE:  # the fallback is the only reason: say so
            was = (f"the fallback resolution {state.get('fallback_mpp')} um/px" if source != "objective-power"
                   else "a resolution estimated from its objective power")
            progress.info(f"{task.name}: read at {was}; this run's --fallback-mpp is {job.fallback_mpp:g}: running "
                          "it again")
        # a done slide from before fingerprints were recorded is trusted; a failed one is tried again
        changed = same and status in (Status.DONE, Status.FAILED) and (
            input_changed(state.get("input"), task.path) if "input" in state or status == Status.FAILED else False)
        if changed and not overwrite:
            progress.info(f"{task.name}: the slide file changed since its {status} run; running it again")
        if same and not overwrite and status == Status.DONE and not changed and job.outputs_ok(task.name):
            _tidy_done(task, job)
            finish(Outcome(task, "skipped", "up to date", state))
        elif not (refall or overwrite) and (what := remake_reason(state, job, task)):
            progress.info(f"{task.name}: {what}: its outputs are made again from its saved heatmap (no backbone)")
            job.relabel.add(task.name)  # on the job: Dask workers receive it with the task
            todo.append(task)
        elif same and not (overwrite or opts.retry_failed) and (known := known_failure(state, changed)):
            finish(Outcome(task, "failed", known, state))
        else:
            if status == Status.DONE and not (overwrite or refall or changed):  # hours of backbone: say why
                why = "but its outputs are incomplete" if same else "with " + (
                    settings_change(state.get("params"), job.task_params(task)) or "settings it did not record")
                progress.info(f"{task.name}: done before, {why}; running it again")
            todo.append(task)
    return todo


# OUT's own files and folders: a slide of such a name (`metrics.json.tif`, `.state.svs`) would write its folder
# there (evaluate then failed "metrics.json: Is a directory"; a `.state` slide wrote into the state folder)
RESERVED_NAMES = frozenset(n.lower() for n in (*COHORT_FILES, STAGES_CSV, CONFUSION_PNG, FROC_PNG, FROC_DETECTIONS,
                                               ROC_SUBGROUPS_PNG, STATE_DIR, *VECTOR_COPIES))


def _older_mpp_source(state: dict, job, task: SlideTask) -> str | None:
    """Where a done slide's resolution came from: its state's record, else (a predict state written before
    states recorded it) its prediction.json's, read only when this run's --fallback-mpp differs from the state's."""
    import json

    recorded = (state.get("result") or {}).get("mpp_source")
    if (recorded or job.fallback_mpp is None or state.get("fallback_mpp") == job.fallback_mpp
            or job.kind != "predict" or state.get("status") != Status.DONE):
        return recorded if isinstance(recorded, str) else None
    try:
        rec = json.loads((Path(job.out) / task.name / PREDICTION_JSON).read_text(encoding="utf-8"))
        return rec["mpp"]["slide_source"] if isinstance(rec["mpp"]["slide_source"], str) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def name_taken(state: dict | None, path: str | None) -> str | None:
    """The other slide whose results OUT holds under this slide's name: recorded at another path that still
    exists and holds other content. None when the slide is the recorded one, a copy of it (the same size and
    fingerprint: its results stand) or moved (the recorded path is gone)."""
    old = _recorded_path(state)
    if old is None or path is None or old == os.path.abspath(path) or not os.path.exists(old):
        return None
    try:
        if os.path.samefile(old, path):
            return None
    except OSError:
        return None
    return old if input_changed(state.get("input"), path) else None


def _moved_failure(state: dict | None, path: str | None) -> bool:
    """A failure recorded for a copy of this slide at another path that still exists (e.g. two empty files of
    one name)."""
    old = _recorded_path(state)
    return (old is not None and state.get("status") == Status.FAILED and path is not None
            and old != os.path.abspath(path) and os.path.exists(old))


def _recorded_path(state: dict | None) -> str | None:
    if not state:
        return None
    old = state.get("abspath") or state.get("path")
    return old if isinstance(old, str) and os.path.isabs(old) else None  # a relative one: its cwd is unknown


def _tidy_done(task: SlideTask, job) -> None:
    """A run killed after writing `done` may leave its lock and temporaries: clear them if the lock is free.
    Without a lock file it ended normally: nothing is looked for (a search of OUT/.state per slide made a rerun
    of up-to-date slides quadratic, 22 of 27 s for 3,600 slides)."""
    lock = SlideLock(job.out, job.kind, task.name)
    if not lock.path.exists():
        return
    try:
        if lock.acquire():
            clear_temporaries(task.name, job)
    except OSError:
        pass  # a read-only leftover is harmless: the slide is done
    finally:
        lock.release()


def _run_serial(task: SlideTask, job, progress: Progress, finish) -> None:
    lock, refused, state = start_slide(task, job)
    if refused is not None:
        finish(refused)
        return
    progress.working_on(task.name)
    try:
        with progress.regions(task.name) as cb:
            res = execute(job, task, cb)
    except BaseException:
        lock.release()  # Ctrl-C: the state stays "running", so the next run redoes the slide
        raise
    finally:
        progress.working_on(None)
    finish(finish_slide(task, job, lock, state, res))


def report_outcome(o: Outcome, job, progress: Progress, debug: bool) -> None:
    state = o.state or {}
    if progress.json_lines:
        progress.record(o.record(job))
    if o.status == "done":
        for w in state.get("warnings") or []:
            progress.warn(w)
        progress.result(job.describe(o.task.name, state.get("result") or {}, state.get("timings") or {}))
    elif o.status == "skipped":  # with its result, so a rerun's output still answers "what did it get?"
        result, name = state.get("result"), o.task.name
        line = job.describe(name, result, state.get("timings") or {}) if result else ""
        done = line[len(name) + 2:] if line.startswith(f"{name}: ") else f"({job.where(name)})"
        progress.result(f"{name}: up to date, done before: {done}")
    elif o.status == "locked":
        progress.warn(f"{o.task.name}: {o.message}; not done by this run")
    else:
        for w in state.get("warnings") or []:
            progress.warn(w)
        progress.error(o.message)
        if debug and state.get("traceback"):
            progress._write(state["traceback"].rstrip(), err=True)
