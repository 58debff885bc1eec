"""The dense stage (wsi_vssm.training.dense): token labels, the balanced loss, calibration, mining and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_patch_folder, write_tiny_model

from wsi_vssm.errors import UsageError
from wsi_vssm.outputs.calibration import expected_calibration_error
from wsi_vssm.training.data.dense_mosaics import DenseMosaics, TokenWeights, mosaic_token_targets, patch_token_targets
from wsi_vssm.training.dense import DenseConfig, balanced_bce, train_dense
from wsi_vssm.training.dense_eval import fit_platt, fold_platt, rim_noise


def test_patch_targets_label_every_token_of_a_normal_patch_and_only_the_centre_of_a_tumour_one():
    t, w = patch_token_targets(np.array([0, 1]), TokenWeights(rim=0.5, background=0.25))
    assert t[0].sum() == 0 and w[0, 1, 1] == 1 and np.all(w[0][np.arange(9).reshape(3, 3) != 4] == 0.5)
    assert t[1, 1, 1] == 1 and w[1].sum() == 1 and w[1, 1, 1] == 1  # tumour rim ignored


def test_mosaic_targets_place_each_cell_and_weight_glass():
    labels = np.array([0, 1])
    index = np.array([[0, 1], [-1, 0]])
    t, w = mosaic_token_targets(index, labels, TokenWeights(rim=0.5, background=0.25))
    assert t.shape == w.shape == (6, 6)
    assert t[4, 1] == 0 and np.all(w[3:, :3] == 0.25)  # glass
    assert t[1, 4] == 1 and w[1, 4] == 1 and w[0, 3] == 0  # tumour centre; its rim ignored
    assert t[:3, :3].sum() == 0 and w[1, 1] == 1 and w[0, 0] == 0.5  # normal patch: all negative


def test_dense_mosaics_draw_lesions_glass_and_hard_negatives(tmp_path):
    from wsi_vssm.training.data.patches import load_patches

    write_patch_folder(tmp_path / "p", 30, seed=0)
    ds = load_patches(tmp_path / "p")
    dm = DenseMosaics(ds, (3, 5), 0.3, TokenWeights())
    dm.hard, dm.hard_share = np.flatnonzero(ds.labels == 0)[:2], 1.0
    rng = np.random.default_rng(0)
    imgs, t, w = dm.batch(rng, 25)
    side = imgs.shape[2] // 96
    assert imgs.shape[1] == 3 and t.shape[1] == 3 * side and imgs.dtype == np.uint8
    img, t, w = dm.draw(rng, 5, True)
    assert t.sum() >= 1 and (w == 0.25).any()  # a lesion, and glass around the tissue


def test_balanced_bce_gives_each_class_half_the_loss():
    logits = torch.tensor([0.0, 0.0, 0.0, 0.0])
    target = torch.tensor([1.0, 0.0, 0.0, 0.0])
    w = torch.ones(4)
    assert torch.isclose(balanced_bce(logits, target, w), torch.tensor(np.log(2.0), dtype=torch.float32))
    logits = torch.tensor([5.0, -5.0, 5.0, 5.0])  # the positive right, two of three negatives badly wrong
    lone = balanced_bce(logits, target, w)
    assert lone > balanced_bce(logits, target, torch.tensor([1.0, 1.0, 0.0, 0.0]))  # weights 0 drop tokens


def test_platt_recovers_a_known_scaling_and_folds_into_a_linear_head():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 2, 20000)
    y = rng.random(20000) < 1 / (1 + np.exp(-(0.5 * x - 1.0)))
    a, b = fit_platt(x, y)
    assert abs(a - 0.5) < 0.05 and abs(b + 1.0) < 0.08
    lin = torch.nn.Linear(3, 1)
    f = torch.randn(5, 3)
    before = lin(f).detach()
    fold_platt(lin, a, b)
    assert torch.allclose(lin(f).detach(), a * before + b, atol=1e-5)


def test_ece_is_zero_when_calibrated_and_large_when_not():
    y = np.r_[np.ones(30), np.zeros(70)]
    assert expected_calibration_error(y, np.full(100, 0.3)) == pytest.approx(0.0)
    assert expected_calibration_error(y, np.full(100, 0.9)) == pytest.approx(0.6)


def test_rim_noise_counts_rims_above_the_centres_tail():
    rng = np.random.default_rng(0)
    centre = rng.normal(0, 1, 1000)
    clean = {"neg_centre": centre, "neg_rim": rng.normal(0, 1, 8000)}
    noisy = {"neg_centre": centre, "neg_rim": np.r_[rng.normal(0, 1, 7200), np.full(800, 9.0)]}
    assert rim_noise(clean) < 0.005 and rim_noise(noisy) > 0.08


def test_dense_stage_trains_mines_calibrates_and_resumes(tmp_path, capsys):
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.training.data.patches import load_patches

    write_patch_folder(tmp_path / "train", 24, seed=1)
    write_patch_folder(tmp_path / "valid", 24, seed=2)
    init = write_tiny_model(tmp_path / "init.pt")
    train, valid = load_patches(tmp_path / "train"), load_patches(tmp_path / "valid")
    cfg = dict(rounds=1, round_epochs=1, epoch_patches=8, batch_size=4, mosaic_cells=9, grid=[3, 3],
               valid_select=24, eval_grid=3, warmup_steps=1, hard_top=0.5, scan="cpu")
    out = tmp_path / "run" / "model.pt"
    train_dense(init, train, valid, out, DenseConfig(epochs=1, **cfg), progress=False)
    assert (tmp_path / "run" / "dense" / "checkpoint.pt").is_file()
    with pytest.raises(UsageError, match="other settings: lr="):  # resumed with another run's lr: refused
        train_dense(init, train, valid, out, DenseConfig(epochs=2, resume=True, lr=0.01, **cfg), progress=False)
    rec = train_dense(init, train, valid, out, DenseConfig(epochs=2, resume=True, **cfg), progress=True)
    printed = capsys.readouterr().out
    assert "resumed" in printed and "mining round 1" in printed
    assert [r["epoch"] for r in rec["log"]] == [1, 2] and [r["phase"] for r in rec["log"]] == [0, 1]
    assert rec["mining"][0]["pool"] == 9  # 18 of the 24 negatives fill two 3 x 3 mosaics; the worst half
    model = load_model(out)
    t = model.metadata["cell_threshold"]
    assert 0 < t < 1 and model.metadata["dense_stage"]["platt"]["a"] != 0
    cal = model.metadata["patch_calibration"]  # isolated patches: their own Platt fit, on the selection part
    assert cal == {k: model.metadata["dense_stage"]["patch_platt"][k] for k in ("a", "b")} and cal["a"] != 0
    assert model.metadata["dense_stage"]["best_epoch"] in (1, 2)
    from wsi_vssm.training.data.fingerprints import patch_digests, patches_seen  # for evaluate's warning

    assert patches_seen(patch_digests(train), model.metadata) == {"trained": 48, "selected": 0, "either": 48}
    assert patches_seen(patch_digests(valid), model.metadata) == {"trained": 0, "selected": 24, "either": 24}
    assert model.metadata["date"] and model.metadata["package_version"]  # its own date, not its first stage's
    with pytest.raises(Exception, match="--resume"):  # a rerun without --resume keeps the finished epochs
        train_dense(init, train, valid, out, DenseConfig(epochs=2, **cfg), progress=False)


def test_a_truncated_or_empty_dense_checkpoint_is_one_line(tmp_path):
    """A truncated checkpoint gave a 39-line traceback; an empty one was reported as Ctrl-C (torch's EOFError,
    which click turns into an abort)."""
    write_patch_folder(tmp_path / "train", 4, seed=1)
    write_patch_folder(tmp_path / "valid", 4, seed=2)
    init = write_tiny_model(tmp_path / "init.pt")
    (tmp_path / "run" / "dense").mkdir(parents=True)
    for content in (b"PK\x03\x04 cut short", b""):
        (tmp_path / "run" / "dense" / "checkpoint.pt").write_bytes(content)
        with pytest.raises(UsageError, match="cannot read this training checkpoint") as err:
            train_dense(init, tmp_path / "train", tmp_path / "valid", tmp_path / "run" / "model.pt",
                        DenseConfig(epochs=1, resume=True, scan="cpu", valid_select=8), progress=False)
        assert "\n" not in str(err.value)


def test_an_earlier_versions_dense_checkpoint_still_resumes_with_a_warning(tmp_path):
    """Checkpoints written before settings and random states were recorded: a long run must not be lost."""
    from wsi_vssm.training.checkpoint import load_checkpoint

    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "opt": {}, "state": {"epoch": 3}, "ema": {}, "ema_updates": 7}, path)
    with pytest.warns(UserWarning, match="earlier version's checkpoint"):
        ck = load_checkpoint(path, {"lr": 1.0})
    assert ck["state"]["epoch"] == 3


def test_every_symmetry_turns_back_to_the_input_and_the_seven_differ():
    from wsi_vssm.training.dense import SYMMETRIES, turned, unturn

    x = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5)  # not square: turns swap the sides
    seen = {tuple(x.flatten().tolist())}
    for turn, flip in SYMMETRIES:
        y = turned(x, turn, flip)
        assert y.shape == ((2, 5, 3) if turn % 2 else (2, 3, 5))
        assert torch.equal(unturn(y, turn, flip), x)
        seen.add((y.shape, tuple(y.flatten().tolist())))
    assert len(SYMMETRIES) == 7 and len(seen) == 8  # no symmetry repeats another or the identity


def _one_epoch_setup(tmp_path):
    """(initial model, settings) of a one-epoch dense stage without mining on 16 + 16 patches in tmp_path."""
    write_patch_folder(tmp_path / "train", 16, seed=1)
    write_patch_folder(tmp_path / "valid", 16, seed=2)
    cfg = dict(rounds=0, round_epochs=1, epoch_patches=8, batch_size=4, mosaic_cells=9, grid=[3, 3],
               valid_select=16, eval_grid=3, warmup_steps=1, scan="cpu")
    return write_tiny_model(tmp_path / "init.pt"), cfg


def test_the_consistency_term_trains_two_views_and_logs_their_gap(tmp_path, capsys):
    """`dense.consistency`: each step also scores its inputs under a random symmetry and penalises the two views'
    token-logit difference; the epoch's mean gap is logged and printed (absent when the term is off)."""
    import csv

    init, cfg = _one_epoch_setup(tmp_path)
    rec = train_dense(init, tmp_path / "train", tmp_path / "valid", tmp_path / "on" / "model.pt",
                      DenseConfig(epochs=1, consistency=0.5, **cfg), progress=True)
    assert "view gap" in capsys.readouterr().out
    gap = rec["log"][0]["view_gap"]
    assert np.isfinite(gap) and gap > 0  # an untrained model's turned views differ
    rows = list(csv.DictReader((tmp_path / "on" / "dense" / "dense.log.csv").read_text().splitlines()))
    assert float(rows[0]["view_gap"]) == pytest.approx(gap, rel=1e-5)
    rec_off = train_dense(init, tmp_path / "train", tmp_path / "valid", tmp_path / "off" / "model.pt",
                          DenseConfig(epochs=1, **cfg), progress=True)
    assert np.isnan(rec_off["log"][0]["view_gap"]) and "view gap" not in capsys.readouterr().out
    # the gap is in the loss: with a large weight the step losses are dominated by it
    big = train_dense(init, tmp_path / "train", tmp_path / "valid", tmp_path / "big" / "model.pt",
                      DenseConfig(epochs=1, consistency=1000.0, **cfg), progress=False)["log"][0]
    assert big["train_loss"] > 100 * big["view_gap"] > 0
    with pytest.raises(UsageError, match="consistency"):
        DenseConfig(consistency=-1.0)


def test_distill_learns_the_starts_tta_probability_kept_for_a_resume(tmp_path, capsys, monkeypatch):
    """`dense.distill`: soft centre-token targets, the start model's 8-view TTA probability of each training
    patch, computed once and kept beside the checkpoint (a resumed run reads them, not a newer model's)."""
    import wsi_vssm.training.patch_eval as patch_eval

    write_patch_folder(tmp_path / "train", 12, seed=1)
    write_patch_folder(tmp_path / "valid", 12, seed=2)
    init = write_tiny_model(tmp_path / "init.pt")
    cfg = dict(rounds=0, round_epochs=2, epoch_patches=8, batch_size=4, mosaic_cells=9, grid=[3, 3],
               valid_select=12, eval_grid=3, warmup_steps=1, scan="cpu", distill=1.0)
    out = tmp_path / "run" / "model.pt"
    train_dense(init, tmp_path / "train", tmp_path / "valid", out, DenseConfig(epochs=1, **cfg), progress=True)
    assert "soft targets: the start's 8-view TTA on 24 training patches" in capsys.readouterr().out
    with np.load(tmp_path / "run" / "dense" / "teacher_tta.npz") as z:
        kept = z["probs"]
    assert kept.shape == (24,) and kept.dtype == np.float32 and ((kept > 0) & (kept < 1)).all()
    calls = []
    real = patch_eval.predict_patches
    monkeypatch.setattr(patch_eval, "predict_patches", lambda *a, **k: calls.append(k) or real(*a, **k))
    rec = train_dense(init, tmp_path / "train", tmp_path / "valid", out,
                      DenseConfig(epochs=2, resume=True, **cfg), progress=False)
    assert [r["epoch"] for r in rec["log"]] == [1, 2]
    assert not any(k.get("tta") for k in calls)  # the kept targets were read, not computed from the newer model
    with np.load(tmp_path / "run" / "dense" / "teacher_tta.npz") as z:
        np.testing.assert_array_equal(z["probs"], kept)
    # the same cache beside a run on other training patches is not taken for its targets
    import shutil

    write_patch_folder(tmp_path / "train2", 12, seed=3)
    (tmp_path / "other" / "dense").mkdir(parents=True)
    shutil.copy(tmp_path / "run" / "dense" / "teacher_tta.npz", tmp_path / "other" / "dense")
    calls.clear()
    train_dense(init, tmp_path / "train2", tmp_path / "valid", tmp_path / "other" / "model.pt",
                DenseConfig(epochs=1, **cfg), progress=False)
    assert any(k.get("tta") for k in calls)
    with pytest.raises(UsageError, match="distill"):
        DenseConfig(distill=-0.5)
    # the soft target is in the loss: a large weight on it raises the step loss far above the token loss
    big = train_dense(init, tmp_path / "train", tmp_path / "valid", tmp_path / "big" / "model.pt",
                      DenseConfig(epochs=1, **{**cfg, "distill": 1000.0}), progress=False)["log"][0]
    assert big["train_loss"] > 50 * rec["log"][0]["train_loss"]


def test_a_checkpoint_whose_log_predates_view_gap_resumes_and_writes_its_log(tmp_path):
    """Rows logged before the view_gap column existed raised KeyError when the log was written after a resume."""
    write_patch_folder(tmp_path / "train", 8, seed=1)
    write_patch_folder(tmp_path / "valid", 8, seed=2)
    init = write_tiny_model(tmp_path / "init.pt")
    cfg = dict(rounds=0, round_epochs=3, epoch_patches=8, batch_size=4, mosaic_cells=9, grid=[3, 3],
               valid_select=8, eval_grid=2, warmup_steps=1, scan="cpu")
    out = tmp_path / "run" / "model.pt"
    train_dense(init, tmp_path / "train", tmp_path / "valid", out, DenseConfig(epochs=1, **cfg), progress=False)
    ckpt = tmp_path / "run" / "dense" / "checkpoint.pt"
    ck = torch.load(ckpt, weights_only=False)
    for row in ck["state"]["log"]:
        del row["view_gap"]
    torch.save(ck, ckpt)
    rec = train_dense(init, tmp_path / "train", tmp_path / "valid", out, DenseConfig(epochs=2, resume=True, **cfg),
                      progress=False)
    assert [r["epoch"] for r in rec["log"]] == [1, 2]
    lines = (tmp_path / "run" / "dense" / "dense.log.csv").read_text().splitlines()
    assert lines[0].endswith(",view_gap") and len(lines) == 3


def test_a_finished_dense_stage_resumes_with_one_more_mining_round(tmp_path, capsys):
    """`--resume --set dense.rounds=N+1` continues a stage whose last phase ended with a further mining round
    (refused before: rounds had to match the checkpoint); fewer rounds than already ran are refused."""
    write_patch_folder(tmp_path / "train", 12, seed=1)
    write_patch_folder(tmp_path / "valid", 12, seed=2)
    init = write_tiny_model(tmp_path / "init.pt")
    cfg = dict(round_epochs=1, epoch_patches=8, batch_size=4, mosaic_cells=9, grid=[3, 3], valid_select=12,
               eval_grid=3, warmup_steps=1, hard_top=0.5, scan="cpu")
    out = tmp_path / "run" / "model.pt"
    first = train_dense(init, tmp_path / "train", tmp_path / "valid", out, DenseConfig(epochs=4, rounds=0, **cfg),
                        progress=False)
    assert [r["phase"] for r in first["log"]] == [0] and first["mining"] == []
    rec = train_dense(init, tmp_path / "train", tmp_path / "valid", out,
                      DenseConfig(epochs=4, rounds=1, resume=True, **cfg), progress=True)
    assert "mining round 1" in capsys.readouterr().out
    assert [r["phase"] for r in rec["log"]] == [0, 1] and len(rec["mining"]) == 1
    assert [p["phase"] for p in rec["phases"]] == [0, 1]  # each phase recorded once
    with pytest.raises(UsageError, match="other settings: hard_top="):  # the mined pool's rule may not change
        train_dense(init, tmp_path / "train", tmp_path / "valid", out,
                    DenseConfig(epochs=4, rounds=2, resume=True, **{**cfg, "hard_top": 0.2}), progress=False)
    with pytest.raises(UsageError, match="1 mining rounds already ran; dense.rounds 0 cannot be fewer"):
        train_dense(init, tmp_path / "train", tmp_path / "valid", out,
                    DenseConfig(epochs=5, rounds=0, resume=True, **cfg), progress=False)
    ran = rec["epochs_run"]  # fewer epochs than the checkpoint holds were accepted and recorded as the stage's
    with pytest.raises(UsageError, match=f"{ran} epochs already ran; dense.epochs {ran - 1} cannot be fewer"):
        train_dense(init, tmp_path / "train", tmp_path / "valid", out,
                    DenseConfig(epochs=ran - 1, rounds=1, resume=True, **cfg), progress=False)


def test_a_checkpoint_resumes_from_its_start_model_by_contents(tmp_path):
    """A run folder copied to branch an experiment, or moved: its checkpoints name the original folder's start
    model. The run records that file's sha256 when it starts, so a file with those contents is the same start,
    wherever it lies now; a changed one is refused, even at the recorded path and even when it changed while the
    run was going (every later checkpoint still records the start as it was)."""
    import shutil

    from wsi_vssm.training.checkpoint import load_checkpoint, save_checkpoint, with_start_digests

    a, b = tmp_path / "run" / "context.pt", tmp_path / "copy" / "context.pt"
    a.parent.mkdir()
    a.write_bytes(b"weights" * 1000)
    run = with_start_digests({"init": str(a), "lr": 0.1})
    save_checkpoint(tmp_path / "ck.pt", {"state": {"epoch": 3}}, run)
    shutil.copytree(a.parent, b.parent)

    def resume(path, lr=0.1):
        return load_checkpoint(tmp_path / "ck.pt", with_start_digests({"init": str(path), "lr": lr}))

    assert resume(b)["state"]["epoch"] == 3
    with pytest.raises(UsageError, match="other settings: lr="):  # other settings are still compared
        resume(b, lr=0.2)
    b.write_bytes(b"weights" * 999 + b"changed")
    with pytest.raises(UsageError, match="other settings: init=.*: not the file it started from"):
        resume(b)
    shutil.copy(a, b)
    a.unlink()  # the folder was moved, not copied: its contents still show the start is the same
    assert resume(b)["state"]["epoch"] == 3
    with pytest.raises(UsageError, match="other settings: init=.*: no such file"):  # nothing there any more
        resume(a)
    a.write_bytes(b"retrained" * 1000)  # the start model made again at its recorded path: not the same start
    with pytest.raises(UsageError, match="other settings: init=.*: not the file it started from"):
        resume(a)
    save_checkpoint(tmp_path / "ck.pt", {"state": {"epoch": 4}}, run)  # a later epoch of the same run
    with pytest.raises(UsageError, match="not the file it started from"):  # still the start as it was
        resume(a)
    assert resume(b)["state"]["epoch"] == 4


def test_a_checkpoint_without_the_start_digest_compares_the_files(tmp_path):
    """Checkpoints written before the digest was recorded (or of a run that rewrites its start file): a
    byte-identical copy is the same start, a path spelt the same is too; a moved folder cannot be shown to be."""
    import shutil

    from wsi_vssm.training.checkpoint import load_checkpoint, save_checkpoint, with_start_digests

    a, b = tmp_path / "run" / "context.pt", tmp_path / "copy" / "context.pt"
    a.parent.mkdir()
    a.write_bytes(b"weights" * 1000)
    save_checkpoint(tmp_path / "ck.pt", {"state": {"epoch": 3}}, {"init": str(a), "lr": 0.1})
    shutil.copytree(a.parent, b.parent)
    assert load_checkpoint(tmp_path / "ck.pt", with_start_digests({"init": str(b), "lr": 0.1}))["state"]["epoch"] == 3
    a.write_bytes(b"fine-tuned in place")  # a run whose start file is its output
    skipped = with_start_digests({"init": str(a), "lr": 0.1}, output=a)
    assert skipped["file_digests"] == {} and load_checkpoint(tmp_path / "ck.pt", skipped)["state"]["epoch"] == 3
    a.unlink()
    with pytest.raises(UsageError, match="other settings: init="):
        load_checkpoint(tmp_path / "ck.pt", with_start_digests({"init": str(b), "lr": 0.1}))


def test_another_token_specificity_moves_only_the_threshold_not_the_logged_figure(tmp_path):
    """The recipe's `dense.token_specificity` is 0.99 since r15; the log's fixed 99.5% sensitivity column stays
    (a KeyError at the stage's end before)."""
    from wsi_vssm.models.slide_model import load_model

    init, cfg = _one_epoch_setup(tmp_path)
    out = tmp_path / "run" / "model.pt"
    rec = train_dense(init, tmp_path / "train", tmp_path / "valid", out,
                      DenseConfig(epochs=1, token_specificity=0.99, **cfg), progress=False)
    assert rec["token_specificity"] == 0.99 and np.isfinite(rec["log"][0]["sensitivity_at_0.995"])
    assert load_model(out).metadata["cell_threshold"] == rec["cell_threshold"]
