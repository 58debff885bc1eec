"""Synthetic CAMELYON17-style patients: 5 lymph-node slides each, with lesions of known longest diameter.

Patient i (from 0) gets stage `PATIENT_STAGES[i % 5]`: pN0, pN0(i+), pN1mi, pN1, pN2, then again. Its five node
categories are drawn to give exactly that stage under the CAMELYON17 rules (`wsi_vssm.outputs.staging`):

* pN0: five negative nodes;
* pN0(i+): one or two nodes with isolated tumour cells, the rest negative;
* pN1mi: one or two nodes with a micrometastasis, perhaps one with ITCs, the rest negative;
* pN1: one node with a macrometastasis and up to two more positive (micro or macro), perhaps one with ITCs;
* pN2: four or five positive nodes, at least one of them macro.

Each positive node holds one lesion of its category and, half the time, a smaller one of a lower category
(ITC nodes: one or two ITCs). Lesion sizes scale with the slide: a lesion's longest diameter is a fraction of
the slide side S = size * mpp (`SIZE_FRACTION`), clamped to the category's range (`SIZE_LIMITS_MM`), which
keeps every lesion well inside its category (ITC 0.05-0.17 mm, micro 0.3-1.8 mm, macro 2.1-8 mm). A
macrometastasis takes 0.52-0.56 S, so it needs S >= 2.1 / 0.56 = 3.75 mm: 7,500 px at 0.5 um/px (an 8,192 px
slide holds one of 2.1-2.3 mm); smaller slides need a coarser mpp (2,048 px at 2 um/px is the same 4.1 mm).
Each lesion is scaled so that its outline, the polygon written to the ASAP XML, has exactly the drawn longest
diameter. Each node is one large smooth tissue section (a lymph node) with room for the biggest lesion.

Written into OUT: `patient_PPP_node_K.tif` (K = 0..4), `annotations/patient_PPP_node_K.xml` for nodes with
lesions (group `_0`), `patients.csv` (`patient,slide`), and last `reference.csv` (`slide,label,category`;
label `tumor` for any node with tumour, ITC included).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi_vssm.synth.cohort import SynthError, _check, _prepare_out, atomic_write_bytes, refuse_another_cohort

PATIENT_STAGES = ("pN0", "pN0(i+)", "pN1mi", "pN1", "pN2")
NODES = 5
# Fractions of the slide side, and limits in mm, of a lesion's longest diameter. The category limits themselves
# (ITC <= 0.2 mm, micro <= 2 mm, macro > 2 mm) are those of wsi_vssm.outputs.lesions, kept well clear of.
SIZE_FRACTION = {"itc": (0.02, 0.04), "micro": (0.08, 0.3), "macro": (0.52, 0.56)}
SIZE_LIMITS_MM = {"itc": (0.05, 0.17), "micro": (0.3, 1.8), "macro": (2.1, 8.0)}
_LOWER = {"itc": ("itc",), "micro": ("itc",), "macro": ("itc", "micro")}


@dataclass(frozen=True)
class NodeRecord:
    name: str  # slide name without extension, as in reference.csv and patients.csv
    patient: str
    category: str  # negative, itc, micro or macro: that of its largest lesion
    path: Path
    lesions: list[np.ndarray] = field(default_factory=list)  # (n, 2) polygons, level-0 px
    diameters_mm: tuple[float, ...] = ()  # each lesion's longest diameter

    @property
    def label(self) -> str:
        return "normal" if self.category == "negative" else "tumor"


@dataclass(frozen=True)
class PatientPlan:
    patient: str
    stage: str
    categories: tuple[str, ...]  # one per node, node 0 first


def patient_name(index: int) -> str:
    return f"patient_{index:03d}"


def node_name(patient_index: int, node: int) -> str:
    return f"{patient_name(patient_index)}_node_{node}"


def patient_plan(n_patients: int, seed: int = 0) -> list[PatientPlan]:
    """Stage and node categories of every patient; stages in turn, categories drawn from the seed."""
    if not isinstance(n_patients, (int, np.integer)) or n_patients < 1:
        raise SynthError(f"number of patients must be at least 1, got {n_patients!r}")
    return [_plan_one(i, seed) for i in range(int(n_patients))]


def _plan_one(index: int, seed: int) -> PatientPlan:
    stage = PATIENT_STAGES[index % len(PATIENT_STAGES)]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xCA17, index]))
    itc = int(rng.integers(0, 2))  # one node with ITCs, or none, beside the positive ones
    if stage == "pN0":
        cats = []
    elif stage == "pN0(i+)":
        cats = ["itc"] * int(rng.integers(1, 3))
    elif stage == "pN1mi":
        cats = ["micro"] * int(rng.integers(1, 3)) + ["itc"] * itc
    elif stage == "pN1":
        cats = ["macro"] + [str(rng.choice(["micro", "macro"])) for _ in range(int(rng.integers(0, 3)))]
        cats += ["itc"] * itc
    else:
        n_pos = int(rng.integers(4, 6))
        n_macro = int(rng.integers(1, n_pos + 1))
        cats = ["macro"] * n_macro + ["micro"] * (n_pos - n_macro)
    cats = cats + ["negative"] * (NODES - len(cats))
    return PatientPlan(patient_name(index), stage, tuple(str(c) for c in rng.permutation(cats)))


def lesion_diameters_um(category: str, side_um: float, rng: np.random.Generator) -> list[float]:
    """Longest diameters (um) of a node's lesions, largest first: none for a negative node."""
    if category == "negative":
        return []
    out = [_diameter_um(category, side_um, rng)]
    if category == "itc":
        if rng.random() < 0.5:
            out.append(_diameter_um("itc", side_um, rng))
    elif rng.random() < 0.5:
        out.append(_diameter_um(str(rng.choice(_LOWER[category])), side_um, rng))
    return sorted(out, reverse=True)


def _diameter_um(category: str, side_um: float, rng: np.random.Generator) -> float:
    lo, hi = SIZE_FRACTION[category]
    mm_lo, mm_hi = SIZE_LIMITS_MM[category]
    return 1000.0 * float(np.clip(side_um / 1000.0 * rng.uniform(lo, hi), mm_lo, mm_hi))


def check_patient_slides(plan: list[PatientPlan], size: int, mpp: float) -> None:
    """SynthError when a planned macrometastasis cannot reach its size on slides this small."""
    side_mm = size * mpp / 1000.0
    need_mm = SIZE_LIMITS_MM["macro"][0] / SIZE_FRACTION["macro"][1]
    if side_mm < need_mm and any("macro" in p.categories for p in plan):
        raise SynthError(
            f"a macrometastasis (over 2 mm) needs slides at least {need_mm:.2f} mm across; {size} px at {mpp} um/px "
            f"is {side_mm:.2f} mm: use --size {int(np.ceil(need_mm * 1000 / mpp))} or more at this mpp, or "
            f"--mpp {need_mm * 1000 / size:.3g} or coarser at this size"
        )


def node_seed(seed: int, patient_index: int, node: int) -> int:
    return int(np.random.SeedSequence([int(seed), 0xCA17, int(patient_index), int(node)]).generate_state(1)[0])


def write_node(
    path: str | os.PathLike, category: str, size: int, mpp: float, seed: int, **kwargs
) -> tuple[list[np.ndarray], tuple[float, ...]]:
    """Write one node slide of `category`; returns its lesion polygons (level-0 px) and their diameters (mm)."""
    from wsi_vssm.synth.cohort import write_layout
    from wsi_vssm.synth.layout import feret, make_node_layout

    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xD1A]))
    diameters_px = tuple(d / mpp for d in lesion_diameters_um(category, size * mpp, rng))
    try:
        layout = make_node_layout(size, mpp, seed, diameters_px)
    except ValueError as err:
        raise SynthError(f"cannot make {Path(path).name} ({category}): {err}; try a larger --size") from err
    write_layout(path, layout, "normal" if category == "negative" else "tumor", **kwargs)
    polys = layout.lesion_polygons()
    return polys, tuple(feret(p) * mpp / 1000.0 for p in polys)


def make_patient_cohort(
    out: str | os.PathLike,
    n_patients: int,
    seed: int = 0,
    size: int = 8192,
    mpp: float = 0.5,
    *,
    workers: int | None = None,
    quality: int = 85,
    on_slide: Callable[[NodeRecord], None] | None = None,
) -> list[NodeRecord]:
    """Write a CAMELYON17-style cohort of `n_patients` x 5 node slides into `out` (layout in the module doc).

    Returns one record per node, patient by patient. Same arguments, same bytes.
    """
    from wsi_vssm.synth.asap import asap_xml

    _check(size, mpp)
    plan = patient_plan(n_patients, seed)
    check_patient_slides(plan, size, mpp)
    out = Path(out)
    refuse_another_cohort(out, [node_name(i, k) for i, p in enumerate(plan) for k in range(len(p.categories))])
    _prepare_out(out)
    records = []
    for index, p in enumerate(plan):
        for node, category in enumerate(p.categories):
            name = node_name(index, node)
            path = out / f"{name}.tif"
            polys, diameters = write_node(
                path, category, size, mpp, node_seed(seed, index, node), workers=workers, quality=quality
            )
            if polys:
                atomic_write_bytes(out / "annotations" / f"{name}.xml", asap_xml(polys))
            rec = NodeRecord(name, p.patient, category, path, polys, diameters)
            records.append(rec)
            if on_slide is not None:
                on_slide(rec)
    atomic_write_bytes(out / "patients.csv", patients_csv(records).encode())
    atomic_write_bytes(out / "reference.csv", reference_csv(records).encode())
    return records


def patients_csv(records: list[NodeRecord]) -> str:
    return "patient,slide\n" + "".join(f"{r.patient},{r.name}\n" for r in records)


def reference_csv(records: list[NodeRecord]) -> str:
    return "slide,label,category\n" + "".join(f"{r.name},{r.label},{r.category}\n" for r in records)
