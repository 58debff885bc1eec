"""The cohort runner: per-slide state, skip/retry, locks, SIGKILL at any moment, and Dask = serial.

Slides are tiny (1024 px at 2 um/px, read at 4 um/px: one 512 px region each) so the whole file stays fast.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from wsi_vssm.cli import main
from wsi_vssm.runs.state import STATE_DIR, SlideLock, read_state

FAST = ["--device", "cpu", "--target-mpp", "4", "--region-px", "512", "--overlap-px", "64", "--reader-threads", "1"]


@pytest.fixture(scope="module")
def reference(model_file, cohort, tmp_path_factory):
    """An uninterrupted serial evaluate run: what every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    assert _cli(["evaluate", str(cohort), "--out", str(out), "--model", str(model_file), "--bootstrap", "200",
                 *FAST]) == 0
    return out


def _cli(args) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _probs(out) -> dict:
    with open(out / "predictions.csv", encoding="utf-8") as f:
        return {r["slide"]: (r["status"], float(r["probability"])) for r in csv.DictReader(f)}


def _table(out) -> list[dict]:
    try:
        with open(out / "predictions.csv", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def _n_cells(rec: dict) -> int:
    return (rec.get("summary") or rec["parameters"])["n_cells"]  # prediction.json v2 moved it to `summary`


def _same_results(out, ref) -> None:
    got, want = _probs(out), _probs(ref)
    assert got.keys() == want.keys()
    for name, (status, p) in want.items():
        assert got[name][0] == status and abs(got[name][1] - p) <= 1e-5, name
        rec = json.loads((out / name / "prediction.json").read_text())
        assert abs(rec["probability"] - p) <= 1e-5
    m, mref = (json.loads((d / "metrics.json").read_text()) for d in (out, ref))
    assert m.keys() == mref.keys() and m["n"] == mref["n"] and m["n_failed"] == mref["n_failed"]
    assert m["complete"] is True and m["n_pending"] == 0
    assert m["auc"] == pytest.approx(mref["auc"], abs=1e-9)
    assert not [p for p in out.rglob(".tmp-*")], "temporaries left behind"


def test_state_records_and_a_rerun_skips_done_slides(model_file, cohort, tmp_path, capsys):
    slides = [cohort / "normal_001.tif", cohort / "tumor_001.tif"]
    args = ["predict", *slides, "--out", tmp_path, "--model", model_file, *FAST]
    assert _cli(args) == 0
    state = read_state(tmp_path, "predict", "normal_001")
    assert state["status"] == "done" and state["error"] is None and state["pid"] == os.getpid()
    assert state["model_hash"] and state["params_hash"] and state["timings"]["total"] > 0
    assert 0 <= state["result"]["probability"] <= 1 and state["started"] < state["finished"]
    assert not list((tmp_path / STATE_DIR).glob("*.lock")), "locks must be released"
    first = (tmp_path / "normal_001" / "prediction.json").stat().st_mtime_ns
    capsys.readouterr()

    assert _cli(args) == 0
    out = capsys.readouterr().out
    assert out.count("up to date") == 2
    assert (tmp_path / "normal_001" / "prediction.json").stat().st_mtime_ns == first

    # reader threads do not change outputs (not in the hash); a threshold does: the slides are redone
    assert _cli([*args, "--reader-threads", "2"]) == 0 and capsys.readouterr().out.count("up to date") == 2
    assert _cli([*args, "--threshold", "0.4"]) == 0
    assert "up to date" not in capsys.readouterr().out
    assert read_state(tmp_path, "predict", "normal_001")["params_hash"] != state["params_hash"]


def test_evaluates_progress_lines_name_the_command(model_file, cohort, tmp_path, capsys, monkeypatch):
    """`evaluate` predicts its slides through the runner, whose lines said "predict slides: 1 of 2 through" in an
    evaluation's log."""
    monkeypatch.setattr("wsi_vssm.progress.HEARTBEAT_S", 0.02)
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide,label\n" + "".join(f"{cohort / n}.tif,{int(n.startswith('t'))}\n"
                                                  for n in ("normal_001", "tumor_001")))
    assert _cli(["evaluate", manifest, "--out", tmp_path / "o", "--model", model_file, "--bootstrap", "200",
                 "-v", *FAST]) == 0
    err = capsys.readouterr().err
    assert "evaluate slides: " in err and "evaluate: model " in err, err
    assert "predict slides" not in err and "predict: model" not in err, err


def test_a_done_slide_run_again_says_why(model_file, cohort, tmp_path, capsys):
    """A done slide whose settings differ (another model, a new version, an option) was run again with nothing
    but its usual line: hours of backbone on a real cohort, unexplained."""
    import shutil

    args = ["predict", cohort / "normal_001.tif", "--out", tmp_path, "--model", model_file, *FAST]
    assert _cli(args) == 0
    capsys.readouterr()
    assert _cli([*args, "--overlap-px", "32"]) == 0
    assert "normal_001: done before, with overlap_px 64 -> 32; running it again" in capsys.readouterr().err
    state_file = next((tmp_path / STATE_DIR).glob("normal_001.predict.json"))
    state = json.loads(state_file.read_text())
    state["params"] = {k: v for k, v in state["params"].items() if k != "version"} | {"model_hash": "older"}
    state["params_hash"] = "older"
    state_file.write_text(json.dumps(state))
    assert _cli(args) == 0
    err = capsys.readouterr().err
    assert "normal_001: done before, with another model, overlap_px 32 -> 64, version unrecorded -> " in err, err
    shutil.rmtree(tmp_path / "normal_001")
    assert _cli(args) == 0
    assert "normal_001: done before, but its outputs are incomplete; running it again" in capsys.readouterr().err
    assert _cli(args) == 0 and "running it again" not in capsys.readouterr().err  # up to date: nothing said


def test_a_slide_another_run_wrote_over_while_evaluate_worked_says_so(model_file, cohort, tmp_path, capsys,
                                                                       monkeypatch):
    """A `predict` with other options on a slide `evaluate` had done (it waited for that run's lock) left the row
    "not finished: the run ended before this slide", though this run had scored it."""
    import wsi_vssm.runs.evaluate as evaluate_mod

    out = tmp_path / "o"
    real = evaluate_mod._wait_for_other_runs

    def other_run_wrote_over(tasks, job, wait, progress):
        state_file = next((out / STATE_DIR).glob("normal_001.predict.json"))
        state = json.loads(state_file.read_text())
        state["params"] = {**state["params"], "analysis_mpp": 8.0}
        state["params_hash"] = "another run's"
        state_file.write_text(json.dumps(state))
        return real(tasks, job, wait, progress)

    monkeypatch.setattr(evaluate_mod, "_wait_for_other_runs", other_run_wrote_over)
    assert _cli(["evaluate", cohort / "reference.csv", "--out", out, "--model", model_file, "--bootstrap", "200",
                 *FAST]) == 4
    rows = {r["slide"]: r for r in _table(out)}
    assert rows["normal_001"]["status"] == "pending", rows
    assert rows["normal_001"]["error"] == ("another run wrote over its outputs with other settings (analysis_mpp "
                                           "4.0 -> 8.0) after this run had it: rerun the same command to predict it "
                                           "again"), rows["normal_001"]
    monkeypatch.setattr(evaluate_mod, "_wait_for_other_runs", real)
    assert _cli(["evaluate", cohort / "reference.csv", "--out", out, "--model", model_file, "--bootstrap", "200",
                 *FAST]) == 0  # the advice, followed
    assert {r["status"] for r in _table(out)} == {"done"}

    def outputs_deleted(tasks, job, wait, progress):  # the same settings, its folder gone: no other run to blame
        import shutil

        shutil.rmtree(out / "normal_001")
        return real(tasks, job, wait, progress)

    monkeypatch.setattr(evaluate_mod, "_wait_for_other_runs", outputs_deleted)
    assert _cli(["evaluate", cohort / "reference.csv", "--out", out, "--model", model_file, "--bootstrap", "200",
                 *FAST]) == 4
    row = {r["slide"]: r for r in _table(out)}["normal_001"]
    assert row["status"] == "pending" and "another run" not in row["error"], row


def test_evaluate_writes_the_cohort_lesions_table(model_file, cohort, tmp_path, capsys):
    """OUT/lesions.csv: every slide that ran through, its lesions.csv rows with its name in front; a slide that
    failed has none. A low cell threshold gives every slide lesions to list."""
    broken = tmp_path / "broken.svs"
    broken.write_text("not a slide")
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide,label\n" + "".join(f"{cohort / n}.tif,{int(n.startswith('t'))}\n"
                                                  for n in ("normal_001", "tumor_001")) + f"{broken},0\n")
    out = tmp_path / "o"
    assert _cli(["evaluate", manifest, "--out", out, "--model", model_file, "--bootstrap", "200",
                 "--cell-threshold", "0.05", *FAST]) == 3  # a slide failed
    with open(out / "lesions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    want = [[name, *line.split(",")] for name in ("normal_001", "tumor_001")
            for line in (out / name / "lesions.csv").read_text(encoding="utf-8").splitlines()[1:]]
    assert rows[0][:2] == ["slide", "id"] and rows[1:] == want
    assert {r[0] for r in rows[1:]} == {"normal_001", "tumor_001"}  # both listed lesions; broken has none


def test_a_rerun_leaves_no_stale_cohort_lesions_table_while_it_works(model_file, cohort, tmp_path, capsys):
    """OUT/lesions.csv of an earlier run stayed, unmarked, until the new run's end rewrote it (left alone on
    2026-12-05): a run stopped half-way left the old model's table beside the new predictions."""
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.pipeline.predict import PredictParams
    from wsi_vssm.runs.evaluate import evaluate_cohort

    out = tmp_path / "o"
    out.mkdir()
    (out / "lesions.csv").write_text("slide,id\nfrom_an_earlier_run,1\n", encoding="utf-8")
    seen = []
    params = PredictParams(device="cpu", target_mpp=4, region_px=512, overlap_px=64, reader_threads=1,
                           cell_threshold=0.05)
    evaluate_cohort(cohort, load_model(model_file), out, params, n_boot=50,
                    on_slide=lambda row: seen.append((out / "lesions.csv").exists()))
    assert seen and not any(seen)  # gone from the start: no slide of this run finished beside the old table
    text = (out / "lesions.csv").read_text(encoding="utf-8")
    assert "from_an_earlier_run" not in text and text.startswith("slide,id") and "normal_001" in text


def test_failed_slides_are_retried_only_with_retry_failed(model_file, cohort, tmp_path, capsys):
    broken = tmp_path / "broken.svs"
    broken.write_text("not a slide")
    args = ["predict", cohort / "normal_001.tif", broken, "--out", tmp_path / "o", "--model", model_file, *FAST]
    assert _cli(args) == 3
    state = read_state(tmp_path / "o", "predict", "broken")
    assert state["status"] == "failed" and "broken.svs" in state["error"] and state["error_type"]
    capsys.readouterr()

    assert _cli(args) == 3
    err = capsys.readouterr().err
    assert "earlier run" in err and "--retry-failed" in err
    assert read_state(tmp_path / "o", "predict", "broken")["finished"] == state["finished"]  # not run again

    assert _cli([*args, "--retry-failed"]) == 3
    assert read_state(tmp_path / "o", "predict", "broken")["finished"] != state["finished"]


@pytest.mark.parametrize("error", [MemoryError("Unable to allocate 128. MiB for an array"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 1 GB"),
                                   RuntimeError("can't start new thread"),
                                   OSError(12, "Cannot allocate memory")])
def test_out_of_memory_is_said_as_such_and_retried_unasked(model_file, cohort, tmp_path, capsys, monkeypatch,
                                                           error):
    """Under a memory limit every slide was recorded as "unexpected MemoryError ... (a bug: please report it)",
    and a rerun needed --retry-failed. A slide the machine could not hold is not a bug nor the slide's fault."""
    from wsi_vssm.pipeline import extract

    real = extract.extract_slide

    def hungry(slide, *a, **k):
        if slide.name == "tumor_001":
            raise error
        return real(slide, *a, **k)

    monkeypatch.setattr(extract, "extract_slide", hungry)
    args = ["predict", cohort / "normal_001.tif", cohort / "tumor_001.tif", "--out", tmp_path / "o", "--model",
            model_file, *FAST]
    assert _cli(args) == 3
    err = capsys.readouterr().err
    state = read_state(tmp_path / "o", "predict", "tumor_001")
    assert state["error_type"] == "OutOfMemory" and "out of memory" in state["error"] and "a bug" not in err
    assert "tumor_001.tif: out of memory" in err and "lower --region-px" in err
    assert read_state(tmp_path / "o", "predict", "normal_001")["status"] == "done"
    monkeypatch.setattr(extract, "extract_slide", real)
    assert _cli(args) == 0  # tried again without --retry-failed
    assert read_state(tmp_path / "o", "predict", "tumor_001")["status"] == "done"


def test_a_slide_failed_for_a_missing_package_is_tried_again_unasked(model_file, cohort, tmp_path, capsys,
                                                                       monkeypatch):
    """A cohort run without numba failed every slide, and the rerun after installing it replayed each failure
    ("failed in an earlier run; --retry-failed tries again"): a missing package is the machine's, not the slide's."""
    from wsi_vssm.errors import MissingDependency
    from wsi_vssm.pipeline import extract

    real = extract.extract_slide

    def without_numba(slide, *a, **k):
        if slide.name == "tumor_001":
            raise MissingDependency("numba (the fast CPU scan)", "pip install numba")
        return real(slide, *a, **k)

    monkeypatch.setattr(extract, "extract_slide", without_numba)
    args = ["predict", cohort / "normal_001.tif", cohort / "tumor_001.tif", "--out", tmp_path / "o", "--model",
            model_file, *FAST]
    assert _cli(args) == 3
    assert "tumor_001.tif: numba (the fast CPU scan) is not installed" in capsys.readouterr().err
    monkeypatch.setattr(extract, "extract_slide", real)
    assert _cli(args) == 0  # tried again without --retry-failed
    assert read_state(tmp_path / "o", "predict", "tumor_001")["status"] == "done"


def test_the_command_line_says_out_of_memory_and_a_library_that_cannot_load_in_one_line(tmp_path, capsys,
                                                                                         monkeypatch):
    from wsi_vssm.commands import info

    for error, words in ((MemoryError(), "wsi-vssm: error: out of memory; free memory"),
                         (ImportError("libqhull.so: failed to map segment from shared object"),
                          "wsi-vssm: error: a library failed to load: libqhull.so: failed to map segment")):
        def fail(*a, _error=error, **k):
            raise _error

        monkeypatch.setattr(info, "slide_info", fail)
        assert _cli(["info", tmp_path / "x.tif"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(words) and err.count("\n") == 1 and "Traceback" not in err, err
    own = ImportError("cannot import name 'x' from 'wsi_vssm.y'", name="wsi_vssm.y")  # our bug, not a library's

    def broken(*a, **k):
        raise own

    monkeypatch.setattr(info, "slide_info", broken)
    with pytest.raises(ImportError):
        _cli(["info", tmp_path / "x.tif"])


def test_a_live_lock_skips_the_slide_and_a_stale_one_is_broken(model_file, cohort, tmp_path, capsys):
    out = tmp_path / "o"
    (out / STATE_DIR).mkdir(parents=True)
    lock = out / STATE_DIR / "normal_001.predict.lock"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "time": "t"}))
        args = ["predict", cohort / "normal_001.tif", cohort / "normal_002.tif", "--out", out, "--model",
                model_file, *FAST]
        assert _cli([*args, "--wait-locked", "0"]) == 4  # not done, not failed: incomplete
        err = capsys.readouterr().err
        assert "normal_001: locked by another run" in err and f"pid {other.pid}" in err
        assert "still being done by another run" in err
        assert read_state(out, "predict", "normal_001") is None and lock.exists()
        assert read_state(out, "predict", "normal_002")["status"] == "done"
    finally:
        other.kill()
        other.wait()
    assert _cli([*args, "--wait-locked", "0"]) == 0  # the holder is gone: its lock is stale and broken
    assert read_state(out, "predict", "normal_001")["status"] == "done" and not lock.exists()


def test_lock_is_exclusive():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, STATE_DIR))
        a, b = SlideLock(d, "predict", "s"), SlideLock(d, "predict", "s")
        assert a.acquire() and not b.acquire() and b.holder["pid"] == os.getpid()
        a.release()
        assert b.acquire()
        b.release()


def test_a_half_written_lock_of_a_killed_run_is_broken_once_old(tmp_path):
    """A run SIGKILLed between creating its lock and writing it leaves an empty lock. Its age changed between the
    two reads that breaking compares, so it was never broken: the slide stayed locked and a waiting rerun spun
    (the SIGKILL test below hit it once in CI)."""
    (tmp_path / STATE_DIR).mkdir()
    lock_file = tmp_path / STATE_DIR / "s.predict.lock"
    lock_file.write_text("")
    young = SlideLock(tmp_path, "predict", "s")
    assert not young.acquire() and young.holder["pid"] is None  # a live run may be writing it right now
    old = time.time() - 120
    os.utime(lock_file, (old, old))
    lock = SlideLock(tmp_path, "predict", "s")
    assert lock.acquire() and json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()


def test_sigkill_at_any_moment_then_rerun_equals_an_uninterrupted_run(model_file, cohort, reference, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "wsi_vssm", "evaluate", str(cohort), "--out", str(out), "--model",
           str(model_file), "--bootstrap", "200", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # first kill: as soon as a slide is running (mid-slide); second: once the table shows the first slide done
    for ready in (lambda: any(s and s["status"] == "running" for s in
                              (read_state(out, "predict", n) for n in ("normal_001", "normal_002", "tumor_001"))),
                  lambda: "done" in [r["status"] for r in _table(out)]):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not ready():
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    # the killed run's table lists every slide; those not through are `pending` rows without a probability
    table = _table(out)
    assert sorted(r["slide"] for r in table) == ["normal_001", "normal_002", "tumor_001"]
    assert {r["status"] for r in table} <= {"done", "pending"} and "pending" in {r["status"] for r in table}
    assert all(r["probability"] == "" and r["error"] for r in table if r["status"] == "pending")
    assert _cli(["evaluate", cohort, "--out", out, "--model", model_file, "--bootstrap", "200", *FAST]) == 0
    _same_results(out, reference)
    assert not list((out / STATE_DIR).glob("*.lock"))


def test_sigterm_unwinds_like_ctrl_c_and_the_rerun_resumes(model_file, cohort, reference, tmp_path):
    """A batch scheduler's SIGTERM (walltime, preemption): locks released, exit 143 with one line, then resume."""
    out = tmp_path / "termed"
    cmd = [sys.executable, "-m", "wsi_vssm", "evaluate", str(cohort), "--out", str(out), "--model",
           str(model_file), "--bootstrap", "200", *FAST]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # a cold start on a loaded 2-core machine (imports, kernel compiles) is slow
    running = False
    while proc.poll() is None and time.monotonic() < deadline and not (running := any(
            s and s["status"] == "running" for s in
            (read_state(out, "predict", n) for n in ("normal_001", "normal_002", "tumor_001")))):
        time.sleep(0.02)
    if not running:  # say which way it went wrong, not a confusing exit code
        ended = proc.poll() is not None
        proc.kill()
        err = proc.communicate()[1]
        pytest.fail(f"the run never reached a slide: {'it ended: ' + err if ended else 'still starting'}")
    os.kill(proc.pid, signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last == "wsi-vssm: terminated (SIGTERM); finished slides are kept: rerun the same command to resume"
    assert not list((out / STATE_DIR).glob("*.lock")), "the slide in flight keeps no lock"
    assert _cli(["evaluate", cohort, "--out", out, "--model", model_file, "--bootstrap", "200", *FAST]) == 0
    _same_results(out, reference)


def test_running_state_and_temporaries_of_a_killed_run_are_redone(model_file, cohort, reference, tmp_path):
    import shutil

    out = tmp_path / "o"
    shutil.copytree(reference, out)
    state = read_state(out, "predict", "tumor_001")
    from wsi_vssm.runs.state import write_state

    write_state(out, "predict", "tumor_001", {**{k: v for k, v in state.items() if k != "format"},
                                              "status": "running"})
    (out / "tumor_001" / ".tmp-overlay.png.x").write_bytes(b"half")
    (out / "normal_002" / "prediction.json").unlink()  # a done state whose outputs are gone is redone too
    assert _cli(["evaluate", cohort, "--out", out, "--model", model_file, "--bootstrap", "200", *FAST]) == 0
    assert read_state(out, "predict", "tumor_001")["finished"] != state["finished"]
    _same_results(out, reference)


def test_dask_local_cluster_equals_the_serial_run(model_file, cohort, reference, tmp_path):
    out = tmp_path / "dask"
    environment = dict(os.environ)
    assert _cli(["evaluate", cohort, "--out", out, "--model", model_file, "--bootstrap", "200", "--workers", 2,
                 *FAST]) == 0
    # distributed's nanny had left its workers' PYTHONHASHSEED, OPENBLAS_NUM_THREADS, ... in this process
    assert dict(os.environ) == environment, set(os.environ.items()) ^ set(environment.items())
    _same_results(out, reference)
    pids = {read_state(out, "predict", n)["worker"]["pid"] for n in ("normal_001", "normal_002", "tumor_001")}
    assert os.getpid() not in pids  # the slides ran in the cluster's worker processes


class _Finished:
    """A Dask future whose slide has run (in this process) and finished."""

    status = "finished"

    def __init__(self, key, value):
        self.key, self._value = key, value

    def result(self):
        return self._value


def test_dask_ctrl_c_keeps_the_slides_the_workers_finished(model_file, cohort, reference, tmp_path, monkeypatch,
                                                           capsys):
    """Ctrl-C while the driver waits: slides whose futures had finished kept state `running` and were redone."""
    import distributed

    from wsi_vssm.runs import dask as run_dask

    monkeypatch.setattr(run_dask, "_THREADS_SET", True)  # the "workers" are this process: keep its torch threads

    class Client:
        def scheduler_info(self):
            return {"workers": {"w": {}}}  # one worker: two slides in flight

        def submit(self, fn, *args, pure, key):
            return _Finished(key, fn(*args))  # runs the slide now: both in-flight slides finish

        def close(self):
            pass

    class InterruptAfterFirst:  # hands back the first finished slide, then Ctrl-C arrives
        def __init__(self):
            self.futures = []

        def add(self, fut):
            self.futures.append(fut)

        def __iter__(self):
            yield self.futures[0]
            raise KeyboardInterrupt

    monkeypatch.setattr(run_dask, "_client", lambda opts, progress: (Client(), None))
    monkeypatch.setattr(distributed, "as_completed", InterruptAfterFirst)
    out = tmp_path / "dask"
    args = ["evaluate", cohort, "--out", out, "--model", model_file, "--bootstrap", "200", *FAST]
    assert _cli([*args, "--workers", 1]) == 130
    statuses = {n: read_state(out, "predict", n)["status"] for n in ("normal_001", "normal_002", "tumor_001")}
    # one gathered before the interrupt, two finished but not gathered yet (the next was submitted meanwhile)
    assert set(statuses.values()) == {"done"}, statuses
    assert not list((out / STATE_DIR).glob("*.lock"))
    monkeypatch.undo()
    assert _cli(args) == 0
    assert capsys.readouterr().out.count("up to date, done before") == 3  # nothing redone
    _same_results(out, reference)


def test_a_dead_dask_workers_half_written_files_are_cleared_with_its_failure(model_file, cohort, tmp_path,
                                                                              monkeypatch):
    """The slide is recorded failed and its lock released, so no later run looks for what the worker was writing."""
    import distributed

    from wsi_vssm.runs import dask as run_dask

    class Died:
        status = "error"

        def __init__(self, key):
            self.key = key

        def result(self):
            raise RuntimeError("KilledWorker: the worker died")

    class Client:
        def scheduler_info(self):
            return {"workers": {"w": {}}}

        def submit(self, fn, job, task, pure, key):  # the worker got as far as a temporary file, then died
            folder = tmp_path / "dask" / task.name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / ".tmp-overlay.png.k3x9q_a1").write_bytes(b"half")
            return Died(key)

        def close(self):
            pass

    class Completed:
        def __init__(self):
            self.futures = []

        def add(self, fut):
            self.futures.append(fut)

        def __iter__(self):
            while self.futures:
                yield self.futures.pop(0)

    monkeypatch.setattr(run_dask, "_client", lambda opts, progress: (Client(), None))
    monkeypatch.setattr(distributed, "as_completed", Completed)
    out = tmp_path / "dask"
    assert _cli(["evaluate", cohort, "--out", out, "--model", model_file, "--bootstrap", "100", *FAST,
                 "--workers", 1]) == 3
    assert {read_state(out, "predict", n)["status"] for n in ("normal_001", "normal_002", "tumor_001")} == {"failed"}
    assert not list(out.rglob(".tmp-*")) and not list((out / STATE_DIR).glob("*.lock"))


def test_a_scheduler_without_workers_is_said_not_waited_on_in_silence():
    """--scheduler whose cluster has no worker yet: a warning says why nothing moves (not an error: an adaptive
    cluster starts workers only once tasks arrive); with a worker there, no warning."""
    import io
    from types import SimpleNamespace

    from distributed import LocalCluster

    from wsi_vssm.progress import Progress
    from wsi_vssm.runs import dask as run_dask

    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        said = {}
        for workers in (0, 1):
            if workers:
                cluster.scale(1)
                cluster.wait_for_workers(1, timeout=30)
            err = io.StringIO()
            client, own = run_dask._client(SimpleNamespace(scheduler=cluster.scheduler_address, workers=None),
                                           Progress(err=err, tty=False))
            client.close()
            assert own is None  # an existing cluster: ours to use, not to close
            said[workers] = err.getvalue()
    assert "no Dask worker has joined yet" in said[0] and cluster.scheduler_address in said[0]
    assert said[1] == ""


def test_dask_split_regions_equal_the_serial_run(model_file, cohort, tmp_path):
    """A slide of more regions than --split-regions runs as region-batch tasks on the cluster's workers; the
    driver assembles its cells and finishes it: the same probabilities and heatmaps as a serial run."""
    import numpy as np

    from wsi_vssm.outputs.heatmap import read_heatmap_zarr

    names = ("tumor_001",)
    # 512 px at the analysis mpp in regions of 256 px stepping 192: a 3 x 3 grid, run as tasks of 2 regions
    geometry = ["--device", "cpu", "--target-mpp", "4", "--region-px", "256", "--overlap-px", "64",
                "--reader-threads", "1"]
    slides = [cohort / f"{n}.tif" for n in names]
    serial, split = tmp_path / "serial", tmp_path / "split"
    assert _cli(["predict", *slides, "--out", serial, "--model", model_file, *geometry]) == 0
    assert _cli(["predict", *slides, "--out", split, "--model", model_file, *geometry, "--workers", 2,
                 "--split-regions", 2]) == 0
    for name in names:
        state = read_state(split, "predict", name)
        assert state["status"] == "done" and state["worker"]["split"]["region_tasks"] >= 2, name
        assert os.getpid() not in state["worker"]["split"]["pids"]  # the regions ran in the worker processes
        want, got = (json.loads((d / name / "prediction.json").read_text()) for d in (serial, split))
        assert want["probability"] is not None and abs(got["probability"] - want["probability"]) <= 1e-5
        assert _n_cells(got) == _n_cells(want)
        hw, hg = (np.asarray(read_heatmap_zarr(d / name / "heatmap.ome.zarr")[0]) for d in (serial, split))
        assert hw.shape == hg.shape and np.array_equal(np.isnan(hw), np.isnan(hg))
        assert np.nanmax(np.abs(hw - hg)) <= 1e-5
        assert read_state(serial, "predict", name)["params_hash"] == state["params_hash"]
    assert not list((split / STATE_DIR).glob("*.lock"))


def test_two_evaluations_at_once_end_with_the_full_report(model_file, cohort, reference, tmp_path):
    """Two runs started together on one cohort and one OUT share the slides through the locks; each then waits
    for the slides the other holds and builds the report from every slide's state: both end with the report of
    a single run, and exit 0."""
    out = tmp_path / "shared"
    cmd = [sys.executable, "-m", "wsi_vssm", "evaluate", str(cohort), "--out", str(out), "--model",
           str(model_file), "--bootstrap", "200", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr
        assert "n=3, failed=0 ->" in stdout and "locked" not in stdout
    assert results[0][0].splitlines()[-1] == results[1][0].splitlines()[-1]  # the same AUC line
    _same_results(out, reference)
    assert not list((out / STATE_DIR).glob("*.lock"))
    workers = {read_state(out, "predict", n)["pid"] for n in ("normal_001", "normal_002", "tumor_001")}
    assert workers <= {p.pid for p in procs}  # every slide done once, by one of the two runs


def _copy_slide_result(src, out, name) -> None:
    import shutil

    shutil.copytree(src / name, out / name)
    shutil.copy(src / STATE_DIR / f"{name}.predict.json", out / STATE_DIR / f"{name}.predict.json")


def test_a_slide_locked_by_another_run_is_waited_for_then_counted(model_file, cohort, reference, tmp_path):
    """While another live run holds a slide, this run waits for it (--wait-locked); when that run finishes the
    slide, the report counts it: the same report as a single run."""
    import threading

    out = tmp_path / "o"
    (out / STATE_DIR).mkdir(parents=True)
    lock = out / STATE_DIR / "tumor_001.predict.lock"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the "other run"
    lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "time": "t"}))

    def other_run_finishes() -> None:
        while (read_state(out, "predict", "normal_002") or {}).get("status") != "done":
            time.sleep(0.05)
        time.sleep(1.0)  # this run is waiting by now
        _copy_slide_result(reference, out, "tumor_001")
        lock.unlink()

    helper = threading.Thread(target=other_run_finishes, daemon=True)
    helper.start()
    try:
        assert _cli(["evaluate", cohort, "--out", out, "--model", model_file, "--bootstrap", "200", *FAST,
                     "--wait-locked", "120"]) == 0
    finally:
        helper.join(5)
        other.kill()
        other.wait()
    _same_results(out, reference)
    assert read_state(out, "predict", "tumor_001")["pid"] == read_state(reference, "predict", "tumor_001")["pid"]


def test_a_slide_still_locked_is_in_progress_never_failed(model_file, cohort, reference, tmp_path, capsys):
    out = tmp_path / "o"
    (out / STATE_DIR).mkdir(parents=True)
    lock = out / STATE_DIR / "tumor_001.predict.lock"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "time": "t"}))
        t0 = time.monotonic()
        code = _cli(["evaluate", cohort, "--out", out, "--model", model_file, "--bootstrap", "200", *FAST,
                     "--wait-locked", "1"])
        assert code == 4 and time.monotonic() - t0 >= 1.0
    finally:
        other.kill()
        other.wait()
    captured = capsys.readouterr()
    assert "not finished=1 (incomplete)" in captured.out and "report is incomplete" in captured.err
    assert "1 slide(s) still being done by another run: rerun when it has finished" in captured.err
    assert "no finished outputs" not in captured.err
    rows = {r["slide"]: r for r in _table(out)}
    assert rows["tumor_001"]["status"] == "in_progress" and rows["tumor_001"]["probability"] == ""
    assert f"pid {other.pid}" in rows["tumor_001"]["error"]
    assert rows["normal_001"]["status"] == rows["normal_002"]["status"] == "done"
    m = json.loads((out / "metrics.json").read_text())
    assert (m["n"], m["n_failed"], m["n_pending"], m["complete"]) == (2, 0, 1, False) and "stale" not in m
    # the holder is gone: a rerun does the slide and completes the report
    assert _cli(["evaluate", cohort, "--out", out, "--model", model_file, "--bootstrap", "200", *FAST]) == 0
    _same_results(out, reference)


def test_an_earlier_report_is_marked_incomplete_while_a_run_works(reference, tmp_path):
    import shutil

    from wsi_vssm.runs.evaluate import _start_report

    out = tmp_path / "o"
    shutil.copytree(reference, out)
    assert json.loads((out / "metrics.json").read_text())["complete"] is True
    (out / ".tmp-predictions.csv.x").write_text("half")  # a killed run's half-written table
    _start_report(out)
    m = json.loads((out / "metrics.json").read_text())
    # an interrupted rerun kept the earlier run's counts and AUC under `complete: false` alone
    assert m["complete"] is False and "an earlier run" in m["stale"]
    assert not (out / ".tmp-predictions.csv.x").exists() and not list((out / STATE_DIR).glob("*.lock"))


def test_an_interrupt_as_a_slide_finishes_leaves_a_table_that_has_it(model_file, cohort, tmp_path, monkeypatch):
    """Ctrl-C landing after a slide's state said done but before its row was written left no predictions.csv
    at all (2 of 2 tries in a probe). The interrupted run's table now comes from the states on disk."""
    from wsi_vssm.runs import runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "report_outcome", interrupted)  # the first slide's line: its state is done
    out = tmp_path / "o"
    assert _cli(["evaluate", cohort, "--out", out, "--model", model_file, "--bootstrap", "200", *FAST]) == 130
    rows = {r["slide"]: r["status"] for r in _table(out)}
    assert rows == {"normal_001": "done", "normal_002": "pending", "tumor_001": "pending"}, rows
    assert not (out / "metrics.json").exists()  # a partial run writes no figures


def test_an_interrupted_run_shows_known_failures_as_failed(model_file, cohort, tmp_path, monkeypatch):
    """An interrupted rerun listed a slide that had failed before (same file, same parameters: the run would only
    have reported it again) as `pending`, "rerun the same command", beside the done slides kept as done."""
    import shutil

    from wsi_vssm.runs import runner

    c = tmp_path / "c"
    shutil.copytree(cohort, c)
    bad = c / "tumor_001.tif"
    bad.write_bytes(bad.read_bytes()[:3000])
    out = tmp_path / "o"
    args = ["evaluate", c, "--out", out, "--model", model_file, "--bootstrap", "200", *FAST]
    assert _cli(args) == 3

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "report_outcome", interrupted)  # at the first slide (skipped: up to date)
    assert _cli(args) == 130
    rows = {r["slide"]: r for r in _table(out)}
    assert {k: r["status"] for k, r in rows.items()} == {
        "normal_001": "done", "normal_002": "done", "tumor_001": "failed"}, rows
    assert "--retry-failed" in rows["tumor_001"]["error"]
    assert _cli([*args, "--retry-failed"]) == 130  # that run would have tried it again: not through yet
    assert {r["slide"]: r["status"] for r in _table(out)}["tumor_001"] == "pending"


def test_an_interrupted_overwrite_run_is_resumed_by_the_same_command(model_file, cohort, tmp_path, monkeypatch):
    """"interrupted; ... rerun the same command to resume": the same `--overwrite` command redid every slide again,
    so a preempted and requeued job never finished. The --overwrite run's start is kept until it has been through
    every slide."""
    from wsi_vssm.runs import runner

    slides = [cohort / "normal_001.tif", cohort / "tumor_001.tif"]
    args = ["predict", *slides, "--out", tmp_path, "--model", model_file, *FAST]

    def started(name):
        return read_state(tmp_path, "predict", name)["started"]

    assert _cli(args) == 0
    before = {n: started(n) for n in ("normal_001", "tumor_001")}
    real = runner.report_outcome

    def interrupted(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "report_outcome", interrupted)  # stopped once the first slide is redone
    assert _cli([*args, "--overwrite"]) == 130
    redone = started("normal_001")
    assert redone > before["normal_001"] and started("tumor_001") == before["tumor_001"]
    monkeypatch.setattr(runner, "report_outcome", real)
    assert _cli([*args, "--overwrite"]) == 0  # the same command: goes on
    assert started("normal_001") == redone and started("tumor_001") > before["tumor_001"]
    assert not list((tmp_path / STATE_DIR).glob("overwrite-run.*"))  # through every slide: done with it
    assert _cli([*args, "--overwrite"]) == 0 and started("normal_001") > redone  # a new --overwrite redoes all
    # an interrupted --overwrite that a plain run then finishes is given up: a later --overwrite redoes all again
    monkeypatch.setattr(runner, "report_outcome", interrupted)
    assert _cli([*args, "--overwrite"]) == 130
    monkeypatch.setattr(runner, "report_outcome", real)
    assert _cli(args) == 0 and not list((tmp_path / STATE_DIR).glob("overwrite-run.*"))
    last = started("normal_001")
    assert _cli([*args, "--overwrite"]) == 0 and started("normal_001") > last


def test_per_slide_overwrite_runs_in_one_out_keep_their_own_resume_points(model_file, cohort, tmp_path,
                                                                          monkeypatch):
    """Workflow managers run one task per slide into a shared OUT. A plain run of slide x deleted the --overwrite
    marker of an interrupted run of slide y (y's rerun then redid from scratch), and `--overwrite x` took y's
    start time for its own."""
    from wsi_vssm.runs import runner

    def args(name, *more):
        return ["predict", cohort / f"{name}.tif", "--out", tmp_path, "--model", model_file, *FAST, *more]

    def started(name):
        return read_state(tmp_path, "predict", name)["started"]

    assert _cli(args("normal_001")) == 0 and _cli(args("tumor_001")) == 0
    real = runner.report_outcome

    def interrupted(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "report_outcome", interrupted)
    assert _cli(args("tumor_001", "--overwrite")) == 130  # y redone, then the run stopped before its end
    redone = started("tumor_001")
    monkeypatch.setattr(runner, "report_outcome", real)
    assert _cli(args("normal_001")) == 0  # another task, plain, through all of its slides
    assert len(list((tmp_path / STATE_DIR).glob("overwrite-run.predict.*"))) == 1  # y's resume point stays
    first = started("normal_001")
    assert _cli(args("normal_001", "--overwrite")) == 0 and started("normal_001") > first  # its own start
    assert _cli(args("tumor_001", "--overwrite")) == 0 and started("tumor_001") == redone  # y goes on
    assert not list((tmp_path / STATE_DIR).glob("overwrite-run.*"))


def test_an_overwrite_run_resumes_over_a_folder_that_gained_a_slide(model_file, cohort, tmp_path, monkeypatch):
    """With one marker per set of slides, an interrupted `predict DIR --overwrite` whose folder then gained a slide
    redid everything again: the marker of a subset of the slides, same parameters, is taken over."""
    import shutil

    from wsi_vssm.runs import runner

    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("normal_001", "tumor_001"):
        shutil.copy(cohort / f"{name}.tif", slides / f"{name}.tif")
    out = tmp_path / "o"
    args = ["predict", slides, "--out", out, "--model", model_file, *FAST, "--overwrite"]
    assert _cli(args[:-1]) == 0
    real = runner.report_outcome

    def interrupted(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "report_outcome", interrupted)
    assert _cli(args) == 130  # the first slide redone
    redone = read_state(out, "predict", "normal_001")["started"]
    monkeypatch.setattr(runner, "report_outcome", real)
    shutil.copy(cohort / "normal_002.tif", slides / "normal_002.tif")
    assert _cli(args) == 0
    assert read_state(out, "predict", "normal_001")["started"] == redone  # kept: the run went on
    assert read_state(out, "predict", "normal_002")["status"] == "done"
    assert not list((out / STATE_DIR).glob("overwrite-run.*"))


def test_a_slide_named_like_the_overwrite_marker_keeps_its_state(model_file, cohort, tmp_path):
    """The marker glob `overwrite-run.predict.*` took a slide `overwrite-run`'s state and lock files for markers
    and deleted them after every run: the slide was never up to date."""
    import shutil

    slide = tmp_path / "overwrite-run.tif"
    shutil.copy(cohort / "normal_001.tif", slide)
    args = ["predict", slide, "--out", tmp_path / "o", "--model", model_file, *FAST]
    assert _cli(args) == 0 and _cli(args) == 0
    assert read_state(tmp_path / "o", "predict", "overwrite-run")["status"] == "done"


def test_outputs_of_an_older_format_are_remade_from_the_saved_heatmap(model_file, cohort, tmp_path, monkeypatch,
                                                                       capsys):
    """A cohort finished before contours.geojson held one feature per lesion was "up to date" after the change
    (the package version is the same between commits of a checkout) and kept its old files: a done slide whose
    state records an older outputs format has its files remade from its saved heatmap, no backbone."""
    from wsi_vssm.pipeline import predict as predict_module
    from wsi_vssm.runs.state import params_hash, read_state, write_state

    args = ["predict", cohort / "tumor_001.tif", "--model", model_file, *FAST, "--out", tmp_path / "o"]
    assert _cli(args) == 0
    want = (tmp_path / "o" / "tumor_001" / "contours.geojson").read_bytes()
    state = read_state(tmp_path / "o", "predict", "tumor_001")
    state["params"].pop("outputs_format")  # as a run before the format was recorded wrote it
    state["params_hash"] = params_hash(state["params"])
    write_state(tmp_path / "o", "predict", "tumor_001", state)
    (tmp_path / "o" / "tumor_001" / "contours.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    capsys.readouterr()

    def no_backbone(*a, **k):
        raise AssertionError("predicted again")

    monkeypatch.setattr(predict_module, "predict_slide", no_backbone)
    assert _cli(args) == 0
    assert "tumor_001: its output files are of an older format" in capsys.readouterr().err
    assert (tmp_path / "o" / "tumor_001" / "contours.geojson").read_bytes() == want
    assert _cli(args) == 0 and "tumor_001: up to date" in capsys.readouterr().out  # and now it is


def test_new_thresholds_alone_remake_done_slides_without_the_backbone(model_file, cohort, tmp_path, monkeypatch,
                                                                        capsys):
    """`evaluate --threshold T` (or `--cell-threshold`) on a finished cohort predicted every slide again (48.5 s
    against 2.7 s for 80 tiny slides; hours on a real cohort), though thresholds act only after the cell
    probabilities. Now the outputs are made again from the saved heatmap, byte for byte what a fresh run writes
    (its timings aside)."""
    from wsi_vssm.pipeline import predict as predict_module

    slides = [cohort / "normal_001.tif", cohort / "tumor_001.tif"]
    base = ["predict", *slides, "--model", model_file, *FAST]
    assert _cli([*base, "--out", tmp_path / "o"]) == 0
    again = ["--threshold", "0.001", "--cell-threshold", "0.45", "--lesion-merge-cells", "1"]
    assert _cli([*base, "--out", tmp_path / "fresh", *again]) == 0
    capsys.readouterr()

    def no_backbone(*a, **k):
        raise AssertionError("predicted again")

    monkeypatch.setattr(predict_module, "predict_slide", no_backbone)
    assert _cli([*base, "--out", tmp_path / "o", *again]) == 0
    err = capsys.readouterr().err
    assert err.count("only thresholds changed") == 2, err
    for name in ("normal_001", "tumor_001"):
        got, want = (json.loads((tmp_path / d / name / "prediction.json").read_text()) for d in ("o", "fresh"))
        assert got["label"] == 1 and got["slide_threshold"] == 0.001 and got["cell_threshold"] == 0.45
        assert "relabel" in got["timings"]
        assert {k: v for k, v in got.items() if k != "timings"} == {k: v for k, v in want.items() if k != "timings"}
        zarr_files = sorted(str(p.relative_to(tmp_path / "o" / name))
                            for p in (tmp_path / "o" / name / "heatmap.ome.zarr").rglob("*") if p.is_file())
        for output in ("overlay.png", "lesions.csv", "contours.geojson", *zarr_files):
            assert (tmp_path / "o" / name / output).read_bytes() == (tmp_path / "fresh" / name / output).read_bytes()
        assert read_state(tmp_path / "o", "predict", name)["params"]["cell_threshold"] == 0.45
    assert _cli([*base, "--out", tmp_path / "o", *again]) == 0  # now up to date
    capsys.readouterr()  # test-time augmentation changes the cell probabilities: the slides are predicted again
    assert _cli([*base, "--out", tmp_path / "o", *again, "--tta"]) == 3
    assert capsys.readouterr().err.count("predicted again") == 2


def test_cells_geojson_is_the_heatmaps_tissue_cells_added_without_the_backbone_and_kept(
        model_file, cohort, tmp_path, monkeypatch, capsys):
    """`--cells-geojson` writes every tissue cell of heatmap level 0 as a QuPath tile with its probability, the
    cells at the cell threshold classed Tumor. Asked for on a finished run (or lost from a folder), it is made
    from the saved heatmap without the backbone, the other files unchanged; a later run without the option
    (`evaluate` on a predicted folder) keeps it, remade with the rest when the thresholds change. It is not in the
    parameter hash, so runs made before the option keep theirs."""
    from wsi_vssm.outputs.heatmap import read_heatmap_zarr
    from wsi_vssm.pipeline import predict as predict_module
    from wsi_vssm.runs.state import read_state

    base = ["predict", cohort / "tumor_001.tif", "--model", model_file, *FAST, "--out", tmp_path / "o"]
    folder = tmp_path / "o" / "tumor_001"
    assert _cli(base) == 0 and not (folder / "cells.geojson").exists()
    hashed = read_state(tmp_path / "o", "predict", "tumor_001")["params_hash"]
    others = {n: (folder / n).read_bytes() for n in ("overlay.png", "lesions.csv", "contours.geojson")}
    capsys.readouterr()

    def no_backbone(*a, **k):
        raise AssertionError("predicted again")

    def tiles():
        doc = json.loads((folder / "cells.geojson").read_text())
        prob, _, _, attrs = read_heatmap_zarr(folder / "heatmap.ome.zarr")
        got = np.array([f["properties"]["measurements"]["Tumor probability"] for f in doc["features"]], np.float32)
        assert len(got) == int((prob > 0).sum()) > 0 and np.array_equal(np.sort(got), np.sort(prob[prob > 0]))
        assert doc["wsi_vssm"]["slide"] == "tumor_001"
        return doc, prob, attrs["wsi_vssm"]["cell_threshold"]

    with monkeypatch.context() as mp:
        mp.setattr(predict_module, "predict_slide", no_backbone)
        assert _cli([*base, "--cells-geojson"]) == 0
        assert "tumor_001: cells.geojson is asked for" in capsys.readouterr().err
        doc, prob, cell_t = tiles()
        assert sum("classification" in f["properties"] for f in doc["features"]) == int((prob >= cell_t).sum())
        assert doc["wsi_vssm"]["cell_threshold"] == cell_t
        assert all((folder / n).read_bytes() == b for n, b in others.items())
        assert read_state(tmp_path / "o", "predict", "tumor_001")["params_hash"] == hashed
        assert json.loads((folder / "prediction.json").read_text())["parameters"]["cells_geojson"] is True
        assert _cli([*base, "--cells-geojson"]) == 0 and "tumor_001: up to date" in capsys.readouterr().out
        kept = (folder / "cells.geojson").read_bytes()
        assert _cli(base) == 0 and "tumor_001: up to date" in capsys.readouterr().out  # without it: kept
        assert (folder / "cells.geojson").read_bytes() == kept
        assert _cli([*base, "--cell-threshold", "0.3"]) == 0  # new thresholds: remade with the rest
        said = capsys.readouterr()
        assert "only thresholds changed" in said.err
        assert "s, made again from the saved heatmap] ->" in said.out, said.out  # was "[n cells, 0.0 s]"
        doc, prob, cell_t = tiles()
        assert cell_t == 0.3 and doc["wsi_vssm"]["cell_threshold"] == 0.3
        assert sum("classification" in f["properties"] for f in doc["features"]) == int((prob >= 0.3).sum())
    fresh = tmp_path / "fresh"  # a prediction with the option writes the file the remake wrote
    assert _cli([*base[:-1], fresh, "--cells-geojson", "--cell-threshold", "0.3"]) == 0
    assert (fresh / "tumor_001" / "cells.geojson").read_bytes() == (folder / "cells.geojson").read_bytes()
    (folder / "cells.geojson").unlink()  # lost: made again from the heatmap
    capsys.readouterr()
    with monkeypatch.context() as mp:
        mp.setattr(predict_module, "predict_slide", no_backbone)
        assert _cli([*base, "--cells-geojson", "--cell-threshold", "0.3"]) == 0
        assert "tumor_001: cells.geojson is asked for" in capsys.readouterr().err
    assert (folder / "cells.geojson").read_bytes() == (fresh / "tumor_001" / "cells.geojson").read_bytes()


def test_the_interrupted_table_keeps_this_runs_outcomes_and_takes_only_this_slides_state(tmp_path):
    """The interrupted table read every unrecorded slide's state on disk: a state of another slide of the same
    name (another cohort run into the same folder, which this run had failed in triage) came out `done` with
    that slide's probability."""
    from types import SimpleNamespace

    from wsi_vssm.runs.cohort_table import InterimTable, interrupted_table
    from wsi_vssm.runs.execute import Outcome, SlideTask
    from wsi_vssm.runs.state import write_state

    out = tmp_path / "o"
    out.mkdir()
    crows = [SimpleNamespace(name=n, label=lab) for n, lab in (("a", 1), ("b", 0), ("c", 0))]
    tasks = [SlideTask(n, str(tmp_path / f"{n}.tif")) for n in ("a", "b", "c")]
    job = SimpleNamespace(out=out, kind="predict", params_hash="h", task_hash=lambda task: "h", fallback_mpp=None,
                          outputs_ok=lambda name: True)
    done = {"status": "done", "params_hash": "h", "result": {"probability": 0.93, "in_domain": True}}
    write_state(out, "predict", "a", {**done, "abspath": str(tmp_path / "elsewhere" / "a.tif")})  # another slide
    write_state(out, "predict", "b", {**done, "abspath": str(tmp_path / "b.tif")})  # finished as Ctrl-C came
    write_state(out, "predict", "c", {**done, "abspath": str(tmp_path / "elsewhere" / "c.tif")})
    after = InterimTable(out, crows, tasks, None, None)
    after(Outcome(tasks[0], "failed", "a: the output folder holds the results of another slide"))
    interrupted_table(out, crows, tasks, job, after)
    rows = {r["slide"]: (r["status"], r["probability"]) for r in _table(out)}
    assert rows == {"a": ("failed", ""), "b": ("done", "0.93"), "c": ("pending", "")}, rows


def test_an_interrupt_while_a_lock_is_written_leaves_no_lock(tmp_path, monkeypatch):
    """Ctrl-C landing while the report lock's file was being written (a cohort run takes it after every slide)
    left the file behind, not held: the interrupted run's table then could not take the lock and wrote nothing
    (no predictions.csv at all after the first slide), and the rerun waited for the orphan to go stale."""
    from wsi_vssm.runs import state

    real_dump = state.json.dump

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(state.json, "dump", interrupted)
    (tmp_path / STATE_DIR).mkdir()
    lock = SlideLock(tmp_path, "report", "cohort")
    with pytest.raises(KeyboardInterrupt):
        lock.acquire()
    assert not lock.held and not list(tmp_path.rglob("*.lock"))
    monkeypatch.setattr(state.json, "dump", real_dump)
    assert lock.acquire() and lock.held  # taken at once, nothing to wait for
    lock.release()


def test_an_interrupt_inside_the_tables_lock_still_leaves_a_true_table(model_file, cohort, tmp_path, monkeypatch):
    """The same interrupt seen from evaluate: the slide whose state says done is `done` in the table."""
    from wsi_vssm.runs import state

    calls = []
    real_dump = state.json.dump

    def dump(obj, f, *args, **kwargs):  # the report lock's file exists, then Ctrl-C
        lock = sys._getframe(1).f_locals.get("self")
        if isinstance(lock, SlideLock) and lock.path.name.startswith("cohort.report"):
            calls.append(lock.path)
            if len(calls) == 2:  # the 1st is the run's start; the 2nd, the table's rewrite after the 1st slide
                raise KeyboardInterrupt
        return real_dump(obj, f, *args, **kwargs)

    out = tmp_path / "o"
    monkeypatch.setattr(state.json, "dump", dump)
    assert _cli(["evaluate", cohort, "--out", out, "--model", model_file, "--bootstrap", "200", *FAST]) == 130
    assert len(calls) >= 2
    rows = {r["slide"]: r["status"] for r in _table(out)}
    assert rows == {"normal_001": "done", "normal_002": "pending", "tumor_001": "pending"}, rows


def test_metrics_json_comes_after_its_figures(model_file, cohort, tmp_path, monkeypatch):
    """A SIGINT just after the last slide left metrics.json saying `"complete": true` with roc.png and
    calibration.png missing: metrics.json is now written last."""
    from wsi_vssm.outputs import report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "roc_png", interrupted)
    out = tmp_path / "o"
    assert _cli(["evaluate", cohort, "--out", out, "--model", model_file, "--bootstrap", "200", *FAST]) == 130
    assert not (out / "metrics.json").exists()
    assert {r["status"] for r in _table(out)} == {"done"}


def test_an_incomplete_report_blames_another_run_only_for_the_slides_it_holds():
    """The output folder deleted under a run left 2 slides pending, and the message said "rerun when the other
    run has finished" with no other run."""
    from wsi_vssm.commands.evaluate import incomplete_warning

    rows = [{"status": "done"}, {"status": "pending"}, {"status": "pending"}, {"status": "in_progress"}]
    text = incomplete_warning(rows, 3)
    assert "1 slide(s) still being done by another run" in text
    assert "2 slide(s) have no finished outputs (deleted or not written): run the same command again" in text
    assert "another run" not in incomplete_warning(rows[:3], 2)


def test_a_state_path_that_is_no_folder_is_named_for_what_it_is(tmp_path):
    """OUT/.state a file was "OUT: cannot write to the output folder (File exists)": OUT was fine."""
    from wsi_vssm.runs.state import OutputNotWritable, check_output_folder

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / STATE_DIR).write_text("")
    (tmp_path / "b").mkdir()
    os.symlink(tmp_path / "nowhere", tmp_path / "b" / STATE_DIR)
    for out, what in (("a", "a file"), ("b", "a broken symbolic link")):
        with pytest.raises(OutputNotWritable) as e:
            check_output_folder(tmp_path / out)
        assert str(e.value).startswith(f"{tmp_path / out / STATE_DIR} is {what}, not a folder: "), e.value
        assert "\n" not in str(e.value)


def _table_job(out, outputs_ok: bool = True):
    """A job as the cohort-table functions read it: one parameters hash "h" for every slide."""
    from types import SimpleNamespace

    return SimpleNamespace(out=out, kind="predict", params_hash="h", task_hash=lambda task: "h", fallback_mpp=None,
                           outputs_ok=lambda name: outputs_ok)


def test_a_slide_another_run_holds_counts_as_unfinished():
    """Only `pending` slides were counted unfinished: a slide in progress in another run let evaluate stage the
    patients (a pN kappa) over a cohort it had not finished."""
    from wsi_vssm.runs.cohort_table import n_unfinished

    rows = [{"status": "done"}, {"status": "in_progress"}, {"status": "failed"}, {"status": "pending"}]
    assert n_unfinished(rows) == 2, n_unfinished(rows)
    assert n_unfinished(rows[:2]) == 1


def test_a_slide_locked_by_another_run_is_in_progress_in_the_interim_table(tmp_path):
    """A slide this run found locked by another was written `pending` ("rerun the same command") in the table
    rewritten after every slide, not `in_progress`."""
    from types import SimpleNamespace

    from wsi_vssm.runs.cohort_table import InterimTable
    from wsi_vssm.runs.execute import Outcome, SlideTask

    (tmp_path / STATE_DIR).mkdir()
    crows = [SimpleNamespace(name=n, label=lab) for n, lab in (("a", 1), ("b", 0))]
    tasks = [SlideTask(n, str(tmp_path / f"{n}.tif")) for n in ("a", "b")]
    table = InterimTable(tmp_path, crows, tasks, None, None)
    table(Outcome(tasks[0], "locked", "a: being done by another run (pid 1)"))
    rows = {r["slide"]: r["status"] for r in _table(tmp_path)}
    assert rows == {"a": "in_progress", "b": "pending"}, rows


def test_a_done_state_whose_outputs_are_missing_is_pending(tmp_path):
    """A slide whose state says done but whose output files are gone or broken (`outputs_ok` False) was counted
    done in the final table, with the probability its state recorded."""
    from types import SimpleNamespace

    from wsi_vssm.runs.cohort_table import final_row
    from wsi_vssm.runs.execute import SlideTask
    from wsi_vssm.runs.state import write_state

    (tmp_path / STATE_DIR).mkdir()
    task, crow = SlideTask("a", str(tmp_path / "a.tif")), SimpleNamespace(name="a", label=1)
    write_state(tmp_path, "predict", "a", {"status": "done", "params_hash": "h", "result": {"probability": 0.9}})
    outcome = SimpleNamespace(task=task, status="done")
    row = final_row(crow, outcome, _table_job(tmp_path, outputs_ok=False))
    assert row["status"] == "pending" and row["probability"] is None, row
    assert final_row(crow, outcome, _table_job(tmp_path))["status"] == "done"


def test_an_interrupted_overwrite_run_lists_known_failures_as_pending(tmp_path):
    """An interrupted --overwrite run (which tries failed slides again, as --retry-failed does) listed a slide
    that had failed before as `failed` ("use --retry-failed"): it was not through yet."""
    from types import SimpleNamespace

    from wsi_vssm.runs.cohort_table import InterimTable, interrupted_table
    from wsi_vssm.runs.execute import SlideTask
    from wsi_vssm.runs.state import input_fingerprint, write_state

    out = tmp_path / "o"
    (out / STATE_DIR).mkdir(parents=True)
    slide = tmp_path / "a.tif"
    slide.write_bytes(b"not a slide")
    crows, tasks = [SimpleNamespace(name="a", label=1)], [SlideTask("a", str(slide))]
    write_state(out, "predict", "a", {"status": "failed", "params_hash": "h", "abspath": str(slide),
                                      "input": input_fingerprint(slide), "error": "a: cannot be read"})
    for overwrite, retry_failed, want in ((False, False, "failed"), (True, False, "pending"),
                                          (False, True, "pending")):
        opts = SimpleNamespace(overwrite=overwrite, retry_failed=retry_failed)
        interrupted_table(out, crows, tasks, _table_job(out), InterimTable(out, crows, tasks, None, None), opts)
        assert _table(out)[0]["status"] == want, (overwrite, retry_failed, _table(out))


def test_the_report_writer_removes_a_killed_runs_temporaries(tmp_path):
    """The holder of the report lock removes the temporaries a killed run left of the cohort files
    (`.tmp-predictions.csv.<random>`, as wsi_vssm.atomic names them); others' files stay."""
    from wsi_vssm.runs.cohort_table import report_writer

    (tmp_path / STATE_DIR).mkdir()
    stale, other = tmp_path / ".tmp-predictions.csv.k3x9q_a1", tmp_path / "notes.txt"
    stale.write_text("slide,label\n")
    other.write_text("keep")
    with report_writer(tmp_path, 0) as held:
        assert held, "the report lock was not taken"
        assert not stale.exists(), "a killed run's temporary of predictions.csv was left"
    assert other.read_text() == "keep"


def test_a_stale_lock_is_judged_without_signals_on_windows(monkeypatch):
    """`os.kill(pid, 0)` sends Ctrl+C to a console group on Windows, or fails ("The parameter is incorrect"):
    a killed run's lock stopped every rerun there. Windows asks the process table instead."""
    import socket

    import wsi_vssm.runs.state as state

    def no_signals(*a):
        raise AssertionError("os.kill called")

    monkeypatch.setattr(state.os, "kill", no_signals)
    monkeypatch.setattr(state, "_windows_pid_alive", lambda pid: pid == 4242)
    monkeypatch.setattr(state, "_WINDOWS", True)
    here = socket.gethostname()
    verdicts = [state._is_stale({"pid": pid, "host": here}) for pid in (4242, 4343)]
    assert verdicts == [False, True]
