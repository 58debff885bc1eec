"""bench/patch_drivers.py: finds the one reused label-0 patch behind a cohort's false-positive normal slides."""

from __future__ import annotations

import json
import sys

from conftest import load_bench


def _slide(name: str, label: str, patches: list[str | None]) -> dict:
    return {"name": name, "label": label, "patches": [patches[:2], patches[2:]]}


def _mosaic() -> dict:
    return {"slides": [
        _slide("n1", "normal", ["a", "bad", None, "c"]),
        _slide("n2", "normal", ["a", "b", "bad", "bad"]),  # held twice: counted once
        _slide("n3", "normal", ["a", "b", "c", None]),
        _slide("n4", "normal", ["b", "c", None, None]),
        _slide("t1", "tumor", ["bad", "x", "y", "z"]),  # tumour slides are not the question
    ]}


def test_a_patch_in_exactly_the_called_slides_ranks_first():
    bench = load_bench("patch_drivers")
    from wsi_vssm.synth.mosaic import slide_patches

    patches = slide_patches(_mosaic())
    assert set(patches) == {"n1", "n2", "n3", "n4"} and patches["n2"] == {"a", "b", "bad"}
    top = bench.drivers(patches, {"n1", "n2"}, top=2)
    assert top[0] == {"patch": "bad", "slides": 2, "called_with": 2, "called_without": 0, "errors": 0}
    assert top[1]["errors"] > 0  # no other patch separates the calls


def test_main_reads_each_slides_own_threshold(tmp_path, monkeypatch, capsys):
    bench = load_bench("patch_drivers")
    cohort, out = tmp_path / "cohort", tmp_path / "eval"
    cohort.mkdir()
    (cohort / "mosaic.json").write_text(json.dumps(_mosaic()))
    for name, p, t in [("n1", 0.9, 0.5), ("n2", 0.6, 0.5), ("n3", 0.6, 0.7), ("n4", 0.1, 0.5)]:
        (out / name).mkdir(parents=True)
        (out / name / "prediction.json").write_text(json.dumps({"probability": p, "slide_threshold": t}))
    layout = _mosaic()
    layout["slides"].append(_slide("n5", "normal", ["a", None, None, None]))  # no output
    (cohort / "mosaic.json").write_text(json.dumps(layout))
    monkeypatch.setattr(sys, "argv", ["patch_drivers", "--cohort", str(cohort), "--eval", str(out), "--top", "1"])
    bench.main()
    text = capsys.readouterr().out
    assert "4 scored normal slides from 4 distinct label-0 patches; a typical patch sits in 67% of the other " \
           "slides (1 normal slides without a probability left out)" in text
    assert "called tumour at their slide_threshold: 2 of 4" in text  # n3 is under its own 0.7
    assert "bad: in 2 slides, 2 of them called; called slides without it 0; separation errors 0" in text


def test_a_patients_cohort_is_refused_in_one_line(tmp_path, monkeypatch):
    """`synth --patients` cohorts store pool indices, not patch names: a KeyError traceback before."""
    import pytest

    bench = load_bench("patch_drivers")
    (tmp_path / "mosaic.json").write_text(json.dumps({"nodes": [{"slide": "p0_n0", "index": [[0, -1]]}]}))
    monkeypatch.setattr(sys, "argv", ["patch_drivers", "--cohort", str(tmp_path), "--eval", str(tmp_path)])
    with pytest.raises(SystemExit, match="no 'slides' list naming each cell's patch") as e:
        bench.main()
    assert "\n" not in str(e.value)
