"""A cohort run's `predictions.csv`: its rows from this run's outcomes or from the per-slide states on disk, the
table rewritten as slides finish, and the lock one writer of the cohort files holds at a time."""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

from wsi_vssm.outputs.files import (
    CALIBRATION_PNG,
    COHORT_LESIONS_CSV,
    METRICS_JSON,
    PREDICTIONS_CSV,
    ROC_PNG,
    is_patch_report,
    read_metrics,
)

REPORT_LOCK_WAIT_S = 60.0  # how long a run waits for another run writing the cohort files
# The interim predictions.csv is rewritten after each slide that ran (unless the last rewrite was under 20 times
# its cost ago), and after others (up to date, a known failure) at most this often, or 20 times a rewrite's cost
# if more: each rewrite is the whole table (68 ms at 10,000 rows), so after every slide a rerun of up-to-date
# slides grew quadratic (71 s for 2,000 slides).
INTERIM_EVERY_S = 2.0
PENDING, IN_PROGRESS = "pending", "in_progress"  # predictions.csv statuses of slides not through yet
UNFINISHED = (PENDING, IN_PROGRESS)
PENDING_NOTE = "not finished: the run ended before this slide; rerun the same command"


def n_unfinished(rows: list[dict]) -> int:
    return sum(r["status"] in UNFINISHED for r in rows)


def replaced_cohort_warning(out: Path, source, split: str | None) -> str | None:
    """One line, before a run, when OUT's metrics.json holds the figures of another cohort, split or patch folder
    (its `cohort` and `split`): this run replaces them and predictions.csv (a slide cohort's slide folders stay; a
    patch folder's scores were in predictions.csv only). None when they are this run's, or when there is no
    readable metrics.json."""
    import os

    old = read_metrics(out)
    if old is None or "cohort" not in old:
        return None
    was, was_split = old["cohort"], old.get("split")
    if (was, was_split) == (os.path.abspath(source), split):
        return None
    kept = "" if is_patch_report(old) else "; its slide folders stay"
    of = f"{was} (split {was_split})" if was_split else str(was)
    return (f"{Path(out) / METRICS_JSON} holds the figures of {of}: this run replaces them and "
            f"{PREDICTIONS_CSV} with those of {os.path.abspath(source)}{f' (split {split})' if split else ''}"
            f"{kept}; use another --out to keep both")


@contextlib.contextmanager
def report_writer(out: Path, wait: float):
    """Hold OUT/.state/cohort.report.lock while writing the cohort files: one writer at a time across runs, so
    the holder may remove a killed run's half-written cohort files. Yields whether the lock is held; after
    `wait` seconds without it a final write goes ahead anyway (every write is atomic), leaving temporaries."""
    from wsi_vssm.atomic import remove_temporaries
    from wsi_vssm.runs.state import SlideLock

    lock = SlideLock(out, "report", "cohort")
    deadline = time.monotonic() + wait
    with contextlib.suppress(OSError):
        while not lock.acquire() and time.monotonic() < deadline:
            time.sleep(0.05)
    try:
        if lock.held:
            for name in (PREDICTIONS_CSV, METRICS_JSON, ROC_PNG, CALIBRATION_PNG, COHORT_LESIONS_CSV):
                remove_temporaries(out, f"{name}.")
        yield lock.held
    finally:
        lock.release()


class InterimTable:
    """The runner's per-slide callback: rewrite predictions.csv with every slide (after each one that ran, and
    every `INTERIM_EVERY_S` or so for the others; `flush` before the run waits), those not through yet as
    `pending` rows, so a run that is killed leaves a table that says it is partial. `table` holds the rows,
    `recorded` the indices that hold this run's outcome (`interrupted_table` keeps them)."""

    def __init__(self, out: Path, crows: list, tasks: list, on_slide, progress):
        self.out, self.crows, self.on_slide, self.progress = out, crows, on_slide, progress
        self.index = {id(t): i for i, t in enumerate(tasks)}
        self.table = [pending_row(c) for c in crows]
        self.recorded: set[int] = set()
        self.written, self.cost, self.behind = -math.inf, 0.0, False  # last rewrite: when, how long; rows since

    def __call__(self, outcome) -> None:
        i = self.index[id(outcome.task)]
        self.table[i] = _row(self.crows[i], outcome)
        self.recorded.add(i)
        self.behind = True
        # a slide that ran waits only for the rewrite to cost under 5% (slides remade from their heatmaps are fast)
        wait = 20 * self.cost if outcome.status == "done" else max(INTERIM_EVERY_S, 20 * self.cost)
        if time.monotonic() - self.written >= wait:
            self.flush()
        if self.on_slide is not None:
            self.on_slide(self.table[i])

    def flush(self) -> None:
        """Rewrite the table if rows came in since the last rewrite."""
        if not self.behind:
            return
        try:  # best effort (skipped while another run writes): the final table, from the states on disk, counts
            with report_writer(self.out, 0) as held:
                if held:
                    start = time.monotonic()
                    write_table(self.out, self.table)
                    self.written = time.monotonic()
                    self.cost, self.behind = self.written - start, False
        except OSError as e:
            if self.progress is not None:
                self.progress.warn(f"{self.out / PREDICTIONS_CSV}: not updated ({e.strerror or e}); the slide is "
                                   "recorded")


def pending_row(crow, note: str = PENDING_NOTE, status: str = PENDING) -> dict:
    return {"slide": crow.name, "label": crow.label, "probability": None, "status": status, "error": note}


def _failed_row(crow, error: str | None) -> dict:
    return {"slide": crow.name, "label": crow.label, "probability": None, "status": "failed", "error": error}


def _result_row(crow, result: dict) -> dict:
    """The row of a slide that ran through, from its prediction (or its state's `result`): `no_tissue` with the
    reason when it got no probability."""
    p = result.get("probability")
    return {"slide": crow.name, "label": crow.label, "probability": p,
            "status": "done" if p is not None else "no_tissue", "error": None if p is not None
            else result.get("reason"), "in_domain": result.get("in_domain"), "logit": result.get("slide_logit")}


def _row(crow, outcome) -> dict:
    """A predictions.csv row from a slide's outcome in this run (its state when it ran or was done before)."""
    if outcome.status == "locked":
        return pending_row(crow, outcome.message, IN_PROGRESS)
    if outcome.ok:
        return _result_row(crow, (outcome.state or {}).get("result") or {})
    return _failed_row(crow, outcome.message or None)


def final_row(crow, outcome, job) -> dict:
    """A slide's row from its state on disk (whichever run wrote it), with this run's parameters.

    Failures without a state of their own (a missing file, a duplicate name) come from this run's outcome; a
    slide another run holds is `in_progress`; one with no finished state is `pending`."""
    from wsi_vssm.runs.state import (
        Status,
        describe_holder,
        fallback_changed,
        live_lock,
        read_state,
        settings_change,
    )

    name = outcome.task.name
    if outcome.status == "failed" and outcome.state is None:
        return _row(crow, outcome)
    state = read_state(job.out, job.kind, name)
    if (state is not None and state.get("params_hash") == job.task_hash(outcome.task)
            and not fallback_changed(state, job.fallback_mpp)):
        if state.get("status") == Status.DONE and job.outputs_ok(name):
            return _result_row(crow, _prediction(Path(job.out) / name) or state.get("result") or {})
        if state.get("status") == Status.FAILED:
            return _failed_row(crow, state.get("error"))
    if outcome.status == "failed":
        return _row(crow, outcome)
    holder = live_lock(job.out, job.kind, name)
    if holder is not None:
        return pending_row(crow, f"{describe_holder(holder)}; rerun when it has finished", IN_PROGRESS)
    if (state is not None and state.get("status") == Status.DONE and outcome.status in ("done", "skipped")
            and state.get("params_hash") != job.task_hash(outcome.task)):
        # this run had it; another (a predict with other options) wrote over it since
        change = settings_change(job.task_params(outcome.task), state.get("params") or {}) or "other settings"
        return pending_row(crow, f"another run wrote over its outputs with other settings ({change}) after this "
                                 "run had it: rerun the same command to predict it again")
    return pending_row(crow)


def _prediction(folder: Path) -> dict | None:
    import json

    from wsi_vssm.outputs.files import PREDICTION_JSON

    try:
        rec = json.loads((folder / PREDICTION_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and "probability" in rec else None


def write_table(out: Path, rows: list[dict]) -> None:
    from wsi_vssm.outputs.report import write_predictions_csv

    write_predictions_csv(out / PREDICTIONS_CSV, rows)


def interrupted_table(out: Path, crows: list, tasks: list, job, interim: InterimTable, opts=None) -> None:
    """On Ctrl-C or SIGTERM: rewrite predictions.csv with this run's outcomes (`interim`, the `InterimTable`
    callback) and, for a slide without one, its state on disk when that state is of this slide and these
    parameters and says done (a slide finished just as the interrupt came) or failed (a known failure the run
    would not have tried again: the same file, and neither --retry-failed nor --overwrite in `opts`, the run's
    `RunOptions`); the others stay `pending`. Best effort: the interrupt goes on whatever happens here."""
    import os
    from types import SimpleNamespace

    from wsi_vssm.runs.state import Status, fallback_changed, input_changed, known_failure, read_state

    retrying = opts is not None and (opts.retry_failed or opts.overwrite)

    def row(i: int) -> dict:
        task = tasks[i]
        state = None if i in interim.recorded or task.path is None else read_state(job.out, job.kind, task.name)
        ours = (state is not None and state.get("abspath") == os.path.abspath(task.path)
                and state.get("params_hash") == job.task_hash(task) and not fallback_changed(state, job.fallback_mpp))
        if ours and state.get("status") == Status.DONE:
            return final_row(crows[i], SimpleNamespace(task=task, status="done"), job)
        known = (ours and not retrying and state.get("status") == Status.FAILED
                 and known_failure(state, input_changed(state.get("input"), task.path)))
        return _failed_row(crows[i], known) if known else interim.table[i]

    with contextlib.suppress(Exception), report_writer(out, 0) as held:
        if held:
            write_table(out, [row(i) for i in range(len(tasks))])


def repeated_slides(out: Path, kind: str, scored: list[dict], folders: dict[str, str]) -> dict | None:
    """Scored slide files whose input is another's (the same file under two names, a copy, a link): by the
    fingerprint their states recorded (size and first and last MiB), as `repeated_patches` finds patches that
    repeat; each copy counts again in the AUC. None when every slide is distinct. OME-Zarr folders are left out:
    their fingerprint covers only the top metadata files, which two different slides can share."""
    import numpy as np

    from wsi_vssm.runs.state import read_state
    from wsi_vssm.training.data.fingerprints import repeated_patches

    known = []
    for r in scored:
        state = read_state(out, kind, folders.get(r["slide"], r["slide"])) or {}
        fingerprint, path = state.get("input"), state.get("abspath") or state.get("path")
        sha = fingerprint.get("sha256") if isinstance(fingerprint, dict) else None
        if isinstance(sha, str) and isinstance(path, str) and os.path.isfile(path):
            known.append((sha, r["label"], r["slide"]))
    if len(known) < 2:
        return None
    digests, labels, names = zip(*known, strict=True)
    return repeated_patches(np.asarray(digests), labels, names)

