"""`evaluate` on a patch folder keeps its scores as it makes them (`runs.patch_scores`): an interrupted run
resumes, a rerun with another threshold scores nothing, and a changed file, model or setting is scored again.
Until 2026-12-06 an interrupted patch run scored the whole folder again (about 20 minutes for 300,000 patches)."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli_captured, write_patch_folder

import wsi_vssm.runs.evaluate_patches as ep
from wsi_vssm.outputs.files import PREDICTIONS_CSV
from wsi_vssm.runs.patch_scores import PATCH_SCORES, PatchFolderBusy, PatchScores
from wsi_vssm.runs.state import OutputNotWritable


def _model(path):
    from wsi_vssm.models.slide_model import load_model

    return load_model(path)


def _counting(monkeypatch, stop_after: int | None = None) -> list[int]:
    """Patches scored per batch; with `stop_after`, a Ctrl-C as that many batches have been scored."""
    batches, real = [], ep.centre_cell_logits

    def spy(model, x, *a, **k):
        if stop_after is not None and len(batches) == stop_after:
            raise KeyboardInterrupt
        batches.append(int(x.shape[0]))
        return real(model, x, *a, **k)

    monkeypatch.setattr(ep, "centre_cell_logits", spy)
    return batches


def test_an_interrupted_patch_run_resumes_and_ends_as_an_uninterrupted_one(model_file, tmp_path, monkeypatch):
    write_patch_folder(tmp_path / "patches", 6, 0)
    model = _model(model_file)
    whole = ep.evaluate_patches(tmp_path / "patches", model, tmp_path / "whole", mpp=0.97, batch_size=4, n_boot=50)
    with monkeypatch.context() as mp:
        _counting(mp, stop_after=2)
        with pytest.raises(KeyboardInterrupt):
            ep.evaluate_patches(tmp_path / "patches", model, tmp_path / "ev", mpp=0.97, batch_size=4, n_boot=50)
    kept = (tmp_path / "ev" / PATCH_SCORES).read_text().splitlines()
    assert len(kept) == 1 + 8 and json.loads(kept[0])["params"]["mpp"] == 0.97  # two batches of 4, and the header
    with monkeypatch.context() as mp:
        scored = _counting(mp)
        res = ep.evaluate_patches(tmp_path / "patches", model, tmp_path / "ev", mpp=0.97, batch_size=4, n_boot=50)
    assert sum(scored) == 12 - 8
    # byte for byte: its batches are the uninterrupted run's (another batching moves a logit by float rounding)
    assert (tmp_path / "ev" / PREDICTIONS_CSV).read_bytes() == (tmp_path / "whole" / PREDICTIONS_CSV).read_bytes()
    assert res.metrics["auc"] == whole.metrics["auc"] and res.metrics["complete"] is True
    with monkeypatch.context() as mp:  # another threshold or bootstrap: nothing is scored again
        scored = _counting(mp)
        again = ep.evaluate_patches(tmp_path / "patches", model, tmp_path / "ev", mpp=0.97, batch_size=4, n_boot=60,
                                    threshold=0.3)
    assert scored == [] and again.metrics["threshold"] == 0.3 and again.metrics["auc"] == whole.metrics["auc"]


def test_a_rerun_decodes_only_the_patches_it_scores_or_samples(model_file, tmp_path, monkeypatch):
    """A rerun with another threshold decoded every patch again, to count their sizes and sample their stain:
    on PCam's 3,000 valid patches a fifth of the rerun. The kept lines carry each patch's size; the size warnings
    of a rerun are the first run's, and a line of an older run (no size) has its patch decoded."""
    from PIL import Image

    from wsi_vssm.training.data.patches import PatchDataset

    write_patch_folder(tmp_path / "patches", 6, 0)
    img = Image.open(tmp_path / "patches" / "0" / "p0.jpg")
    img.resize((80, 64)).save(tmp_path / "patches" / "0" / "odd.jpg")  # another size, non-square, small
    model = _model(model_file)
    monkeypatch.setattr(ep, "STAIN_SAMPLE", 2)  # 13 patches, 2 sampled for the stain check
    decoded, real = [], PatchDataset.decode

    def spy(self, i, raw):
        decoded.append(self.items[i].name)
        return real(self, i, raw)

    monkeypatch.setattr(PatchDataset, "decode", spy)
    args = dict(mpp=0.5, batch_size=4, n_boot=50)  # resized to about half: smaller than trained, warned
    with pytest.warns(UserWarning) as first:
        whole = ep.evaluate_patches(tmp_path / "patches", model, tmp_path / "ev", **args)
    assert len(decoded) == 13
    lines = [json.loads(x) for x in (tmp_path / "ev" / PATCH_SCORES).read_text().splitlines()[1:]]
    assert {tuple(e["size"]) for e in lines} == {(96, 96), (64, 80)}, lines
    decoded.clear()
    with pytest.warns(UserWarning) as again:
        res = ep.evaluate_patches(tmp_path / "patches", model, tmp_path / "ev", threshold=0.3, **args)
    assert len(decoded) == 2, decoded  # the stain sample alone
    said = sorted(str(w.message) for w in first if "px" in str(w.message))
    assert said and said == sorted(str(w.message) for w in again if "px" in str(w.message))
    assert [r["logit"] for r in res.rows] == [r["logit"] for r in whole.rows]
    # a score file of an older run: no sizes, so its patches are decoded (and not scored again)
    text = "\n".join([(tmp_path / "ev" / PATCH_SCORES).read_text().splitlines()[0]] + [
        json.dumps({k: v for k, v in e.items() if k != "size"}) for e in lines]) + "\n"
    (tmp_path / "ev" / PATCH_SCORES).write_text(text)
    decoded.clear()
    with monkeypatch.context() as mp:
        scored = _counting(mp)
        with pytest.warns(UserWarning):
            ep.evaluate_patches(tmp_path / "patches", model, tmp_path / "ev", **args)
    assert len(decoded) == 13 and scored == []


def test_changed_files_settings_and_overwrite_are_scored_again(model_file, tmp_path, monkeypatch):
    write_patch_folder(tmp_path / "patches", 3, 0)
    model = _model(model_file)
    ep.evaluate_patches(tmp_path / "patches", model, tmp_path / "ev", mpp=0.97, n_boot=50)
    write_patch_folder(tmp_path / "other", 3, 7)  # the same names, other images
    (tmp_path / "patches" / "1" / "p2.jpg").write_bytes((tmp_path / "other" / "1" / "p2.jpg").read_bytes())
    with monkeypatch.context() as mp:
        scored = _counting(mp)
        ep.evaluate_patches(tmp_path / "patches", model, tmp_path / "ev", mpp=0.97, n_boot=50)
    assert scored == [1]  # the replaced file alone
    for kwargs in ({"mpp": 0.9}, {"mpp": 0.97, "overwrite": True}):
        with monkeypatch.context() as mp:
            scored = _counting(mp)
            ep.evaluate_patches(tmp_path / "patches", model, tmp_path / "ev", n_boot=50, **kwargs)
        assert sum(scored) == 6, kwargs
    with monkeypatch.context() as mp:  # after --overwrite, the file holds this run's scores alone
        scored = _counting(mp)
        ep.evaluate_patches(tmp_path / "patches", model, tmp_path / "ev", mpp=0.97, n_boot=50)
    assert scored == [] and len((tmp_path / "ev" / PATCH_SCORES).read_text().splitlines()) == 1 + 6


def test_a_torn_last_line_costs_one_patch_and_is_cut_off(model_file, tmp_path, monkeypatch):
    write_patch_folder(tmp_path / "patches", 3, 0)
    model = _model(model_file)
    ep.evaluate_patches(tmp_path / "patches", model, tmp_path / "ev", mpp=0.97, n_boot=50)
    path = tmp_path / "ev" / PATCH_SCORES
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:25])  # killed mid-line
    with monkeypatch.context() as mp:
        scored = _counting(mp)
        ep.evaluate_patches(tmp_path / "patches", model, tmp_path / "ev", mpp=0.97, n_boot=50)
    assert scored == [1]
    now, before = ([json.loads(line) for line in text.splitlines()[1:]] for text in (path.read_text(), "".join(lines)))
    # every line whole again, the torn one scored again (alone in its batch: equal within float rounding)
    assert [(e["name"], e["digest"]) for e in now] == [(e["name"], e["digest"]) for e in before]
    assert [e["logit"] for e in now] == pytest.approx([e["logit"] for e in before], abs=1e-5)


def test_a_second_run_on_the_same_out_stops_in_one_line(model_file, tmp_path, capsys):
    write_patch_folder(tmp_path / "patches", 2, 0)
    out = tmp_path / "ev"
    out.mkdir()
    with PatchScores(out, "x", {}):  # another run holds the folder
        with pytest.raises(PatchFolderBusy, match="another evaluate is scoring patches into this folder"):
            ep.evaluate_patches(tmp_path / "patches", _model(model_file), out, mpp=0.97, n_boot=50)
        code, _, err = run_cli_captured(["evaluate", tmp_path / "patches", "--model", model_file, "--mpp", "0.97",
                                         "--out", out, "--bootstrap", "100"], capsys)
    assert code == 4 and err.count("\n") == 1 and "wait for it to finish" in err, err
    assert not (out / "metrics.json").exists()  # the other run's folder left as it was
    code, _, err = run_cli_captured(["evaluate", tmp_path / "patches", "--model", model_file, "--mpp", "0.97",
                                     "--out", out, "--bootstrap", "100"], capsys)
    assert code == 0, err  # once it has ended, the folder is free


def test_the_cli_resumes_says_so_and_info_tells_an_interrupted_run(model_file, tmp_path, capsys, monkeypatch):
    write_patch_folder(tmp_path / "patches", 40, 0)
    out = tmp_path / "ev"
    args = ["evaluate", tmp_path / "patches", "--model", model_file, "--mpp", "0.97", "--out", out,
            "--bootstrap", "100", "--batch-size", "16"]
    with monkeypatch.context() as mp:
        _counting(mp, stop_after=2)
        code, _, err = run_cli_captured(args, capsys)
    assert code == 130 and "the patches scored so far are kept: rerun the same command to resume" in err, err
    code, text, _ = run_cli_captured(["info", out], capsys)
    assert code == 0 and "interrupted before its first report; 32 patch scores kept" in text, text
    code, _, err = run_cli_captured(args, capsys)
    assert code == 0 and f"resuming: 32 of 80 patches have a score from an earlier run in {out / PATCH_SCORES}" in err
    with monkeypatch.context() as mp:  # no longer "without effect on a patch folder"; interrupted, then again
        _counting(mp, stop_after=3)
        code, _, err = run_cli_captured([*args, "--overwrite"], capsys)
    assert code == 130 and "resuming" not in err and "without effect" not in err, err
    with monkeypatch.context() as mp:  # the same --overwrite command goes on with what it scored, not over
        scored = _counting(mp)
        code, _, err = run_cli_captured([*args, "--overwrite"], capsys)
    assert code == 0 and sum(scored) == 80 - 48 and "going on with the --overwrite run begun earlier: 48 of 80" in err
    with monkeypatch.context() as mp:  # once that run has written its report, --overwrite starts over again
        scored = _counting(mp)
        run_cli_captured([*args, "--overwrite"], capsys)
    assert sum(scored) == 80
    with monkeypatch.context() as mp:  # a later run interrupted: the earlier report is marked, with how far it got
        _counting(mp, stop_after=1)
        code, _, err = run_cli_captured([*args, "--tta"], capsys)
    assert "its 80 score(s) were made with other settings (tta False -> True): every patch is scored again" in err
    code, text, _ = run_cli_captured(["info", out], capsys)
    assert "NOT complete: the figures of an earlier run" in text and "(16 patch scores kept)" in text, text


def test_damaged_lines_and_a_linked_file_are_not_trusted(model_file, tmp_path, monkeypatch):
    """Lines edited to an inf, a NaN or a boolean were taken as scores (a NaN failed every rerun); a score file
    that is a symbolic link had the file it points to truncated and rewritten."""
    write_patch_folder(tmp_path / "patches", 3, 0)
    model = _model(model_file)
    ep.evaluate_patches(tmp_path / "patches", model, tmp_path / "ev", mpp=0.97, n_boot=50)
    path = tmp_path / "ev" / PATCH_SCORES
    lines = path.read_text().splitlines()
    bad = [line.replace(f'"logit": {json.loads(line)["logit"]}', f'"logit": {value}')
           for line, value in zip(lines[1:4], ("Infinity", "NaN", "true"), strict=True)]
    path.write_text("\n".join([lines[0], *bad, *lines[4:]]) + "\n")
    with monkeypatch.context() as mp:
        scored = _counting(mp)
        res = ep.evaluate_patches(tmp_path / "patches", model, tmp_path / "ev", mpp=0.97, n_boot=50)
    assert scored == [3] and res.metrics["n"] == 6
    (tmp_path / "victim.txt").write_text("keep me")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / PATCH_SCORES).symlink_to(tmp_path / "victim.txt")
    with pytest.raises(OutputNotWritable, match="is a symbolic link: remove it"):
        ep.evaluate_patches(tmp_path / "patches", model, tmp_path / "linked", mpp=0.97, n_boot=50)
    assert (tmp_path / "victim.txt").read_text() == "keep me"


def test_info_tells_a_run_in_progress_from_an_interrupted_one(tmp_path, capsys):
    out = tmp_path / "ev"
    out.mkdir()
    with PatchScores(out, "h", {"precision": "fp32", "tta": True}) as scores:
        scores.add([("0/a.jpg", 1, 0.5)])
        code, text, _ = run_cli_captured(["info", out], capsys)
        assert code == 0 and text.strip() == f"patch evaluation: {out}: being scored now by a run (1 patch score(s) " \
            "so far)"
    code, text, _ = run_cli_captured(["info", out, "--json"], capsys)
    report = json.loads(text)
    assert (report["in_progress"], report["kept_scores"], report["tta"]) == (False, 1, True)


def test_a_file_system_without_flock_scores_unguarded_with_a_warning(model_file, tmp_path, monkeypatch):
    """Some network mounts refuse flock (ENOLCK): the run failed as "No locks available", naming no file."""
    import errno
    import fcntl

    import wsi_vssm.runs.patch_scores as ps

    write_patch_folder(tmp_path / "patches", 2, 0)

    def refuse(*a):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(ps.fcntl, "flock", refuse)
    with pytest.warns(UserWarning, match=r"\.patch_scores\.jsonl: cannot be locked \(No locks available\)"):
        res = ep.evaluate_patches(tmp_path / "patches", _model(model_file), tmp_path / "ev", mpp=0.97, n_boot=50)
    assert res.metrics["n"] == 4
    kept = ps.kept_scores(tmp_path / "ev")
    assert kept["scores"] == 4 and kept["in_progress"] is False and kept["params"]["job"] == "patches", kept
    monkeypatch.setattr(ps.fcntl, "flock", fcntl.flock)


def _score_lines(out, params_hash: str, entries: list[tuple[str, int, float]], fmt: str | None = None) -> None:
    """A score file as a run writes it: the header, then one line per (name, digest, logit)."""
    from wsi_vssm.runs.patch_scores import SCORES_FORMAT

    header = {"format": fmt or SCORES_FORMAT, "params_hash": params_hash, "params": {}}
    lines = [header, *({"name": n, "digest": d, "logit": z} for n, d, z in entries)]
    (out / PATCH_SCORES).write_text("".join(json.dumps(e) + "\n" for e in lines))


def test_info_does_not_count_a_torn_last_line_as_a_score(tmp_path):
    """`info OUT` counted the line a kill tore in half as a kept score (3 where the rerun keeps 2)."""
    from wsi_vssm.runs.patch_scores import kept_scores

    _score_lines(tmp_path, "h", [("0/a.jpg", 1, 0.5), ("0/b.jpg", 2, -0.5)])
    with open(tmp_path / PATCH_SCORES, "a") as f:
        f.write('{"name": "1/c.jpg", "dig')  # killed mid-line
    assert kept_scores(tmp_path)["scores"] == 2, kept_scores(tmp_path)


def test_a_run_starting_while_info_looks_waits_for_it(tmp_path):
    """`info OUT` holds a shared lock on the score file for an instant; a run starting then must try again, not
    stop with "another evaluate is scoring patches" (an exclusive lock held throughout still stops it:
    test_a_second_run_on_the_same_out_stops_in_one_line)."""
    import fcntl
    import threading

    _score_lines(tmp_path, "h", [("0/a.jpg", 1, 0.5)])
    look = open(tmp_path / PATCH_SCORES, "rb")  # noqa: SIM115 - closed by the timer, as info's look ends
    fcntl.flock(look, fcntl.LOCK_SH | fcntl.LOCK_NB)
    timer = threading.Timer(0.2, look.close)
    timer.start()
    try:
        with PatchScores(tmp_path, "h", {}) as scores:
            assert scores.kept("0/a.jpg", 1) == (0.5, None), "the kept score was not read"
    except PatchFolderBusy as e:
        pytest.fail(f"a run starting during info's look stopped as busy: {e}")
    finally:
        timer.join()


def test_an_overwrite_after_a_plain_run_with_other_settings_starts_over(tmp_path):
    """An --overwrite run interrupted (its marker stays), then a plain run with other settings interrupted, then
    --overwrite with those settings: it went on with the plain run's scores, taking them for its own."""
    with PatchScores(tmp_path, "A", {}, overwrite=True) as scores:  # interrupted: no `finished`
        scores.add([("0/a.jpg", 1, 0.5)])
    with PatchScores(tmp_path, "B", {}) as scores:  # other settings, interrupted
        scores.add([("0/a.jpg", 1, 0.7)])
    with PatchScores(tmp_path, "B", {}, overwrite=True) as scores:
        assert not scores.going_on, "the marker of the run with settings A was taken for this run's"
        assert scores.kept("0/a.jpg", 1) is None, "the plain run's score was reused by --overwrite"


def test_a_score_file_of_another_format_is_not_read(tmp_path):
    """A score file whose header names another format (a later version's), with this run's hash, had its lines
    read as scores."""
    _score_lines(tmp_path, "h", [("0/a.jpg", 1, 0.5)], fmt="other/9")
    with PatchScores(tmp_path, "h", {}) as scores:
        assert scores.kept("0/a.jpg", 1) is None and scores.earlier == {}, scores.earlier
    assert len((tmp_path / PATCH_SCORES).read_text().splitlines()) == 1  # started anew: its header alone


def test_without_flock_or_o_nofollow_as_on_windows_the_scores_are_kept_unlocked(tmp_path, monkeypatch):
    """`import fcntl` at the top of this module stopped every `info` and `evaluate` on Windows ("No module named
    'fcntl'"), and `os.O_NOFOLLOW` would then have been a traceback: the scores are kept there unlocked, with the
    warning a file system without flock gets."""
    import os
    import subprocess
    import sys

    import wsi_vssm.runs.patch_scores as ps

    code = ("import sys; sys.modules['fcntl'] = None\n"
            "import wsi_vssm.commands.output_info, wsi_vssm.runs.patch_scores as ps; print(ps.fcntl)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "None", proc.stderr
    monkeypatch.setattr(ps, "fcntl", None)
    monkeypatch.delattr(os, "O_NOFOLLOW")
    with pytest.warns(UserWarning, match=r"cannot be locked \(.*file locks are not available on this platform\)"):
        scores = ps.PatchScores(tmp_path, "h", {"tta": False})
    scores.close()
    assert ps.kept_scores(tmp_path)["in_progress"] is False


class _FakeMsvcrt:
    """Windows' msvcrt.locking as it behaves: an exclusive lock on bytes from the file's position, held per handle
    until unlocked (Windows frees a closed handle's locks only in its own time), refused to other handles with
    EACCES; unlocking a range one does not hold is refused too."""

    LK_UNLCK, LK_LOCK, LK_NBLCK = 0, 1, 2

    def __init__(self):
        self.held: dict[tuple, int] = {}  # (device, inode, offset) -> the fd holding it

    def locking(self, fd: int, mode: int, nbytes: int) -> None:
        import errno
        import os

        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, os.lseek(fd, 0, os.SEEK_CUR))
        if mode == self.LK_NBLCK:
            if self.held.get(key, fd) != fd:
                raise PermissionError(errno.EACCES, "Permission denied")
            self.held[key] = fd
        elif mode == self.LK_UNLCK:
            if self.held.get(key) != fd:
                raise PermissionError(errno.EACCES, "Permission denied")
            del self.held[key]


def test_on_windows_a_second_run_is_stopped_and_info_sees_the_run_through_msvcrt(tmp_path, monkeypatch):
    """Windows has no flock: the score file was used unlocked there, so two runs into one folder mixed their
    lines and `info OUT` could not tell a run at work. msvcrt's byte lock stands in, on a byte past the end so that
    the file can still be read."""
    import warnings

    import wsi_vssm.runs.patch_scores as ps

    fake = _FakeMsvcrt()
    monkeypatch.setattr(ps, "fcntl", None)
    monkeypatch.setattr(ps, "msvcrt", fake)
    _score_lines(tmp_path, "h", [("0/a.jpg", 1, 0.5)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "cannot be locked" warning: the lock is taken
        first = PatchScores(tmp_path, "h", {})
    try:
        assert first.kept("0/a.jpg", 1) == (0.5, None), "the file was not read from its start"
        assert [key[2] for key in fake.held] == [ps.WINDOWS_LOCK_BYTE], fake.held
        assert ps.kept_scores(tmp_path)["in_progress"] is True
        with pytest.raises(PatchFolderBusy, match="another evaluate is scoring patches into this folder"):
            PatchScores(tmp_path, "h", {})
        first.add([("0/b.jpg", 2, -0.5)])
    finally:
        first.close()
    assert not fake.held, "the lock outlived the run"
    assert ps.kept_scores(tmp_path) == {"scores": 2, "params": {}, "in_progress": False}
    with PatchScores(tmp_path, "h", {}) as again:  # the next run takes the lock and reads both scores
        assert again.kept("0/b.jpg", 2) == (-0.5, None)
        assert len(fake.held) == 1
    assert not fake.held


def test_a_patch_and_a_slide_evaluation_into_one_folder_do_not_mix(model_file, cohort, tmp_path, capsys):
    """A patch evaluation and a slide evaluation running into one OUT each said they were done, and left one's
    metrics.json beside the other's predictions.csv. The second stops now, exit 4; slide evaluations still share
    a folder (each slide under its own lock)."""
    from wsi_vssm.runs.patch_scores import EvaluationBusy, evaluation_lock

    write_patch_folder(tmp_path / "patches", 2, 0)
    out = tmp_path / "ev"
    out.mkdir()
    slides = ["evaluate", cohort / "reference.csv", "--model", model_file, "--out", out, "--bootstrap", "100",
              "--device", "cpu", "--target-mpp", "4", "--region-px", "512", "--overlap-px", "64"]
    patches = ["evaluate", tmp_path / "patches", "--model", model_file, "--mpp", "0.97", "--out", out,
               "--bootstrap", "100"]
    def listing():
        return sorted(str(f.relative_to(out)) for f in out.rglob("*"))

    with evaluation_lock(out, patches=False):  # a slide evaluation at work
        before = listing()
        with pytest.raises(EvaluationBusy, match=r"ev: another evaluate, of slides, is writing into this folder"):
            ep.evaluate_patches(tmp_path / "patches", _model(model_file), out, mpp=0.97, n_boot=50)
        code, _, err = run_cli_captured([*patches, "--overwrite"], capsys)
        assert code == 4 and err.count("\n") == 1 and "give another --out" in err, err
        assert listing() == before, "the refused patch run changed the folder (its score file, say)"
        with evaluation_lock(out, patches=False):  # and another one beside it: they share
            pass
    with evaluation_lock(out, patches=True):  # a patch evaluation at work
        before = listing()
        code, _, err = run_cli_captured(slides, capsys)
        assert code == 4 and "another evaluate, of a patch folder, is writing into this folder" in err, err
        assert listing() == before, "the refused slide run changed the folder (its .state, say)"
    assert run_cli_captured(slides, capsys)[0] == 0  # once the other has ended
