"""The napari plugin: reader (slides and prediction outputs), alignment in world coordinates, the Predict widget,
a rendered screenshot, and the npe2 manifest.

Needs napari and an X server (Xvfb through pytest-xvfb); the whole module skips without napari.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")
npe2 = pytest.importorskip("npe2")
if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):  # Qt would abort the whole run
    pytest.skip("no X server: install Xvfb (.ci/napari-setup.sh) and pytest-xvfb, or run under xvfb-run",
                allow_module_level=True)

import tifffile  # noqa: E402
import zarr  # noqa: E402
from shapely.geometry import Polygon  # noqa: E402

from wsi_vssm.io import open_slide  # noqa: E402
from wsi_vssm.io.annotations import rasterize  # noqa: E402
from wsi_vssm.napari_plugin import reader as plugin_reader  # noqa: E402
from wsi_vssm.napari_plugin._layers import CHUNK, META_KEY  # noqa: E402
from wsi_vssm.outputs.contours import max_probability, tumour_contours, write_contours_geojson  # noqa: E402
from wsi_vssm.outputs.heatmap import write_heatmap_zarr  # noqa: E402

pytestmark = pytest.mark.napari

MANIFEST = Path(__file__).resolve().parents[2] / "wsi_vssm" / "napari_plugin" / "napari.yaml"
PLUGIN = "wsi-vssm"
SLIDE_MPP = 0.5
SLIDE_SIZE = 3000


# ---- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def _plugin_registered():
    """The manifest, registered as napari finds it through the entry point (registered here if not installed)."""
    pm = npe2.PluginManager.instance()
    if PLUGIN not in pm:
        pm.register(npe2.PluginManifest.from_file(MANIFEST))
    yield


@pytest.fixture(scope="module")
def tumour_slide(tmp_path_factory):
    """A synthetic pyramidal TIFF at 0.5 um/px with one known lesion: (path, lesion polygon in level-0 px)."""
    from wsi_vssm.synth import write_slide

    path = tmp_path_factory.mktemp("napari") / "tumour_slide.tif"
    lesions = write_slide(path, size=SLIDE_SIZE, mpp=SLIDE_MPP, seed=3, tumor=True, workers=2)
    assert lesions, "the synthetic tumour slide should carry a lesion"
    return path, Polygon(lesions[0])


@pytest.fixture(scope="module")
def prediction_folder(tumour_slide, tmp_path_factory):
    """A prediction output folder for `tumour_slide` whose heatmap is hot exactly on the lesion's cells.

    Written by the library's own writers, with a cell size that is not a whole number of pixels and an
    origin off zero, so any slip in the reader's placement shows.
    """
    path, lesion = tumour_slide
    cell0, origin = 61.7, (13.0, 29.0)
    rows = cols = int((SLIDE_SIZE - 29) // cell0)
    with open_slide(path) as slide:
        thumb = slide.thumbnail(512)
    # background 0 (no tissue), tissue 0.2, lesion cells 0.95
    ys = ((np.arange(rows) + 0.5) * cell0 + origin[1]) * thumb.shape[0] / SLIDE_SIZE
    xs = ((np.arange(cols) + 0.5) * cell0 + origin[0]) * thumb.shape[1] / SLIDE_SIZE
    tissue = thumb[ys.astype(int)][:, xs.astype(int)].mean(axis=2) < 220
    prob = np.where(tissue, 0.2, np.nan).astype(np.float32)
    hot = rasterize(lesion, (rows, cols), origin=origin, downsample=cell0)
    prob[hot] = 0.95
    out = tmp_path_factory.mktemp("pred") / "tumour_slide"
    out.mkdir()
    write_heatmap_zarr(out / "heatmap.ome.zarr", prob, cell0, origin, SLIDE_MPP, attrs={"slide": "tumour_slide"})
    polys = tumour_contours(prob, 0.5, cell0, origin)
    write_contours_geojson(out / "contours.geojson", polys, max_probability(polys, prob, cell0, origin), SLIDE_MPP)
    (out / "prediction.json").write_text(json.dumps({"slide": "tumour_slide", "probability": 0.9}))
    return out, prob, cell0, origin


def _pattern_levels(h=600, w=800, n=3):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 3) % 256, (yy * 5) % 256, ((xx + yy) * 7) % 256], -1).astype(np.uint8)
    return [np.ascontiguousarray(img[:: 2**i, :: 2**i]) for i in range(n)]


def _write_ome_tiff(path, levels, mpp):
    meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp}
    with tifffile.TiffWriter(path, ome=True) as tw:
        kw = {"tile": (64, 64), "photometric": "rgb", "compression": "zlib"}
        tw.write(levels[0], subifds=len(levels) - 1, metadata=meta, **kw)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, **kw)


def _write_ome_zarr(path, levels, mpp):
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    datasets = []
    for i, img in enumerate(levels):
        group.create_array(str(i), shape=img.shape[::-1][::-1], chunks=(64, 64, 3), dtype="uint8")[:] = img
        s = mpp * 2**i
        datasets.append({"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [s, s, 1]}]})
    axes = [{"name": n, "type": "space", "unit": "micrometer"} for n in "yx"] + [{"name": "c", "type": "channel"}]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets}]


# ---- reader -----------------------------------------------------------------------------------------------------
def test_reader_opens_a_synthetic_slide_with_its_levels_and_scale_lazily(make_napari_viewer, tumour_slide,
                                                                         monkeypatch):
    from wsi_vssm.io.base import SlideReader

    reads = []
    original = SlideReader.read_region

    def spy(self, location, level, size):
        reads.append((level, tuple(size)))
        return original(self, location, level, size)

    monkeypatch.setattr(SlideReader, "read_region", spy)
    path, _ = tumour_slide
    viewer = make_napari_viewer(show=True)
    layers = viewer.open(path, plugin=PLUGIN)
    assert len(layers) == 1
    layer = layers[0]
    with open_slide(path) as slide:
        dims, count = slide.level_dimensions, slide.level_count
    assert layer.multiscale and layer.rgb and len(layer.data) == count > 1
    assert [tuple(d.shape) for d in layer.data] == [(h, w, 3) for w, h in dims]
    assert tuple(layer.scale) == (SLIDE_MPP, SLIDE_MPP)
    assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]
    assert layer.metadata[META_KEY]["kind"] == "slide"
    viewer.screenshot(canvas_only=True)  # draw: napari reads what it shows
    assert reads, "drawing the slide should read from it"
    assert all(w <= CHUNK and h <= CHUNK for _, (w, h) in reads), "level 0 (or any level) read whole"


@pytest.mark.parametrize("kind", ["ome.tif", "ome.zarr"])
def test_reader_opens_ome_formats_with_the_right_pixels(make_napari_viewer, tmp_path, kind):
    levels, mpp = _pattern_levels(), 0.25
    path = tmp_path / f"pattern.{kind}"
    (_write_ome_tiff if kind == "ome.tif" else _write_ome_zarr)(path, levels, mpp)
    assert plugin_reader.get_reader(str(path)) is plugin_reader.read_slide
    viewer = make_napari_viewer()
    (layer,) = viewer.open(path, plugin=PLUGIN)
    assert [tuple(d.shape) for d in layer.data] == [lv.shape for lv in levels]
    assert tuple(layer.scale) == (mpp, mpp)
    for k, lv in enumerate(levels):  # a box straddling dask blocks comes out pixel-exact at every level
        np.testing.assert_array_equal(np.asarray(layer.data[k][7:151, 5:203]), lv[7:151, 5:203])


def test_slide_without_mpp_opens_in_pixels(make_napari_viewer, tmp_path):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, _pattern_levels(256, 256, 1)[0], photometric="rgb", tile=(64, 64))
    viewer = make_napari_viewer()
    (layer,) = viewer.open(path, plugin=PLUGIN)
    assert tuple(layer.scale) == (1.0, 1.0)
    assert layer.metadata[META_KEY]["mpp"] is None


def test_reader_returns_none_fast_for_what_it_cannot_read(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "fake.tif").write_bytes(b"GIF89a not a tiff")
    (tmp_path / "empty.mrxs").write_bytes(b"")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "odd.zarr").mkdir()
    (tmp_path / "odd.zarr" / ".zattrs").write_text("{not json")
    (tmp_path / "prediction.json").write_text("{}")  # no heatmap beside it
    (tmp_path / "empty.svs").write_bytes(b"")  # a name only slide readers claim, but nothing in it
    candidates = ["notes.txt", "fake.tif", "empty.mrxs", "emptydir", "odd.zarr", "prediction.json", "missing.svs",
                  "empty.svs"]
    t = time.perf_counter()
    results = {name: plugin_reader.get_reader(str(tmp_path / name)) for name in candidates}
    elapsed = time.perf_counter() - t
    assert results == dict.fromkeys(candidates)
    assert plugin_reader.get_reader([str(tmp_path / "a.tif"), str(tmp_path / "b.tif")]) is None
    assert elapsed < 0.5, f"get_reader took {elapsed:.3f} s for {len(candidates)} non-slides"


def test_a_damaged_slide_only_file_says_why_it_cannot_be_read(make_napari_viewer, tmp_path):
    """broken.svs (no TIFF header) was refused with napari's "Reader 'wsi-vssm' ... refused the file"."""
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"IJrEr1vV not a slide")
    assert plugin_reader.get_reader(str(bad)) is plugin_reader.read_slide
    with pytest.raises(Exception, match="not a slide format this app reads"):
        plugin_reader.read_slide(str(bad))


def test_a_dicom_series_folder_opens_as_its_slide(tmp_path):
    """IDC lays DICOM slides out a folder per series: napari had no reader for the folder."""
    import shutil

    from conftest import shared_file

    one = tmp_path / "1.2.3"
    one.mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):  # a volume and its thumbnail: one series
        shutil.copy(shared_file("slides", name), one / name)
    assert plugin_reader.get_reader(str(one)) is plugin_reader.read_dicom_folder
    [(data, kwargs, kind)] = plugin_reader.read_dicom_folder(str(one))
    assert kind == "image" and data[0].shape[:2] == (16, 16), (kind, data[0].shape)
    bare = tmp_path / "bare"  # DICOM media name files without an extension
    bare.mkdir()
    for i, name in enumerate(("boxes_0.dcm", "boxes_1.dcm")):
        shutil.copy(one / name, bare / f"IM00000{i}")
    assert plugin_reader.get_reader(str(bare)) is plugin_reader.read_dicom_folder
    assert plugin_reader.read_dicom_folder(str(bare))[0][0][0].shape[:2] == (16, 16)
    two = tmp_path / "two"
    shutil.copytree(one, two)
    shutil.copy(shared_file("slides", "small.svs"), two / "small.svs")  # another slide beside the series
    with pytest.raises(Exception, match=r"two: a folder of 2 slides \(boxes_0.dcm, small.svs\): open one of them"):
        plugin_reader.read_dicom_folder(str(two))


def test_package_and_fast_path_import_neither_qt_nor_heavy_libraries(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    code = (
        "import sys; import wsi_vssm.napari_plugin; from wsi_vssm.napari_plugin.reader import get_reader;"
        f"assert get_reader({str(tmp_path / 'x.png')!r}) is None;"
        "bad = sorted(m for m in ('qtpy', 'PyQt5', 'PyQt6', 'PySide6', 'napari', 'torch', 'dask', 'zarr')"
        " if m in sys.modules); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ---- prediction outputs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["folder", "prediction.json", "heatmap.ome.zarr"])
def test_prediction_output_opens_as_heatmap_and_contours(make_napari_viewer, prediction_folder, target):
    folder = prediction_folder[0]
    path = folder if target == "folder" else folder / target
    viewer = make_napari_viewer()
    layers = viewer.open(path, plugin=PLUGIN)
    assert [ly._type_string for ly in layers] == ["image", "shapes"]
    heat, shapes = layers
    assert tuple(heat.contrast_limits) == (0.0, 1.0)
    alpha = heat.colormap.map(np.array([0.0, 0.2, 0.49, 0.5, 0.95]))[:, 3]
    assert (alpha[:3] == 0).all(), "no tissue and cells below the cell threshold should be transparent"
    assert 0 < alpha[3] < alpha[4], "above the threshold, opacity rises with the probability"
    assert heat.metadata[META_KEY]["kind"] == "heatmap"
    assert heat.metadata[META_KEY]["prediction"]["probability"] == 0.9  # the call travels with the layers
    assert len(shapes.data) >= 1 and set(shapes.shape_type) == {"polygon"}
    np.testing.assert_allclose(np.asarray(shapes.features["max_probability"]), 0.95, rtol=1e-6)
    assert {"lesion_id", "category", "area_um2"} <= set(shapes.features.columns)  # as QuPath shows them
    assert (np.asarray(shapes.features["area_um2"]) > 0).all()


def test_an_output_folder_opens_its_one_slide_and_names_the_folders_of_several(make_napari_viewer,
                                                                              prediction_folder, tmp_path):
    """`predict slide --out OUT` then `napari OUT`: the folder was refused with napari's "no reader"."""
    import shutil

    out = tmp_path / "OUT"
    (out / ".state").mkdir(parents=True)
    assert plugin_reader.get_reader(str(out)) is plugin_reader.read_cohort_folder
    with pytest.raises(Exception, match="no slide predicted yet"):
        plugin_reader.read_cohort_folder(str(out))
    # an extract run's OUT holds features, not predictions: "not predicted yet" would have the user wait
    extracted = tmp_path / "features"
    (extracted / ".state").mkdir(parents=True)
    for name in ("a", "b"):
        (extracted / ".state" / f"{name}.extract.json").write_text("{}")
    with pytest.raises(Exception, match=r"an `extract` output folder \(features of 2 slides\), not predictions"):
        plugin_reader.read_cohort_folder(str(extracted))
    shutil.copytree(prediction_folder[0], out / "tumour_slide")
    viewer = make_napari_viewer()
    layers = viewer.open(out, plugin=PLUGIN)
    assert [ly._type_string for ly in layers] == ["image", "shapes"]
    assert layers[0].metadata[META_KEY]["prediction"]["probability"] == 0.9
    shutil.copytree(prediction_folder[0], out / "another")
    with pytest.raises(Exception, match=r"output folder of 2 slide predictions \(another, tumour_slide\): open one "
                                        r"slide's folder, e.g. .*another"):
        plugin_reader.read_cohort_folder(str(out))


def test_heatmap_hot_spot_lies_over_the_known_lesion_in_world_coordinates(make_napari_viewer, tumour_slide,
                                                                           prediction_folder):
    path, lesion = tumour_slide
    folder, prob, cell0, origin = prediction_folder
    viewer = make_napari_viewer()
    (slide,) = viewer.open(path, plugin=PLUGIN)
    heat, shapes = viewer.open(folder, plugin=PLUGIN)

    # the lesion's centre, a point in the slide's level-0 pixels, as world coordinates via the slide layer
    c = lesion.representative_point()
    world = np.asarray(slide.data_to_world((c.y - 0.5, c.x - 0.5)))  # continuous (x, y) -> pixel-centre index
    # ... falls on a hot heatmap pixel
    r, col = np.round(np.asarray(heat.world_to_data(world))).astype(int)
    assert heat.data[r, col] == pytest.approx(0.95)
    # the hot spot's centre of mass (world) is the lesion's (level-0 px -> world), within one cell
    rr, cc = np.nonzero(heat.data >= 0.5)
    hot_world = np.mean([heat.data_to_world((i, j)) for i, j in zip(rr, cc, strict=True)], axis=0)
    cells = [(origin[0] + (j + 0.5) * cell0, origin[1] + (i + 0.5) * cell0) for i, j in zip(rr, cc, strict=True)]
    expect = np.asarray(slide.data_to_world(np.mean(cells, axis=0)[::-1] - 0.5))
    np.testing.assert_allclose(hot_world, expect, atol=1e-6)
    assert np.linalg.norm(hot_world - np.asarray(slide.data_to_world((lesion.centroid.y, lesion.centroid.x)))) \
        < 2 * cell0 * SLIDE_MPP
    # contours run along the hot cells' outer edges: their world box is the hot block's world box
    verts = np.concatenate([np.asarray([shapes.data_to_world(v) for v in poly]) for poly in shapes.data])
    half = cell0 * SLIDE_MPP / 2
    hot_box = np.array([[heat.data_to_world((i, j)) for i, j in zip(rr, cc, strict=True)]]).reshape(-1, 2)
    np.testing.assert_allclose(verts.min(axis=0), hot_box.min(axis=0) - half, atol=1e-6)
    np.testing.assert_allclose(verts.max(axis=0), hot_box.max(axis=0) + half, atol=1e-6)


def test_screenshot_shows_heatmap_colour_over_tissue(make_napari_viewer, tumour_slide, prediction_folder):
    path, lesion = tumour_slide
    viewer = make_napari_viewer(show=True)
    viewer.open(path, plugin=PLUGIN)
    heat, shapes = viewer.open(prediction_folder[0], plugin=PLUGIN)
    shapes.visible = False
    viewer.reset_view()
    heat.visible = False
    plain = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    heat.visible = True
    over = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    changed = np.abs(over - plain).sum(axis=2) > 30
    white = plain.min(axis=2) > 235  # background glass (and canvas) stays as it was: 0 is transparent
    tissue = (plain.max(axis=2) - plain.min(axis=2) > 25) & ~white
    assert tissue.mean() > 0.05, "the slide should show tissue"
    assert changed[white].mean() < 0.05, "no heatmap colour over background"
    # normal tissue (0.2, below the cell threshold) shows untouched; the lesion (0.95) turns viridis yellow-green
    assert changed[tissue].mean() < 0.5, "tissue below the cell threshold should not be tinted"
    tinted = changed & (over[..., 1] > over[..., 2])  # yellow-green: green above blue, unlike H&E
    assert tinted.sum() > 20


# ---- widget -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random micro SlideModel saved as a model file (the packaged default may not exist yet)."""
    torch = pytest.importorskip("torch")
    from wsi_vssm.models.slide_model import SlideModel, save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_model(SlideModel.create("micro", name="tiny"), path)
    return path


@pytest.fixture
def widget_viewer(make_napari_viewer, tumour_slide):
    from wsi_vssm.napari_plugin.widget import PredictWidget

    viewer = make_napari_viewer()
    viewer.open(tumour_slide[0], plugin=PLUGIN)
    widget = PredictWidget(viewer)
    viewer.window.add_dock_widget(widget)
    return viewer, widget


def _notifications(since: int) -> list[str]:
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records[since:]]


def test_the_widgets_line_says_out_of_domain_next_to_the_call():
    """The widget printed "tumour probability 0.997 -> tumour" for the skin sample, which the CLI and the overlay
    call OUT OF DOMAIN."""
    from wsi_vssm.napari_plugin._predict import summary

    record = {"slide": "cmu", "probability": 0.997, "label": 1, "slide_threshold": 0.519, "in_domain": False}
    line = summary(record)
    assert line == "cmu: tumour probability 0.997 -> tumour, OUT OF DOMAIN (unreliable) (slide threshold 0.519)"
    assert "OUT OF DOMAIN" not in summary({**record, "in_domain": True})
    empty = {"slide": "f", "probability": None, "reason": "no tissue found", "in_domain": False}
    assert "OUT OF DOMAIN" in summary(empty)
    # a tumour call on almost no cells, tagged as the CLI's line tags it (the widget's line had no sign of it)
    few = {**record, "in_domain": True, "summary": {"cells_at_cell_threshold": 0, "warnings": []}}
    assert summary(few) == ("cmu: tumour probability 0.997 -> tumour (doubtful: 0 cell(s) at the cell threshold) "
                            "(slide threshold 0.519)")
    assert "doubtful" not in summary({**few, "summary": {"cells_at_cell_threshold": 40, "warnings": []}})


def test_widget_presets_the_default_model_and_the_open_slide(widget_viewer):
    viewer, widget = widget_viewer
    assert widget.model_combo.currentText() == "default"
    assert widget.slide_combo.currentText() == "tumour_slide"
    assert widget.mpp_spin.value() == 0.0 and widget.mpp_spin.text() == "from file"
    assert widget.cancel_button.isEnabled() is False


def test_widget_predicts_end_to_end_and_adds_heatmap_and_contours(widget_viewer, tiny_model, tmp_path, qtbot):
    viewer, widget = widget_viewer
    widget.model_combo.setEditText(str(tiny_model))
    widget.out_edit.setText(str(tmp_path / "out"))
    stages = []
    widget._progress.changed.connect(lambda done, total, stage: stages.append(stage))
    widget.predict_button.click()
    assert widget.cancel_button.isEnabled() and not widget.predict_button.isEnabled()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget.last_result is not None, widget.result_label.text()
    record = widget.last_result.record
    assert 0.0 <= record["probability"] <= 1.0
    assert "tumour probability" in widget.result_label.text()
    assert {"read", "regions", "done"} <= set(stages)
    names = [ly.name for ly in viewer.layers]
    assert names[:2] == ["tumour_slide", "tumour_slide heatmap"] and "tumour_slide contours" in names
    out = tmp_path / "out" / "tumour_slide"
    assert {p.name for p in out.iterdir()} >= {"prediction.json", "heatmap.ome.zarr", "contours.geojson"}
    heat = viewer.layers["tumour_slide heatmap"]
    assert heat.data.max() > 0 and heat.metadata[META_KEY]["mpp"] == SLIDE_MPP
    # the heatmap grid covers the slide from its top-left edge; the last cells start inside it
    slide = viewer.layers["tumour_slide"]
    half = heat.scale[-1] / 2
    first_edge = np.asarray(heat.data_to_world((0, 0))) - half
    np.testing.assert_allclose(first_edge, np.asarray(slide.data_to_world((-0.5, -0.5))), atol=1e-6)
    last_edge = np.asarray(heat.data_to_world(np.array(heat.data.shape) - 1)) - half
    assert np.all(last_edge < np.asarray(slide.data_to_world((SLIDE_SIZE - 0.5, SLIDE_SIZE - 0.5))))
    assert widget.predict_button.isEnabled() and not widget.cancel_button.isEnabled()


def test_widget_reports_errors_as_notifications_without_crashing(widget_viewer, tmp_path, qtbot):
    from napari.utils.notifications import notification_manager

    viewer, widget = widget_viewer
    widget.model_combo.setEditText(str(tmp_path / "no-such-model.pt"))
    widget.out_edit.setText(str(tmp_path / "out"))
    before = len(notification_manager.records)
    widget.predict_button.click()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    messages = _notifications(before)
    assert any("model file not found" in m for m in messages), messages
    assert widget.last_result is None and len(viewer.layers) == 1
    assert widget.result_label.text().startswith("failed:")


def test_renaming_the_slide_layer_keeps_it_selected(widget_viewer):
    """The Slide box kept the old name, and Predict said "open a slide first" with the slide open."""
    viewer, widget = widget_viewer
    viewer.layers["tumour_slide"].name = "my slide"
    assert widget.slide_combo.currentText() == "my slide"
    assert widget._selected_slide() is viewer.layers["my slide"]


def test_widget_says_where_to_give_a_missing_mpp(widget_viewer):
    """The library's message says "--mpp", a flag the widget does not have."""
    from wsi_vssm.io.errors import MissingMpp

    _, widget = widget_viewer
    widget._on_errored(MissingMpp("s.svs", "slide has no resolution; state it with --mpp"))
    assert "mpp box" in widget.result_label.text()
    from wsi_vssm.errors import UsageError

    widget._on_errored(UsageError("device 'cuda' asked for, but torch sees no CUDA GPU; use --device cpu or auto"))
    assert "(here: pick cpu or auto in the Device box)" in widget.result_label.text()  # the widget's own box


def test_widget_cancel_stops_prediction(widget_viewer, tiny_model, tmp_path, qtbot):
    from napari.utils.notifications import notification_manager

    viewer, widget = widget_viewer
    widget.model_combo.setEditText(str(tiny_model))
    widget.out_edit.setText(str(tmp_path / "out"))
    widget._progress.changed.connect(lambda *_: widget.cancel())  # cancel as soon as work is under way
    before = len(notification_manager.records)
    widget.predict_button.click()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert any("cancelled" in m for m in _notifications(before))
    assert widget.last_result is None and len(viewer.layers) == 1
    assert not (tmp_path / "out" / "tumour_slide" / "prediction.json").exists()


def test_widget_without_a_slide_says_so(make_napari_viewer):
    from napari.utils.notifications import notification_manager

    from wsi_vssm.napari_plugin.widget import PredictWidget

    viewer = make_napari_viewer()
    widget = PredictWidget(viewer)
    before = len(notification_manager.records)
    widget.predict_button.click()
    assert widget.worker is None
    assert any("open a slide first" in m for m in _notifications(before))


def test_widget_is_reachable_through_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Predict metastasis")
    assert type(widget).__name__ == "PredictWidget"


# ---- manifest ---------------------------------------------------------------------------------------------------
def test_npe2_validate_passes():
    npe2_cli = Path(sys.executable).with_name("npe2")
    cmd = [str(npe2_cli)] if npe2_cli.exists() else [sys.executable, "-m", "npe2"]
    out = subprocess.run([*cmd, "validate", str(MANIFEST)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "NO_COLOR": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    manifest.validate_imports()  # every python_name imports and exists
    patterns = manifest.contributions.readers[0].filename_patterns
    assert {"*.svs", "*.tif", "*.ndpi", "*.mrxs", "*.zarr"} <= set(patterns)


@pytest.mark.parametrize("how", ["dock close button", "viewer closed"])
def test_closing_the_dock_or_the_viewer_cancels_a_running_prediction(make_napari_viewer, tumour_slide, qtbot,
                                                                      monkeypatch, how):
    """napari's close button takes the widget out of its dock without a close event, and closing the viewer
    destroys it: the prediction went on unseen (minutes of CPU, outputs nobody asked to keep)."""
    import wsi_vssm.napari_plugin.widget as widget_module
    from wsi_vssm.pipeline.predict import Cancelled

    seen = {}

    def slow_prediction(request, progress=None, cancel=None):  # stands in for minutes of regions
        seen["cancel"] = cancel
        seen["cancelled"] = cancel.wait(30)
        raise Cancelled("prediction cancelled")

    monkeypatch.setattr(widget_module, "run_prediction", slow_prediction)
    viewer = make_napari_viewer()
    viewer.open(tumour_slide[0], plugin=PLUGIN)
    widget = widget_module.PredictWidget(viewer)
    dock = viewer.window.add_dock_widget(widget)
    widget.predict_button.click()
    qtbot.waitUntil(lambda: "cancel" in seen, timeout=10_000)
    assert not seen["cancel"].is_set()
    if how == "dock close button":
        dock.title.close_button.click()
    else:
        viewer.close()
    qtbot.waitUntil(lambda: "cancelled" in seen, timeout=10_000)
    assert seen["cancelled"] is True  # set at once, not after the 30 s wait


# ---- a user-flow review, 2026-12-06 --------------------------------------------------------------------------------
def test_reopened_results_replay_predicts_warnings_and_say_when_there_is_no_call(make_napari_viewer, prediction_folder,
                                                                                 tmp_path):
    """Reopening CMU-1's folder showed "tumour 0.999" alone: not prediction.json's "the call rests on 0 cells"
    warning, nor why a slide is out of domain; a damaged or missing prediction.json opened without a word."""
    import shutil

    from napari.utils.notifications import notification_manager

    folder = tmp_path / "tumour_slide"
    shutil.copytree(prediction_folder[0], folder)
    # as predict writes it: the domain notes also among the summary's warnings
    record = {"slide": "tumour_slide", "probability": 0.999, "label": 1, "slide_threshold": 0.44, "in_domain": False,
              "domain_notes": ["stain: no eosin (IHC?)"],
              "summary": {"warnings": ["out of domain: stain: no eosin (IHC?)",
                                       "the tumour call rests on 0 cell(s) at or above the cell threshold 0.781"]}}
    (folder / "prediction.json").write_text(json.dumps(record))
    viewer = make_napari_viewer()
    before = len(notification_manager.records)
    viewer.open(folder, plugin=PLUGIN)
    said = _notifications(before)
    assert any("OUT OF DOMAIN" in m for m in said)
    from napari.utils.notifications import NotificationSeverity

    call = [n for n in notification_manager.records[before:] if "OUT OF DOMAIN" in str(n.message)]
    assert call and all(n.severity == NotificationSeverity.WARNING for n in call)  # not an info line
    assert sum("out of domain: stain: no eosin (IHC?)" in m for m in said) == 1, said  # once, not twice
    assert any("tumour_slide: the tumour call rests on 0 cell(s)" in m for m in said), said
    del record["summary"]  # an older file: the notes alone
    (folder / "prediction.json").write_text(json.dumps(record))
    before = len(notification_manager.records)
    viewer.open(folder, plugin=PLUGIN)
    assert sum("out of domain: stain: no eosin (IHC?)" in m for m in _notifications(before)) == 1
    for broken in ('{"slide": "tumour_sl', None):  # cut off mid-file, then gone
        if broken is None:
            (folder / "prediction.json").unlink()
        else:
            (folder / "prediction.json").write_text(broken)
        before = len(notification_manager.records)
        layers = viewer.open(folder, plugin=PLUGIN)
        said = _notifications(before)
        assert len(layers) == 2 and layers[0].metadata[META_KEY]["prediction"] is None
        assert any("prediction.json" in m and "the slide's call cannot be shown" in m for m in said), said


def test_contours_are_labelled_once_per_lesion(make_napari_viewer, prediction_folder):
    """QuPath users read a lesion's name beside it; the layer's text was empty."""
    viewer = make_napari_viewer()
    _, shapes = viewer.open(prediction_folder[0], plugin=PLUGIN)
    labels = list(shapes.features["label"])
    assert labels[0] == shapes.features["name"][0] != "" and shapes.text.string.format == "{label}"
    assert sum(bool(label) for label in labels) == len(set(shapes.features["lesion_id"]))


def test_widget_refuses_a_file_as_output_before_running_and_passes_tta_and_device(widget_viewer, tmp_path):
    """An Output that is a file failed after the whole slide had run, as "an unexpected error"."""
    from napari.utils.notifications import notification_manager

    _, widget = widget_viewer
    (tmp_path / "afile").write_text("x")
    widget.out_edit.setText(str(tmp_path / "afile"))
    before = len(notification_manager.records)
    assert widget.request() is None
    assert any("is a file, not a folder" in m for m in _notifications(before))
    widget.out_edit.setText(str(tmp_path / "out"))
    assert (widget.request().tta, widget.request().device) == (False, "auto")
    widget.tta_check.setChecked(True)
    widget.device_combo.setCurrentText("cpu")
    assert (widget.request().tta, widget.request().device) == (True, "cpu")


def test_the_mpp_box_starts_from_the_file_for_another_slide(widget_viewer, tumour_slide, tmp_path):
    """A 0.5 typed for a slide without a resolution stayed for the next slide, which it silently rescaled (a
    0.972 um/px mosaic read at 0.5 lost its lesion)."""
    import shutil

    viewer, widget = widget_viewer
    other = tmp_path / "other_slide.tif"
    shutil.copy(tumour_slide[0], other)
    viewer.open(other, plugin=PLUGIN)
    widget.slide_combo.setCurrentText("other_slide")  # the second slide in the box
    widget.mpp_spin.setValue(0.5)
    viewer.add_points([[0, 0]])  # any other layer change keeps the slide and its mpp
    assert widget.slide_combo.currentText() == "other_slide" and widget.mpp_spin.value() == 0.5
    viewer.layers["other_slide"].name = "renamed"  # the same slide: its mpp stays
    assert widget.slide_combo.currentText() == "renamed" and widget.mpp_spin.value() == 0.5
    widget.slide_combo.setCurrentText("tumour_slide")
    assert widget.mpp_spin.value() == 0.0 and widget.mpp_spin.text() == "from file"


def test_a_slide_open_in_pixels_is_placed_at_its_predictions_mpp(make_napari_viewer, prediction_folder, tmp_path):
    """A slide that states no resolution opened in pixels, its prediction in micrometres: 1/mpp times apart."""
    import shutil

    from napari.utils.notifications import notification_manager

    path = tmp_path / "tumour_slide.tif"  # the prediction folder's slide name, without a resolution
    tifffile.imwrite(path, _pattern_levels(256, 256, 1)[0], photometric="rgb", tile=(64, 64))
    other = tmp_path / "other.tif"
    shutil.copy(path, other)
    viewer = make_napari_viewer()
    (slide,) = viewer.open(path, plugin=PLUGIN)
    (unrelated,) = viewer.open(other, plugin=PLUGIN)
    before = len(notification_manager.records)
    viewer.open(prediction_folder[0], plugin=PLUGIN)
    assert tuple(slide.scale) == (SLIDE_MPP, SLIDE_MPP) and slide.metadata[META_KEY]["mpp"] == SLIDE_MPP
    assert tuple(unrelated.scale) == (1.0, 1.0)  # another slide's name: left alone
    assert any("placed at 0.5 um/px, the one its prediction used" in m for m in _notifications(before))
    viewer.layers.remove(slide)  # the other way round: the prediction is open, then the slide
    (again,) = viewer.open(path, plugin=PLUGIN)
    assert tuple(again.scale) == (SLIDE_MPP, SLIDE_MPP) and again.metadata[META_KEY]["mpp_source"] == "its prediction"
    assert all("micrometer" in str(u) for u in (*slide.units, *again.units))  # the scale bar speaks um, not px
    other2 = tmp_path / "other2.tif"  # prediction open first, then a slide of another name: left alone too
    shutil.copy(path, other2)
    (unrelated2,) = viewer.open(other2, plugin=PLUGIN)
    assert tuple(unrelated2.scale) == (1.0, 1.0) and unrelated2.metadata[META_KEY]["mpp"] is None


def test_a_slide_that_states_its_mpp_keeps_it_beside_its_prediction(make_napari_viewer, tumour_slide,
                                                                   prediction_folder):
    """Only a slide that states no resolution is placed at its prediction's: one that states its own keeps it
    and its source, whichever is opened first, and no notification claims it states none."""
    from napari.utils.notifications import notification_manager

    viewer = make_napari_viewer()
    for order in ("slide first", "prediction first"):
        viewer.layers.clear()
        before = len(notification_manager.records)
        if order == "slide first":
            (slide,) = viewer.open(tumour_slide[0], plugin=PLUGIN)
            viewer.open(prediction_folder[0], plugin=PLUGIN)
        else:
            viewer.open(prediction_folder[0], plugin=PLUGIN)
            (slide,) = viewer.open(tumour_slide[0], plugin=PLUGIN)
        assert slide.metadata[META_KEY]["mpp_source"] != "its prediction", order
        assert not any("states no resolution" in m for m in _notifications(before)), order


def test_a_prediction_mpp_that_is_no_positive_number_places_nothing():
    for mpp in (0, -1.0, True, "0.5", None, float("nan")):
        settings, meta = {"name": "s"}, {"mpp": None}
        assert plugin_reader._placed(settings, meta, {"mpp": mpp}) is False, mpp
        assert "scale" not in settings and meta["mpp"] is None


def test_a_prediction_rewritten_while_it_is_read_is_read_again(prediction_folder, tmp_path, monkeypatch):
    """Each file of a prediction folder is replaced atomically, the folder is not: a rerun with another threshold
    writing while napari read gave one run's heatmap with the other's contours (72 of 18,000 reads in a probe)."""
    import shutil

    from wsi_vssm.napari_plugin import _layers

    folder = tmp_path / "tumour_slide"
    shutil.copytree(prediction_folder[0], folder)
    real, calls = _layers.heatmap_layer, []

    def rerun_writes_meanwhile(path, *a, **k):
        layer = real(path, *a, **k)
        calls.append(path)
        if len(calls) == 1:  # another run replaces prediction.json as this read is under way
            tmp = folder / ".prediction.json.tmp"
            tmp.write_text(json.dumps({"slide": "tumour_slide", "probability": 0.1}))
            os.replace(tmp, folder / "prediction.json")
        return layer

    monkeypatch.setattr(_layers, "heatmap_layer", rerun_writes_meanwhile)
    layers = _layers.prediction_layers(folder)
    assert len(calls) == 2, "the folder was not read again"
    assert layers[0][1]["metadata"][META_KEY]["prediction"]["probability"] == 0.1
