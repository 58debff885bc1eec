"""Synthetic CAMELYON17-style patients: stages in turn, lesion sizes, files, and kappa 1.0 from the annotations."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from wsi_vssm.outputs.lesions import ITC_MAX_MM, MICRO_MAX_MM, lesion_category
from wsi_vssm.outputs.staging import (
    node_category_from_annotations,
    patient_stage,
    quadratic_kappa,
    read_patients_csv,
    stage_patients,
)
from wsi_vssm.synth import SynthError
from wsi_vssm.synth.asap import asap_xml
from wsi_vssm.synth.layout import feret, make_node_layout
from wsi_vssm.synth.patients import (
    PATIENT_STAGES,
    SIZE_LIMITS_MM,
    check_patient_slides,
    lesion_diameters_um,
    make_patient_cohort,
    node_seed,
    patient_plan,
)


def test_stages_in_turn_and_categories_give_them():
    plan = patient_plan(12, seed=4)
    assert [p.stage for p in plan] == [PATIENT_STAGES[i % 5] for i in range(12)]
    assert PATIENT_STAGES == ("pN0", "pN0(i+)", "pN1mi", "pN1", "pN2")
    for p in plan:
        assert len(p.categories) == 5 and patient_stage(p.categories) == p.stage
    assert patient_plan(12, seed=4) == plan and patient_plan(12, seed=5) != plan


def test_size_limits_sit_inside_the_categories():
    assert SIZE_LIMITS_MM["itc"][1] < ITC_MAX_MM < SIZE_LIMITS_MM["micro"][0]
    assert SIZE_LIMITS_MM["micro"][1] < MICRO_MAX_MM < SIZE_LIMITS_MM["macro"][0]


@pytest.mark.parametrize("side_um", [4096, 10_000])
def test_lesion_sizes_scale_with_the_slide(side_um):
    rng = np.random.default_rng(0)
    for cat in ("itc", "micro", "macro"):
        for _ in range(20):
            ds = lesion_diameters_um(cat, side_um, rng)
            assert lesion_category(ds[0] / 1000) == cat and all(d <= ds[0] for d in ds)
    small = max(lesion_diameters_um("macro", 4096, np.random.default_rng(1)))
    large = max(lesion_diameters_um("macro", 10_000, np.random.default_rng(1)))
    assert 2000 < small < large


def test_macrometastasis_fits_an_8192_px_slide_at_half_a_micron():
    for seed in range(3):
        layout = make_node_layout(8192, 0.5, seed, (2300 / 0.5,))
        (poly,) = layout.lesion_polygons()
        assert feret(poly) * 0.5 / 1000 == pytest.approx(2.3)
        assert poly.min() > 0 and poly.max() < 8192


def test_too_small_slides_for_a_macrometastasis_are_refused():
    with pytest.raises(SynthError, match="--size 7500 or more"):
        check_patient_slides(patient_plan(5), 2048, 0.5)
    check_patient_slides(patient_plan(3), 2048, 0.5)  # no macro planned: fine
    check_patient_slides(patient_plan(5), 2048, 2.0)  # 4.1 mm across


def test_reference_annotations_give_kappa_one(tmp_path):
    """The target: every planned stage back from the lesion outlines alone (layouts only, no pixels)."""
    size, mpp, seed = 2048, 2.0, 7
    plan = patient_plan(5, seed)
    nodes_ref, nodes_ann = {}, {}
    for i, p in enumerate(plan):
        nodes_ref[p.patient], nodes_ann[p.patient] = list(p.categories), []
        for k, cat in enumerate(p.categories):
            s = node_seed(seed, i, k)
            rng = np.random.default_rng(np.random.SeedSequence([s, 0xD1A]))
            layout = make_node_layout(size, mpp, s, tuple(d / mpp for d in lesion_diameters_um(cat, size * mpp, rng)))
            xml = None
            if layout.lesions:
                xml = tmp_path / f"{p.patient}_{k}.xml"
                xml.write_bytes(asap_xml(layout.lesion_polygons()))
            nodes_ann[p.patient].append(node_category_from_annotations(xml, mpp))
    assert nodes_ann == nodes_ref
    ref, found = stage_patients(nodes_ref), stage_patients(nodes_ann)
    assert quadratic_kappa(list(ref.values()), list(found.values())) == 1.0


@pytest.fixture
def no_pixels(monkeypatch):
    """Stand-in for the renderer: a few bytes per slide, so a cohort's files and tables are quick to test."""
    import wsi_vssm.synth.cohort as cohort

    monkeypatch.setattr(cohort, "write_layout", lambda path, layout, label, **kw: path.write_bytes(label.encode()))


def staged_from_files(out, mpp):
    cats = {r["slide"]: r["category"] for r in csv.DictReader((out / "reference.csv").open())}
    patients = read_patients_csv(out / "patients.csv", cats)
    found = {}
    for s in cats:
        xml = out / "annotations" / f"{s}.xml"
        found[s] = node_category_from_annotations(xml if xml.exists() else None, mpp)
    ref = stage_patients({p: [cats[s] for s in ss] for p, ss in patients.items()})
    got = stage_patients({p: [found[s] for s in ss] for p, ss in patients.items()})
    return ref, got


def test_cohort_files_at_the_issue_scale(tmp_path, no_pixels):
    """5 patients of 8,192 px slides at 0.5 um/px (pixels stubbed out): files, tables, and kappa 1.0."""
    records = make_patient_cohort(tmp_path, 5, seed=3, size=8192, mpp=0.5)
    names = [r.name for r in records]
    assert names == [f"patient_{p:03d}_node_{k}" for p in range(5) for k in range(5)]
    assert sorted(p.name for p in tmp_path.glob("*.tif")) == sorted(f"{n}.tif" for n in names)
    rows = list(csv.DictReader((tmp_path / "reference.csv").open()))
    assert list(rows[0]) == ["slide", "label", "category"] and [r["slide"] for r in rows] == names
    assert all(r["label"] == ("normal" if r["category"] == "negative" else "tumor") for r in rows)
    assert {p.stem for p in (tmp_path / "annotations").iterdir()} == {r.name for r in records if r.lesions}
    assert all(bool(r.lesions) == (r.category != "negative") for r in records)
    assert all(lesion_category(max(r.diameters_mm)) == r.category for r in records if r.lesions)
    ref, got = staged_from_files(tmp_path, 0.5)
    assert list(ref.values()) == list(PATIENT_STAGES) == list(got.values())
    assert quadratic_kappa(list(ref.values()), list(got.values())) == 1.0


@pytest.mark.slow
def test_written_cohort_of_all_stages_gives_kappa_one(tmp_path):
    """Real slides, rendered: 1,024 px at 4 um/px is 4.1 mm across, like 8,192 px at 0.5 um/px."""
    make_patient_cohort(tmp_path, 5, seed=1, size=1024, mpp=4.0, workers=2)
    ref, got = staged_from_files(tmp_path, 4.0)
    assert list(ref.values()) == list(PATIENT_STAGES)
    assert quadratic_kappa(list(ref.values()), list(got.values())) == 1.0
    assert len(list(tmp_path.glob("*.tif"))) == 25
