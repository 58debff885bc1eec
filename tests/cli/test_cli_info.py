"""`wsi-vssm info`: the fields it reports, the mpp hint, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from conftest import REPO, shared_file

from wsi_vssm.cli import main

SAMPLE = REPO / "sample_data" / "cmu-1-small-region.svs"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stop:
        main(["info", *args])
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def test_json_on_the_sample_slide(capsys):
    code, out, err = run_cli(capsys, str(SAMPLE), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["name"] == "cmu-1-small-region"
    assert (info["vendor"], info["backend"]) == ("aperio", "openslide")
    assert info["dimensions"] == [2220, 2967]
    assert info["level_count"] == len(info["levels"]) == 1
    assert info["levels"][0] == {"level": 0, "width": 2220, "height": 2967, "downsample": 1.0, "mpp": 0.499}
    assert info["mpp"] == pytest.approx(0.499, abs=1e-3)
    assert info["mpp_source"] == "openslide-properties"
    assert info["associated_images"] == ["label", "macro", "thumbnail"]
    assert 0.05 < info["tissue_fraction"] < 0.95  # a crop of real H&E: part tissue, part glass
    assert info["warnings"] == []


def test_tifffile_backend_reports_the_same_resolution(capsys):
    code, out, _ = run_cli(capsys, str(SAMPLE), "--json", "--backend", "tifffile")
    info = json.loads(out)
    assert code == 0 and info["backend"] == "tifffile"
    assert info["mpp"] == pytest.approx(0.499, abs=1e-3)


def test_text_output_names_mpp_and_its_source(capsys):
    code, out, _ = run_cli(capsys, str(SAMPLE))
    assert code == 0
    assert "0.499 um/px" in out and "OpenSlide" in out
    assert "label, macro, thumbnail" in out


def test_missing_mpp_gets_a_hint_and_mpp_fixes_it(capsys):
    path = shared_file("slides", "tcga-cr-7395-01a-01-ts1.svs")
    code, out, _ = run_cli(capsys, str(path))
    assert code == 0
    assert "unknown" in out and "--mpp" in out
    code, out, _ = run_cli(capsys, str(path), "--json")
    info = json.loads(out)
    assert info["mpp"] is None and info["mpp_source"] == "none" and "--mpp" in info["mpp_hint"]
    code, out, _ = run_cli(capsys, str(path), "--json", "--mpp", "0.5")
    info = json.loads(out)
    assert (info["mpp"], info["mpp_source"], info["mpp_hint"]) == (0.5, "user", None)
    assert info["levels"][1]["mpp"] == pytest.approx(0.5 * info["levels"][1]["downsample"])


def test_blank_slide_reports_no_tissue_with_a_warning(tmp_path, capsys):
    path = tmp_path / "blank.tif"
    tifffile.imwrite(path, np.full((256, 256, 3), 245, np.uint8), tile=(64, 64), photometric="rgb")
    code, out, err = run_cli(capsys, str(path), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["tissue_fraction"] == 0
    assert any("no tissue" in w for w in info["warnings"])
    assert "warning" in err and "no tissue" in err


def test_overriding_a_stated_mpp_warns(capsys):
    code, out, err = run_cli(capsys, str(SAMPLE), "--json", "--mpp", "0.25")
    assert code == 0 and json.loads(out)["mpp"] == 0.25
    assert "0.499" in err and "0.25" in err


BAD = [
    ("broken.svs", "not a slide"),
    ("unopenable.tiff", "52479"),
    ("unreadable.svs", "reading region"),
]


@pytest.mark.parametrize("name, says", BAD)
def test_bad_files_exit_non_zero_with_one_line(capsys, name, says):
    path = shared_file("slides", name)
    code, out, err = run_cli(capsys, str(path))
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsi-vssm: error:")
    assert str(path) in lines[0] and says in lines[0]


def test_missing_file_and_plain_directory_exit_non_zero(tmp_path, capsys):
    for path in (tmp_path / "absent.svs", tmp_path):
        code, _, err = run_cli(capsys, str(path))
        assert code == 1 and len(err.strip().splitlines()) == 1 and str(path) in err


def test_unknown_backend_is_a_usage_error(capsys):
    code, _, err = run_cli(capsys, str(SAMPLE), "--backend", "bioformats")
    assert code == 2 and "bioformats" in err


def test_error_from_a_fresh_process_has_no_traceback(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("not a slide\n")
    proc = subprocess.run(
        [sys.executable, "-m", "wsi_vssm", "info", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wsi-vssm: error: {path}: ")


def test_info_on_a_slide_loads_no_torch():
    """`info SLIDE` imported torch (1.9 s and 360 MB before the first line) only to learn the packaged model's
    name: it now answers in about a third of that."""
    from wsi_vssm.commands.model_info import PACKAGED_MODEL
    from wsi_vssm.models.model_file import DEFAULT_NAME

    assert PACKAGED_MODEL == DEFAULT_NAME
    code = ("import sys\nfrom wsi_vssm.cli import main\ntry:\n    main(['info', sys.argv[1], '--json'])\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\nprint('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(SAMPLE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_info_says_what_the_stain_looks_like(capsys):
    """`info` said only "no tissue found" for a fluorescence slide, which predict flags at once."""
    fluo = shared_file("slides", "fluorescence-tritc.ndpi")
    code, out, _ = run_cli(capsys, str(fluo))
    assert code == 0 and "stain:       looks like fluorescence" in out
    code, out, _ = run_cli(capsys, str(SAMPLE))
    assert code == 0 and "stain:       looks like brightfield H&E" in out


def test_a_wsi_vssm_heatmap_is_described_as_one(tmp_path, capsys):
    """Our own heatmap.ome.zarr: its 32 um cells read as a slide gave "implausible mpp" and "no tissue"."""
    from wsi_vssm.outputs.heatmap import write_heatmap_zarr

    prob = np.zeros((6, 8), np.float32)
    prob[2, 3], prob[2, 4], prob[5, 7] = 0.9, 0.8, 0.3
    path = write_heatmap_zarr(tmp_path / "heatmap.ome.zarr", prob, cell0=64.0, origin=(0, 0), slide_mpp=0.5,
                              attrs={"slide": "s1", "model": "m", "cell_threshold": 0.75})
    code, out, err = run_cli(capsys, str(path))
    assert code == 0 and err == "", err
    assert "a wsi-vssm heatmap" in out and "implausible" not in out, out
    assert "8 x 6, 32 um each" in out and "2 cells at or above" in out and "highest probability 0.900" in out, out
    code, out, _ = run_cli(capsys, str(path), "--json")
    info = json.loads(out)
    assert (info["kind"], info["cells"], info["cells_at_or_above_threshold"]) == ("wsi-vssm heatmap", [8, 6], 2)  # w, h
    # a heatmap written before prediction.json v2 named it `threshold` (the napari reader took it, info did not)
    old = write_heatmap_zarr(tmp_path / "old.ome.zarr", prob, cell0=64.0, origin=(0, 0), slide_mpp=0.5,
                             attrs={"slide": "s1", "model": "m", "threshold": 0.75})
    code, out, _ = run_cli(capsys, str(old), "--json")
    assert json.loads(out)["cells_at_or_above_threshold"] == 2 and json.loads(out)["cell_threshold"] == 0.75


def test_an_ome_zarr_slide_is_still_read_as_a_slide(tmp_path, capsys):
    import zarr

    group = zarr.open_group(str(tmp_path / "slide.ome.zarr"), mode="w", zarr_format=2)
    group.create_array("0", data=np.full((64, 96, 3), 200, np.uint8), chunks=(64, 96, 3))
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "y", "type": "space"},
                                  {"name": "x", "type": "space"}, {"name": "c", "type": "channel"}],
                                   "datasets": [{"path": "0", "coordinateTransformations": [
                                       {"type": "scale", "scale": [0.5, 0.5, 1]}]}]}]
    code, out, err = run_cli(capsys, str(tmp_path / "slide.ome.zarr"))
    assert code == 0 and out.startswith("slide:") and "96 x 64 px" in out, (out, err)


def test_info_on_an_output_folder_says_where_each_slide_stands(model_file, cohort, tmp_path, capsys):
    """`info OUT` said "a directory, but not an OME-Zarr store": now one line per slide from the run's states,
    with the call the run made, failures, and states a killed run or a damaged disk left; no numpy, no torch."""
    broken = tmp_path / "broken.svs"
    broken.write_text("not a slide")
    out = tmp_path / "o"
    fast = ["--device", "cpu", "--target-mpp", "4", "--region-px", "512", "--overlap-px", "64", "--reader-threads", "1"]
    with pytest.raises(SystemExit) as stop:
        main(["predict", str(cohort / "normal_001.tif"), str(cohort / "tumor_001.tif"), str(broken), "--out",
              str(out), "--model", str(model_file), *fast])
    assert stop.value.code == 3  # one slide failed
    (out / ".state" / "gone.predict.json").write_text(json.dumps({"slide": "gone", "status": "running"}))
    (out / ".state" / "bad.predict.json").write_text("{")
    for name, odd in [("odd", {"status": "done", "result": {"probability": "x"}}),
                      ("odd2", {"status": "done", "result": {"probability": 0.5, "in_domain": "no"}}),
                      ("odd3", {"status": "failed", "error": {"m": 1}}),
                      ("odd4", {"status": "running", "slide": None})]:
        (out / ".state" / f"{name}.predict.json").write_text(json.dumps(odd))
    capsys.readouterr()

    code, text, err = run_cli(capsys, str(out))
    assert code == 0, err
    lines = text.splitlines()
    assert lines[0] == (f"output folder: {out} (2 predict done, 1 predict failed, 1 predict interrupted, "
                        "5 predict unreadable)")
    by_name = {line.split(":")[0].strip(): line for line in lines[1:]}
    for name in ("normal_001", "tumor_001"):
        rec = json.loads((out / name / "prediction.json").read_text())
        call = "tumor" if rec["label"] == 1 else "normal"  # the call the run made, not one made again
        assert by_name[name].startswith(f"  {name}: done: probability {rec['probability']:.3f} -> {call}")
    assert by_name["broken"].startswith("  broken: failed: ") and "broken.svs" in by_name["broken"]
    assert "interrupted" in by_name["gone"] and "unreadable" in by_name["bad"] and "unreadable" in by_name["odd"]

    code, text, _ = run_cli(capsys, str(out), "--json")
    report = json.loads(text)
    assert [s["slide"] for s in report["slides"]] == ["bad", "broken", "gone", "normal_001", "odd",
                                                          "odd2", "odd3", "odd4", "tumor_001"]
    assert report["counts"] == {"predict done": 2, "predict failed": 1, "predict interrupted": 1,
                                "predict unreadable": 5}

    code = ("import sys\nfrom wsi_vssm.cli import main\ntry:\n    main(['info', sys.argv[1]])\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print('numpy' in sys.modules, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False False"


def test_info_on_a_training_log_and_on_a_folder_of_training_outputs(tmp_path, capsys):
    """`info mil.log.csv` said "not a slide format", and `info` on train mil's --out folder "not an OME-Zarr
    store": neither said what the file or folder is."""
    from wsi_vssm.atomic import atomic_write_rows
    from wsi_vssm.training.mil import LOG_COLUMNS

    rows = [{"epoch": e, "train_loss": 0.7, "valid_loss": 0.6, "valid_auc": auc, "seconds": 30.0, "best": best}
            for e, auc, best in ((1, 0.80, True), (2, 0.85, True), (3, float("nan"), False))]
    folder = tmp_path / "milout"
    folder.mkdir()
    for name in ("mil.log.csv", "mil.log.json"):
        atomic_write_rows(folder / name, rows, LOG_COLUMNS)
        code, out, err = run_cli(capsys, str(folder / name))
        assert code == 0 and err == "", err
        assert "a per-epoch log of `train mil`" in out and "3 (1.5 min)" in out
        assert "epoch 2, valid_auc 0.8500 (last epoch: undefined)" in out
        code, out, _ = run_cli(capsys, "--json", str(folder / name))
        report = json.loads(out)
        assert report["kind"] == "train_log" and report["best_epoch"] == 2 and report["epochs"] == 3
    (folder / "mil.pt").write_bytes(b"\x00")
    code, out, err = run_cli(capsys, str(folder))
    assert code == 1 and err.count("\n") == 1 and "a folder of training outputs, not a slide" in err
    assert "1 model file (mil.pt) and 2 training logs (mil.log.csv, mil.log.json)" in err
    other = tmp_path / "table.csv"  # any other CSV is still not taken for a log
    other.write_text("epoch,loss\n1,0.5\n")
    code, _, err = run_cli(capsys, str(other))
    assert code == 1 and "not a slide format" in err


def test_info_on_an_evaluate_folder_leads_with_its_report(model_file, cohort, tmp_path, capsys):
    """`info OUT` on an evaluate folder listed its slides' states only: not the AUC, the cohort or whether the
    report is complete (a later run marks it stale while it works)."""
    from wsi_vssm.runs.evaluate import _start_report

    out = tmp_path / "ev"
    fast = ["--device", "cpu", "--target-mpp", "4", "--region-px", "512", "--overlap-px", "64", "--bootstrap", "100"]
    with pytest.raises(SystemExit) as stop:
        main(["evaluate", str(cohort), "--out", str(out), "--model", str(model_file), *fast])
    assert stop.value.code in (0, None)
    metrics = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    code, text, _ = run_cli(capsys, str(out))
    report = text.splitlines()[1]
    assert code == 0 and report.startswith(f"report:        AUC {metrics['auc']:.3f} (95% CI "), text
    assert f"over 3 slides of {metrics['cohort']}" in report and report.endswith("; complete -> metrics.json")
    _start_report(out)  # as a later run does when it starts
    code, text, _ = run_cli(capsys, str(out))
    assert "NOT complete: the figures of an earlier run on this folder" in text.splitlines()[1]
    code, text, _ = run_cli(capsys, str(out), "--json")
    assert json.loads(text)["report"]["n"] == 3


def test_info_on_an_evaluate_folder_marks_what_its_report_counts(tmp_path, capsys):
    """`info OUT` listed every state in the folder as if the report counted it (slides of another cohort run
    into it too), said `done` for a slide the report calls failed, and left out a slide whose file was missing
    (it never got a state)."""
    from wsi_vssm.runs.state import write_state

    out = tmp_path / "ev"
    for name, p in (("Tumor_001", 0.9), ("normal_001", 0.1), ("other_cohort", 0.5)):
        write_state(out, "predict", name, {"slide": name, "status": "done", "result": {"probability": p},
                                           "params": {"threshold": 0.5}})
    (out / "metrics.json").write_text(json.dumps({"cohort": "/c/ref.csv", "n": 1, "n_failed": 2, "auc": None,
                                                  "reason": "AUC needs both classes", "complete": True}))
    (out / "predictions.csv").write_text("slide,label,probability,status,error,in_domain,logit\n"
                                         "TUMOR_001,1,0.9,done,,,\nnormal_001,0,,failed,its file went,,\n"
                                         "gone,0,,failed,slide file not found: /c/gone.tif,,\n")
    code, text, _ = run_cli(capsys, str(out))
    by_name = {line.split(":")[0].strip(): line for line in text.splitlines()[2:]}
    assert code == 0 and "(not in the report)" in by_name["other_cohort"], text
    assert "(not in the report)" not in by_name["Tumor_001"]  # the table's case is the file's
    assert "(the report has it failed)" in by_name["normal_001"]
    assert by_name["gone"] == "  gone: failed (in the report, no state): slide file not found: /c/gone.tif"


def test_info_on_one_slides_prediction_folder_and_on_folders_that_are_no_slide(model_file, cohort, tmp_path,
                                                                               capsys):
    """`info OUT/<slide>/` (the folder predict prints and napari opens), a folder of slides, a patch folder, one
    of its class folders and an empty folder all got "a directory, but not an OME-Zarr store"."""
    out = tmp_path / "o"
    fast = ["--device", "cpu", "--target-mpp", "4", "--region-px", "512", "--overlap-px", "64", "--reader-threads", "1"]
    with pytest.raises(SystemExit) as stop:
        main(["predict", str(cohort / "tumor_001.tif"), "--out", str(out), "--model", str(model_file), *fast])
    assert stop.value.code == 0
    capsys.readouterr()
    folder = out / "tumor_001"
    pred = json.loads((folder / "prediction.json").read_text())
    code, text, err = run_cli(capsys, str(folder), "--json")
    assert code == 0, err
    r = json.loads(text)
    assert (r["kind"], r["slide"], r["probability"], r["label"]) == ("prediction", "tumor_001", pred["probability"],
                                                                    pred["label"])
    assert (r["slide_threshold"], r["cell_threshold"], r["in_domain"]) == (
        pred["slide_threshold"], pred["cell_threshold"], pred["in_domain"])
    assert r["lesions"] == len(pred["lesions"]) and r["missing"] == [] and "overlay.png" in r["files"]
    assert "cells.geojson" not in r["files"]  # written only when asked for: never said missing
    (folder / "cells.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    assert "cells.geojson" in json.loads(run_cli(capsys, str(folder), "--json")[1])["files"]
    (folder / "cells.geojson").unlink()
    assert r["n_cells"] == pred["summary"]["n_cells"] > 0
    code, text, _ = run_cli(capsys, str(folder))
    call = "tumor" if pred["label"] == 1 else "normal"
    assert code == 0 and f"probability {pred['probability']:.3f} -> {call} at slide threshold" in text, text
    # the file itself (napari opens it): the folder's call, not "not a slide format this app reads"
    assert run_cli(capsys, str(folder / "prediction.json"))[:2] == (0, text)
    assert ("OUT OF DOMAIN" in text) == (pred["in_domain"] is False)
    from wsi_vssm.commands.folder_info import format_prediction_folder_info

    assert "; slide 0.2282 um/px (" in format_prediction_folder_info({**r, "mpp": 0.2281750559028887})  # NDPI's
    code = ("import sys\nfrom wsi_vssm.cli import main\ntry:\n    main(['info', sys.argv[1]])\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print('numpy' in sys.modules, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "False False", proc.stderr

    # out of domain, with warnings, and a file gone: said, not hidden
    pred.update(in_domain=False, domain_notes=["looks like fluorescence"])
    pred["summary"]["warnings"] = ["the call rests on 0 cells"]
    (folder / "prediction.json").write_text(json.dumps(pred))
    (folder / "overlay.png").unlink()
    code, text, _ = run_cli(capsys, str(folder))
    assert "OUT OF DOMAIN" in text and "domain: looks like fluorescence" in text, text
    assert "warning:     the call rests on 0 cells" in text and "(missing: overlay.png)" in text, text
    (folder / "prediction.json").write_text("{")
    code, _, err = run_cli(capsys, str(folder))
    assert code == 1 and "prediction.json: cannot be read" in err and len(err.strip().splitlines()) == 1, err
    # another tool's JSON under our name: refused as napari and pN staging refuse it, not read as "no probability"
    (folder / "prediction.json").write_text(json.dumps({"slide": "x", "score": 0.9}))
    code, _, err = run_cli(capsys, str(folder))
    assert code == 1 and "not a wsi-vssm prediction.json" in err and "predict the slide again" in err, err
    (folder / "prediction.json").unlink()  # written last: without it the slide was never finished
    code, _, err = run_cli(capsys, str(folder))
    assert code == 1 and "a prediction folder without prediction.json" in err, err

    patches = tmp_path / "patches"
    for label in ("0", "1"):
        (patches / label).mkdir(parents=True)
        for i in range(2 + int(label)):
            (patches / label / f"p{i}.png").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("x")
    for path, part in [(cohort, "a folder of 3 slides (normal_001.tif, normal_002.tif, tumor_001.tif)"),
                       (tmp_path / "notes", "no slide files directly in it (sub-folders are not searched)"),
                       (patches, "a patch folder (ImageFolder: 2 images in 0/, 3 in 1/)"),
                       (patches / "1", f"a class folder of the patch folder {patches} (3 images)"),
                       (tmp_path / "empty", "an empty folder, not a slide")]:
        code, _, err = run_cli(capsys, str(path))
        assert code == 1 and part in err and "OME-Zarr" not in err and len(err.strip().splitlines()) == 1, err


def _states(out, kind: str, states: dict[str, dict], outputs: bool = True) -> None:
    """Hand-written per-slide states of OUT, as a run leaves them (no slide is run); a done slide's output file
    stands beside it (an empty one) unless not `outputs`."""
    from wsi_vssm.runs.state import write_state

    for name, state in states.items():
        write_state(out, kind, name, {"slide": name, **state})
        if outputs and state.get("status") == "done" and "/" not in name:
            where = out / name / "prediction.json" if kind == "predict" else out / f"{name}.zarr"
            where.parent.mkdir(parents=True, exist_ok=True)
            where.write_text("{}")


def test_info_does_not_advise_a_rerun_while_a_run_is_at_work(tmp_path, capsys):
    """While an evaluate rerun worked, `info OUT` said its report was "NOT complete: ... a later run started and
    has not written its report: rerun the same command to finish it", advice to start a second run beside it."""
    from wsi_vssm.runs.evaluate import STALE_NOTE
    from wsi_vssm.runs.state import SlideLock

    out = tmp_path / "ev"
    _states(out, "predict", {"a": {"status": "done", "result": {"probability": 0.9, "n_cells": 3},
                                   "params": {"threshold": 0.5}},
                             "b": {"status": "running"}})
    (out / "metrics.json").write_text(json.dumps({"cohort": "/c/ref.csv", "n": 2, "n_failed": 0, "auc": 1.0,
                                                  "complete": False, "stale": STALE_NOTE}))
    lock = SlideLock(out, "predict", "b")
    assert lock.acquire()
    try:
        code, text, _ = run_cli(capsys, str(out))
    finally:
        lock.release()
    assert code == 0 and ("NOT complete: a run is at work in this folder now (1 slide(s) in progress); these are "
                          "an earlier run's figures") in text and "rerun the same command" not in text, text
    code, text, _ = run_cli(capsys, str(out))  # no run at work (it was killed): the advice stands
    assert code == 0 and STALE_NOTE in text, text


def test_info_on_a_training_checkpoint_says_what_it_is(tmp_path, capsys):
    """`info` on `train cells`' or the dense stage's checkpoint said "not a wsi-vssm model file"."""
    from wsi_vssm.training.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "m.checkpoint.pt", {"epoch": 3, "best_epoch": 2, "log": []}, {"lr": 1e-3})
    save_checkpoint(tmp_path / "checkpoint.pt", {"state": {"epoch": 5, "best_epoch": 4}}, {})
    code, text, _ = run_cli(capsys, str(tmp_path / "m.checkpoint.pt"))
    assert code == 0 and "per-epoch training checkpoint, not a model file" in text, text
    assert "saved after epoch 3 (best so far: epoch 2)" in text and "--resume" in text, text
    code, text, _ = run_cli(capsys, str(tmp_path / "checkpoint.pt"), "--json")
    r = json.loads(text)
    assert code == 0 and (r["kind"], r["stage"], r["epoch"], r["best_epoch"]) == ("training_checkpoint", "dense", 5, 4)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    code, _, err = run_cli(capsys, str(tmp_path / "junk.pt"))
    assert code == 1 and "junk.pt: not a wsi-vssm model file" in err, err


def test_info_says_a_done_slide_whose_outputs_are_gone(tmp_path, capsys):
    """`info OUT` trusted the state files: a slide whose folder was deleted since was listed as done, though its
    outputs are gone and the next run makes them again."""
    out = tmp_path / "o"
    _states(out, "predict", {"kept": {"status": "done", "result": {"probability": 0.9, "n_cells": 7},
                                      "params": {"threshold": 0.5}}})
    _states(out, "predict", {"deleted": {"status": "done", "result": {"probability": 0.1, "n_cells": 5},
                                         "params": {"threshold": 0.5}}}, outputs=False)
    code, text, _ = run_cli(capsys, str(out))
    lines = text.splitlines()
    assert code == 0 and "  kept: done: probability 0.900 -> tumor [7 cells]" in lines, text
    assert ("  deleted: done: probability 0.100 -> normal [5 cells] (its outputs are gone since: a rerun makes them "
            "again)") in lines, text
    slides = json.loads(run_cli(capsys, str(out), "--json")[1])["slides"]
    assert [(s["slide"], s["outputs_gone"]) for s in slides] == [("deleted", True), ("kept", False)], slides


def test_info_tells_a_slide_a_live_run_holds_from_one_a_killed_run_left(tmp_path, capsys):
    """A `running` state was always said `interrupted` (rerun to redo it), even while a live run held the
    slide's lock and was working on it: a user told to rerun would start a second run beside it."""
    import os
    import socket

    from wsi_vssm.runs.state import SlideLock

    out = tmp_path / "o"
    _states(out, "predict", {"busy": {"status": "running"}})
    lock = SlideLock(out, "predict", "busy")  # held as a run holds it: this pid, this host, this process's token
    assert lock.acquire()
    try:
        code, text, _ = run_cli(capsys, str(out), "--json")
        entry = json.loads(text)["slides"][0]
        assert code == 0 and entry["status"] == "in_progress", entry
        assert f"pid {os.getpid()} on {socket.gethostname()}" in entry["error"]
        code, text, _ = run_cli(capsys, str(out))
        assert "(1 predict in_progress)" in text and "  busy: in_progress: locked by another run (pid" in text, text
    finally:
        lock.release()
    code, text, _ = run_cli(capsys, str(out))
    assert "  busy: interrupted: a run stopped during it; rerun to redo it" in text, text


def test_a_patch_evaluations_report_does_not_list_its_patches_as_slides_without_state(tmp_path, capsys):
    """An `evaluate` of a patch folder into an OUT that also holds slide states (an earlier slide run): its
    predictions.csv (one row per patch) was read as a slide table, so every patch was listed as "(in the report,
    no state)" and every slide as "(not in the report)"."""
    out = tmp_path / "o"
    _states(out, "predict", {"s1": {"status": "done", "result": {"probability": 0.9, "n_cells": 7},
                                    "params": {"threshold": 0.5}}})
    (out / "metrics.json").write_text(json.dumps({"cohort": "/p/patches", "n": 2, "n_failed": 0, "auc": 1.0,
                                                  "complete": True, "model_patches": {"either": 0}}))
    (out / "predictions.csv").write_text("slide,label,probability,status,error\n0/a.png,0,0.1,done,\n"
                                         "1/b.png,1,0.9,done,\n1/c.png,1,,failed,cannot be read\n")
    code, text, _ = run_cli(capsys, str(out))
    assert code == 0 and "over 2 patches of /p/patches" in text, text
    assert "(a patch evaluation: the slides below are an earlier run's)" in text
    assert "in the report, no state" not in text and "not in the report" not in text, text
    assert "  s1: done: probability 0.900 -> tumor [7 cells]" in text.splitlines(), text


def _old_patch_report(folder, auc, ci, rows):
    """A patch evaluation's folder as the first releases wrote it: metrics.json without `model_patches`, and
    predictions.csv of (patch, label, probability) rows."""
    folder.mkdir()
    called = [label for _, label, p in rows if p >= 0.5]
    (folder / "metrics.json").write_text(json.dumps({
        "n": len(rows), "n_failed": 0, "auc": auc, "auc_ci95": ci, "threshold": 0.5,
        "sensitivity": sum(called) / sum(label for _, label, _ in rows),
        "specificity": 1 - (len(called) - sum(called)) / sum(1 - label for _, label, _ in rows)}))
    (folder / "predictions.csv").write_text("slide,label,probability,status,error\n" + "".join(
        f"{name},{label},{p},done,\n" for name, label, p in rows))
    return folder


def test_info_reads_reports_an_earlier_version_wrote(tmp_path, capsys):
    """Reports of the first releases lack keys later ones added: `info` refused a patch evaluation of 0.1.0 (no
    `model_patches`, no score file: "a folder with no slide files"), said a slide report's cohort was `None`, and
    would have called both reports not complete (no `complete` key)."""
    patches = _old_patch_report(tmp_path / "patches", 0.75, [0.2, 1.0], [("0/a.jpg", 0, 0.1), ("1/b.jpg", 1, 0.9),
                                                                        ("1/c.jpg", 1, 0.4)])
    code, text, _ = run_cli(capsys, str(patches))
    assert code == 0 and text.splitlines()[0] == (f"patch evaluation: {patches} (of a patch folder not recorded; "
                                                  "model not recorded, precision not recorded)"), text
    assert "3 patches scored, 0 failed; AUC 0.750 (95% CI 0.200-1.000)" in text and "NOT complete" not in text, text
    slides = tmp_path / "slides"
    _states(slides, "predict", {"s1": {"status": "done", "result": {"probability": 0.9, "n_cells": 7},
                                       "params": {"threshold": 0.5}}})
    (slides / "metrics.json").write_text(json.dumps({"n": 1, "n_failed": 0, "auc": None, "reason": "one class"}))
    (slides / "predictions.csv").write_text("slide,label,probability,status,error\ns1,1,0.9,done,\n")
    code, text, _ = run_cli(capsys, str(slides))
    assert code == 0 and "over 1 slides of a cohort not recorded (0 failed); complete" in text, text


def test_a_slide_without_tissue_says_so_in_its_line(tmp_path, capsys):
    """A done slide with no tissue has no probability and no error: its line said only `done`, not why it has
    no call (the state's result carries the reason)."""
    out = tmp_path / "o"
    _states(out, "predict", {"blank": {"status": "done", "result": {"probability": None,
                                                                    "reason": "no tissue found"}}})
    code, text, _ = run_cli(capsys, str(out))
    assert code == 0 and "  blank: done: no tissue found" in text.splitlines(), text


def test_info_says_a_later_run_is_scoring_into_a_patch_evaluation_now(tmp_path, capsys):
    """A patch evaluation whose report a later run marked stale, while that run still scores: info said the
    report was not finished (as for an interrupted run, which a rerun resumes) instead of a run being at work."""
    from wsi_vssm.runs.patch_scores import PatchScores

    out = tmp_path / "ev"
    out.mkdir()
    stale = "the figures of an earlier run on this folder; a later run has begun"
    (out / "metrics.json").write_text(json.dumps({
        "cohort": "/p/patches", "model": {"name": "m"}, "n": 4, "n_failed": 0, "auc": 0.75, "auc_ci95": None,
        "threshold": 0.5, "sensitivity": 1.0, "specificity": 0.5, "model_patches": {"either": 0},
        "repeated_patches": {}, "parameters": {"precision": "fp32", "tta": False}, "complete": False,
        "stale": stale}))
    with PatchScores(out, "h", {"precision": "fp32", "tta": False}) as scores:
        scores.add([("0/a.png", 1, 0.5)])
        code, text, _ = run_cli(capsys, str(out))
        assert code == 0 and text.splitlines()[1] == ("  NOT complete: a later run is scoring into this folder now "
                                                      "(1 patch score(s) so far); these are the earlier run's "
                                                      "figures"), text
    code, text, _ = run_cli(capsys, str(out))  # the run gone: an interrupted one, its scores kept
    assert text.splitlines()[1] == f"  NOT complete: {stale} (1 patch scores kept)", text


def test_mixed_extract_settings_count_finished_slides_only(tmp_path, capsys):
    """A failed slide's state carries the settings it was tried with: a folder whose finished stores all agree
    was warned "extracted with different region_px" because a failed (retried) slide had others."""
    out = tmp_path / "feats"
    same = {"model_hash": "abc", "mpp": 0.5, "token_px": 32, "overlap_px": 64, "min_tissue": 0.1,
            "precision": "fp32"}
    _states(out, "extract", {"a": {"status": "done", "params": {**same, "region_px": 512}, "result": {"n_cells": 3}},
                             "b": {"status": "failed", "params": {**same, "region_px": 1024}, "error": "boom"}})
    code, text, _ = run_cli(capsys, str(out), "--json")
    assert code == 0 and json.loads(text)["mixed_settings"] == {}, text
    code, text, _ = run_cli(capsys, str(out))
    assert "different region_px" not in text, text
    _states(out, "extract", {"b": {"status": "done", "params": {**same, "region_px": 1024}, "result": {"n_cells": 2}}})
    code, text, _ = run_cli(capsys, str(out))  # once it is done, the folder does hold both
    assert "warning: its slides were extracted with different region_px: 1024 (1), 512 (1)" in text, text


def test_a_foreign_slide_name_does_not_find_outputs_outside_the_folder(tmp_path, capsys):
    """A state naming its slide `../elsewhere` (foreign or damaged) was looked up as OUT/../elsewhere/: a failed
    slide was said to still hold an earlier run's outputs because of another folder's files."""
    out = tmp_path / "o"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "prediction.json").write_text("{}")  # what OUT/../elsewhere would find
    (tmp_path / "elsewhere.zarr").mkdir()
    _states(out, "predict", {"x": {"slide": "../elsewhere", "status": "failed", "error": "boom"}})
    _states(out, "extract", {"y": {"slide": "../elsewhere", "status": "failed", "error": "boom"}})
    code, text, _ = run_cli(capsys, str(out), "--json")
    slides = json.loads(text)["slides"]
    assert code == 0 and [(s["kind"], s["earlier_outputs"]) for s in slides] == [("predict", False),
                                                                                  ("extract", False)], slides


def test_a_probability_at_the_threshold_is_called_tumor(tmp_path, capsys):
    """predict calls a slide tumor at or above its threshold: info called one exactly at it normal."""
    out = tmp_path / "o"
    _states(out, "predict", {"edge": {"status": "done", "result": {"probability": 0.5, "n_cells": 7},
                                      "params": {"threshold": 0.5}}})
    code, text, _ = run_cli(capsys, str(out))
    assert code == 0 and "  edge: done: probability 0.500 -> tumor [7 cells]" in text.splitlines(), text


def test_a_done_slide_the_report_counts_as_no_tissue_is_not_flagged(tmp_path, capsys):
    """A slide without tissue is `done` in its state and `no_tissue` in the report's table: info flagged it
    "(the report has it no_tissue)" as if its outputs had gone since."""
    out = tmp_path / "ev"
    _states(out, "predict", {"blank": {"status": "done", "result": {"probability": None,
                                                                    "reason": "no tissue found"}},
                             "gone": {"status": "done", "result": {"probability": 0.2}, "params": {"threshold": 0.5}}})
    (out / "metrics.json").write_text(json.dumps({"cohort": "/c/ref.csv", "n": 0, "n_failed": 1, "auc": None,
                                                  "reason": "AUC needs both classes", "complete": True}))
    (out / "predictions.csv").write_text("slide,label,probability,status,error\nblank,0,,no_tissue,\n"
                                         "gone,0,,failed,its outputs went\n")
    code, text, _ = run_cli(capsys, str(out))
    by_name = {line.split(":")[0].strip(): line for line in text.splitlines()[2:]}
    assert code == 0 and by_name["blank"] == "  blank: done: no tissue found", text
    assert by_name["gone"].endswith("(the report has it failed)")  # another status still is


def test_info_on_an_output_folder_says_out_of_domain_also_without_a_probability(tmp_path, capsys):
    """A fluorescence slide (no probability: "no tissue found") was listed without the OUT OF DOMAIN that slides
    with a probability get, though its prediction.json says so."""
    from wsi_vssm.runs.state import write_state

    out = tmp_path / "o"
    _states(out, "predict", {"dapi": {"status": "done", "params": {"threshold": 0.5},
                                      "result": {"probability": None, "reason": "no tissue found", "in_domain": False}},
                             "he": {"status": "done", "params": {"threshold": 0.5},
                                    "result": {"probability": None, "reason": "no tissue found", "in_domain": True}}})
    write_state(out, "predict", "bare", {"slide": "bare", "status": "failed", "params": {"threshold": 0.5},
                                         "result": {"probability": None, "in_domain": False}})
    code, text, _ = run_cli(capsys, str(out))
    by_name = {line.split(":")[0].strip(): line for line in text.splitlines()[1:]}
    assert code == 0 and by_name["dapi"].endswith("done: no tissue found, OUT OF DOMAIN"), text
    assert by_name["he"].endswith("done: no tissue found"), text
    assert by_name["bare"].endswith("failed: OUT OF DOMAIN"), text  # no stray ", " without a reason


def test_info_says_a_zero_width_interval_is_undefined_as_evaluate_does(tmp_path, capsys):
    """`evaluate` said "95% CI undefined" for perfectly separated slides while `info` printed 1.000-1.000."""
    patches = _old_patch_report(tmp_path / "patches", 1.0, [1.0, 1.0], [("0/a.jpg", 0, 0.1), ("1/b.jpg", 1, 0.9)])
    code, text, _ = run_cli(capsys, str(patches))
    assert code == 0 and "AUC 1.000 (95% CI undefined: every resample gives this AUC)" in text, text
    slides = tmp_path / "slides"
    _states(slides, "predict", {"s1": {"status": "done", "result": {"probability": 0.9, "n_cells": 7},
                                       "params": {"threshold": 0.5}}})
    (slides / "metrics.json").write_text(json.dumps({"n": 2, "n_failed": 0, "auc": 1.0, "auc_ci95": [1.0, 1.0],
                                                     "subgroups": {"centre": "not a block"}}))
    code, text, _ = run_cli(capsys, str(slides))
    assert code == 0 and "report:        AUC 1.000 (95% CI undefined: every resample gives this AUC)" in text, text
    assert "subgroups" not in text  # a block info cannot read is left out, the rest shown
