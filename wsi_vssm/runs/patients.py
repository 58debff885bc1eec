"""`evaluate --patients`: node categories and pN stages per patient, against the reference, with kappa.

The predicted category of a node is that of its largest lesion in `OUT/<slide>/prediction.json` (`lesions`,
measured by `outputs.lesions`); a slide without lesions is `negative`. The reference category is the `category`
column of the cohort's table (reference.csv or a manifest) when it has one, else the slide's lesion annotations
(ASAP XML or GeoJSON in the cohort's `annotations/` folder, or `--annotations DIR`) measured by the same diameter
rule; no annotation file means negative, which a slide labelled tumour cannot be (an error before any slide
runs). Patients are staged from their nodes by the CAMELYON17 rules (`outputs.staging`).
"""

from __future__ import annotations

import contextlib
import csv
import os
import warnings
from pathlib import Path

from wsi_vssm.errors import UsageError
from wsi_vssm.outputs.files import CONFUSION_PNG, PREDICTION_JSON, STAGES_CSV


def evaluate_patients(patients_csv: str | os.PathLike, table: Path, cohort_root: Path, out: Path,
                      folders: dict[str, str], labels: dict[str, int], annotations: Path | None = None,
                      n_boot: int = 2000, ran: set[str] | None = None, paths: dict | None = None) -> dict:
    """Stage every patient of `patients_csv` from the predictions in `out` and write stages.csv and the node
    confusion matrix; returns the metrics.json keys (`kappa`, `kappa_ci95`, `node_confusion`, ...).

    `table` is the cohort's table (reference.csv or a manifest: its `category` column, if any, is the reference),
    `labels` its slide labels. `folders` maps each slide name to its output folder under `out`. Raises
    UsageError when patients.csv names a slide that is not in the cohort, or a tumour node has no reference
    category (`reference_sources`). A patient with a node slide without a prediction (it failed) is left out,
    with a warning, and listed in `patients_not_staged`. `ran`: the slides that ran through with this run's
    parameters (predictions.csv `done` or `no_tissue`); a slide outside it is treated as failed even when its
    folder still holds an older run's prediction.json (that of another file, or of other parameters). `paths`:
    each slide's file, on which an NDP.view annotation file is placed (`reference_categories`).
    """
    from wsi_vssm.outputs.staging import (
        confusions_png,
        read_patients_csv,
        stage_patients,
        staging_metrics,
        write_stages_csv,
    )

    patients = read_patients_csv(patients_csv, cohort_slides=folders)
    records = {}
    for s in {s for members in patients.values() for s in members}:
        if ran is not None and s not in ran:
            continue
        with contextlib.suppress(UsageError):  # a node slide that failed has none: its patient is left out
            records[s] = _prediction(out / folders[s])
    unstaged = sorted(p for p, members in patients.items() if any(s not in records for s in members))
    if unstaged:
        warnings.warn(f"{len(unstaged)} patient(s) not staged, a node slide of theirs has no prediction (it "
                      f"failed): {', '.join(unstaged[:5])}{' ...' if len(unstaged) > 5 else ''}", UserWarning,
                      stacklevel=2)
        patients = {p: members for p, members in patients.items() if p not in unstaged}
    if not patients:
        return {"kappa": None, "kappa_ci95": None, "n_patients": 0, "patients_not_staged": unstaged}
    slides = [s for members in patients.values() for s in members]
    records = {s: records[s] for s in slides}
    predicted = {s: predicted_category(rec) for s, rec in records.items()}
    mpps = {s: float(rec["mpp"]["slide"]) for s, rec in records.items()}
    reference = reference_categories(reference_sources(table, cohort_root, slides, labels, annotations), mpps,
                                     paths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same patients are staged twice: warn once, below
        ref_stages = stage_patients({p: [reference[s] for s in m] for p, m in patients.items()})
    stages = stage_patients({p: [predicted[s] for s in m] for p, m in patients.items()})
    write_stages_csv(out / STAGES_CSV, stages, ref_stages)
    metrics = staging_metrics(stages, ref_stages, predicted, reference, n_boot=n_boot)
    stage, node = metrics["stage_confusion"], metrics["node_confusion"]
    confusions_png(out / CONFUSION_PNG, [
        (stage["matrix"], stage["labels"], f"patients' pN stage ({len(stages)}; kappa {metrics['kappa']:.2f})"),
        (node["matrix"], node["labels"], f"node categories ({len(predicted)})")])
    return {**metrics, "patients_not_staged": unstaged}


def _prediction(folder: Path) -> dict:
    from wsi_vssm.outputs.prediction import read_prediction_json

    return read_prediction_json(folder / PREDICTION_JSON)


def predicted_category(record: dict) -> str:
    """The category of a slide's largest predicted lesion in its prediction.json record (`negative` without)."""
    from wsi_vssm.outputs.lesions import node_category

    return node_category([float(les["diameter_mm"]) for les in record.get("lesions") or []])


def reference_sources(table: Path, cohort_root: Path, slides: list[str], labels: dict[str, int],
                      annotations: Path | None = None) -> dict[str, str | Path]:
    """{slide: where its reference category comes from}: the cohort table's `category` column (the value), else
    its lesion annotation file (a Path), else `negative`. Cheap (nothing is measured), so `evaluate` calls it
    before any slide runs. A slide labelled tumour with neither raises UsageError: staged as negative, its
    patient's reference pN would be wrong and the kappa flattered."""
    from wsi_vssm.io.annotations import annotation_file_names  # here: shapely only when staging runs

    table_categories = _category_column(table)
    if table_categories is not None:
        missing = [s for s in slides if s not in table_categories]
        if missing:
            raise UsageError(f"{table}: no category for {', '.join(missing[:5])}")
        return {s: table_categories[s] for s in slides}
    folder = annotations or cohort_root / "annotations"
    out: dict[str, str | Path] = {}
    for s in slides:
        path = next((folder / n for n in annotation_file_names(s) if (folder / n).is_file()), None)
        out[s] = "negative" if path is None else path
    unknown = [s for s in slides if out[s] == "negative" and labels.get(s) == 1]
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise UsageError(f"{table}: --patients needs the reference category of every tumour node, but "
                         f"{', '.join(unknown[:5])}{more} (labelled tumour) has no `category` column in the "
                         f"table and no annotation file in {folder}; add a category column (negative, itc, "
                         "micro, macro) or give --annotations DIR")
    return out


def reference_categories(sources: dict[str, str | Path], slide_mpps: dict[str, float],
                         paths: dict | None = None) -> dict[str, str]:
    """{slide: category} from `reference_sources`: a table's value parsed, an annotation file measured (an
    NDP.view file placed on the slide's file from `paths`, else on the slide beside it)."""
    from wsi_vssm.io.annotations import NDPA, read_annotations
    from wsi_vssm.outputs.staging import node_category_from_annotations, parse_category

    def measured(s: str, src: Path) -> str:
        if src.suffix.lower() == NDPA:
            src = list(read_annotations(src, slide=(paths or {}).get(s)).classes.items())
        return node_category_from_annotations(src, slide_mpps[s])

    return {s: measured(s, src) if isinstance(src, Path) else parse_category(src, f"category of slide {s}")
            for s, src in sources.items()}


def _category_column(path: Path) -> dict[str, str] | None:
    """{slide: category} of a reference.csv with a `category` column; None without one (or without the file)."""
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or "category" not in [c.strip().lower() for c in rows[0]]:
        return None
    header = [c.strip().lower() for c in rows[0]]
    si, ci = header.index("slide") if "slide" in header else 0, header.index("category")
    return {Path(r[si].strip()).stem: r[ci].strip() for r in rows[1:] if len(r) > max(si, ci) and r[si].strip()}
