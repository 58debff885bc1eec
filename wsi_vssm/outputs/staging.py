"""From nodes to patients: node categories, CAMELYON17 pN stages, quadratic-weighted kappa, stages.csv.

A node (one slide) is `negative`, `itc`, `micro` or `macro`: the category of its largest lesion by longest
diameter (see `wsi_vssm.outputs.lesions`: ITC <= 0.2 mm, micro <= 2 mm, macro > 2 mm), `negative` without any.

A patient's pN stage follows from its nodes by the CAMELYON17 rules. A node is *positive* when it holds a
micro- or macrometastasis; nodes with isolated tumour cells only are not positive.

* `pN0`:     no micrometastases or macrometastases, and no ITCs found.
* `pN0(i+)`: only ITCs found.
* `pN1mi`:   micrometastases found, but no macrometastases (however many nodes).
* `pN1`:     metastases in 1 to 3 nodes, of which at least one is a macrometastasis.
* `pN2`:     metastases in 4 to 9 nodes, of which at least one is a macrometastasis.

CAMELYON17 patients have 5 nodes, so pN2 is as far as it goes; with more nodes, 10 or more positive nodes
(AJCC pN3a) are still called `pN2`, with a warning. The rules do not need exactly 5 nodes: a patient with more or
fewer is staged, with a warning.

Agreement over patients is Cohen's kappa with quadratic weights over the ordered stages (CAMELYON17's score):
kappa = 1 - sum(w * O) / sum(w * E), w_ij = (i - j)^2 / (k - 1)^2, O the observed confusion matrix and E the
one expected from its marginals. When the two agree on every patient it is 1.0 (also when they use one stage
only, where the formula is 0 / 0).
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from wsi_vssm.atomic import atomic_write_figure, atomic_write_text
from wsi_vssm.errors import UsageError
from wsi_vssm.outputs.files import from_spreadsheet_safe, spreadsheet_safe

NODE_CATEGORIES = ("negative", "itc", "micro", "macro")
STAGES = ("pN0", "pN0(i+)", "pN1mi", "pN1", "pN2")
NODES_PER_PATIENT = 5
STAGES_COLUMNS = ("patient", "stage", "reference_stage")


class StagingWarning(UserWarning):
    """Input that is staged anyway but looks unusual (a patient with != 5 nodes, an unknown annotation group)."""


# ---- categories and stages ---------------------------------------------------------------------------------
def parse_category(value, where: str = "") -> str:
    """A node category from text (case and surrounding blanks ignored); UsageError listing the valid ones."""
    v = str(value).strip().lower()
    if v not in NODE_CATEGORIES:
        at = f"{where}: " if where else ""
        raise UsageError(f"{at}unknown node category {value!r}; valid: {', '.join(NODE_CATEGORIES)}")
    return v


def patient_stage(categories: Iterable[str]) -> str:
    """The pN stage of one patient from its node categories (the rules in the module docstring)."""
    cats = [parse_category(c) for c in categories]
    n_macro = cats.count("macro")
    n_positive = n_macro + cats.count("micro")
    if n_macro:
        if n_positive >= 10:
            warnings.warn(
                f"{n_positive} positive nodes (AJCC pN3a) are staged pN2: CAMELYON17 stops there",
                StagingWarning, stacklevel=2,
            )  # fmt: skip
        return "pN1" if n_positive <= 3 else "pN2"
    if n_positive:
        return "pN1mi"
    return "pN0(i+)" if "itc" in cats else "pN0"


def stage_patients(
    nodes_by_patient: Mapping[str, Sequence[str]], expected_nodes: int = NODES_PER_PATIENT
) -> dict[str, str]:
    """{patient: stage} from {patient: [node category, ...]}, in the input's order.

    A patient without exactly `expected_nodes` nodes is staged anyway, with one `StagingWarning` naming it.
    """
    out = {}
    for patient, cats in nodes_by_patient.items():
        cats = list(cats)
        if len(cats) != expected_nodes:
            warnings.warn(
                f"patient {patient} has {len(cats)} node(s), not {expected_nodes}: staged from the nodes it has",
                StagingWarning, stacklevel=2,
            )  # fmt: skip
        out[patient] = patient_stage(cats)
    return out


# ---- agreement ---------------------------------------------------------------------------------------------
def confusion_matrix(reference: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """(k, k) int64 counts: rows the reference label, columns the predicted one, in `labels` order."""
    ref, pred = _codes(reference, labels, "reference"), _codes(predicted, labels, "predicted")
    if ref.size != pred.size:
        raise UsageError(f"{ref.size} reference and {pred.size} predicted labels: they must pair up")
    k = len(labels)
    return np.bincount(ref * k + pred, minlength=k * k).reshape(k, k).astype(np.int64)


def quadratic_kappa(reference: Sequence[str], predicted: Sequence[str], labels: Sequence[str] = STAGES) -> float:
    """Cohen's kappa with quadratic weights over the ordered `labels` (see the module docstring)."""
    m = confusion_matrix(reference, predicted, labels)
    if m.sum() == 0:
        raise UsageError("kappa needs at least one patient")
    return float(_kappa_batch(m[None])[0])


def bootstrap_kappa_ci(
    reference: Sequence[str],
    predicted: Sequence[str],
    labels: Sequence[str] = STAGES,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile (1 - alpha) interval of the quadratic kappa over `n_boot` resamples of the patients (with
    replacement). Deterministic for a given `seed`, whatever the order of the patients."""
    ref, pred = _codes(reference, labels, "reference"), _codes(predicted, labels, "predicted")
    if ref.size != pred.size or ref.size == 0:
        raise UsageError(f"kappa needs paired labels for at least one patient, got {ref.size} and {pred.size}")
    if not (isinstance(n_boot, int) and n_boot >= 1):
        raise UsageError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0 < alpha < 1:
        raise UsageError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    k, n = len(labels), ref.size
    pair = np.sort(ref * k + pred)  # sorted: the interval depends on the patients, not on their order
    kappas = np.empty(n_boot)
    batch = max(1, 2_000_000 // n)  # bound memory on large cohorts
    for start in range(0, n_boot, batch):
        b = min(batch, n_boot - start)
        codes = pair[rng.integers(0, n, size=(b, n))] + (np.arange(b) * k * k)[:, None]
        mats = np.bincount(codes.ravel(), minlength=b * k * k).reshape(b, k, k)
        kappas[start : start + b] = _kappa_batch(mats)
    low, high = np.quantile(kappas, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _kappa_batch(mats: np.ndarray) -> np.ndarray:
    """Quadratic kappa of each (k, k) confusion matrix in a (b, k, k) stack."""
    mats = mats.astype(np.float64)
    k = mats.shape[-1]
    idx = np.arange(k)
    w = (idx[:, None] - idx[None, :]) ** 2 / max(k - 1, 1) ** 2
    n = mats.sum((1, 2))
    expected = mats.sum(2)[:, :, None] * mats.sum(1)[:, None, :] / n[:, None, None]
    observed_d = (w * mats).sum((1, 2))
    expected_d = (w * expected).sum((1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = 1.0 - observed_d / expected_d
    return np.where(observed_d == 0, 1.0, kappa)


def _codes(values: Sequence[str], labels: Sequence[str], what: str) -> np.ndarray:
    index = {lab: i for i, lab in enumerate(labels)}
    bad = sorted({str(v) for v in values if v not in index})
    if bad:
        raise UsageError(f"unknown {what} label(s) {bad[:5]}; valid: {', '.join(labels)}")
    return np.array([index[v] for v in values], np.int64)


def staging_metrics(
    stages: Mapping[str, str],
    reference_stages: Mapping[str, str],
    node_categories: Mapping[str, str] | None = None,
    reference_categories: Mapping[str, str] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """The patient keys of metrics.json: `kappa`, `kappa_ci95`, `n_patients`, `stage_confusion` and (with node
    categories: slide -> category, both) `node_confusion`; each confusion is {"labels", "matrix"} with rows the
    reference. Patients or slides missing from either side are left out. With no patient, kappa is None."""
    patients = [p for p in stages if p in reference_stages]
    ref, pred = [reference_stages[p] for p in patients], [stages[p] for p in patients]
    out: dict = {"kappa": None, "kappa_ci95": None, "n_patients": len(patients)}
    if patients:
        out["kappa"] = quadratic_kappa(ref, pred)
        out["kappa_ci95"] = list(bootstrap_kappa_ci(ref, pred, n_boot=n_boot, seed=seed))
    out["stage_confusion"] = {"labels": list(STAGES), "matrix": confusion_matrix(ref, pred, STAGES).tolist()}
    if node_categories is not None and reference_categories is not None:
        slides = [s for s in node_categories if s in reference_categories]
        m = confusion_matrix(
            [reference_categories[s] for s in slides], [node_categories[s] for s in slides], NODE_CATEGORIES
        )
        out["node_confusion"] = {"labels": list(NODE_CATEGORIES), "matrix": m.tolist()}
    return out


def confusion_png(
    path: str | os.PathLike,
    matrix: np.ndarray,
    labels: Sequence[str],
    title: str = "",
    xlabel: str = "predicted",
    ylabel: str = "reference",
) -> None:
    """Write a confusion matrix (rows reference, columns predicted) as an annotated PNG, atomically."""
    confusions_png(path, [(matrix, labels, title)], xlabel, ylabel)


def confusions_png(
    path: str | os.PathLike,
    panels: Sequence[tuple[np.ndarray, Sequence[str], str]],
    xlabel: str = "predicted",
    ylabel: str = "reference",
) -> None:
    """Several confusion matrices side by side (`(matrix, labels, title)` each; rows reference, columns
    predicted) in one annotated PNG, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrices = [np.asarray(m) for m, _, _ in panels]
    for m, (_, labels, _) in zip(matrices, panels, strict=True):
        if m.ndim != 2 or m.shape != (len(labels), len(labels)):
            raise UsageError(f"confusion matrix must be {len(labels)} x {len(labels)}, got shape {m.shape}")
    side = max(len(labels) for _, labels, _ in panels)
    fig = Figure(figsize=((1.2 + 0.75 * side) * len(panels), 1.0 + 0.7 * side), dpi=120)
    FigureCanvasAgg(fig)  # the Agg canvas directly: no pyplot global state
    for k, (m, (_, labels, title)) in enumerate(zip(matrices, panels, strict=True)):
        ax = fig.add_subplot(1, len(panels), k + 1)
        ax.imshow(m, cmap="Blues", vmin=0, vmax=max(1, int(m.max())))
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                dark = m[i, j] > m.max() / 2
                ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=8, color="w" if dark else "k")
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.set_title(title or f"{int(m.sum())} pairs, {int(np.trace(m))} agree", fontsize=9)
    fig.tight_layout()
    atomic_write_figure(path, fig)


# ---- tables ------------------------------------------------------------------------------------------------
def write_stages_csv(
    path: str | os.PathLike, stages: Mapping[str, str], reference_stages: Mapping[str, str] | None = None
) -> None:
    """`stages.csv` atomically: one row per patient of `stages` (its order), columns `STAGES_COLUMNS`;
    `reference_stage` is empty where there is none."""
    ref = reference_stages or {}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(STAGES_COLUMNS)
    for patient, stage in stages.items():
        writer.writerow([spreadsheet_safe(patient), stage, ref.get(patient, "")])
    atomic_write_text(path, buf.getvalue())


def read_stages_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of a `stages.csv` as dicts (`reference_stage` None when empty)."""
    rows = _read_table(path, STAGES_COLUMNS, "stages table")
    return [
        {"patient": from_spreadsheet_safe(r["patient"]), "stage": r["stage"],
         "reference_stage": r["reference_stage"] or None} for r in rows
    ]


def read_patients_csv(path: str | os.PathLike, cohort_slides: Iterable[str] | None = None) -> dict[str, list[str]]:
    """{patient: [slide, ...]} from a patients.csv (columns `patient`, `slide`; others ignored), in file order.

    Slide names are matched to `cohort_slides` (names without extension) as written, or without their file
    extension (`patient_000_node_0.tif`). A slide in no cohort raises one UsageError listing up to 5 of them; so
    does a slide listed twice, an empty table or a missing column.
    """
    rows = _read_table(path, ("patient", "slide"), "patients table")
    where = os.fspath(path)
    known = None if cohort_slides is None else set(cohort_slides)
    out: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    missing: list[str] = []
    for r in rows:
        patient, slide = r["patient"].strip(), r["slide"].strip()
        if not patient and not slide:
            continue
        if not patient or not slide:
            raise UsageError(f"{where}: a row lacks its patient or slide: {patient!r}, {slide!r}")
        if known is not None and slide not in known:
            stem = Path(slide).stem
            if stem not in known:
                missing.append(slide)
                continue
            slide = stem
        if slide in seen:
            raise UsageError(f"{where}: slide {slide} is listed twice (patients {seen[slide]} and {patient})")
        seen[slide] = patient
        out.setdefault(patient, []).append(slide)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise UsageError(f"{where}: {len(missing)} slide(s) not in the cohort: {', '.join(missing[:5])}{more}")
    if not out:
        raise UsageError(f"{where}: no patients listed")
    return out


def _read_table(path: str | os.PathLike, columns: Sequence[str], what: str) -> list[dict]:
    where = os.fspath(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            names = [n.strip() for n in reader.fieldnames or ()]
            # `Patient,Slide` as a spreadsheet writes it: the required columns match in any case
            names = [n.lower() if n.lower() in columns else n for n in names]
            lacking = [c for c in columns if c not in names]
            if lacking:
                raise UsageError(f"{where}: {what} lacks column(s) {', '.join(lacking)} (has: {', '.join(names)})")
            reader.fieldnames = names
            return [{k: (v or "") for k, v in r.items() if k is not None} for r in reader]
    except OSError as err:
        raise UsageError(f"{where}: cannot read {what}: {err.strerror or err}") from err
    except (csv.Error, UnicodeDecodeError) as err:
        raise UsageError(f"{where}: malformed {what}: {err}") from err


# ---- reference categories from lesion annotations ----------------------------------------------------------
PLAIN_TISSUE_GROUPS = ("tissue", "negative", "normal", "none")  # known, not tumour: skipped silently


def annotation_lesion_diameters(source, mpp: float, classes=None, merge_distance_um: float = 0.0) -> list[float]:
    """Longest diameters (mm, largest first) of the tumour lesions in an annotation file (ASAP XML or GeoJSON),
    or in (class name, geometry) pairs, or in plain (n, 2) polygons (all taken as tumour).

    Tumour and excluded groups are those of `wsi_vssm.io.annotations.AnnotationClasses` (`classes`); excluded
    areas are cut out of the tumour. Plain-tissue groups (`PLAIN_TISSUE_GROUPS`) are skipped; any other group is
    skipped with a `StagingWarning` naming it. Each connected tumour polygon is one lesion; with
    `merge_distance_um` > 0, lesions closer than that are measured together. `mpp`: level-0 microns per pixel.
    """
    import shapely

    from wsi_vssm.io.annotations import AnnotationClasses, AnnotationSet
    from wsi_vssm.outputs.lesions import polygon_feret_mm

    classes = classes or AnnotationClasses()
    items = _annotation_items(source)
    unknown = sorted(
        {n for n, _ in items if classes.kind(n) == "other" and n.strip().lower() not in PLAIN_TISSUE_GROUPS}
    )
    for name in unknown:  # a polygon without a class (an unnamed ImageScope layer, say) too: it may be the lesion
        what = f"annotation group {name!r} is" if name.strip() else "polygons without a class (no group or name) are"
        warnings.warn(f"{_source_name(source)}: {what} neither tumour nor excluded: skipped", StagingWarning,
                      stacklevel=2)
    tumor = AnnotationSet.from_items(items, classes).tumor
    parts = [g for g in getattr(tumor, "geoms", [tumor]) if not g.is_empty]
    if merge_distance_um > 0 and parts:
        grown = shapely.union_all([p.buffer(merge_distance_um / mpp / 2) for p in parts])
        groups = [shapely.union_all([p for p in parts if p.intersects(g)]) for g in getattr(grown, "geoms", [grown])]
    else:
        groups = parts
    return sorted((polygon_feret_mm(g, mpp) for g in groups), reverse=True)


def node_category_from_annotations(source, mpp: float, classes=None, merge_distance_um: float = 0.0) -> str:
    """A node's reference category from its lesion annotations (see `annotation_lesion_diameters`); `negative`
    when `source` is None or holds no tumour."""
    from wsi_vssm.outputs.lesions import node_category

    if source is None:
        return "negative"
    return node_category(annotation_lesion_diameters(source, mpp, classes, merge_distance_um))


def _annotation_items(source) -> list:
    """(class name, geometry) pairs; from a file, one pair per class (the union of its polygons)."""
    from shapely.geometry import Polygon
    from shapely.geometry.base import BaseGeometry

    from wsi_vssm.io.annotations import read_annotations

    if isinstance(source, (str, os.PathLike)):
        return list(read_annotations(source).classes.items())
    items = []
    for item in source:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            items.append(item)
        elif isinstance(item, BaseGeometry):
            items.append(("tumor", item))
        else:
            items.append(("tumor", Polygon(np.asarray(item, float)).buffer(0)))
    return items


def _source_name(source) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "annotations"
