"""State keyed by what the input is (size, mtime, content fingerprint), missing paths, a missing cohort, and the
warning when the scores do not separate."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from conftest import run_cli_captured

from wsi_vssm.runs.evaluate import EvaluationResult
from wsi_vssm.runs.report_warnings import separation_warning, training_slides_warning
from wsi_vssm.runs.state import FINGERPRINT_BYTES, STATE_DIR, input_changed, input_fingerprint, read_state

FAST = ["--device", "cpu", "--target-mpp", "4", "--region-px", "512", "--overlap-px", "64", "--reader-threads", "1"]


def _cli(args, capsys) -> tuple[int, str, str]:
    return run_cli_captured(args, capsys)


def test_a_slide_replaced_under_the_same_name_is_redone(model_file, cohort, tmp_path, capsys):
    slide = tmp_path / "s.tif"
    shutil.copy(cohort / "normal_001.tif", slide)
    args = ["predict", slide, "--out", tmp_path / "o", "--model", model_file, *FAST]
    assert _cli(args, capsys)[0] == 0
    first = read_state(tmp_path / "o", "predict", "s")
    assert first["input"] == input_fingerprint(slide) and first["input"]["size"] == slide.stat().st_size

    os.utime(slide, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched or copied: same content
    code, out, _ = _cli(args, capsys)
    assert code == 0 and "up to date" in out

    shutil.copy(cohort / "tumor_001.tif", slide)  # another slide under the same name
    code, out, err = _cli(args, capsys)
    assert code == 0 and "up to date" not in out and "changed" in err
    second = read_state(tmp_path / "o", "predict", "s")
    assert second["finished"] != first["finished"] and second["input"]["sha256"] != first["input"]["sha256"]


def test_a_failed_slide_stays_failed_only_while_its_file_is_unchanged(model_file, cohort, tmp_path, capsys):
    slide = tmp_path / "s.tif"
    slide.write_bytes(b"not a slide at all")
    args = ["predict", slide, "--out", tmp_path / "o", "--model", model_file, *FAST]
    assert _cli(args, capsys)[0] == 1
    failed = read_state(tmp_path / "o", "predict", "s")
    assert failed["status"] == "failed"
    code, _, err = _cli(args, capsys)
    assert code == 1 and "earlier run" in err  # unchanged: not tried again
    assert read_state(tmp_path / "o", "predict", "s")["finished"] == failed["finished"]

    shutil.copy(cohort / "normal_001.tif", slide)  # the file is fixed: redone without --retry-failed
    code, out, _ = _cli(args, capsys)
    assert code == 0 and "s: probability" in out
    assert read_state(tmp_path / "o", "predict", "s")["status"] == "done"


def test_a_failed_state_without_a_fingerprint_is_tried_again(model_file, cohort, tmp_path, capsys):
    """A failure recorded before fingerprints existed cannot prove the file unchanged: the slide is redone."""
    from wsi_vssm.runs.state import write_state

    slide = tmp_path / "s.tif"
    shutil.copy(cohort / "normal_001.tif", slide)
    args = ["predict", slide, "--out", tmp_path / "o", "--model", model_file, *FAST]
    assert _cli(args, capsys)[0] == 0
    state = read_state(tmp_path / "o", "predict", "s")
    old = {k: v for k, v in state.items() if k not in ("format", "input")}
    write_state(tmp_path / "o", "predict", "s", {**old, "status": "failed", "error": "s.tif: broken"})
    code, out, _ = _cli(args, capsys)
    assert code == 0 and "s: probability" in out


def test_another_slide_of_the_same_name_keeps_the_first_ones_results(model_file, cohort, tmp_path, capsys):
    """`a/s.tif` done, then `b/s.tif` (another slide) on the same OUT: refused, not silently replaced."""
    first_slide, other = tmp_path / "a" / "s.tif", tmp_path / "b" / "s.tif"
    for path, src in ((first_slide, "normal_001.tif"), (other, "tumor_001.tif")):
        path.parent.mkdir()
        shutil.copy(cohort / src, path)
    out = tmp_path / "o"
    common = ["--out", out, "--model", model_file, *FAST]
    assert _cli(["predict", first_slide, *common], capsys)[0] == 0
    first = read_state(out, "predict", "s")

    code, _, err = _cli(["predict", other, *common], capsys)
    (line,) = [ln for ln in err.splitlines() if ln.startswith("wsi-vssm: error:")]
    assert code == 1 and str(other) in line and str(first_slide) in line and "--overwrite" in line
    assert "Traceback" not in err
    assert read_state(out, "predict", "s") == first  # the first slide's results stand

    copy = tmp_path / "c" / "s.tif"  # a copy of the first slide elsewhere: its results stand for it too
    copy.parent.mkdir()
    shutil.copy(first_slide, copy)
    code, stdout, _ = _cli(["predict", copy, *common], capsys)
    assert code == 0 and "up to date" in stdout

    code, stdout, err = _cli(["predict", other, *common, "--overwrite"], capsys)
    assert code == 0 and "replacing the results of" in err and "s: probability" in stdout
    assert read_state(out, "predict", "s")["abspath"] == str(other)


def test_empty_files_of_one_name_each_fail_with_their_own_path(model_file, tmp_path, capsys):
    """Two empty files share a fingerprint; the second must not be reported with the first's error and path."""
    out, errors = tmp_path / "o", []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "e.tif").write_bytes(b"")
        code, _, err = _cli(["predict", tmp_path / folder / "e.tif", "--out", out, "--model", model_file, *FAST],
                            capsys)
        assert code == 1 and "Traceback" not in err
        errors.append([ln for ln in err.splitlines() if ln.startswith("wsi-vssm: error:")])
    assert str(tmp_path / "b" / "e.tif") in errors[1][0] and str(tmp_path / "a") not in errors[1][0]
    assert "earlier run" not in errors[1][0]


def test_a_missing_path_is_bad_input_and_writes_no_state(model_file, cohort, tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = _cli(["predict", tmp_path / "nope.tif", "--out", out, "--model", model_file, *FAST], capsys)
    (line,) = [ln for ln in err.splitlines() if ln.startswith("wsi-vssm: error:")]
    assert code == 1 and "nope.tif" in line and "no such file" in line and "Traceback" not in err
    assert not list((out / STATE_DIR).glob("nope*"))
    # among other slides: one line, the others run, still no state for it (exit 3: some failed)
    code, _, err = _cli(["predict", tmp_path / "nope.tif", cohort / "normal_001.tif", "--out", out, "--model",
                         model_file, *FAST], capsys)
    assert code == 3 and sum("nope.tif" in ln for ln in err.splitlines()) == 1
    assert not list((out / STATE_DIR).glob("nope*"))
    assert read_state(out, "predict", "normal_001")["status"] == "done"


def test_missing_cohort_fails_fast_in_one_line_without_heavy_imports(tmp_path):
    code = ("import sys\nfrom wsi_vssm.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print(e.code, 'torch' in sys.modules, 'numpy' in sys.modules)\n")
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code, "evaluate", str(tmp_path / "no such cohort"), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert res.stdout.split() == ["1", "False", "False"], res.stdout + res.stderr
    assert res.stderr.count("\n") == 1 and "no such cohort" in res.stderr and "Traceback" not in res.stderr
    assert elapsed < 2.0, elapsed
    assert not (tmp_path / "out").exists()


def test_file_fingerprint_reads_both_ends_only(tmp_path):
    big = tmp_path / "big.svs"
    data = bytearray(os.urandom(3 * FINGERPRINT_BYTES))
    big.write_bytes(bytes(data))
    fp = input_fingerprint(big)
    assert fp["size"] == len(data) and not input_changed(fp, big)
    st = big.stat()
    data[-1] ^= 0xFF  # the tail changes, same size and mtime: the stat says "same file", nothing is read
    big.write_bytes(bytes(data))
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not input_changed(fp, big)
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # another mtime: the content decides
    assert input_changed(fp, big)
    fp = input_fingerprint(big)
    data[len(data) // 2] ^= 0xFF  # the middle is not part of the fingerprint (documented)
    big.write_bytes(bytes(data))
    assert not input_changed(fp, big)
    big.write_bytes(bytes(data) + b"x")  # another size: changed without reading, even at the recorded mtime
    os.utime(big, ns=(st.st_atime_ns, fp["mtime_ns"]))
    assert input_changed(fp, big)
    assert input_fingerprint(tmp_path / "gone.svs") is None and input_changed(fp, tmp_path / "gone.svs")
    assert input_changed(None, big)


def test_folder_fingerprint_covers_metadata_not_chunks(tmp_path):
    z = tmp_path / "s.ome.zarr"
    (z / "0").mkdir(parents=True)
    (z / ".zattrs").write_text('{"multiscales": []}')
    (z / "0" / ".zarray").write_text('{"shape": [1, 2]}')
    (z / "0" / "0.0").write_bytes(b"chunk")
    fp = input_fingerprint(z)
    (z / "0" / "0.0").write_bytes(b"other chunk")
    assert not input_changed(fp, z)
    (z / "0" / ".zarray").write_text('{"shape": [3, 4]}')
    assert input_changed(fp, z)


def _result(probabilities, labels, auc=None, ci=None) -> EvaluationResult:
    rows = [{"slide": f"s{i}", "label": y, "probability": p, "status": "done", "error": None}
            for i, (p, y) in enumerate(zip(probabilities, labels, strict=True))]
    return EvaluationResult({"auc": auc, "auc_ci95": ci, "n": len(rows)}, rows)


def test_evaluate_warns_when_the_scores_do_not_separate():
    same = _result([0.001] * 4, [0, 1, 0, 1], 0.5, [0.5, 0.5])
    assert "every one of the 4 slides scores 0.001" in separation_warning(same)
    same.items = "patches"  # a patch folder says what it scored
    warning = separation_warning(same)
    assert "every one of the 4 patches scores 0.001" in warning and "slide" not in warning
    warning = separation_warning(_result([0.1, 0.4, 0.3, 0.2], [0, 1, 0, 1], 0.75, [0.25, 1.0]))
    assert "covers 0.5" in warning and "0.750" in warning and "\n" not in warning
    assert separation_warning(_result([0.1, 0.9, 0.2, 0.8], [0, 1, 0, 1], 1.0, [1.0, 1.0])) is None
    assert separation_warning(_result([0.3], [1])) is None  # one slide: nothing to say
    ranked = _result([0.0] * 4, [0, 1, 0, 1], 0.75, [0.6, 0.9])  # probabilities that round to 0, logits that rank
    for row, z in zip(ranked.rows, (-23.0, -15.0, -20.0, -18.0), strict=True):
        row["logit"] = z
    ranked.metrics["auc_ranked_by"] = "logit"  # as _write_metrics records it
    assert separation_warning(ranked) is None  # it said "every one scores 0.000" beside an AUC of 0.75


def test_evaluate_warns_when_slides_trained_the_models_slide_head():
    """`evaluate --split all` with an attached MIL head scored its own training slides (AUC 1.000) without a word,
    though the model names them (mil_stage, recorded by `run ... attach_mil`)."""
    from types import SimpleNamespace

    result = _result([0.1, 0.9, 0.8], [0, 1, 1])  # slides s0, s1, s2
    attached = SimpleNamespace(metadata={"mil_stage": {"train_slides": ["S1", "x"], "valid_slides": ["s2"]}})
    warning = training_slides_warning(result, attached)
    assert "2 of the 3 slides have the names of slides that trained or selected this model's slide head" in warning
    assert "s1, s2" in warning and "if they are those slides" in warning
    default = SimpleNamespace(metadata={"mil_stage": {"train_slides": 160, "valid_slides": 60}})  # counts only
    assert training_slides_warning(result, default) is None
    assert training_slides_warning(_result([0.5], [1]), attached) is None  # s0 alone: none of them


def test_a_full_disk_stops_the_run_and_the_rerun_redoes_that_slide(model_file, cohort, tmp_path, capsys,
                                                                   monkeypatch):
    """No space left while writing a slide's outputs: blamed on the output folder, not the slide; the run stops
    (every later slide would fail too) keeping what is done, and the rerun does the rest without --retry-failed."""
    import errno

    from wsi_vssm.runs.jobs import PredictJob

    slides = [cohort / f"{n}.tif" for n in ("normal_001", "tumor_001", "normal_002")]
    out = tmp_path / "o"
    args = ["predict", *slides, "--out", out, "--model", model_file, *FAST]
    real_run = PredictJob.run

    def full_after_first(self, task, *a, **k):
        if task.name == "tumor_001":
            raise OSError(errno.ENOSPC, "No space left on device")  # as numpy or zarr raise it: no file name
        return real_run(self, task, *a, **k)

    monkeypatch.setattr(PredictJob, "run", full_after_first)
    code, _, err = _cli(args, capsys)
    (line,) = [ln for ln in err.splitlines() if ln.startswith("wsi-vssm: error:")]
    assert code == 1 and "Traceback" not in err
    assert "tumor_001: cannot write its outputs" in line and str(out) in line and "the run stopped" in line
    assert str(slides[1]) not in line  # the slide file is not to blame
    assert read_state(out, "predict", "normal_001")["status"] == "done"
    assert read_state(out, "predict", "normal_002") is None  # not started after the disk filled

    monkeypatch.setattr(PredictJob, "run", real_run)  # space freed
    code, stdout, _ = _cli(args, capsys)
    assert code == 0 and "normal_001: up to date" in stdout
    assert "tumor_001: probability" in stdout and "normal_002: probability" in stdout


def test_a_librarys_deprecation_notice_is_not_a_slide_warning(tmp_path):
    """An old matplotlib with a new pyparsing printed "'parseString' deprecated - use 'parse_string'" three
    times as the slide's own warning: pyparsing's notices are UserWarning and DeprecationWarning at once."""
    import warnings

    from wsi_vssm.runs.execute import SlideTask, execute

    class LibraryDeprecation(UserWarning, DeprecationWarning):
        pass

    class Job:
        def run(self, task, region_progress, run_regions):
            warnings.warn("'parseString' deprecated - use 'parse_string'", LibraryDeprecation, stacklevel=1)
            warnings.warn("slide.svs: no resolution in the file, 0.5 um/px from --mpp", UserWarning, stacklevel=1)
            return {"probability": 0.5, "timings": {}}

    res = execute(Job(), SlideTask("s", str(tmp_path / "s.svs")))
    assert res["ok"] and res["warnings"] == ["slide.svs: no resolution in the file, 0.5 um/px from --mpp"]
