"""CAMELYON17 pN staging, quadratic kappa with its bootstrap CI, stages.csv, patients.csv and annotation categories."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from wsi_vssm.errors import UsageError
from wsi_vssm.outputs.staging import (
    STAGES,
    StagingWarning,
    annotation_lesion_diameters,
    bootstrap_kappa_ci,
    confusion_matrix,
    confusion_png,
    node_category_from_annotations,
    parse_category,
    patient_stage,
    quadratic_kappa,
    read_patients_csv,
    read_stages_csv,
    stage_patients,
    staging_metrics,
    write_stages_csv,
)
from wsi_vssm.synth.asap import asap_xml

NEG, ITC, MIC, MAC = "negative", "itc", "micro", "macro"


@pytest.mark.parametrize(
    "nodes, stage",
    [
        ([NEG] * 5, "pN0"),
        ([ITC, NEG, NEG, NEG, NEG], "pN0(i+)"),
        ([ITC] * 5, "pN0(i+)"),  # ITC-only nodes are not positive
        ([MIC, ITC, NEG, NEG, NEG], "pN1mi"),
        ([MIC] * 5, "pN1mi"),  # micro in any number of nodes, no macro
        ([MAC, NEG, NEG, NEG, NEG], "pN1"),
        ([MAC, MIC, MIC, ITC, ITC], "pN1"),  # 3 positive nodes; ITCs do not count
        ([MAC, MIC, MIC, MIC, NEG], "pN2"),  # 4 positive, one macro
        ([MAC] * 5, "pN2"),
    ],
)
def test_pn_rules(nodes, stage):
    assert patient_stage(nodes) == stage


def test_patient_with_other_than_five_nodes_is_staged_with_a_warning():
    with pytest.warns(StagingWarning, match="patient p1 has 3 node"):
        stages = stage_patients({"p1": [MAC, MIC, MIC], "p2": [NEG] * 5})
    assert stages == {"p1": "pN1", "p2": "pN0"}
    with pytest.warns(StagingWarning, match="patient p3 has 7 node"):
        assert stage_patients({"p3": [MAC, MIC, MIC, MIC, NEG, NEG, NEG]}) == {"p3": "pN2"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stage_patients({"p": [NEG] * 5})


def test_unknown_category_is_rejected_with_the_valid_ones():
    assert parse_category(" Macro ") == "macro"
    with pytest.raises(UsageError, match="negative, itc, micro, macro"):
        patient_stage(["big"])


def lin_ccc(ref, pred) -> float:
    """Quadratic kappa, independently: 2 cov / (var x + var y + (mean x - mean y)^2), population moments."""
    x = np.array([STAGES.index(s) for s in ref], float)
    y = np.array([STAGES.index(s) for s in pred], float)
    cov = ((x - x.mean()) * (y - y.mean())).mean()
    return 2 * cov / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)


def test_quadratic_kappa():
    assert quadratic_kappa(list(STAGES), list(STAGES)) == 1.0
    assert quadratic_kappa(["pN0"] * 4, ["pN0"] * 4) == 1.0  # agreement on one stage: 1, not 0 / 0
    assert quadratic_kappa(["pN0", "pN2", "pN1"], ["pN2", "pN0", "pN1"]) == pytest.approx(-11 / 13)
    rng = np.random.default_rng(3)
    ref = list(rng.choice(STAGES, 40))
    pred = [s if rng.random() < 0.6 else str(rng.choice(STAGES)) for s in ref]
    assert quadratic_kappa(ref, pred) == pytest.approx(lin_ccc(ref, pred))
    assert quadratic_kappa(ref, pred) == pytest.approx(quadratic_kappa(pred, ref))
    with pytest.raises(UsageError):
        quadratic_kappa([], [])


def test_bootstrap_kappa_ci():
    ref = ["pN0", "pN0(i+)", "pN1mi", "pN1", "pN2"] * 4
    pred = ref[:-3] + ["pN0", "pN1", "pN1mi"]
    k = quadratic_kappa(ref, pred)
    low, high = bootstrap_kappa_ci(ref, pred, n_boot=500, seed=1)
    assert -1 <= low <= k <= high <= 1 and low < high
    assert bootstrap_kappa_ci(ref, pred, n_boot=500, seed=1) == (low, high)
    assert bootstrap_kappa_ci(ref, ref, n_boot=200) == (1.0, 1.0)


def test_confusion_matrix_and_png(tmp_path):
    m = confusion_matrix([NEG, ITC, MAC, MAC], [NEG, NEG, MAC, MIC], ("negative", "itc", "micro", "macro"))
    assert m.tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]]  # rows: reference
    confusion_png(tmp_path / "nodes.png", m, ("negative", "itc", "micro", "macro"))
    assert (tmp_path / "nodes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_staging_metrics_is_json_ready():
    stages = {"a": "pN0", "b": "pN1", "c": "pN2"}
    ref = {"a": "pN0", "b": "pN2", "c": "pN2", "d": "pN1"}
    m = staging_metrics(stages, ref, {"s1": MAC, "s2": NEG}, {"s1": MAC, "s2": ITC}, n_boot=100)
    assert list(m)[:2] == ["kappa", "kappa_ci95"] and m["n_patients"] == 3
    assert m["node_confusion"]["matrix"][1][0] == 1
    json.dumps(m, allow_nan=False)
    assert staging_metrics({}, {})["kappa"] is None


def test_stages_csv_round_trip(tmp_path):
    path = tmp_path / "stages.csv"
    write_stages_csv(path, {"patient_000": "pN0(i+)", "patient_001": "pN2"}, {"patient_000": "pN0(i+)"})
    assert path.read_text().splitlines() == ["patient,stage,reference_stage", "patient_000,pN0(i+),pN0(i+)",
                                             "patient_001,pN2,"]  # fmt: skip
    assert read_stages_csv(path)[1] == {"patient": "patient_001", "stage": "pN2", "reference_stage": None}


def test_read_patients_csv(tmp_path):
    path = tmp_path / "patients.csv"
    path.write_text("patient,slide\np0,p0_n0.tif\np0,p0_n1\n\np1,p1_n0\n")
    assert read_patients_csv(path, ["p0_n0", "p0_n1", "p1_n0"]) == {"p0": ["p0_n0", "p0_n1"], "p1": ["p1_n0"]}
    assert read_patients_csv(path) == {"p0": ["p0_n0.tif", "p0_n1"], "p1": ["p1_n0"]}


def test_patients_csv_naming_slides_not_in_the_cohort(tmp_path):
    path = tmp_path / "patients.csv"
    path.write_text("patient,slide\n" + "".join(f"p,x{i}\n" for i in range(7)) + "p,ok\n")
    with pytest.raises(UsageError) as err:
        read_patients_csv(path, ["ok"])
    msg = str(err.value)
    assert "\n" not in msg and "7 slide(s) not in the cohort: x0, x1, x2, x3, x4 (and 2 more)" in msg


@pytest.mark.parametrize(
    "text, match",
    [
        ("patient,name\np,s\n", "lacks column"),
        ("patient,slide\n", "no patients"),
        ("patient,slide\na,s\nb,s\n", "twice"),
    ],
)
def test_bad_patients_csv(tmp_path, text, match):
    path = tmp_path / "patients.csv"
    path.write_text(text)
    with pytest.raises(UsageError, match=match):
        read_patients_csv(path, ["s"])
    with pytest.raises(UsageError, match="cannot read"):
        read_patients_csv(tmp_path / "missing.csv")


def square(x, y, side):
    return np.array([[x, y], [x + side, y], [x + side, y + side], [x, y + side]], float)


def test_unknown_annotation_group_is_skipped_with_a_warning(tmp_path):
    xml = asap_xml([square(0, 0, 1000)]).decode()  # group _0: 1000 px square, 1.41 mm diagonal at 1 um/px
    extra = '<Annotation Name="odd" Type="Polygon" PartOfGroup="Necrosis"><Coordinates>' + "".join(
        f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(square(5000, 0, 3000))
    )
    xml = xml.replace("</Annotations>", extra + "</Coordinates></Annotation></Annotations>")
    path = tmp_path / "node.xml"
    path.write_text(xml)
    with pytest.warns(StagingWarning, match="'Necrosis'"):
        assert node_category_from_annotations(path, mpp=1.0) == "micro"


def test_polygons_without_a_class_are_warned_about(tmp_path):
    """A lesion drawn in an unnamed layer (ImageScope's default) has no class: the node was staged negative
    without a word."""
    import json

    feat = {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon",
                                                              "coordinates": [square(0, 0, 3000).tolist() + [[0, 0]]]}}
    path = tmp_path / "node.geojson"
    path.write_text(json.dumps(feat))
    with pytest.warns(StagingWarning, match=r"node\.geojson: polygons without a class \(no group or name\) are "
                                            r"neither tumour nor excluded: skipped"):
        assert node_category_from_annotations(path, mpp=1.0) == "negative"


def test_annotation_categories_geojson_exclusion_and_none(tmp_path):
    feats = [
        {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
         "geometry": {"type": "Polygon", "coordinates": [square(0, 0, 100).tolist() + [[0, 0]]]}},
        {"type": "Feature", "properties": {"classification": {"name": "Tissue"}},
         "geometry": {"type": "Polygon", "coordinates": [square(0, 0, 9000).tolist() + [[0, 0]]]}},
    ]  # fmt: skip
    path = tmp_path / "node.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plain tissue is a known group: no warning
        assert annotation_lesion_diameters(path, mpp=1.0) == pytest.approx([0.1 * 2**0.5])
    assert node_category_from_annotations(path, mpp=1.0) == "itc"
    assert node_category_from_annotations(None, mpp=1.0) == "negative"
    items = [("_0", square(0, 0, 2000)), ("_2", square(0, 0, 1500))]  # the exclusion cuts the corner out
    from shapely.geometry import Polygon

    items = [(n, Polygon(p)) for n, p in items]
    assert annotation_lesion_diameters(items, 1.0) == pytest.approx([2 * 2**0.5])  # farthest corners survive
    near = [square(0, 0, 100), square(150, 0, 100)]  # 50 px apart
    assert len(annotation_lesion_diameters(near, 1.0)) == 2
    assert annotation_lesion_diameters(near, 1.0, merge_distance_um=60) == pytest.approx(
        [(250**2 + 100**2) ** 0.5 / 1000]
    )
