"""predict and evaluate end to end on tiny synthetic slides with a tiny random model (fast on 2 cores)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_file, write_tiny_model

from wsi_vssm.cli import main
from wsi_vssm.pipeline.predict import Cancelled, PredictParams, cell_grid, predict_slide

# 1024 px at 2 um/px is 2048 um: at the model's 0.97 um/px about 2100 px, i.e. a few 1024 px regions.
FAST = PredictParams(device="cpu", region_px=1024, overlap_px=64, reader_threads=1)


def _model(path):
    from wsi_vssm.models.slide_model import load_model

    return load_model(path)


def test_predict_writes_every_output(model_file, cohort, tmp_path):
    rec = predict_slide(cohort / "tumor_001.tif", _model(model_file), tmp_path, FAST)
    folder = tmp_path / "tumor_001"
    saved = json.loads((folder / "prediction.json").read_text())
    assert list(saved) == ["schema", "slide", "probability", "slide_logit", "label", "threshold", "slide_threshold",
                           "cell_threshold", "lesion_extent_threshold", "lesion_merge_distance_cells", "reason",
                           "in_domain", "domain_notes", "domain_distance", "domain_threshold", "device", "model", "mpp",
                           "summary", "lesions", "parameters", "timings", "version"]
    assert list(rec) == list(saved)  # the record returned is the file's, in its order
    # the synthetic slide is a 2 um/px scan read at 0.97: enlarged, so out of domain; a random test model has no
    # feature domain, and the notes say what was not checked
    enlarged, unchecked = saved["domain_notes"]
    assert saved["in_domain"] is False and "scanned at 2 um/px" in enlarged and "enlarged 2.1x" in enlarged
    assert "not checked (this model has no feature domain" in unchecked
    assert saved["domain_distance"] is None and saved["domain_threshold"] is None
    assert saved["parameters"]["precision"] == "fp32" and saved["parameters"]["precision_used"] == "fp32"
    assert saved["schema"] == "wsi-vssm-prediction/2" and saved["device"] == "cpu"
    assert saved["probability"] == 0.5 * (1 + math.tanh(0.5 * saved["slide_logit"]))  # its logistic, in float64
    assert saved["slide"] == "tumor_001" and 0.0 <= saved["probability"] <= 1.0 and saved["reason"] is None
    assert saved["label"] == int(saved["probability"] >= 0.5) and rec["probability"] == saved["probability"]
    assert saved["threshold"] == saved["slide_threshold"] == 0.5 and saved["cell_threshold"] == 0.5
    assert saved["lesion_extent_threshold"] == 0.5  # the test model stores none: lesions end at the cell threshold
    assert saved["lesion_merge_distance_cells"] == 1.0  # nor a merge distance: the default
    assert saved["mpp"]["analysis"] == pytest.approx(0.97) and saved["summary"]["n_cells"] > 10
    assert saved["summary"]["tissue_area_mm2"] > 0
    largest = max((les["diameter_mm"] for les in saved["lesions"]), default=None)
    assert saved["summary"]["largest_lesion_mm"] == largest
    assert (folder / "lesions.csv").read_text().splitlines()[0].startswith("id,x,y,width,height,area_mm2,diameter_mm")
    assert "n_cells" not in saved["parameters"] and "warning" not in saved["parameters"]
    model = saved["model"]
    assert model["hash"] == model["weights_hash"] and len(model["sha256"]) == 64 and "lymph" in model["domain"]
    for name in ("heatmap.ome.zarr", "overlay.png", "contours.geojson"):
        assert (folder / name).exists(), name
    from wsi_vssm.outputs.heatmap import read_heatmap_zarr

    block = read_heatmap_zarr(folder / "heatmap.ome.zarr")[3]["wsi_vssm"]  # the heatmap alone names its model
    assert (block["model_sha256"], block["weights_hash"]) == (model["sha256"], model["weights_hash"])
    geo = json.loads((folder / "contours.geojson").read_text())
    assert geo["type"] == "FeatureCollection"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_heatmap_cells_sit_on_tissue(model_file, cohort, tmp_path):
    from wsi_vssm.io import open_slide
    from wsi_vssm.io.tissue import slide_tissue_mask
    from wsi_vssm.outputs.heatmap import read_heatmap_zarr

    predict_slide(cohort / "normal_001.tif", _model(model_file), tmp_path, FAST)
    prob, cell_um, _, attrs = read_heatmap_zarr(tmp_path / "normal_001" / "heatmap.ome.zarr")
    cell0 = attrs["wsi_vssm"]["cell0"]
    with open_slide(cohort / "normal_001.tif") as slide:
        mask, scale = slide_tissue_mask(slide)
    assert cell_um == pytest.approx(0.97 * 32, rel=1e-6)
    ii, jj = np.nonzero(prob > 0)
    assert len(ii) > 10
    # the centre of every scored cell lies on (or right next to) tissue in the mask
    my = np.clip(((ii + 0.5) * cell0 / scale).astype(int), 0, mask.shape[0] - 1)
    mx = np.clip(((jj + 0.5) * cell0 / scale).astype(int), 0, mask.shape[1] - 1)
    from scipy import ndimage as ndi

    near = ndi.binary_dilation(mask, iterations=2)
    assert near[my, mx].mean() > 0.95


def test_cell_grid_places_values_by_coordinates():
    grid = cell_grid(np.array([[0, 0], [62, 124]]), np.array([0.2, 0.9], np.float32), 31.0, (100, 160))
    assert grid.shape == (6, 4) and grid[0, 0] == pytest.approx(0.2) and grid[4, 2] == pytest.approx(0.9)
    assert np.isnan(grid).sum() == 22


def test_a_speck_of_tissue_keeps_its_area():
    """The area was rounded to 4 decimals of a mm^2: one 31 um cell of tissue (0.00096 mm^2) read 0.0009."""
    from types import SimpleNamespace

    from wsi_vssm.pipeline.predict import _tissue_area_mm2

    mask = np.zeros((8, 8), bool)
    mask[3, 3] = True
    area = _tissue_area_mm2(SimpleNamespace(mask=mask, scale=62.0), 0.5)  # one 31 x 31 um mask pixel
    assert area == pytest.approx(0.000961, rel=1e-6)


def test_cancel_stops_prediction(model_file, cohort, tmp_path):
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        predict_slide(cohort / "normal_001.tif", _model(model_file), tmp_path, FAST, cancel=stop)
    assert not (tmp_path / "normal_001" / "prediction.json").exists()


def test_a_cancel_stops_the_backbone_at_its_next_block_not_its_next_region(model_file, cohort, tmp_path):
    """napari's Cancel was honoured between regions only: it waited for the region under way (about 11 s on 2
    CPU cores). Pressed while the first block runs, no further block finishes; the model keeps no hook."""
    model = _model(model_file)
    blocks = [b for stage in model.backbone.layers for b in stage.blocks]
    stop, finished_after = threading.Event(), []

    def press_cancel(_module, _inputs, _output):
        stop.set()

    def count(_module, _inputs, _output):
        if stop.is_set():
            finished_after.append(1)

    handles = [blocks[0].register_forward_hook(press_cancel)]
    handles += [b.register_forward_hook(count) for b in blocks[1:]]
    with pytest.raises(Cancelled):
        predict_slide(cohort / "normal_001.tif", model, tmp_path, FAST, cancel=stop)
    assert len(blocks) > 2 and finished_after == []
    for h in handles:
        h.remove()
    assert all(not b._forward_pre_hooks for b in blocks)
    assert predict_slide(cohort / "normal_001.tif", model, tmp_path / "again", FAST)["probability"] is not None


def test_a_cancel_during_the_writing_leaves_a_done_slide_not_a_cancelled_one(model_file, cohort, tmp_path):
    """The napari widget's Cancel pressed while the outputs were being written: prediction.json (whose presence
    means done) was complete, but the run said "cancelled" and showed nothing."""
    stop = threading.Event()

    def progress(done, total, stage):
        if stage == "write":
            stop.set()  # the user presses Cancel as writing starts

    rec = predict_slide(cohort / "normal_001.tif", _model(model_file), tmp_path, FAST, progress=progress, cancel=stop)
    assert stop.is_set() and rec["probability"] is not None
    assert (tmp_path / "normal_001" / "prediction.json").is_file()


def test_no_tissue_is_a_null_probability_not_an_error(model_file, tmp_path):
    import tifffile

    path = tmp_path / "blank.tif"
    tifffile.imwrite(path, np.full((1024, 1024, 3), 245, np.uint8), tile=(256, 256), photometric="rgb",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with pytest.warns(UserWarning, match="no tissue") as caught:
        rec = predict_slide(path, _model(model_file), tmp_path / "out", FAST)
    assert rec["probability"] is None and rec["reason"] == "no tissue found" and rec["label"] is None
    # it points at the caller's line (a script's top-level call showed "sys:1")
    assert [w.filename for w in caught if "no tissue" in str(w.message)] == [__file__]


def test_a_slide_without_cells_says_why(model_file, tmp_path):
    """A 16 px fixture read "11.7% tissue" in `info` and "no tissue found" in predict: its tissue was there, the
    slide is smaller than one cell. The reason says which of the three it is, and the overlay shows it."""
    from PIL import Image

    from wsi_vssm.pipeline.predict import NO_TISSUE, SMALLER_THAN_A_CELL, TOO_LITTLE_TISSUE, no_cells_reason
    from wsi_vssm.synth.mosaic import write_image_slide

    attrs = {"mpp": 1.0, "slide_mpp": 0.5, "dims": [60, 4000], "token_px": 32, "min_tissue": 0.25}
    some = np.zeros((8, 8), bool)
    some[0, 0] = True
    assert no_cells_reason(attrs, np.zeros((8, 8), bool)) == NO_TISSUE
    assert no_cells_reason(attrs, some) == f"{SMALLER_THAN_A_CELL}: 30 x 2000 px at 1 um/px, a cell is 32 px"
    # 31.5 px is no whole cell either (the grid counts whole cells), whatever rounding would say
    assert no_cells_reason({**attrs, "dims": [63, 63]}, some).startswith(f"{SMALLER_THAN_A_CELL}: 31.5 x 31.5 px")
    assert no_cells_reason({**attrs, "dims": [4000, 4000]}, some) == \
        f"{TOO_LITTLE_TISSUE}: tissue on 1.6% of the slide, a cell needs 25%"
    rgb = np.full((40, 40, 3), 240, np.uint8)
    rgb[10:30, 10:30] = (150, 60, 160)  # tissue, on a slide of 40 px at 0.5 um/px: 20 px at the model's 1 um/px
    write_image_slide(tmp_path / "tiny.tif", rgb, 0.5)
    with pytest.warns(UserWarning, match=SMALLER_THAN_A_CELL):
        rec = predict_slide(tmp_path / "tiny.tif", _model(model_file), tmp_path / "out", FAST)
    assert rec["probability"] is None and rec["reason"].startswith(SMALLER_THAN_A_CELL), rec["reason"]
    assert Image.open(tmp_path / "out" / "tiny" / "overlay.png").size[0] > 0


def test_fluorescence_like_slide_is_out_of_domain_with_a_warning(model_file, tmp_path):
    """A dark-field slide is warned about, never refused: in_domain false, the reason in domain_notes."""
    import warnings

    from wsi_vssm.synth.mosaic import write_image_slide

    rng = np.random.default_rng(0)
    dark = rng.integers(0, 25, (1024, 1024, 3)).astype(np.uint8)
    dark[300:700, 300:700, 2] = 200  # a bright blue (DAPI-like) region
    write_image_slide(tmp_path / "dapi.tif", dark, 1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = predict_slide(tmp_path / "dapi.tif", _model(model_file), tmp_path / "out", FAST)
    assert rec["in_domain"] is False and any("fluorescence" in n for n in rec["domain_notes"])
    assert [w.filename for w in caught if "out of the model's domain" in str(w.message)] == [__file__]
    assert any(w.startswith("out of domain") for w in rec["summary"]["warnings"])


def test_cli_predict_one_line_per_slide_and_exit_3_on_a_broken_one(model_file, cohort, tmp_path, capsys):
    broken = tmp_path / "broken.svs"
    broken.write_text("not a slide")
    args = ["predict", str(cohort / "normal_001.tif"), str(broken), "--model", str(model_file), "--out",
            str(tmp_path / "o"), "--device", "cpu", "--region-px", "1024", "--overlap-px", "64",
            "--reader-threads", "1"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 3
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("normal_001: probability")
    assert "was trained on" in lines[1]  # the domain note closes the results
    assert "broken.svs" in err and "Traceback" not in err
    assert (tmp_path / "o" / "normal_001" / "prediction.json").exists()


def test_cli_predict_without_mpp_asks_for_it(model_file, tmp_path, capsys):
    tcga = shared_file("slides", "tcga-cr-7395-01a-01-ts1.svs")
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(tcga), "--model", str(model_file), "--out", str(tmp_path)])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "--mpp" in err and "tcga-cr-7395" in err and "\n" not in err


def test_cli_missing_model_is_one_line(cohort, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(cohort / "normal_001.tif"), "--model", str(tmp_path / "nope.pt")])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "nope.pt" in err and "\n" not in err and "Traceback" not in err


def test_evaluate_cohort_writes_metrics_table_and_roc(model_file, cohort, tmp_path, capsys):
    # a manifest with one missing slide: it is recorded as failed and the run goes on (exit 3)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"slide,label\n{cohort / 'normal_001.tif'},normal\n{cohort / 'tumor_001.tif'},Tumor\n"
                        f"missing.tif,0\n")
    args = ["evaluate", str(manifest), "--model", str(model_file), "--out", str(tmp_path / "ev"), "--device",
            "cpu", "--region-px", "1024", "--overlap-px", "64", "--reader-threads", "1", "--bootstrap", "200"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 3
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert list(metrics)[:9] == ["auc", "auc_ci95", "auc_ci95_delong", "accuracy", "sensitivity", "specificity",
                                 "threshold", "n", "n_failed"]
    assert metrics["n"] == 2 and metrics["n_failed"] == 1 and metrics["auc"] in (0.0, 1.0)
    # what a methods section needs: the class counts, the confusion behind sensitivity and specificity with their
    # exact intervals, where the threshold came from, the slide head and the software
    c = metrics["confusion"]
    assert (metrics["n_tumour"], metrics["n_normal"]) == (1, 1) and sum(c.values()) == 2
    assert metrics["sensitivity"] == c["tp"] / (c["tp"] + c["fn"])
    low, high = metrics["sensitivity_ci95"]
    assert (low, high) == ((0.0, 0.975) if c["tp"] == 0 else (0.025, 1.0))  # Clopper-Pearson of 0 or 1 of 1
    assert metrics["threshold_origin"] == {"source": "model", "rule": None}  # stored, with no training record
    assert metrics["model"]["slide_head"]["pool"] == "attention"
    assert set(metrics["environment"]) == {"python", "torch", "numpy", "platform"}
    with open(tmp_path / "ev" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["done", "done", "failed"]
    assert rows[2]["slide"] == "missing" and rows[2]["error"]
    assert (tmp_path / "ev" / "roc.png").stat().st_size > 1000
    assert (tmp_path / "ev" / "tumor_001" / "heatmap.ome.zarr").is_dir()
    # calibration of the two scored slides, with the reliability diagram beside the ROC
    cal = metrics["calibration"]
    probs = [float(r["probability"]) for r in rows[:2]]
    assert sum(b["n"] for b in cal["reliability"]) == 2 and cal["bins"] == 10
    same_bin = min(int(probs[0] * 10), 9) == min(int(probs[1] * 10), 9)  # labels 0, 1
    want = abs(1 - probs[0] - probs[1]) / 2 if same_bin else (probs[0] + 1 - probs[1]) / 2
    assert cal["ece"] == pytest.approx(want, abs=1e-9)
    assert (tmp_path / "ev" / "calibration.png").stat().st_size > 1000
    assert "calibration: ECE" in capsys.readouterr().out


def test_evaluate_patch_folder_scores_the_centre_cell(model_file, tmp_path):
    from PIL import Image

    from wsi_vssm.runs.evaluate_patches import evaluate_patches

    rng = np.random.default_rng(0)
    for label in (0, 1):
        d = tmp_path / "patches" / str(label)
        d.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(d / f"p{i}.png")
    model = _model(model_file)
    res = evaluate_patches(tmp_path / "patches", model, tmp_path / "ev", mpp=0.97, n_boot=200)
    assert len(res.rows) == 6 and all(0 <= r["probability"] <= 1 for r in res.rows)
    # each patch alone, read at its centre token (PCam's label is the centre 32 px): the cell head's logit there
    import torch

    from wsi_vssm.models.inputs import to_tensor

    for r in res.rows:
        img = np.asarray(Image.open(tmp_path / "patches" / str(r["label"]) / Path(r["slide"]).name).convert("RGB"))
        with torch.no_grad():
            want = float(model.cell_logits(to_tensor(img))[0, 1, 1])
        assert r["logit"] == pytest.approx(want, abs=1e-4), r
    assert res.metrics["n"] == 6 and (tmp_path / "ev" / "metrics.json").exists()
    assert res.metrics["repeated_patches"] is None  # every file distinct
    with pytest.raises(Exception, match="--mpp"):
        evaluate_patches(tmp_path / "patches", _model(model_file), tmp_path / "ev2", mpp=None)
    calibrated = _model(write_tiny_model(tmp_path / "cal.pt", cell_threshold=0.73))
    res = evaluate_patches(tmp_path / "patches", calibrated, tmp_path / "ev3", mpp=0.97, n_boot=50)
    assert res.metrics["threshold"] == 0.73  # a patch is a cell: the model's cell threshold, not 0.5
    assert res.metrics["threshold_origin"]["source"] == "model"
    assert res.metrics["n_tumour"] == res.metrics["n_normal"] == 3
    given = evaluate_patches(tmp_path / "patches", calibrated, tmp_path / "ev4", mpp=0.97, n_boot=50, threshold=0.2)
    assert given.metrics["threshold_origin"] == {"source": "option", "rule": "given on the command line"}
    # a model with an isolated-patch calibration: each probability p becomes sigmoid(a * logit(p) + b)
    cal = _model(write_tiny_model(tmp_path / "pcal.pt", patch_calibration={"a": 2.0, "b": -1.0}))
    res_cal = evaluate_patches(tmp_path / "patches", cal, tmp_path / "ev4", mpp=0.97, n_boot=50)
    raw = np.clip([r["probability"] for r in evaluate_patches(tmp_path / "patches", _model(model_file),
                                                             tmp_path / "ev5", mpp=0.97, n_boot=50).rows], 1e-7, None)
    want = 1 / (1 + np.exp(-(2.0 * np.log(raw / (1 - raw)) - 1.0)))
    assert np.allclose([r["probability"] for r in res_cal.rows], want, atol=1e-6)


def test_evaluate_patch_folder_says_which_patches_repeat_an_image(model_file, tmp_path, capsys):
    """PCam repeats some images inside a split (173 of valid's 3,000 files): each copy counted again in the AUC
    without a word, and a copy filed under the other label (a labelling error) was invisible."""
    import shutil

    from conftest import run_cli_captured
    from PIL import Image

    rng = np.random.default_rng(3)
    for label in (0, 1):
        (tmp_path / "patches" / str(label)).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(
                tmp_path / "patches" / str(label) / f"p{i}.png")
    shutil.copy(tmp_path / "patches/1/p0.png", tmp_path / "patches/1/again.png")  # twice more, same label
    shutil.copy(tmp_path / "patches/1/p0.png", tmp_path / "patches/1/thrice.png")
    shutil.copy(tmp_path / "patches/0/p1.png", tmp_path / "patches/1/other_label.png")  # under both labels
    for name in ("broken_a.png", "broken_b.png"):  # identical, but they fail alone and no figure counts them
        (tmp_path / "patches/0" / name).write_bytes(b"")
    (tmp_path / "patches/1/gone.png").symlink_to(tmp_path / "nowhere.png")  # stopped the whole run, no metrics
    code, _, err = run_cli_captured(["evaluate", tmp_path / "patches", "--mpp", "0.97", "--model", model_file,
                                     "--out", tmp_path / "ev", "--bootstrap", "100"], capsys)
    assert code == 3, err  # some patches failed
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    rep = metrics["repeated_patches"]
    assert (rep["groups"], rep["repeats"], rep["conflicting_labels"]) == (2, 3, 1)
    assert sorted(rep["example"]) == ["0/p1.png", "1/other_label.png"]  # the conflicting group is the one shown
    assert metrics["n"] == 9 and metrics["n_failed"] == 3  # the warning says what the figure counts; no change
    assert ("3 of the 9 scored patches repeat another patch's image byte for byte (2 group(s) of identical files; "
            "metrics.json repeated_patches); 1 of those group(s) filed under both labels" in err)
    assert "holds the true AUC more often from 10 patches a class" in err  # it said "slides" of patches
    # info OUT on it said "a directory, but not an OME-Zarr store": a patch evaluation keeps no states
    code, out, _ = run_cli_captured(["info", tmp_path / "ev"], capsys)
    assert code == 0 and "patch evaluation: " in out and "9 patches scored, 3 failed; AUC " in out
    assert "3 repeat another patch's image (2 groups, 1 under both labels)" in out
    assert "failed: 1/gone.png: " in out and "failed: 0/broken_a.png: " in out
    shutil.copytree(tmp_path / "patches/0", tmp_path / "normal_only/0")
    (tmp_path / "normal_only/1").mkdir()
    shutil.copytree(tmp_path / "patches/0", tmp_path / "normal_only/2")  # a class the model does not score
    _, out, err = run_cli_captured(["evaluate", tmp_path / "normal_only", "--mpp", "0.97", "--model", model_file,
                                    "--out", tmp_path / "ev_normal", "--bootstrap", "100"], capsys)
    reason = json.loads((tmp_path / "ev_normal" / "metrics.json").read_text())["reason"]
    assert reason == "AUC needs both classes; the cohort has 0 tumour and 3 normal patches with a prediction"
    assert f"AUC n/a ({reason})" in out  # it printed "AUC n/a" alone; the reason was only in metrics.json
    assert "2/ (5 images) is not a class the model scores (0/ normal, 1/ tumour): left out" in err


def test_evaluate_patch_folder_says_when_patches_are_not_h_and_e(model_file, tmp_path, capsys):
    """Slides get a stain check; patches got none: greyscale copies of PCam patches scored AUC 0.769 (0.910 in
    colour) with no warning."""
    from conftest import run_cli_captured, write_patch_folder
    from PIL import Image

    write_patch_folder(tmp_path / "he", 4, 0)  # pink, with darker centres for class 1: H&E-like
    # a long path: the warning was cut at 300 characters, and its reasons come after the path
    grey_folder = tmp_path / ("a-long-folder-name-" * 8) / "grey"
    for f in sorted((tmp_path / "he").rglob("*.jpg")):
        grey = grey_folder / f.relative_to(tmp_path / "he")
        grey.parent.mkdir(parents=True, exist_ok=True)
        Image.open(f).convert("L").convert("RGB").save(grey)
    args = ["evaluate", "--mpp", "0.97", "--model", model_file, "--bootstrap", "100"]
    code, _, err = run_cli_captured([*args, tmp_path / "he", "--out", tmp_path / "a"], capsys)
    assert code == 0 and "brightfield H&E" not in err, err
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["stain_notes"] == []
    code, _, err = run_cli_captured([*args, grey_folder, "--out", tmp_path / "b"], capsys)
    assert code == 0 and "the patches do not look like the model's brightfield H&E: " in err, err
    assert "looks unstained or greyscale (100% of non-glass pixels are colourless)" in err
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["stain_notes"]


def test_evaluate_patch_folder_honours_tta_and_precision(model_file, tmp_path, monkeypatch):
    import torch
    from PIL import Image

    from wsi_vssm.models import precision
    from wsi_vssm.pipeline.extract import Inference
    from wsi_vssm.runs.evaluate_patches import evaluate_patches

    rng = np.random.default_rng(1)
    imgs = {label: rng.integers(0, 255, (96, 96, 3), dtype=np.uint8) for label in (0, 1)}
    for label, img in imgs.items():
        (tmp_path / "patches" / str(label)).mkdir(parents=True)
        Image.fromarray(img).save(tmp_path / "patches" / str(label) / "p.png")
    model = _model(model_file)

    def probs(inference, out):
        rows = evaluate_patches(tmp_path / "patches", model, tmp_path / out, mpp=0.97, n_boot=50,
                                inference=inference).rows
        return np.array([r["probability"] for r in sorted(rows, key=lambda r: r["label"])])

    plain, tta = probs(None, "plain"), probs(Inference(tta=True), "tta")
    # TTA: the cell head on the mean of the 8 views' feature maps, each turned back (as predict does)
    from wsi_vssm.models.inputs import to_tensor

    with torch.inference_mode():
        x = torch.cat([to_tensor(imgs[label]) for label in (0, 1)])
        views = []
        for v in (x, x.flip(-1)):
            for k in range(4):
                f = torch.rot90(model.backbone.forward_features(torch.rot90(v, k, (2, 3))), -k, (2, 3))
                views.append(f.flip(-1) if v is not x else f)
        want = torch.sigmoid(model.mil.cell_head(torch.stack(views).mean(0).permute(0, 2, 3, 1))[:, 1, 1, 0])
    assert np.allclose(tta, want.numpy(), atol=1e-5)
    assert not np.allclose(tta, plain, atol=1e-6)
    try:  # the CLI passes --tta through for a patch folder too
        main(["evaluate", str(tmp_path / "patches"), "--model", str(model_file), "--mpp", "0.97", "--tta",
              "--out", str(tmp_path / "cli"), "--bootstrap", "100"])
    except SystemExit as e:
        assert e.code in (0, None)
    with open(tmp_path / "cli" / "predictions.csv") as f:
        cli = sorted(csv.DictReader(f), key=lambda r: r["label"])
    assert np.allclose([float(r["probability"]) for r in cli], tta, atol=1e-5)
    # bf16 asked of a CPU without it runs fp32, and metrics.json says fp32 (it said bf16, as asked)
    monkeypatch.setattr(precision, "bf16_supported", lambda device="cpu": False)
    res = evaluate_patches(tmp_path / "patches", model, tmp_path / "nobf16", mpp=0.97, n_boot=50,
                           inference=Inference(precision="bf16"))
    assert res.metrics["parameters"]["precision"] == "fp32"
    # bf16 (forced: this CPU may have none): autocast reaches the backbone, and stays close to fp32
    monkeypatch.setattr(precision, "bf16_supported", lambda device="cpu": True)
    bf16 = probs(Inference(precision="bf16"), "bf16")
    assert json.loads((tmp_path / "bf16" / "metrics.json").read_text())["parameters"]["precision"] == "bf16"
    assert 0 < np.abs(bf16 - plain).max() < 0.05


def test_readme_main_job_uses_a_shipped_slide():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "wsi-vssm predict sample_data/lymph-node-mosaic.tif" in readme
    assert (Path(__file__).resolve().parents[2] / "sample_data" / "lymph-node-mosaic.tif").exists()
    assert "cmu-1-small-region.svs" in readme  # named as the example of a slide out of the model's domain


def test_evaluate_with_annotations_adds_the_froc(model_file, cohort, tmp_path, monkeypatch):
    import wsi_vssm.runs.evaluate as ev
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.runs.evaluate import evaluate_cohort

    res = evaluate_cohort(cohort, load_model(model_file), tmp_path / "ev", FAST, annotations=cohort / "annotations",
                          n_boot=200)
    froc = res.metrics["froc"]
    assert 0.0 <= froc["froc"] <= 1.0 and froc["n_slides"] == len(list(cohort.glob("*.tif"))) and froc["n_lesions"] >= 1
    assert set(froc["sensitivity_at_fps"]) == {"0.25", "0.5", "1", "2", "4", "8"}
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["froc"]["froc"] == pytest.approx(froc["froc"])
    assert (tmp_path / "ev" / "froc.png").is_file()
    # a run without --annotations takes the old curve away: it no longer matches metrics.json
    res = evaluate_cohort(cohort, load_model(model_file), tmp_path / "ev", FAST, n_boot=200)
    assert "froc" not in res.metrics and not (tmp_path / "ev" / "froc.png").exists()
    # so it does when a run with them finished while this one worked, its curve written after this run began
    real_wait = ev._wait_for_other_runs
    monkeypatch.setattr(ev, "_wait_for_other_runs", lambda *a: (tmp_path / "ev" / "froc.png").write_bytes(b"x")
                        or real_wait(*a))
    evaluate_cohort(cohort, load_model(model_file), tmp_path / "ev", FAST, n_boot=200)
    assert not (tmp_path / "ev" / "froc.png").exists()


def test_the_froc_names_the_slides_it_leaves_out(model_file, cohort, tmp_path):
    """An annotated tumour slide that failed left the FROC (and its lesions the sensitivity's denominator) with
    no word in the froc block."""
    import shutil

    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.runs.evaluate import evaluate_cohort

    shutil.copytree(cohort, tmp_path / "c")
    (tmp_path / "c" / "tumor_001.tif").write_bytes(b"II*\x00 not a slide any more")
    res = evaluate_cohort(tmp_path / "c", load_model(model_file), tmp_path / "ev", FAST,
                          annotations=tmp_path / "c" / "annotations", n_boot=100)
    froc = res.metrics["froc"]
    assert froc["slides_left_out"] == ["tumor_001"] and froc["annotated_slides_left_out"] == ["tumor_001"]
    assert froc["n_slides"] == 2


def test_cli_evaluate_with_annotations_prints_the_froc(model_file, cohort, tmp_path, capsys):
    """The FROC went to metrics.json only: `evaluate --annotations` printed AUC and ECE lines and no FROC."""
    args = ["evaluate", str(cohort), "--annotations", str(cohort / "annotations"), "--model", str(model_file),
            "--out", str(tmp_path / "ev"), "--device", "cpu", "--region-px", "1024", "--overlap-px", "64",
            "--reader-threads", "1", "--bootstrap", "100"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0
    froc = json.loads((tmp_path / "ev" / "metrics.json").read_text())["froc"]
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("FROC"))
    if froc["froc"] is None:
        assert line.startswith("FROC: none (") and froc["reason"] in line
    else:
        lo, hi = froc["froc_ci95"]
        assert line.startswith(f"FROC {froc['froc']:.3f} (95% CI {lo:.3f}-{hi:.3f}; lesion sensitivity "), line
        assert "at 0.25/0.5/1/2/4/8 false positives per slide" in line
        assert f"over {froc['n_lesions']} lesions on {froc['n_slides']} slides" in line
    # the detections as CAMELYON16's submission CSVs, to score with the challenge's own script: probability,x,y
    # in level-0 integer pixels, no header, one file per scored slide
    files = sorted((tmp_path / "ev" / "froc_detections").iterdir())
    assert [f.stem for f in files] == sorted(froc["per_slide"])
    rows = [line.split(",") for f in files for line in f.read_text().splitlines()]
    assert len(rows) == froc["n_detections"] and all(len(r) == 3 for r in rows)
    assert all(0 <= float(p) <= 1 and int(x) >= 0 and int(y) >= 0 for p, x, y in rows)
    # a run without --annotations into the same folder takes them away with froc.png: they would not match
    with pytest.raises(SystemExit):
        main([a for a in args if a not in ("--annotations", str(cohort / "annotations"))])
    assert not (tmp_path / "ev" / "froc_detections").exists() and not (tmp_path / "ev" / "froc.png").exists()


def test_a_cohort_with_no_slide_scored_still_gets_its_froc_block(model_file, cohort, tmp_path):
    """Every slide failing (or having no tissue) ended `evaluate --annotations` with "FROC needs at least one
    slide" after metrics.json was written without a froc block; and n_out_of_domain read null, the patch
    folders' value."""
    import shutil

    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.runs.evaluate import evaluate_cohort

    shutil.copytree(cohort, tmp_path / "c")
    slides = sorted(p.stem for p in (tmp_path / "c").glob("*.tif"))
    for name in slides:
        (tmp_path / "c" / f"{name}.tif").write_bytes(b"II*\x00 not a slide any more")
    res = evaluate_cohort(tmp_path / "c", load_model(model_file), tmp_path / "ev", FAST,
                          annotations=tmp_path / "c" / "annotations", n_boot=10)
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["froc"]["froc"] is None and saved["froc"]["reason"] == "no slide was scored"
    assert saved["froc"]["slides_left_out"] == slides and saved["froc"]["n_slides"] == 0
    assert saved["n_out_of_domain"] == 0 and res.metrics["n_failed"] == len(slides)


def test_annotations_reaching_past_their_slide_are_said(model_file, cohort, tmp_path):
    """Annotations in another frame (a lower level's pixels, micrometres) gave FROC 0 with no word, or 1.0 for a
    huge square: the froc block names them and the command warns."""
    import re
    import shutil

    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.runs.evaluate import evaluate_cohort
    from wsi_vssm.runs.report_warnings import annotation_frame_warning

    shutil.copytree(cohort, tmp_path / "c")
    xml = tmp_path / "c" / "annotations" / "tumor_001.xml"
    in_pixels = xml.read_text()
    xml.write_text(re.sub(r'(X|Y)="([\d.]+)"', lambda m: f'{m[1]}="{float(m[2]) * 100:.2f}"', in_pixels))
    res = evaluate_cohort(tmp_path / "c", load_model(model_file), tmp_path / "ev", FAST,
                          annotations=tmp_path / "c" / "annotations", n_boot=100)
    outside = res.metrics["froc"]["annotations_outside_slide"]
    assert list(outside) == ["tumor_001"] and outside["tumor_001"][2] > 10_000
    assert "the annotations of 1 slide(s) reach past the slide (tumor_001" in annotation_frame_warning(res)
    xml.write_text(in_pixels)  # the slides' predictions are reused: only the FROC is made again
    res = evaluate_cohort(tmp_path / "c", load_model(model_file), tmp_path / "ev", FAST,
                          annotations=tmp_path / "c" / "annotations", n_boot=100)
    assert res.metrics["froc"]["annotations_outside_slide"] == {} and annotation_frame_warning(res) is None


def test_a_froc_that_fails_leaves_the_report_marked_incomplete(model_file, cohort, tmp_path):
    """metrics.json is written before the FROC runs; a FROC that failed (here a damaged heatmap) left it saying
    "complete": true without a froc block."""
    import json

    from wsi_vssm.errors import UsageError
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.runs.evaluate import evaluate_cohort

    model, out = load_model(model_file), tmp_path / "ev"
    evaluate_cohort(cohort, model, out, FAST, n_boot=10)
    heatmap = out / "tumor_001" / "heatmap.ome.zarr"
    next(p for p in (heatmap / "0").rglob("*") if p.is_file() and not p.name.startswith(".")).write_bytes(b"junk")
    with pytest.raises(UsageError, match="damaged heatmap"):
        evaluate_cohort(cohort, model, out, FAST, annotations=cohort / "annotations", n_boot=10)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] is False and "froc" not in metrics


def test_a_malformed_annotation_fails_before_any_slide_runs(model_file, cohort, tmp_path):
    import shutil

    from wsi_vssm.io.annotations import AnnotationError
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.runs.evaluate import evaluate_cohort

    ann = tmp_path / "ann"
    shutil.copytree(cohort / "annotations", ann)
    bad = next(ann.iterdir())
    bad.write_text("<ASAP_Annotations><Annotation")
    with pytest.raises(AnnotationError, match=bad.name):
        evaluate_cohort(cohort, load_model(model_file), tmp_path / "ev", FAST, annotations=ann, n_boot=10)
    assert not (tmp_path / "ev").exists()  # failed up front: no slide was run for nothing


def test_older_model_file_thresholds_and_one_uncalibrated_warning(cohort, tmp_path):
    """A model file from before the thresholds had names: `threshold` is the slide threshold, the cell threshold
    is 0.5, and one warning says its probabilities are not calibrated."""
    import warnings

    import torch

    from wsi_vssm.models.slide_model import SlideModel, load_model, save_model
    from wsi_vssm.pipeline import params as params_module

    torch.manual_seed(0)
    save_model(SlideModel.create("micro", scan="cpu").eval(), tmp_path / "old.pt", metadata={"threshold": 0.6})
    model = load_model(tmp_path / "old.pt")
    params_module._UNCALIBRATED_WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = predict_slide(cohort / "normal_001.tif", model, tmp_path / "a", FAST)
        predict_slide(cohort / "normal_001.tif", model, tmp_path / "b", FAST)
    assert rec["slide_threshold"] == rec["threshold"] == 0.6 and rec["cell_threshold"] == 0.5
    assert rec["lesion_extent_threshold"] == 0.5
    said = [w for w in caught if "not calibrated" in str(w.message)]
    assert len(said) == 1


def test_tta_and_precision_change_the_parameter_hash(model_file):
    """A cohort done without --tta (or in another precision) is redone with it: the state hash covers both."""
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.runs.jobs import predict_job

    model = load_model(model_file)
    plain = predict_job("out", model_file, model, PredictParams(device="cpu"))
    tta = predict_job("out", model_file, model, PredictParams(device="cpu", tta=True))
    cell = predict_job("out", model_file, model, PredictParams(device="cpu", cell_threshold=0.7))
    extent = predict_job("out", model_file, model, PredictParams(device="cpu", extent_threshold=0.3))
    merge = predict_job("out", model_file, model, PredictParams(device="cpu", merge_distance_cells=2))
    assert len({plain.params_hash, tta.params_hash, cell.params_hash, extent.params_hash, merge.params_hash}) == 5
    assert tta.resolved["tta"] is True and plain.resolved["precision"] == "float32"
    # --amp is the old spelling of --precision bf16: prediction.json's parameters said "fp32" under it
    amp, bf16 = PredictParams(device="cpu", amp=True), PredictParams(device="cpu", precision="bf16")
    assert amp.precision == "bf16" and amp.to_dict()["precision"] == "bf16"
    assert predict_job("out", model_file, model, amp).params_hash == predict_job("out", model_file, model,
                                                                                 bf16).params_hash


def test_a_cohorts_region_bar_sees_only_the_region_count(model_file, cohort, tmp_path):
    """The terminal bar was sized by the first report, the read stage's 0 of 1: it then showed "1/1", "2region",
    ... "18region" with no total. The job now passes on the regions stage alone."""
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.runs.jobs import SlideTask, predict_job

    params = PredictParams(device="cpu", region_px=256, overlap_px=0, reader_threads=1)
    job = predict_job(str(tmp_path), str(model_file), load_model(model_file), params)
    seen = []
    job.run(SlideTask("tumor_001", str(cohort / "tumor_001.tif")), lambda done, total: seen.append((done, total)))
    totals = {total for _, total in seen}
    assert len(totals) == 1 and totals.pop() > 1  # 1,024 px at 2 um/px read at the model's 0.97: several regions
    assert seen[-1][0] == seen[-1][1]


def test_a_tumour_call_resting_on_few_cells_is_flagged():
    from wsi_vssm.pipeline.predict import FEW_CELLS_NOTE, _few_cells_warning, few_cells_of

    assert "1 cell(s)" in _few_cells_warning(1, 1, 0.5)
    assert _few_cells_warning(1, 0, 0.5) is None  # a normal call needs no such warning
    assert _few_cells_warning(10, 1, 0.5) is None
    # the count is read from the summary; a record written before it had only the note's text
    assert few_cells_of({"label": 1, "summary": {"cells_at_cell_threshold": 2, "warnings": []}}) == 2
    assert few_cells_of({"label": 1, "summary": {"cells_at_cell_threshold": 7, "warnings": []}}) is None
    assert few_cells_of({"label": 0, "summary": {"cells_at_cell_threshold": 0, "warnings": []}}) is None
    old = {"label": 1, "summary": {"warnings": [f"{FEW_CELLS_NOTE} 1 cell(s) at or above the cell threshold 0.5"]}}
    assert few_cells_of(old) == 1


def test_the_summary_counts_the_cells_at_the_cell_threshold(cohort, tmp_path):
    """prediction.json said how many cells a call rests on only inside a warning's text, and only for calls on
    fewer than 3: the summary now counts them for every slide, on heatmap level 0's scale, and a rerun with
    another cell threshold recounts them from the saved heatmap."""
    import zarr

    from wsi_vssm.pipeline.relabel import relabel_slide

    model = _model(write_tiny_model(tmp_path / "m.pt"))
    record = predict_slide(cohort / "tumor_001.tif", model, tmp_path / "a", FAST)
    grid = zarr.open(str(tmp_path / "a" / "tumor_001" / "heatmap.ome.zarr"), mode="r")["0"][:]
    cells = grid[grid > 0]
    t = record["cell_threshold"]
    assert record["summary"]["cells_at_cell_threshold"] == int((cells >= t).sum())
    higher = float(np.quantile(cells, 0.9))
    again = relabel_slide(cohort / "tumor_001.tif", model, tmp_path / "a",
                          dataclasses.replace(FAST, cell_threshold=higher))
    on_disk = json.loads((tmp_path / "a" / "tumor_001" / "prediction.json").read_text())
    assert again["summary"]["cells_at_cell_threshold"] == int((cells >= higher).sum())
    assert on_disk["summary"]["cells_at_cell_threshold"] == int((cells >= higher).sum())


def test_lesions_grow_from_seed_cells_to_the_extent_threshold(cohort, tmp_path):
    """A model with a lesion extent threshold: lesions and contours take every cell at or above it that joins a
    cell at or above the cell threshold; groups above the extent threshold without such a cell stay out."""
    import zarr
    from shapely.geometry import shape

    model = _model(write_tiny_model(tmp_path / "m.pt", cell_threshold=0.5))
    predict_slide(cohort / "tumor_001.tif", model, tmp_path / "a", FAST)
    grid = zarr.open(str(tmp_path / "a" / "tumor_001" / "heatmap.ome.zarr"), mode="r")["0"][:]
    lo, hi = (float(np.nanquantile(grid, q)) for q in (0.3, 0.97))
    model.metadata = {**model.metadata, "cell_threshold": hi}
    seeds = predict_slide(cohort / "tumor_001.tif", model, tmp_path / "s", FAST)
    model.metadata = {**model.metadata, "lesion_extent_threshold": lo}
    grown = predict_slide(cohort / "tumor_001.tif", model, tmp_path / "g", FAST)
    assert seeds["lesion_extent_threshold"] == hi and grown["lesion_extent_threshold"] == lo
    area = {k: sum(les["area_mm2"] for les in r["lesions"]) for k, r in (("s", seeds), ("g", grown))}
    assert area["g"] > area["s"] > 0  # the extent adds cells ...
    assert 1 <= len(grown["lesions"]) <= len(seeds["lesions"])  # ... and no lesion without a seed
    assert all(les["peak_probability"] >= hi for les in grown["lesions"])
    assert min(les["mean_probability"] for les in grown["lesions"]) < hi
    model.metadata = {**model.metadata, "lesion_extent_threshold": hi, "lesion_merge_distance_cells": 3}
    merged = predict_slide(cohort / "tumor_001.tif", model, tmp_path / "m", FAST)
    assert merged["lesion_merge_distance_cells"] == 3  # pieces up to 3 cells apart join: fewer, larger lesions
    assert len(merged["lesions"]) < len(seeds["lesions"])
    assert sum(les["area_mm2"] for les in merged["lesions"]) == pytest.approx(area["s"])
    mm_per_px = grown["mpp"]["slide"] / 1000
    for k in ("s", "g"):  # the contours outline exactly the lesions' cells
        feats = json.loads((tmp_path / k / "tumor_001" / "contours.geojson").read_text())["features"]
        assert sum(shape(f["geometry"]).area for f in feats) * mm_per_px**2 == pytest.approx(area[k], rel=1e-6)
    # one feature per lesion, in lesions.csv's order, its area the lesion's: QuPath counted a lesion of several
    # pieces as several annotations of one name, each with a piece's area
    feats = json.loads((tmp_path / "m" / "tumor_001" / "contours.geojson").read_text())["features"]
    assert [f["properties"]["lesion_id"] for f in feats] == [les["id"] for les in merged["lesions"]]
    assert "MultiPolygon" in {f["geometry"]["type"] for f in feats}  # merging 3 cells apart joined pieces
    for f, les in zip(feats, merged["lesions"], strict=True):
        assert shape(f["geometry"]).is_valid
        assert f["properties"]["measurements"]["Area um^2"] / 1e6 == pytest.approx(les["area_mm2"], rel=1e-3)


def test_extent_threshold_above_the_cell_threshold_is_refused(model_file):
    from wsi_vssm.commands.options import build_params
    from wsi_vssm.errors import OptionError

    opts = dict(target_mpp=None, region_px=None, overlap_px=None, device="cpu", batch_size=1, reader_threads=1,
                precision="fp32", amp=False, tta=False, threshold=None, cell_threshold=0.6, extent_threshold=0.7,
                merge_distance_cells=None, backend="auto")
    with pytest.raises(OptionError, match="--extent-threshold 0.7 is above the cell threshold 0.6"):
        build_params(_model(model_file), None, **opts)


def test_the_overlay_title_says_out_of_domain():
    from wsi_vssm.pipeline.predict import overlay_title

    record = {"slide": "s", "probability": 0.9, "label": 1, "slide_threshold": 0.5, "cell_threshold": 0.7,
              "model": {"name": "m"}, "in_domain": True}
    assert "OUT OF DOMAIN" not in overlay_title(record) and "probability 0.900 -> tumour" in overlay_title(record)
    title = overlay_title({**record, "in_domain": False})
    assert title.startswith("s  |  OUT OF DOMAIN") and "probability 0.900 -> tumour" in title
    from wsi_vssm.pipeline.predict import overlay_warning

    assert overlay_warning(record) is None
    notes = ["looks like IHC", "tissue unlike the training data"]
    assert overlay_warning({**record, "in_domain": False, "domain_notes": notes}).endswith(
        "mean nothing: looks like IHC; tissue unlike the training data")
    few = "the tumour call rests on 0 cell(s) at or above the cell threshold 0.7; check the heatmap before trusting it"
    weak = {**record, "summary": {"warnings": ["something else", few]}}
    assert overlay_warning(weak) == few  # the title's call alone read as confident as any
    both = overlay_warning({**weak, "in_domain": False, "domain_notes": notes})
    assert both.startswith("out of the model's domain") and both.endswith(few)


def test_tta_averages_the_eight_views_and_measures_the_domain_on_the_untransformed_one(model_file, cohort, tmp_path):
    """--tta: the feature map is the mean over the dihedral views; a model that is itself equivariant would not
    change, a random one does, and the outputs stay valid probabilities. The feature domain's threshold was set on
    single views; a mean of 8 views lies nearer the training mean, so under --tta the skin sample (out of domain)
    measured in domain. The distance now reads the untransformed view, which is what the run without --tta
    reads."""
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.pipeline.domain import METADATA_KEY, FeatureDomain

    model = load_model(model_file)
    width = int(model.backbone.num_features)
    domain = FeatureDomain(np.zeros(width), np.eye(width), threshold=1e6)  # distance = the token features' norm
    model.metadata = {**model.metadata, METADATA_KEY: domain.to_metadata()}
    slide = cohort / "tumor_001.tif"
    plain = predict_slide(slide, model, tmp_path / "p", FAST)
    tta = predict_slide(slide, model, tmp_path / "t", dataclasses.replace(FAST, tta=True))
    assert plain["domain_threshold"] == tta["domain_threshold"] == 1e6
    assert plain["domain_distance"] > 0
    assert tta["domain_distance"] == pytest.approx(plain["domain_distance"], rel=1e-3)
    assert tta["probability"] != plain["probability"]  # the scores themselves are the 8 views' mean
    assert tta["parameters"]["tta"] is True and 0.0 <= tta["probability"] <= 1.0
    assert tta["summary"]["n_cells"] == plain["summary"]["n_cells"]


def test_prediction_records_what_auto_precision_came_to(monkeypatch):
    """`parameters.precision` is the request ("auto"); `precision_used` says what ran on this machine."""
    from wsi_vssm.models import precision
    from wsi_vssm.pipeline.predict import _precision_used

    monkeypatch.setattr(precision, "bf16_supported", lambda device: True)
    assert _precision_used(PredictParams(device="cpu", precision="auto")) == "bf16"
    assert _precision_used(PredictParams(device="cpu", amp=True)) == "bf16"  # the old spelling
    assert _precision_used(PredictParams(device="cpu")) == "fp32"
    monkeypatch.setattr(precision, "bf16_supported", lambda device: False)
    assert _precision_used(PredictParams(device="cpu", precision="auto")) == "fp32"


@pytest.mark.parametrize("field, value", [("threshold", float("nan")), ("cell_threshold", 1.5),
                                          ("extent_threshold", -0.1), ("target_mpp", 0), ("mpp", float("inf")),
                                          ("merge_distance_cells", -1), ("batch_size", 0), ("reader_threads", 1.5)])
def test_predict_params_refuse_a_bad_value_at_once(field, value):
    """PredictParams(threshold=nan) was taken (every slide labelled 0), target_mpp=0 silently became the model's,
    cell_threshold=1.5 failed only after the backbone had run."""
    from wsi_vssm.errors import UsageError

    with pytest.raises(UsageError, match=f"PredictParams.{field} must be"):
        PredictParams(**{field: value})


def test_an_extent_threshold_above_the_cell_threshold_is_refused_before_the_slide_is_read(model_file, tmp_path):
    from wsi_vssm.errors import OptionError

    params = PredictParams(device="cpu", cell_threshold=0.6, extent_threshold=0.7)
    with pytest.raises(OptionError, match="above the cell threshold"):  # the slide does not even exist
        predict_slide(tmp_path / "missing.tif", _model(model_file), tmp_path / "out", params)


def test_predict_slide_leaves_the_callers_model_as_it_was(model_file, cohort, tmp_path):
    """A validation call inside a training loop: the submodules were left in eval mode (the model itself still
    said training) and the MIL head was moved to the CPU. The returned record is the file's, schema included."""
    model = _model(model_file).train()
    rec = predict_slide(cohort / "tumor_001.tif", model, tmp_path, FAST)
    assert all(m.training for m in model.modules())
    saved = json.loads((tmp_path / "tumor_001" / "prediction.json").read_text())
    assert rec["schema"] == saved["schema"] == "wsi-vssm-prediction/2"
    model.eval()
    again = predict_slide(cohort / "tumor_001.tif", model, tmp_path / "b", FAST)
    assert not any(m.training for m in model.modules())
    assert again["probability"] == rec["probability"]


def test_an_mpp_override_is_warned_about_once_with_reader_threads(model_file, cohort, tmp_path):
    """Each reader thread reopened the slide with the given mpp and warned again."""
    import dataclasses
    import warnings

    params = dataclasses.replace(FAST, mpp=2.1, reader_threads=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predict_slide(cohort / "tumor_001.tif", _model(model_file), tmp_path, params)
    given = [w for w in caught if "using the given 2.1 um/px instead" in str(w.message)]
    assert len(given) == 1, [str(w.message) for w in caught]


def test_predict_slide_takes_an_open_slide_and_leaves_it_open(model_file, cohort, tmp_path):
    """A notebook user's open reader (or an image in memory) failed with a TypeError from Path()."""
    from wsi_vssm.errors import UsageError
    from wsi_vssm.io import ArraySlide, open_slide

    model = _model(model_file)
    by_path = predict_slide(cohort / "tumor_001.tif", model, tmp_path / "a", FAST)
    with open_slide(cohort / "tumor_001.tif") as slide:
        by_reader = predict_slide(slide, model, tmp_path / "b", FAST)
        assert slide.read_region((0, 0), 0, (4, 4)).shape == (4, 4, 3)  # still open
        image = slide.read_region((0, 0), 0, slide.dimensions)
        mpp = slide.mpp
    assert by_reader["probability"] == by_path["probability"]
    in_memory = predict_slide(ArraySlide(image, mpp=mpp, name="tumor_001_mem"), model, tmp_path / "c", FAST)
    assert (tmp_path / "c" / "tumor_001_mem" / "prediction.json").is_file()
    assert abs(in_memory["probability"] - by_path["probability"]) < 0.05
    with pytest.raises(UsageError, match="PredictParams.mpp is for slides given by path"):
        predict_slide(ArraySlide(image, mpp=mpp), model, tmp_path / "d", PredictParams(mpp=1.0))


def test_the_uncalibrated_warning_goes_with_a_slide_that_is_scored(cohort, tmp_path, monkeypatch):
    """Thresholds checked before the slide is read must not say the once-per-process warning for a slide that then
    fails to open: it went into the failed slide's state, and the slide scored at 0.5 had none."""
    import warnings

    from conftest import write_tiny_model

    from wsi_vssm.io import SlideError
    from wsi_vssm.pipeline import params

    model = _model(write_tiny_model(tmp_path / "old.pt", purpose="test"))
    model.metadata = {"threshold": 0.4}  # an older file: no cell threshold
    monkeypatch.setattr(params, "_UNCALIBRATED_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SlideError):
            predict_slide(tmp_path / "missing.tif", model, tmp_path / "o", FAST)
    assert not any("not calibrated" in str(w.message) for w in caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predict_slide(cohort / "tumor_001.tif", model, tmp_path / "o", FAST)
    assert any("not calibrated" in str(w.message) for w in caught)


def test_predict_params_take_numpy_integers():
    params = PredictParams(batch_size=np.int64(2), reader_threads=np.int32(1), threshold=np.float32(0.4))
    assert (params.batch_size, params.reader_threads) == (2, 1)


def test_an_output_folder_that_is_a_file_fails_before_the_backbone(model_file, cohort, tmp_path, monkeypatch):
    """predict_slide (the napari widget's and the API's) ran the whole slide, then failed "File exists"."""
    from wsi_vssm.errors import UsageError
    from wsi_vssm.pipeline import extract

    monkeypatch.setattr(extract, "extract_slide", lambda *a, **k: pytest.fail("the backbone ran"))
    (tmp_path / "normal_001").write_text("not a folder")
    with pytest.raises(UsageError, match="output folder .*normal_001 is a file, not a folder"):
        predict_slide(cohort / "normal_001.tif", _model(model_file), tmp_path, FAST)


def test_evaluate_patch_folder_checks_mpp_and_out_first_and_marks_an_earlier_report(model_file, tmp_path, capsys):
    """A review of 2026-12-06: `--mpp 2` (patches enlarged 2x, AUC 0.75 against 0.97) was taken without a word;
    an --out under a file failed only after every patch was scored; a patch run into a slide cohort's OUT left
    its metrics.json "complete" while it ran (and its lesions.csv for good), and the reverse kept
    model_patches.csv; Ctrl-C promised "finished slides are kept" of a run that kept nothing (it keeps its
    patches' scores since: tests/runs/test_patch_scores.py)."""
    import json

    from conftest import run_cli_captured, write_patch_folder

    from wsi_vssm.cli import _how_to_go_on
    from wsi_vssm.outputs.files import COHORT_LESIONS_CSV, METRICS_JSON, MODEL_PATCHES_CSV
    from wsi_vssm.runs.evaluate_patches import evaluate_patches

    write_patch_folder(tmp_path / "patches", 3, 0)
    args = ["evaluate", tmp_path / "patches", "--model", model_file, "--bootstrap", "100"]
    code, _, err = run_cli_captured([*args, "--mpp", "2.0", "--out", tmp_path / "coarse"], capsys)
    said = [line for line in err.splitlines() if "times coarser than the model's" in line]
    assert code == 0 and len(said) == 1 and "enlarged 2.06x" in said[0], err
    code, _, err = run_cli_captured([*args, "--mpp", "9", "--out", tmp_path / "far"], capsys)
    assert code != 0 and err.count("\n") == 1 and "without detail for the model" in err, err
    (tmp_path / "afile").write_text("x")
    scored = []
    with pytest.MonkeyPatch.context() as mp:
        import wsi_vssm.runs.evaluate_patches as ep

        mp.setattr(ep, "centre_cell_logits", lambda *a, **k: scored.append(1) or pytest.fail("scored"))
        code, _, err = run_cli_captured([*args, "--mpp", "0.97", "--out", tmp_path / "afile" / "sub"], capsys)
    assert code == 1 and not scored and "cannot write to the output folder" in err and err.count("\n") == 1
    out = tmp_path / "slides_out"  # as a slide cohort left it
    out.mkdir()
    (out / METRICS_JSON).write_text(json.dumps({"complete": True, "n": 4}))
    (out / COHORT_LESIONS_CSV).write_text("slide,id\n")
    seen = []
    with pytest.MonkeyPatch.context() as mp:
        import wsi_vssm.runs.evaluate_patches as ep

        real = ep.centre_cell_logits

        def spy(*a, **k):  # what the folder holds while the patches are being scored
            seen.append((json.loads((out / METRICS_JSON).read_text())["complete"], (out / COHORT_LESIONS_CSV).exists()))
            return real(*a, **k)

        mp.setattr(ep, "centre_cell_logits", spy)
        evaluate_patches(tmp_path / "patches", _model(model_file), out, mpp=0.97, n_boot=100)
    assert seen[0] == (False, False) and json.loads((out / METRICS_JSON).read_text())["complete"] is True
    (out / MODEL_PATCHES_CSV).write_text("patch,part\n0/a.jpg,trained\n")  # as a patch run writes it
    from wsi_vssm.runs.evaluate import _start_report

    _start_report(out)  # what a slide cohort run does first
    assert not (out / MODEL_PATCHES_CSV).exists()
    assert "patches scored so far are kept" in _how_to_go_on(["evaluate", str(tmp_path / "patches")])
    assert "patches scored so far are kept" in _how_to_go_on(["evaluate", "--out", "ev", "--mpp", "0.97",
                                                              str(tmp_path / "patches")])  # options first
    inside = tmp_path / "patches" / "ev"  # an OUT inside the patch folder: its plots are no class
    for _ in range(2):
        code, _, err = run_cli_captured([*args, "--mpp", "0.97", "--out", inside], capsys)
        assert code == 0 and "not a class" not in err, err
    assert "finished slides are kept" in _how_to_go_on(["evaluate", str(tmp_path / "slides_out")])


def test_evaluate_patch_folder_reads_each_file_once(model_file, tmp_path, monkeypatch):
    """A patch evaluation read every file twice: to score it, then to hash it for `model_patches` and
    `repeated_patches` (left alone since 2026-12-05). The digests are the same as a fresh hash's."""
    from pathlib import Path

    from conftest import write_patch_folder

    from wsi_vssm.runs.evaluate_patches import evaluate_patches
    from wsi_vssm.training.data.fingerprints import patch_digests
    from wsi_vssm.training.data.patches import load_patches

    write_patch_folder(tmp_path / "patches", 3, 0)
    reads, real = [], Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes",
                        lambda self: (reads.append(self.name) if self.suffix == ".jpg" else None) or real(self))
    res = evaluate_patches(tmp_path / "patches", _model(model_file), tmp_path / "ev", mpp=0.97, n_boot=100)
    assert res.metrics["n"] == 6 and len(reads) == 6 and len(set(reads)) == 3  # 0/p0.jpg and 1/p0.jpg: 2 names
    ds = load_patches(tmp_path / "patches")
    fresh = patch_digests(ds)  # nothing read yet: hashed from the files
    ds[0], ds[5]
    again = ds.subset([5, 0, 2])
    assert list(patch_digests(again)) == [fresh[5], fresh[0], fresh[2]]


def test_a_fluorescence_slide_is_not_stamped_no_tissue_found():
    """A probe read "no tissue found" stamped across a fluorescence NDPI full of DAPI nuclei: the brightfield
    tissue finder sees none there, and the overlay's stamp took that for the slide's content."""
    from wsi_vssm.pipeline.domain import FLUORESCENCE_NOTE
    from wsi_vssm.pipeline.predict import no_cells_stamp

    fluo = {"reason": "no tissue found", "domain_notes": [f"{FLUORESCENCE_NOTE} (dark background: ...)"]}
    assert no_cells_stamp(fluo) == "fluorescence, not analysed"
    assert no_cells_stamp({**fluo, "domain_notes": ["no eosin ..."]}) == "no tissue found"
    assert no_cells_stamp({"reason": "no cell has enough tissue: tissue on 0.3% ...", "domain_notes": []}) == \
        "no cell has enough tissue"


def test_a_library_or_napari_prediction_writes_only_into_its_slides_own_folder(model_file, cohort, tmp_path):
    """The runner refused a slide named `..` (`...tif`) or an OUT/<slide> that is a symbolic link, but
    `predict_slide` (the napari widget's and library callers' path) wrote the outputs of `...tif` into OUT's
    parent, and through a link wherever it pointed."""
    import shutil

    from wsi_vssm.errors import UsageError

    (tmp_path / "in").mkdir()
    shutil.copy(cohort / "normal_001.tif", tmp_path / "in" / "...tif")
    out = tmp_path / "home" / "wsi-vssm-predictions"
    with pytest.raises(UsageError, match=r"\.\.\.tif: its name '\.\.' is no folder name of its own"):
        predict_slide(tmp_path / "in" / "...tif", _model(model_file), out, FAST)
    (tmp_path / "elsewhere").mkdir()
    out.mkdir(parents=True, exist_ok=True)
    (out / "normal_001").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UsageError, match=r"normal_001 is a symbolic link \(to .*elsewhere\): outputs are not "):
        predict_slide(cohort / "normal_001.tif", _model(model_file), out, FAST)
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["wsi-vssm-predictions"]
    assert not list((tmp_path / "elsewhere").iterdir())
