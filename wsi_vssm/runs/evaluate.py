"""Cohort evaluation: predict every slide of a cohort, then AUC with a bootstrap CI, a ROC plot and a table.
Patch folders (PCam) are scored by `runs.evaluate_patches`, which writes its report with this module's helpers.

Finished work is never lost: each slide's state is kept by `wsi_vssm.runs.runner`, `predictions.csv` is
rewritten atomically after every slide (slides not through yet as `pending` rows, empty probability), and a
slide that fails is recorded with its error while the run goes on.

The final report (predictions.csv, metrics.json, roc.png) is built from every slide's state on disk, so a slide
done by another run on the same folder counts. A slide another run still holds is an `in_progress` row; then
metrics.json says `"complete": false` (true only when every slide is done or failed).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi_vssm.atomic import atomic_write_json
from wsi_vssm.errors import UsageError
from wsi_vssm.outputs.files import (
    CALIBRATION_PNG,
    COHORT_LESIONS_CSV,
    CONFUSION_PNG,
    FROC_DETECTIONS,
    FROC_PNG,
    LESIONS_CSV,
    METRICS_JSON,
    MODEL_PATCHES_CSV,
    REPORT_FIGURES,
    ROC_PNG,
    ROC_SUBGROUPS_PNG,
    STAGES_CSV,
    VECTOR_COPIES,
    is_detections_folder,
    read_metrics,
    vector_copies_of,
)
from wsi_vssm.pipeline.params import threshold_origin
from wsi_vssm.pipeline.predict import PredictParams, slide_threshold
from wsi_vssm.runs.cohort_froc import cohort_froc, read_cohort_annotations
from wsi_vssm.runs.cohort_table import (
    REPORT_LOCK_WAIT_S,
    UNFINISHED,
    InterimTable,
    final_row,
    interrupted_table,
    n_unfinished,
    repeated_slides,
    replaced_cohort_warning,
    report_writer,
    write_table,
)


@dataclass
class EvaluationResult:
    metrics: dict
    rows: list[dict] = field(default_factory=list)
    items: str = "slides"  # what was scored: "slides", or "patches" for a patch folder

    @property
    def n_failed(self) -> int:
        return sum(r["status"] == "failed" for r in self.rows)

    @property
    def complete(self) -> bool:
        """Every slide is done or failed (none pending or in progress in another run)."""
        return not any(r["status"] in UNFINISHED for r in self.rows)


def evaluate_cohort(
    cohort_path: str | os.PathLike,
    model,
    out_dir: str | os.PathLike,
    params: PredictParams | None = None,
    annotations: str | os.PathLike | None = None,
    on_slide: Callable[[dict], None] | None = None,
    n_boot: int = 2000,
    model_path: str | os.PathLike | None = None,
    run=None,
    progress=None,
    patients: str | os.PathLike | None = None,
    split: str = "all",
    subgroups: Sequence[str] = (),
) -> EvaluationResult:
    """Predict each slide of a manifest / CAMELYON16 folder into `out_dir/<slide>/`, then write the cohort files.

    Slides go through `wsi_vssm.runs.runner` (per-slide state, resume, locks; serial or Dask per `run`, a
    RunOptions). `model_path` is the file workers load; without one a Dask run saves `model` under
    OUT/.state/models/. `on_slide(row)` is called after each slide. The final predictions.csv and metrics.json
    are rebuilt from the per-slide states on disk, so a resumed run, or one sharing the folder with another run,
    ends with the same files as an uninterrupted one. `patients` (a patients.csv) adds pN staging against the
    reference (`runs.patients`): stages.csv, confusion.png and the kappa keys of metrics.json. `split`
    (`runs.cohort.select_split`): the rows of one split of a manifest's split column, `auto` the test rows when
    there is one; the line saying so goes to `progress`. `subgroups`: columns of the cohort table (names or
    1-based numbers, `runs.subgroups`) whose groups get their own figures (metrics.json `subgroups`,
    roc_subgroups.png; `outputs.subgroups`).
    """
    from wsi_vssm.runs.cohort import read_cohort, select_split
    from wsi_vssm.runs.execute import SlideTask
    from wsi_vssm.runs.jobs import predict_job
    from wsi_vssm.runs.patch_scores import evaluation_lock
    from wsi_vssm.runs.runner import RunOptions, run_slides, slide_key
    from wsi_vssm.runs.state import check_output_folder

    params = params or PredictParams()
    run = run or RunOptions()
    cohort = read_cohort(cohort_path)
    if not cohort.rows:
        raise UsageError(f"{cohort.source}: the cohort lists no slides")
    cohort, split, note = select_split(cohort, split)
    if note and progress is not None:
        progress.info(note)
    columns = _subgroup_columns(cohort, subgroups, progress)  # a column the table lacks fails before any slide
    out = Path(out_dir)
    if annotations is not None and not Path(annotations).is_dir():
        raise UsageError(f"{annotations}: --annotations must be a folder of annotation files (docs/io.md)")
    if model_path is None:
        model_path = (_model_file_for_workers(model, out) if (run.workers or run.scheduler)
                      else f"<in-memory {id(model):x}>")
    job = predict_job(out, model_path, model, params)
    tasks = [SlideTask(slide_key(r.path) if r.ok else r.name, None if r.path is None else str(r.path), r.error,
                       r.mpp) for r in cohort.rows]
    folders = {r.name: t.name for r, t in zip(cohort.rows, tasks, strict=True)}  # table name -> output folder
    if patients is not None:
        from wsi_vssm.outputs.staging import read_patients_csv
        from wsi_vssm.runs.patients import reference_sources

        try:
            table = read_patients_csv(patients, cohort_slides=folders)
        except UsageError as e:  # a patient's slide may be in another split than the one evaluated
            raise UsageError(f"{e} (evaluating the {split} rows only; --split all takes every slide)" if note
                             else str(e)) from e
        staged = [s for members in table.values() for s in members]
        # a wrong table, or a tumour node with no reference category, fails before any slide runs
        reference_sources(cohort.source, _cohort_root(cohort_path), staged, cohort.labels(),
                          annotations and Path(annotations))
    truth = (None if annotations is None  # bad files fail now, before any slide runs
             else read_cohort_annotations(Path(annotations), folders, cohort.labels(),
                                          {r.name: r.path for r in cohort.rows if r.ok}))
    with contextlib.suppress(OSError):  # the lock lives in OUT; check_output_folder says why one cannot be made
        out.mkdir(parents=True, exist_ok=True)
    with evaluation_lock(out, patches=False):  # taken before OUT changes: refused while a patch evaluation works here
        check_output_folder(out)
        if replaced := replaced_cohort_warning(out, cohort.source, split):  # before the first table is written
            warnings.warn(replaced, stacklevel=2)
        _start_report(out)
        after = InterimTable(out, cohort.rows, tasks, on_slide, progress)
        try:
            summary = run_slides(tasks, job, run, progress, on_outcome=after, on_wait=after.flush,
                                 command="evaluate")
        except KeyboardInterrupt:
            interrupted_table(out, cohort.rows, tasks, job, after, run)
            raise
        after.flush()  # before waiting for other runs' slides: the rows of this run's last slides
        _wait_for_other_runs(tasks, job, run.wait_locked, progress)
        with report_writer(out, REPORT_LOCK_WAIT_S):
            rows = [final_row(crow, o, job) for crow, o in zip(cohort.rows, summary.outcomes, strict=True)]
            write_table(out, rows)
            finished = [r for r in rows if r["status"] not in UNFINISHED]
            scored = [r for r in finished if r["probability"] is not None and r["label"] is not None]
            mosaics = _mosaic_layout(cohort_path)
            groups = _write_subgroups(out, scored, columns, slide_threshold(model, params), n_boot)
            metrics = _write_metrics(out, scored, slide_threshold(model, params), len(finished) - len(scored), n_boot,
                                     n_pending=len(rows) - len(finished), items=MOSAIC_ITEMS if mosaics else "slides",
                                     origin=threshold_origin(model, params.threshold),
                                     provenance=_provenance(cohort.source, split, model, {
                                         **{k: v for k, v in job.resolved.items() if k != "job"},
                                         "fallback_mpp": job.fallback_mpp,
                                         "params_hash": job.params_hash}) | {"mosaics": mosaics,
                                     "repeated_slides": repeated_slides(out, job.kind, scored, folders)},
                                     extra=groups)
            _write_cohort_lesions(out, rows, folders, progress)  # after metrics.json: a bad table costs only itself
            # a run with these options that finished while this one worked left its figures beside this report
            optional = ((FROC_PNG, annotations), (STAGES_CSV, patients), (CONFUSION_PNG, patients),
                        (ROC_SUBGROUPS_PNG, columns or None))
            for name, given in optional:
                if given is None and (out / name).is_file():
                    with contextlib.suppress(OSError):
                        (out / name).unlink()
            if annotations is None and is_detections_folder(out / FROC_DETECTIONS):
                shutil.rmtree(out / FROC_DETECTIONS, ignore_errors=True)
            if annotations is not None or patients is not None:
                try:
                    if annotations is not None:
                        # slides without a probability (failed, no tissue, not finished) are outside the FROC: say
                        # which, as an annotated one's lesions leave its sensitivity's denominator
                        left_out = sorted(r["slide"] for r in rows if r["probability"] is None)
                        metrics["froc"] = {**cohort_froc(out, scored, truth, folders, n_boot),
                                           "slides_left_out": left_out,
                                           "annotated_slides_left_out": [s for s in left_out if s in truth]}
                    if patients is not None and not n_unfinished(rows):
                        from wsi_vssm.runs.patients import evaluate_patients

                        metrics.update(evaluate_patients(patients, cohort.source, _cohort_root(cohort_path), out,
                                                         folders, cohort.labels(), annotations and Path(annotations),
                                                         n_boot, ran={r["slide"] for r in finished
                                                                      if r["status"] in ("done", "no_tissue")},
                                                         paths={r.name: r.path for r in cohort.rows if r.ok}))
                except BaseException:  # metrics.json was written without them: it must not say it is complete
                    atomic_write_json(out / METRICS_JSON, {**metrics, "complete": False})
                    raise
                atomic_write_json(out / METRICS_JSON, metrics)
            _drop_other_vector_copies(out, {ROC_PNG, CALIBRATION_PNG,
                                            *(name for name, given in optional if given is not None)})
        return EvaluationResult(metrics, rows, items=MOSAIC_ITEMS if mosaics else "slides")


def _drop_other_vector_copies(out: Path, written: set[str]) -> None:
    """Remove the vector copies this run did not write: of another format, or of a figure it has none of. A run
    that finished while this one worked left them, and they would not match this report."""
    from wsi_vssm.atomic import VECTOR_FORMATS, vector_formats

    for figure in REPORT_FIGURES:
        for fmt, copy in zip(VECTOR_FORMATS, vector_copies_of(figure), strict=True):
            if (figure not in written or fmt not in vector_formats()) and (out / copy).is_file():
                with contextlib.suppress(OSError):
                    (out / copy).unlink()


def _subgroup_columns(cohort, specs: Sequence[str], progress) -> dict[str, dict[str, str]]:
    """Each `--subgroup` column's values by slide name; a warning for a column with more groups than a grouping
    usually has (an identifier?)."""
    from wsi_vssm.outputs.subgroups import MANY_GROUPS
    from wsi_vssm.runs.subgroups import subgroup_columns

    columns = subgroup_columns(cohort, specs)
    for name, values in columns.items():
        n = len({v for v in values.values() if v})
        if n > MANY_GROUPS and progress is not None:
            progress.warn(f"--subgroup {name}: {n} distinct values among {len(values)} slides; a subgroup column "
                          "groups slides (a centre, a scanner): is it an identifier?")
    return columns


def _write_subgroups(out: Path, scored: list[dict], columns: dict[str, dict[str, str]], threshold: float,
                     n_boot: int) -> dict:
    """metrics.json's `subgroups` (`{}` without --subgroup) over the scored slides, and roc_subgroups.png."""
    from wsi_vssm.outputs.subgroups import subgroup_metrics, subgroups_png

    if not columns:
        return {}
    labels = [r["label"] for r in scored]
    scores = [r["probability"] for r in scored]
    ranks = _ranks(scored)
    by_column = {name: [values.get(r["slide"], "") for r in scored] for name, values in columns.items()}
    blocks = {name: subgroup_metrics(labels, scores, v, threshold, n_boot=n_boot, ranks=ranks)
              for name, v in by_column.items()}
    subgroups_png(out / ROC_SUBGROUPS_PNG, labels, scores if ranks is None else ranks, by_column, blocks)
    return {"subgroups": blocks}


def _ranks(scored: list[dict]) -> list[float] | None:
    """The logits to rank by when every item has one (`_write_metrics`), else None."""
    logits = [r.get("logit") for r in scored]
    return logits if logits and all(z is not None and math.isfinite(z) for z in logits) else None


def _write_cohort_lesions(out: Path, rows: list[dict], folders: dict[str, str], progress) -> None:
    """OUT/lesions.csv: the lesions of every slide that ran through, one table with a `slide` column."""
    from wsi_vssm.outputs.lesions import write_cohort_lesions_csv

    if (out / COHORT_LESIONS_CSV).is_dir():  # a slide folder of that name from a version before the table
        if progress is not None:
            progress.warn(f"{out / COHORT_LESIONS_CSV}: a folder, not written over; no cohort lesions table")
        return
    done = [(r["slide"], out / folders[r["slide"]] / LESIONS_CSV) for r in rows if r["status"] == "done"]
    for problem in write_cohort_lesions_csv(out / COHORT_LESIONS_CSV, done):
        if progress is not None:
            progress.warn(f"{problem}; its lesions are not in {out / COHORT_LESIONS_CSV}")


MOSAIC_ITEMS = "mosaic slides"  # what roc.png and the warnings call a cohort that `synth --from-patches` made


def _mosaic_layout(cohort_path) -> str | None:
    """The mosaic.json beside a cohort that `synth --from-patches` made (absolute), else None: its figures are
    mosaic-slide figures, not whole-slide ones, and metrics.json, roc.png and the summary line say so."""
    layout = _cohort_root(cohort_path) / "mosaic.json"
    return os.path.abspath(layout) if layout.is_file() else None


def _provenance(source, split: str | None, model, parameters: dict) -> dict:
    """What a metrics.json was computed from, for a reader who has only the file: the cohort table (absolute),
    the split, the model's identity (as prediction.json's `model`, with its slide head), the parameters, the
    software version."""
    from wsi_vssm import __version__
    from wsi_vssm.models.mil import head_summary
    from wsi_vssm.pipeline.predict import model_record

    spelt = {"float32": "fp32", "bfloat16": "bf16"}  # as prediction.json and --precision spell them
    parameters = {**parameters, "precision": spelt.get(parameters.get("precision"), parameters.get("precision"))}
    model_block = {**model_record(model), "slide_head": head_summary(model.mil.config)}
    return {"cohort": os.path.abspath(source), "split": split, "model": model_block, "parameters": parameters,
            "version": __version__}


def _cohort_root(cohort_path: str | os.PathLike) -> Path:
    """The folder a cohort's relative paths (and its `annotations/`) hang from."""
    return Path(cohort_path) if Path(cohort_path).is_dir() else Path(cohort_path).parent


def _wait_for_other_runs(tasks: list, job, wait: float, progress) -> None:
    """Before the report: wait up to `wait` seconds while another run holds any of the cohort's slides (e.g. one
    that started a slide this run has done), so the report counts what it finishes."""
    import time

    from wsi_vssm.runs.runner import LOCK_POLL_S
    from wsi_vssm.runs.state import live_lock

    deadline, told = time.monotonic() + wait, False
    while True:
        held = [t.name for t in tasks if t.error is None and live_lock(job.out, job.kind, t.name) is not None]
        if not held or time.monotonic() >= deadline:
            return
        if not told and progress is not None:
            progress.info(f"waiting up to {wait:g} s for {len(held)} slide(s) another run is doing (--wait-locked)")
            told = True
        time.sleep(LOCK_POLL_S)


def _start_report(out: Path) -> None:
    """Mark an earlier run's metrics.json as not complete while this run works, and take away the files that
    have no such mark: its cohort lesions.csv, a patch run's model_patches.csv, the froc.png, stages.csv,
    confusion.png and roc_subgroups.png of `--annotations`, `--patients` and `--subgroup`, and every figure's
    vector copies (`--vector`). Each is rewritten at the end when this run has one (each
    slide's own lesions.csv stays); a slide run over a patch run's folder, or the reverse, or a run without the
    option that made one, left it standing beside figures it no longer matched."""
    from wsi_vssm.runs.state import STATE_DIR

    with report_writer(out, REPORT_LOCK_WAIT_S) as held:
        # a patch run keeps no state folder, and without one no slide run can be writing these tables
        mine = held or not (out / STATE_DIR).is_dir()
        # a folder of one of these names is an old slide's, warned of
        for table in (COHORT_LESIONS_CSV, MODEL_PATCHES_CSV, FROC_PNG, STAGES_CSV, CONFUSION_PNG, ROC_SUBGROUPS_PNG,
                      *VECTOR_COPIES):  # the vector copies: written again with --vector
            if mine and (out / table).is_file():
                with contextlib.suppress(OSError):  # a folder that refuses it refuses the final table too
                    (out / table).unlink()
        if mine and is_detections_folder(out / FROC_DETECTIONS):
            shutil.rmtree(out / FROC_DETECTIONS, ignore_errors=True)
        metrics = read_metrics(out)
        if metrics is not None and not (metrics.get("complete") is False and STALE_KEY in metrics):
            atomic_write_json(out / METRICS_JSON, {**metrics, "complete": False, STALE_KEY: STALE_NOTE})


# what an earlier run's metrics.json says while a later run works on OUT (its counts and figures are the earlier
# run's until this one writes its own); the final report has no such key
STALE_KEY = "stale"
STALE_NOTE = ("the figures of an earlier run on this folder; a later run started and has not written its report: "
              "rerun the same command to finish it")


def _model_file_for_workers(model, out: Path) -> str:
    """Dask workers load models by path: save an in-memory model once under OUT/.state/models/<hash>.pt."""
    from wsi_vssm.models.model_file import state_dict_hash
    from wsi_vssm.models.slide_model import save_model
    from wsi_vssm.runs.state import STATE_DIR

    path = out / STATE_DIR / "models" / f"{state_dict_hash(model.state_dict())[:16]}.pt"
    if not path.is_file():
        save_model(model, path, metadata=getattr(model, "metadata", None))
    return str(path)


def _write_metrics(out: Path, scored: list[dict], threshold: float, n_failed: int, n_boot: int,
                   n_pending: int = 0, items: str = "slides", provenance: dict | None = None,
                   origin: dict | None = None, extra: dict | None = None) -> dict:
    """metrics.json (`report.cohort_metrics`, then `threshold_origin` (`origin`, `params.threshold_origin`),
    the counts and exact intervals at the threshold (`report.operating_point`), the sensitivity at fixed
    specificities and the average precision (`ranking.ranking_metrics`), `n_pending`: slides not through
    yet, `complete`: none is, `n_out_of_domain`: scored slides whose prediction says `in_domain: false` (None for
    patches, which have no domain verdict), `calibration`, `intervals`, any `reason`, the `extra` keys
    (`subgroups`), then the `provenance` keys and `environment`), roc.png and calibration.png, atomically."""
    from wsi_vssm.outputs.calibration import calibration_png, calibration_summary
    from wsi_vssm.outputs.ranking import ranking_metrics
    from wsi_vssm.outputs.report import METRIC_KEYS, cohort_metrics, operating_point, roc_png

    labels = np.array([r["label"] for r in scored], dtype=np.int64)
    scores = np.array([r["probability"] for r in scored], dtype=np.float64)
    # ranked by the logits when every item has one: probabilities round to 1.0 above a logit of about 37, and
    # the default model calls slides at 50 and more; results written before logits were recorded have none
    logits = _ranks(scored)
    by_logit = logits is not None
    ranks = np.array(logits, dtype=np.float64) if by_logit else None
    metrics = cohort_metrics(labels, scores, threshold, n_failed=n_failed, n_boot=n_boot, ranks=ranks, items=items)
    calibration = calibration_summary(labels, scores, n_boot=n_boot)
    # patches carry no domain verdict (None); slides do, and a cohort with no slide scored has 0 out of domain
    n_out = None if items == "patches" else sum(r.get("in_domain") is False for r in scored)
    metrics = {**{k: metrics.pop(k) for k in METRIC_KEYS}, "threshold_origin": origin,
               **operating_point(labels, scores, threshold),
               **ranking_metrics(labels, scores if ranks is None else ranks, scores, n_boot=n_boot),
               "auc_ranked_by": "logit" if by_logit else "probability",
               "n_pending": int(n_pending), "complete": not n_pending,
               "n_out_of_domain": n_out, "calibration": calibration, "intervals": intervals(n_boot),
               **metrics,  # then `reason`, when there is one
               **(extra or {}),
               **(provenance or {}), "environment": environment()}
    roc_png(out / ROC_PNG, labels, scores, auc=metrics.get("auc"), ci=metrics.get("auc_ci95"),
            threshold=threshold, items=items, ranks=ranks)
    calibration_png(out / CALIBRATION_PNG, labels, scores, calibration)
    atomic_write_json(out / METRICS_JSON, metrics)  # last: a "complete" metrics.json has its figures beside it
    return metrics


def intervals(n_boot: int) -> dict:
    """How metrics.json's 95% intervals were made, so that a reader can state it (and rerun it): a rerun with
    another --bootstrap gives other bounds. `method` and `resamples` are the bootstraps'; the exact and DeLong
    intervals draw nothing."""
    return {"level": 0.95, "method": "bootstrap", "resamples": int(n_boot), "seed": 0,
            "generator": "numpy.random.default_rng(seed) (PCG64); quantiles by numpy's default (linear)",
            "auc_ci95": "percentile; positives and negatives resampled separately, each sorted by score first "
                        "(the row order does not matter); wsi_vssm.outputs.report.bootstrap_auc_ci(labels, "
                        "ranked scores, resamples, seed) on predictions.csv gives it again",
            "auc_ci95_delong": "DeLong's variance on the logit scale, mapped back; no resampling",
            "sensitivity_ci95": "Clopper-Pearson (exact binomial); also specificity_ci95, accuracy_ci95, ppv_ci95 "
                                "and npv_ci95",
            "sensitivity_at_specificity": "percentile over the auc_ci95 resamples; also average_precision_ci95",
            "ece_ci95": "percentile of the items' resamples, shifted by the bootstrap bias, clipped to [0, 1]; "
                        "10 equal-width bins",
            "brier_ci95": "percentile of the items' resamples",
            "slope_ci95": "Wald, from the logistic fit's information; also intercept_ci95",
            "kappa_ci95": "percentile; patients resampled (with --patients)",
            "froc_ci95": "percentile; slides with and without a lesion resampled separately (with --annotations)"}


def environment() -> dict:
    """The software the report was computed with, for a methods section (each slide's prediction.json has the
    device it ran on)."""
    import platform

    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "platform": platform.platform()}
