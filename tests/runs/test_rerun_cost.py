"""What a rerun of up-to-date slides costs per slide: no rewrite of the whole table, and no search of the state
folder, for each of them (both made a rerun quadratic in the cohort's size)."""

from __future__ import annotations

import json
import socket
import time
from types import SimpleNamespace

from wsi_vssm.runs.execute import Outcome, SlideTask
from wsi_vssm.runs.state import STATE_DIR, lock_path, state_path


def test_the_interim_table_is_not_rewritten_for_every_skipped_slide(tmp_path, monkeypatch):
    """predictions.csv was rewritten whole after every slide, skipped ones too: 34 of 47 s of a rerun of 1,000
    up-to-date slides. A slide that ran is still written at once, and the rest before the run waits or ends."""
    import wsi_vssm.runs.cohort_table as ct

    (tmp_path / STATE_DIR).mkdir()
    writes = []
    monkeypatch.setattr(ct, "write_table", lambda out, rows: writes.append([r["status"] for r in rows]))
    monkeypatch.setattr(ct, "INTERIM_EVERY_S", 1e9)  # no rewrite for time's sake in this test
    # a clock that stands still: a rewrite costs nothing, so no stall on a loaded machine can hold one back
    monkeypatch.setattr(ct, "time", SimpleNamespace(monotonic=lambda: 0.0, sleep=time.sleep))
    crows = [SimpleNamespace(name=f"s{i}", label=i % 2) for i in range(50)]
    tasks = [SlideTask(f"s{i}", str(tmp_path / f"s{i}.tif")) for i in range(50)]
    told = []
    table = ct.InterimTable(tmp_path, crows, tasks, told.append, None)
    for task in tasks[:40]:
        table(Outcome(task, "skipped", "up to date", {"result": {"probability": 0.2}}))
    assert len(writes) == 1 and writes[0][:2] == ["done", "pending"]  # the first slide's, at once
    assert len(told) == 40 and table.recorded == set(range(40))  # every slide is still told and recorded
    table(Outcome(tasks[40], "failed", "broken"))  # a known failure, reported again: not written either
    table(Outcome(tasks[41], "done", "", {"result": {"probability": 0.9}}))  # a slide that ran: written
    assert len(writes) == 2 and writes[1] == ["done"] * 40 + ["failed", "done"] + ["pending"] * 8
    table.flush()  # nothing new: no rewrite
    table(Outcome(tasks[42], "skipped", "up to date", {"result": {"probability": 0.2}}))
    table.flush()  # before a wait, or at the end of the run's slides
    assert len(writes) == 3 and writes[2][42] == "done"


def test_a_slide_starts_without_a_search_for_temporaries_unless_a_run_was_killed(tmp_path, monkeypatch):
    """Every slide that ran searched OUT/.state (and extract's OUT, h5_files/, pt_files/) for a killed run's
    temporaries: 2.4 us x N^2 in all, 38 s of a 4,000-slide extract. Only a killed run leaves them, and it leaves
    its lock or a `running` state."""
    import wsi_vssm.runs.execute as execute
    from wsi_vssm.runs.state import write_state

    cleared = []
    monkeypatch.setattr(execute, "clear_temporaries", lambda name, job: cleared.append(name))
    job = SimpleNamespace(out=str(tmp_path), kind="predict", model_id="m", model_hash="h", fallback_mpp=None,
                          task_hash=lambda task: "p", task_params=lambda task: {})
    (tmp_path / STATE_DIR).mkdir()

    def start(name: str) -> None:
        lock, refused, _ = execute.start_slide(SlideTask(name, None), job)
        assert refused is None
        lock.release()

    start("fresh")  # no state, no lock: nothing to look for
    write_state(tmp_path, "predict", "done_before", {"status": "done"})
    start("done_before")  # an --overwrite or changed-file rerun of a finished slide
    assert cleared == []
    write_state(tmp_path, "predict", "killed", {"status": "running"})
    start("killed")
    lock_path(tmp_path, "predict", "killed_early").write_text(json.dumps(
        {"pid": 2**22 + 7, "host": socket.gethostname(), "time": "2026-12-07T00:00:00"}))
    start("killed_early")  # killed before its first state was written: its lock is left
    assert cleared == ["killed", "killed_early"]


def test_a_done_slide_is_tidied_only_after_a_run_that_left_its_lock(tmp_path):
    """Each up-to-date slide searched OUT/.state for a killed run's temporaries: 22 of 27 s of a rerun of 3,600
    slides. A run that ended normally left no lock, and nothing to tidy."""
    from wsi_vssm.runs.runner import _tidy_done

    (tmp_path / STATE_DIR).mkdir()
    partial = []
    job = SimpleNamespace(out=str(tmp_path), kind="predict", clear_partial=partial.append)
    task = SlideTask("s1", str(tmp_path / "s1.tif"))
    _tidy_done(task, job)
    assert partial == []
    # a run killed after writing `done`: its lock (its pid gone) and a half-written state are left
    lock_path(tmp_path, "predict", "s1").write_text(json.dumps({"pid": 2**22 + 7, "host": socket.gethostname(),
                                                                "time": "2026-12-07T00:00:00"}))
    leftover = state_path(tmp_path, "predict", "s1").parent / ".tmp-s1.predict.json.abc123"
    leftover.write_text("{")
    _tidy_done(task, job)
    assert partial == ["s1"] and not leftover.exists() and not lock_path(tmp_path, "predict", "s1").exists()
