"""Lesions from a cell-probability grid: diameters and categories of known shapes, merge distance, lesions.csv."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsi_vssm.errors import UsageError
from wsi_vssm.outputs.lesions import (
    LESION_COLUMNS,
    centre_feret,
    find_lesions,
    find_lesions_and_labels,
    label_lesions,
    lesion_category,
    lesion_ids_for_polygons,
    node_category,
    read_lesions_csv,
    write_lesions_csv,
)

CELL0, MPP = 32.0, 1.0  # one cell = 0.032 mm
CELL_MM = CELL0 * MPP / 1000


def grid_of(inside, n: int) -> np.ndarray:
    """0.9 in cells whose centre (col + 0.5, row + 0.5), in cells, satisfies `inside(x, y)`, else 0.1."""
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    return np.where(inside(xx, yy), 0.9, 0.1).astype(np.float32)


def disc(cx, cy, r):
    return lambda x, y: np.hypot(x - cx, y - cy) <= r


def test_single_cell_measures_one_cell():
    prob = np.zeros((5, 5), np.float32)
    prob[2, 3] = 0.7
    (les,) = find_lesions(prob, CELL0, (100.0, 50.0), MPP, threshold=0.5)
    assert les.diameter_mm == pytest.approx(CELL_MM)
    assert les.category == "itc" and les.cells == 1
    assert (les.x, les.y, les.width, les.height) == (100 + 3 * CELL0, 50 + 2 * CELL0, CELL0, CELL0)
    assert les.area_mm2 == pytest.approx(CELL_MM**2)
    assert les.peak_probability == les.mean_probability == pytest.approx(0.7)


@pytest.mark.parametrize("radius, category", [(2.5, "itc"), (20, "micro"), (40, "macro")])
def test_disc_diameter_and_category(radius, category):
    n = int(2 * radius) + 6
    prob = grid_of(disc(n / 2, n / 2, radius), n)
    (les,) = find_lesions(prob, CELL0, (0, 0), MPP)
    assert abs(les.diameter_mm - 2 * radius * CELL_MM) <= CELL_MM
    assert les.category == category
    assert les.area_mm2 == pytest.approx(math.pi * radius**2 * CELL_MM**2, rel=0.15)


def test_ring_diameter_is_outer_and_area_excludes_hole():
    n, r_out, r_in = 70, 30, 20
    ring = grid_of(lambda x, y: (np.hypot(x - 35, y - 35) <= r_out) & (np.hypot(x - 35, y - 35) > r_in), n)
    (les,) = find_lesions(ring, CELL0, (0, 0), MPP)
    assert abs(les.diameter_mm - 2 * r_out * CELL_MM) <= CELL_MM
    assert les.category == "micro"  # 1.92 mm
    assert les.area_mm2 == pytest.approx(math.pi * (r_out**2 - r_in**2) * CELL_MM**2, rel=0.1)


def test_l_shape_diameter_is_its_diagonal():
    prob = np.zeros((80, 80), np.float32)
    prob[5:75, 5:10] = 1.0  # vertical bar: 70 cells tall, 5 wide
    prob[70:75, 5:55] = 1.0  # foot: 50 cells long
    (les,) = find_lesions(prob, CELL0, (0, 0), MPP)
    true = math.hypot(70, 50) * CELL_MM  # outer corner to outer corner: 2.75 mm
    assert abs(les.diameter_mm - true) <= CELL_MM
    assert les.category == "macro"
    assert (les.width, les.height) == (50 * CELL0, 70 * CELL0)


@pytest.mark.parametrize("seam", ["none", "nan column"])
def test_lesion_split_across_a_region_border_is_one(seam):
    """Two regions computed apart and stitched; the lesion crosses their border (here with a padding seam)."""
    n, r = 40, 15.0
    whole = grid_of(disc(20, 20, r), n)
    left, right = whole[:, :20], whole[:, 20:].copy()
    if seam == "nan column":
        right[:, 0] = np.nan  # a padded, uncomputed column where the two regions meet
    prob = np.concatenate([left, right], axis=1)
    (les,) = find_lesions(prob, CELL0, (0, 0), MPP)
    assert abs(les.diameter_mm - 2 * r * CELL_MM) <= CELL_MM
    assert les.category == "micro"
    if seam == "nan column":  # without merging across one cell, the seam splits it
        assert len(find_lesions(prob, CELL0, (0, 0), MPP, merge_distance_cells=0)) == 2


def test_merge_distance():
    prob = np.zeros((10, 20), np.float32)
    prob[4, 2:5] = 1.0
    prob[4, 7:10] = 1.0  # two empty cells between the pieces
    prob[8, 12] = prob[6, 14] = 1.0  # diagonal gap of one cell each way: sqrt(2) cells
    counts = {d: label_lesions(prob, 0.5, d)[1] for d in (0, 1, 1.5, 2)}
    assert counts == {0: 4, 1: 4, 1.5: 3, 2: 2}
    merged = find_lesions(prob, CELL0, (0, 0), MPP, merge_distance_cells=2)
    assert merged[0].diameter_mm == pytest.approx(8 * CELL_MM)  # outer edge to outer edge of the two pieces
    assert merged[0].cells == 6  # the gap cells are not lesion


def test_corner_touching_cells_are_one_lesion_and_nan_never_hot():
    prob = np.full((4, 4), np.nan, np.float32)
    prob[0, 0] = prob[1, 1] = 0.8
    labels, n = label_lesions(prob, 0.5, 0)
    assert n == 1 and labels[0, 0] == labels[1, 1] == 1 and labels.sum() == 2
    assert find_lesions(np.full((3, 3), np.nan), CELL0, (0, 0), MPP) == []


def test_lesions_ordered_largest_first_with_label_grid():
    prob = np.zeros((30, 30), np.float32)
    prob[1, 1] = 0.6
    prob[10:20, 10:20] = 0.9
    lesions, labels = find_lesions_and_labels(prob, CELL0, (0, 0), MPP)
    assert [les.id for les in lesions] == [1, 2] and lesions[0].cells == 100
    assert labels[15, 15] == 1 and labels[1, 1] == 2 and labels[0, 0] == 0


def test_contours_get_their_lesion_ids():
    from wsi_vssm.outputs.contours import tumour_contours

    prob = np.zeros((30, 30), np.float32)
    prob[1, 1] = 0.6
    prob[10:20, 10:20] = 0.9
    prob[10:20, 21] = 0.9  # 4-connected contours: a separate polygon, same lesion (gap of one cell)
    lesions, labels = find_lesions_and_labels(prob, CELL0, (5, 7), MPP)
    polys = tumour_contours(prob, 0.5, CELL0, (5, 7))
    assert sorted(lesion_ids_for_polygons(polys, labels, CELL0, (5, 7))) == [1, 1, 2]


@pytest.mark.parametrize(
    "d, cat", [(0.0, "itc"), (0.2, "itc"), (0.2001, "micro"), (2.0, "micro"), (2.0001, "macro"), (9.0, "macro")]
)
def test_category_limits(d, cat):
    assert lesion_category(d) == cat


def test_node_category_and_bad_values():
    assert node_category([]) == "negative"
    assert node_category([0.1, 2.5, 0.5]) == "macro"
    with pytest.raises(UsageError):
        lesion_category(float("nan"))
    with pytest.raises(UsageError, match="merge distance"):
        label_lesions(np.zeros((2, 2)), 0.5, -1)


def test_centre_feret_matches_brute_force():
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(0, 50, 300), rng.integers(0, 80, 300)
    pts = np.stack([cols, rows], 1).astype(float)
    brute = math.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1).max())
    assert centre_feret(rows, cols) == pytest.approx(brute)
    assert centre_feret(np.arange(100), np.zeros(100, int)) == pytest.approx(99)  # collinear


def test_lesions_csv_columns_and_round_trip(tmp_path):
    prob = np.zeros((20, 20), np.float32)
    prob[2:5, 2:9] = 0.95
    prob[12, 12] = 0.55
    lesions = find_lesions(prob, 62.08, (10.5, 20.25), 0.5)
    path = tmp_path / "s1" / "lesions.csv"
    write_lesions_csv(path, lesions)
    lines = path.read_text().splitlines()
    assert lines[0] == "id,x,y,width,height,area_mm2,diameter_mm,peak_probability,mean_probability,category"
    assert [c for c in LESION_COLUMNS if "diameter" in c] == ["diameter_mm"]
    assert len(lines[1].split(",")[6].split(".")[1]) >= 4
    back = read_lesions_csv(path)
    assert [b.id for b in back] == [1, 2] and back[1].diameter_mm == pytest.approx(0.03104, abs=1e-6)
    assert back[0].x == pytest.approx(lesions[0].x) and back[0].category == lesions[0].category
    assert [p.name for p in path.parent.iterdir()] == ["lesions.csv"]  # no temporary left behind
    write_lesions_csv(path, [])
    assert path.read_text() == ",".join(LESION_COLUMNS) + "\n"


def test_cohort_lesions_table_holds_every_slide_s_rows_with_its_name(tmp_path):
    """OUT/lesions.csv of a cohort: a `slide` column, then each slide's rows exactly as its own table holds them
    (a name with a comma or a quote stays one field); a table that cannot be read is left out and said."""
    import csv

    from wsi_vssm.outputs.lesions import write_cohort_lesions_csv

    prob = np.zeros((20, 20), np.float32)
    prob[2:5, 2:9], prob[12, 12] = 0.95, 0.55
    tables = {}
    for name, lesions in [("a, b", find_lesions(prob, 62.08, (10.5, 20.25), 0.5)), ('c"d', []),
                          ("e", find_lesions(prob, 31.0, (0, 0), 0.25))]:
        tables[name] = tmp_path / f"{len(tables)}" / "lesions.csv"
        write_lesions_csv(tables[name], lesions)
    broken = tmp_path / "broken.csv"
    broken.write_text("id,x\n1,2\n")
    short = tmp_path / "short.csv"  # the right header, a row cut short: its missing cells read as None
    short.write_text(",".join(LESION_COLUMNS) + "\n1,2\n")
    path = tmp_path / "cohort" / "lesions.csv"
    problems = write_cohort_lesions_csv(path, [*tables.items(), ("f", broken), ("g", tmp_path / "missing.csv"),
                                               ("h", short)])
    assert len(problems) == 3 and "broken.csv" in problems[0] and "missing.csv" in problems[1]
    assert "short.csv: malformed lesions table" in problems[2]
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["slide", *LESION_COLUMNS]
    want = [[name, *line.split(",")] for name, t in tables.items() for line in t.read_text().splitlines()[1:]]
    assert rows[1:] == want and [r[0] for r in rows[1:]] == ["a, b"] * 2 + ["e"] * 2  # c"d: no lesion
    assert [p.name for p in path.parent.iterdir()] == ["lesions.csv"]  # written atomically
    write_cohort_lesions_csv(path, [("=HYPERLINK(1)", tables["a, b"])])  # as predictions.csv writes the name
    with open(path, newline="", encoding="utf-8") as f:
        assert [r[0] for r in csv.reader(f)][1:] == ["'=HYPERLINK(1)"] * 2  # it was the raw formula


def test_extent_threshold_grows_seeded_lesions_only():
    """Hysteresis: a 5 x 5 block at 0.6 around one 0.9 seed is one lesion of 25 cells; an equal block with no
    seed is none; without an extent threshold only the seed is a lesion."""
    prob = np.full((12, 20), 0.1, np.float32)
    prob[2:7, 2:7] = 0.6
    prob[4, 4] = 0.9
    prob[2:7, 12:17] = 0.6  # above the extent threshold, no seed
    (seed_only,) = find_lesions(prob, CELL0, (0, 0), MPP, threshold=0.8)
    assert seed_only.cells == 1
    (grown,) = find_lesions(prob, CELL0, (0, 0), MPP, threshold=0.8, extent_threshold=0.5)
    assert grown.cells == 25 and grown.diameter_mm == pytest.approx((math.hypot(4, 4) + 1) * CELL_MM)
    assert grown.peak_probability == pytest.approx(0.9) and grown.mean_probability == pytest.approx(
        (24 * 0.6 + 0.9) / 25)
    assert (grown.x, grown.width) == (2 * CELL0, 5 * CELL0)
    labels, n = label_lesions(prob, 0.5, seed_threshold=0.8)
    assert n == 1 and (labels[2:7, 2:7] == 1).all() and labels[2:7, 12:17].max() == 0
    prob[5, 14] = 0.95  # now the second block has a seed: two lesions, numbered by first cell, row-major
    labels, n = label_lesions(prob, 0.5, seed_threshold=0.8)
    assert n == 2 and labels[2, 2] == 1 and labels[2, 12] == 2
    assert find_lesions(prob, CELL0, (0, 0), MPP, threshold=0.8, extent_threshold=0.8)[0].cells == 1


def test_extent_threshold_above_the_threshold_is_an_error():
    with pytest.raises(UsageError, match="extent threshold 0.9 is above the cell threshold 0.5"):
        find_lesions(np.zeros((3, 3)), CELL0, (0, 0), MPP, threshold=0.5, extent_threshold=0.9)
