"""Cohort evaluation: predict every slide of a cohort, then AUC with a bootstrap CI, a ROC plot and a table.

Also scores patch datasets in ImageFolder layout (`DIR/0/*.jpg`, `DIR/1/*.jpg`, e.g. PCam): each image is scored
by the cell head on the cell covering its centre, which is how PCam labels are defined.

Finished work is never lost: each slide's state is kept by `wsi_vssm.runner`, `predictions.csv` is rewritten
atomically after every slide, and a slide that fails is recorded with its error while the run goes on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi_vssm.errors import UsageError
from wsi_vssm.outputs.files import HEATMAP_ZARR, METRICS_JSON, PREDICTIONS_CSV, ROC_PNG
from wsi_vssm.pipeline.predict import PredictParams, slide_threshold


@dataclass
class EvaluationResult:
    metrics: dict
    rows: list[dict] = field(default_factory=list)

    @property
    def n_failed(self) -> int:
        return sum(r["status"] == "failed" for r in self.rows)


def is_patch_folder(path: Path) -> bool:
    return path.is_dir() and (path / "0").is_dir() and (path / "1").is_dir() and not (path / "reference.csv").exists()


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
) -> EvaluationResult:
    """Predict each slide of a manifest / CAMELYON16 folder into `out_dir/<slide>/`, then write the cohort files.

    Slides go through `wsi_vssm.runner` (per-slide state, resume, locks; serial or Dask per `run`, a
    RunOptions). `model_path` is the file workers load; without one a Dask run saves `model` under
    OUT/.state/models/. `on_slide(row)` is called after each slide. The final predictions.csv and metrics.json
    are rebuilt from the per-slide states, so a resumed run ends with the same files as an uninterrupted one.
    """
    from wsi_vssm.atomic import remove_temporaries
    from wsi_vssm.runs.cohort import read_cohort
    from wsi_vssm.runs.execute import SlideTask
    from wsi_vssm.runs.jobs import predict_job
    from wsi_vssm.runs.runner import RunOptions, run_slides, slide_key

    params = params or PredictParams()
    run = run or RunOptions()
    cohort = read_cohort(cohort_path)
    if not cohort.rows:
        raise UsageError(f"{cohort.source}: the cohort lists no slides")
    out = Path(out_dir)
    if annotations is not None and not Path(annotations).is_dir():
        raise UsageError(f"{annotations}: --annotations must be a folder of ASAP XML / GeoJSON files")
    if model_path is None:
        model_path = (_model_file_for_workers(model, out) if (run.workers or run.scheduler)
                      else f"<in-memory {id(model):x}>")
    job = predict_job(out, model_path, model, params)
    tasks = [SlideTask(slide_key(r.path) if r.ok else r.name, None if r.path is None else str(r.path), r.error)
             for r in cohort.rows]
    finished: dict[int, dict] = {}
    index = {id(t): i for i, t in enumerate(tasks)}

    def after(outcome) -> None:
        i = index[id(outcome.task)]
        finished[i] = _row(cohort.rows[i], outcome)
        try:  # after every slide, so a killed run leaves its table; best effort: the final write is the record
            _write_table(out, [finished[k] for k in sorted(finished)])
        except OSError as e:
            if progress is not None:
                progress.warn(f"{out / 'predictions.csv'}: not updated ({e.strerror or e}); the slide is recorded")
        if on_slide is not None:
            on_slide(finished[i])

    remove_temporaries(out, "predictions.csv.")  # a killed run's half-written cohort files
    remove_temporaries(out, "metrics.json.")
    remove_temporaries(out, "roc.png.")
    summary = run_slides(tasks, job, run, progress, on_outcome=after)
    rows = [_row(cohort.rows[i], o) for i, o in enumerate(summary.outcomes)]
    _write_table(out, rows)
    scored = [r for r in rows if r["probability"] is not None and r["label"] is not None]
    metrics = _write_metrics(out, scored, slide_threshold(model, params), len(rows) - len(scored), n_boot)
    if annotations is not None:
        folders = {r.name: t.name for r, t in zip(cohort.rows, tasks, strict=True)}  # table name -> output folder
        metrics["froc"] = _froc(out, scored, Path(annotations), folders)
        _write_json(out / METRICS_JSON, metrics)
    return EvaluationResult(metrics, rows)


def _row(crow, outcome) -> dict:
    """A predictions.csv row from a slide's outcome (its state when it ran or was done before)."""
    result = (outcome.state or {}).get("result") or {}
    row = {"slide": crow.name, "label": crow.label, "probability": None, "status": "failed",
           "error": outcome.message or None}
    if outcome.ok:
        p = result.get("probability")
        row.update(probability=p, status="done" if p is not None else "no_tissue",
                   error=None if p is not None else result.get("reason"))
    elif outcome.status == "locked":
        row["status"] = "locked"
    return row


def _write_table(out: Path, rows: list[dict]) -> None:
    from wsi_vssm.outputs.report import write_predictions_csv

    write_predictions_csv(out / PREDICTIONS_CSV, rows)


def _model_file_for_workers(model, out: Path) -> str:
    """Dask workers load models by path: save an in-memory model once under OUT/.state/models/<hash>.pt."""
    from wsi_vssm.models.model_file import state_dict_hash
    from wsi_vssm.models.slide_model import save_model
    from wsi_vssm.runs.state import STATE_DIR

    path = out / STATE_DIR / "models" / f"{state_dict_hash(model.state_dict())[:16]}.pt"
    if not path.is_file():
        save_model(model, path, metadata=getattr(model, "metadata", None))
    return str(path)


def evaluate_patches(
    folder: str | os.PathLike, model, out_dir: str | os.PathLike, mpp: float | None, batch_size: int = 64,
    n_boot: int = 2000, threshold: float = 0.5,
) -> EvaluationResult:
    """Score an ImageFolder patch dataset by the centre cell of each image; write predictions and metrics."""
    import torch

    from wsi_vssm.io.base import resize
    from wsi_vssm.models.inputs import to_tensor
    from wsi_vssm.outputs.report import write_predictions_csv
    from wsi_vssm.training.data.patches import load_patches

    if mpp is None:
        raise UsageError(f"{folder}: patch images carry no resolution; state it with --mpp (PCam: 0.97)")
    ds = load_patches(folder)
    scale = mpp / model.mpp  # image px -> model px
    rows, batch, names = [], [], []
    model.eval()

    def flush():
        x = torch.cat(batch)
        with torch.inference_mode():
            logits = model.cell_logits(x)  # (B, h, w)
        h, w = logits.shape[1:]
        cy, cx = min(h - 1, int(x.shape[2] / 2 // 32)), min(w - 1, int(x.shape[3] / 2 // 32))
        probs = torch.sigmoid(logits[:, cy, cx]).tolist()
        for (name, label), p in zip(names, probs, strict=True):
            rows.append({"slide": name, "label": label, "probability": p, "status": "done", "error": None})
        batch.clear()
        names.clear()

    for i in range(len(ds)):
        img, label = ds[i]
        if abs(scale - 1) > 1e-3:
            img = resize(img, max(32, round(img.shape[1] * scale)), max(32, round(img.shape[0] * scale)))
        if batch and batch[0].shape[2:] != img.shape[:2]:
            flush()
        batch.append(to_tensor(img))
        names.append((ds.items[i].name, int(label)))
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions_csv(out / PREDICTIONS_CSV, rows)
    metrics = _write_metrics(out, rows, threshold, 0, n_boot)
    return EvaluationResult(metrics, rows)


def _write_metrics(out: Path, scored: list[dict], threshold: float, n_failed: int, n_boot: int) -> dict:
    from wsi_vssm.outputs.report import cohort_metrics, roc_png

    labels = np.array([r["label"] for r in scored], dtype=np.int64)
    scores = np.array([r["probability"] for r in scored], dtype=np.float64)
    metrics = cohort_metrics(labels, scores, threshold, n_failed=n_failed, n_boot=n_boot)
    _write_json(out / METRICS_JSON, metrics)
    roc_png(out / ROC_PNG, labels, scores, auc=metrics.get("auc"), ci=metrics.get("auc_ci95"),
            threshold=threshold)
    return metrics


FROC_MIN_PROBABILITY = 0.01


def _froc(out: Path, scored: list[dict], annotations: Path, folders: dict[str, str] | None = None) -> dict:
    """CAMELYON16 lesion-level FROC from each slide's heatmap and its ASAP/GeoJSON annotations, if any.
    `folders` maps a table's slide name to its output folder (the file's stem; the case may differ)."""
    from wsi_vssm.io.annotations import read_annotations
    from wsi_vssm.outputs.froc import detections_from_heatmap, froc
    from wsi_vssm.outputs.heatmap import read_heatmap_zarr

    if not annotations.is_dir():
        raise UsageError(f"{annotations}: --annotations must be a folder of ASAP XML / GeoJSON files")
    detections, truth, mpps = {}, {}, {}
    for r in scored:
        folder = (folders or {}).get(r["slide"], r["slide"])
        prob, _, _, attrs = read_heatmap_zarr(out / folder / HEATMAP_ZARR)
        meta = attrs["wsi_vssm"]
        # Every local maximum down to a low floor: the FROC curve sweeps the detection threshold itself.
        detections[r["slide"]] = detections_from_heatmap(prob, meta["cell0"], meta["origin"],
                                                         threshold=FROC_MIN_PROBABILITY)
        mpps[r["slide"]] = meta["mpp"]
        files = [p for name in dict.fromkeys((r["slide"], folder)) for ext in (".xml", ".geojson", ".json")
                 for p in annotations.glob(name + ext)]
        if files:  # slides without an annotation file are normal
            truth[r["slide"]] = read_annotations(files[0])
    return froc(detections, truth, mpps).as_dict()


def _write_json(path: Path, obj: dict) -> None:
    from wsi_vssm.atomic import atomic_write_json

    atomic_write_json(path, obj)
