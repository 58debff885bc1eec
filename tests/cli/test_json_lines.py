"""`--json`: stdout one JSON object a line and nothing else, for workflow managers that parse it (the result line
changed shape with every case: up to date, no tissue, doubtful, out of domain; and the model note shared it)."""

from __future__ import annotations

import json
import math
import shutil

from conftest import run_cli_captured

FAST = ["--device", "cpu", "--target-mpp", "4", "--region-px", "512", "--overlap-px", "64", "--reader-threads", "1"]


def _records(out: str) -> list[dict]:
    lines = out.splitlines()
    assert lines, "no JSON line"
    return [json.loads(line) for line in lines]  # every stdout line parses: nothing else is there


def test_predict_json_lines_one_per_slide_then_up_to_date(model_file, cohort, tmp_path, capsys):
    slides = [cohort / "normal_001.tif", cohort / "tumor_001.tif"]
    args = ["predict", *slides, "--out", tmp_path / "o", "--model", model_file, "--json", *FAST]
    code, out, err = run_cli_captured(args, capsys)
    assert code == 0, err
    recs = _records(out)
    assert [r["slide"] for r in recs] == ["normal_001", "tumor_001"] and {r["status"] for r in recs} == {"done"}
    for r in recs:
        assert r["outputs"] == [str(tmp_path / "o" / r["slide"])]
        assert (tmp_path / "o" / r["slide"] / "prediction.json").is_file()
        assert 0 <= r["result"]["probability"] <= 1 and math.isfinite(r["timings"]["total"]) and r["error"] is None
    assert "normal_001: probability" in err and "note: model" in err  # the usual lines, on stderr
    code, out, err = run_cli_captured([*args, "-q"], capsys)  # a rerun, quiet: the records still come
    assert [r["status"] for r in _records(out)] == ["up_to_date", "up_to_date"]


def test_predict_json_names_a_failed_slide(model_file, tmp_path, capsys):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00 not a tiff")
    good = tmp_path / "good.tif"
    shutil.copy(bad, good)
    code, out, err = run_cli_captured(["predict", bad, good, "--out", tmp_path / "o", "--model", model_file, "--json",
                                       *FAST], capsys)
    recs = _records(out)
    assert code == 3 and [r["status"] for r in recs] == ["failed", "failed"]
    assert all(r["error"] and r["outputs"] is None for r in recs) and "bad.tif" in recs[0]["error"] and "error" in err


def test_evaluate_json_ends_with_its_report(model_file, cohort, tmp_path, capsys):
    code, out, err = run_cli_captured(["evaluate", cohort / "reference.csv", "--out", tmp_path / "e", "--model",
                                       model_file, "--json", "--bootstrap", "100", *FAST], capsys)
    assert code == 0, err
    recs = _records(out)
    report = recs[-1]
    assert len(recs) == 4 and all(r["status"] == "done" for r in recs[:3])
    assert report["report"].endswith("metrics.json") and report["complete"] is True and report["n"] == 3
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert report["auc"] == metrics["auc"] and "AUC" in err


def test_json_records_carry_no_nan(capsys):
    """JSON has no NaN: a record with one would be refused by the reader's parser."""
    import numpy as np

    from wsi_vssm.progress import Progress

    Progress(json_lines=True).record({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": np.int64(2)},
                                      "e": np.float32("nan")})
    assert json.loads(capsys.readouterr().out) == {"a": None, "b": [1.0, None], "c": {"d": 2}, "e": None}
