"""Cell-stage training: a tiny run learns and writes its log and model; region crops give the right token labels."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_patch_folder
from PIL import Image

from wsi_vssm.models.slide_model import load_model
from wsi_vssm.outputs.report import roc_auc_or_nan as roc_auc
from wsi_vssm.training.cells import TrainCellsConfig, train_cells
from wsi_vssm.training.data.patches import PatchDataError, load_patches, split_select_holdout, training_patches
from wsi_vssm.training.data.region_crops import RegionCropDataset, find_annotated_slides

MPP = 0.97
REPO = Path(__file__).resolve().parents[2]


def _patches(root, n_per_class: int, seed: int):
    write_patch_folder(root, n_per_class, seed)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("patches")
    _patches(root / "train", 24, 0)
    _patches(root / "valid", 12, 1)
    return root


def test_load_patches_folder_and_subset(tiny_folder, tmp_path):
    ds = load_patches(tiny_folder / "train")
    assert len(ds) == 48 and ds.labels.sum() == 24
    rgb, label = ds[0]
    assert rgb.shape == (96, 96, 3) and rgb.dtype == np.uint8 and label in (0, 1)
    sub = load_patches(tiny_folder / "train", max_items=10, seed=3)
    assert len(sub) == 10 and sub.labels.sum() == 5
    sel, hold = split_select_holdout(ds, 0)
    assert not {it.name for it in sel.items} & {it.name for it in hold.items}
    with pytest.raises(PatchDataError, match="not found"):
        load_patches(tmp_path / "nope")
    with pytest.raises(PatchDataError, match="ImageFolder"):
        load_patches(tmp_path)


def test_load_patches_from_tar(tiny_folder, tmp_path):
    import tarfile

    tar = tmp_path / "t.tar"
    with tarfile.open(tar, "w") as t:
        t.add(tiny_folder / "valid", arcname="data/valid")
    ds = load_patches(tar)
    assert len(ds) == 24 and ds.labels.sum() == 12 and ds[3][0].shape == (96, 96, 3)


def test_roc_auc():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert np.isnan(roc_auc([1, 1], [0.1, 0.2]))


def test_two_epoch_run_learns(tiny_folder, tmp_path):
    out = tmp_path / "m.pt"
    cfg = TrainCellsConfig(epochs=2, batch_size=16, lr=2e-3, seed=0, mil_bags=16, mil_bag_size=4, mil_patches=16,
                           mil_steps=20)
    r = train_cells(tiny_folder / "train", tiny_folder / "valid", out, cfg, progress=False)
    assert out.is_file() and out.with_suffix(".log.csv").is_file()
    with open(out.with_suffix(".log.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_loss", "valid_loss", "valid_auc", "seconds"} <= set(rows[0])
    assert r.select["auc"] > 0.8 and r.holdout["auc"] > 0.8
    model = load_model(out)
    meta = model.metadata
    assert meta["seed"] == 0 and meta["best_epoch"] == r.best_epoch and meta["mil_stage"]["bags"] == 16
    assert meta["config"]["epochs"] == 2 and meta["package_version"]
    # a seed reproduces weights only at the same thread count on the same CPU: the model says where it was made
    assert meta["torch_threads"] == torch.get_num_threads() and meta["machine"]


def test_min_epochs_holds_off_the_early_stop(tiny_folder, tmp_path, monkeypatch):
    """r9's context stage dipped under its epoch-2 best for five epochs at the peak learning rate and was one epoch
    from an early stop; `min_epochs` lets a recipe wait for the schedule's decay before patience may end it."""
    from wsi_vssm.training import cells

    real, scores = cells._select_metrics, iter([0.9, 0.8, 0.8, 0.95, 0.8, 0.8])

    def scripted(*args, **kwargs):  # the real metrics, with a score that peaks early, dips, then beats it
        return {**real(*args, **kwargs), "score": next(scores)}

    monkeypatch.setattr(cells, "_select_metrics", scripted)
    kw = dict(epochs=6, batch_size=16, seed=0, mil_bags=0, patience=1)
    r = train_cells(tiny_folder / "train", tiny_folder / "valid", tmp_path / "a.pt", TrainCellsConfig(**kw),
                    progress=False)
    assert [row["epoch"] for row in r.log] == [1, 2] and r.best_epoch == 1  # patience 1: stopped in the dip
    scores = iter([0.9, 0.8, 0.8, 0.95, 0.8, 0.8])
    r = train_cells(tiny_folder / "train", tiny_folder / "valid", tmp_path / "b.pt",
                    TrainCellsConfig(**kw, min_epochs=4), progress=False)
    assert [row["epoch"] for row in r.log] == [1, 2, 3, 4, 5] and r.best_epoch == 4  # then patience applies again

    # a run stopped early and interrupted while finishing resumes under the --min-epochs it is given now
    real_finish, scores = cells.finish_model, iter([0.9, 0.8, 0.8, 0.95, 0.8, 0.8])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cells, "finish_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_cells(tiny_folder / "train", tiny_folder / "valid", tmp_path / "c.pt", TrainCellsConfig(**kw),
                    progress=False)
    monkeypatch.setattr(cells, "finish_model", real_finish)
    r = train_cells(tiny_folder / "train", tiny_folder / "valid", tmp_path / "c.pt",
                    TrainCellsConfig(**kw, min_epochs=4, resume=True), progress=False)
    assert [row["epoch"] for row in r.log] == [1, 2, 3, 4, 5] and r.best_epoch == 4


def test_tta_is_the_mean_over_the_eight_views(tiny_folder, tmp_path, capsys):
    from conftest import write_tiny_model

    from wsi_vssm.models.inputs import normalise_batch as normalise
    from wsi_vssm.training.cells import main
    from wsi_vssm.training.patch_eval import centre_logits, predict_patches

    model = load_model(write_tiny_model(tmp_path / "m.pt"))
    ds = load_patches(tiny_folder / "valid").subset(range(5))
    x = normalise(torch.from_numpy(np.stack([ds[i][0] for i in range(5)])).permute(0, 3, 1, 2).float() / 255)
    with torch.no_grad():
        views = [torch.rot90(x.flip(3) if f else x, k, (2, 3)) for f in (0, 1) for k in range(4)]
        expect = torch.stack([torch.sigmoid(centre_logits(model, v)) for v in views]).mean(0).numpy()
        plain = torch.sigmoid(centre_logits(model, x)).numpy()
    np.testing.assert_allclose(predict_patches(model, ds, tta=True), expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(predict_patches(model, ds), plain, rtol=1e-5, atol=1e-6)
    assert main(["--evaluate", str(tmp_path / "m.pt"), "--valid", str(tiny_folder / "valid"), "--tta"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "AUC" in ln]
    assert len(lines) == 2 and "8-view TTA" in lines[1] and "TTA" not in lines[0]


def test_weight_average_follows_the_weights():
    from wsi_vssm.training.cells import WeightAverage

    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    avg = WeightAverage(net, decay=0.99)
    with torch.no_grad():
        net.weight.fill_(1.0)
    avg.update(net)  # first update: decay capped at 2/11, so the average moves most of the way
    assert avg.model.weight.item() == pytest.approx(1 - 2 / 11)
    for _ in range(2000):
        avg.update(net)
    assert avg.model.weight.item() == pytest.approx(1.0, abs=1e-6)
    assert not avg.model.weight.requires_grad


def test_ema_run_selects_and_saves_the_average(tiny_folder, tmp_path):
    from wsi_vssm.training.cells import split_valid
    from wsi_vssm.training.patch_eval import evaluate

    runs = {}
    for ema in (0.0, 0.5):
        cfg = TrainCellsConfig(epochs=1, batch_size=16, seed=0, ema=ema, mil_bags=0)
        r = train_cells(tiny_folder / "train", tiny_folder / "valid", tmp_path / f"m{ema}.pt", cfg, progress=False)
        runs[ema] = (r, load_model(tmp_path / f"m{ema}.pt"))
    (_, raw), (r, avg) = runs[0.0], runs[0.5]
    assert avg.metadata["config"]["ema"] == 0.5
    # same seed, same raw trajectory: the EMA file holds other weights (the average), and they are what was
    # validated (its recorded selection AUC is the file's own)
    w_raw, w_avg = raw.mil.cell_head.weight.detach(), avg.mil.cell_head.weight.detach()
    assert not torch.allclose(w_raw, w_avg)
    select, _ = split_valid(load_patches(tiny_folder / "valid"), cfg)
    assert evaluate(avg, select)["auc"] == pytest.approx(r.select["auc"])
    with pytest.raises(Exception, match="ema"):
        TrainCellsConfig(ema=1.0)


def test_bf16_training_runs_where_the_cpu_has_bf16(tiny_folder, tmp_path, monkeypatch):
    from wsi_vssm.models import precision

    monkeypatch.setattr(precision, "bf16_supported", lambda device="cpu": True)  # as on an AMX / AVX512-BF16 CPU
    cfg = TrainCellsConfig(epochs=1, batch_size=16, max_train=32, seed=0, mil_bags=0, precision="bf16")
    r = train_cells(tiny_folder / "train", tiny_folder / "valid", tmp_path / "bf16.pt", cfg, progress=False)
    assert np.isfinite(r.log[0]["train_loss"]) and load_model(tmp_path / "bf16.pt").metadata["config"]["precision"] \
        == "bf16"


def test_drop_path_option_sets_stochastic_depth_for_training_only(tiny_folder):
    from wsi_vssm.training.cells import _initial_model

    model = _initial_model(TrainCellsConfig(drop_path=0.2, mil_bags=0))
    rates = [b.drop_path.rate for s in model.backbone.layers for b in s.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)
    x = torch.randn(4, 3, 96, 96)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.backbone.forward_features(x), model.backbone.forward_features(x))
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(model.backbone.forward_features(x), model.backbone.forward_features(x))
    plain = _initial_model(TrainCellsConfig(mil_bags=0))  # None: the architecture's own rate (micro: 0)
    assert all(b.drop_path.rate == 0.0 for s in plain.backbone.layers for b in s.blocks)
    with pytest.raises(Exception, match="drop_path"):
        TrainCellsConfig(drop_path=1.0)


# ---------------------------------------------------------------------------------------------------- regions
def _write_slide(path, lesion_box):
    """A 1024 px pink-tissue slide at MPP with a dark lesion square; its ASAP XML beside it."""
    from wsi_vssm.synth.asap import asap_xml
    from wsi_vssm.synth.writer import write_pyramid

    rng = np.random.default_rng(0)
    img = (np.array([215, 150, 195]) + rng.integers(-20, 20, (1024, 1024, 3))).clip(0, 255).astype(np.uint8)
    img[:, 768:] = 245  # background strip: no tissue
    x0, y0, x1, y1 = lesion_box
    img[y0:y1, x0:x1] = (img[y0:y1, x0:x1] * 0.5).astype(np.uint8)
    write_pyramid(path, (1024, 1024), lambda x, y: img[y:y + 256, x:x + 256], MPP, workers=1)
    poly = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)
    path.with_suffix(".xml").write_bytes(asap_xml([poly]))


def test_region_crops_token_labels(tmp_path):
    # lesion covers tokens x 2..4 fully, and 48 px (> half) of token 5 columns; rows 3..6 of the first crop
    _write_slide(tmp_path / "tumor_001.tif", (64, 96, 176, 224))
    pairs = find_annotated_slides(tmp_path)
    assert len(pairs) == 1 and pairs[0].annotations.name == "tumor_001.xml"
    ds = RegionCropDataset(pairs, mpp=MPP, crop_px=256, min_tissue=0.25)
    starts = sorted((c.x, c.y) for c in ds.crops)
    assert (768.0, 0.0) not in starts and (0.0, 0.0) in starts  # background crops dropped
    k = [i for i, c in enumerate(ds.crops) if (c.x, c.y) == (0.0, 0.0)][0]
    rgb, labels, valid = ds[k]
    assert rgb.shape == (256, 256, 3) and labels.shape == (8, 8) and valid.mean() > 0.7  # mask edges may be lost
    expected = np.zeros((8, 8), np.float32)
    expected[3:7, 2:5] = 1  # cols 64..176 px: tokens 2, 3, 4 full; token 5 holds 16 of 32 px (not > half) -> 0
    np.testing.assert_array_equal(labels, expected)


def test_train_with_region_source(tiny_folder, tmp_path):
    (tmp_path / "slides").mkdir()
    _write_slide(tmp_path / "slides" / "tumor_001.tif", (64, 96, 176, 224))
    cfg = TrainCellsConfig(epochs=1, batch_size=16, max_train=16, mil_bags=0, region_batch=1, region_crop_px=256)
    r = train_cells(tiny_folder / "train", tiny_folder / "valid", tmp_path / "m.pt", cfg, slides=tmp_path / "slides",
                    progress=False)
    assert np.isfinite(r.log[0]["train_loss"])
    assert load_model(tmp_path / "m.pt").metadata["slides"].endswith("slides")


def test_untrained_models_rank_the_tiny_data_either_way_round(tiny_folder):
    """Guard for the learning test above (AUC > 0.8 after training). The dark centre changes a random network's
    features a lot, so an untrained model's AUC is far from 0.5 but its sign is arbitrary: across seeds some rank
    the classes the wrong way round. AUC > 0.8 after training then reflects the labels, not the architecture."""
    from wsi_vssm.models.slide_model import SlideModel
    from wsi_vssm.training.patch_eval import evaluate

    valid = load_patches(tiny_folder / "valid")
    aucs = []
    for seed in range(5):
        torch.manual_seed(seed)
        res = evaluate(SlideModel.create("micro"), valid)
        assert res["n"] == 24
        aucs.append(res["auc"])
    assert min(aucs) < 0.5, f"untrained AUCs {aucs}: every untrained model already ranks tumour first"


# ---------------------------------------------------------------------------------------------------- commands
def test_cli_train_cells(tiny_folder, tmp_path, capsys):
    from click.testing import CliRunner

    from wsi_vssm.commands.train_cells import command

    out = tmp_path / "c.pt"
    res = CliRunner().invoke(command, ["--data", str(tiny_folder / "train"), "--valid", str(tiny_folder / "valid"),
                                       "--out", str(out), "--epochs", "1", "--batch-size", "8", "--max-train", "16",
                                       "--log", str(tmp_path / "log.json")])
    assert res.exit_code == 0, res.output
    assert "valid(select" in res.output and "held-back" in res.output
    # 12 held-back patches make no 8 x 8 mosaic: it printed "(n=0): AUC nan acc nan"
    assert "too few of them for one 8 x 8 mosaic (no in-context figure)" in res.output and "nan" not in res.output
    assert out.is_file() and (tmp_path / "log.json").is_file()
    # one's own patches are said to be one's own (every model was described as PCam's lymph nodes at 0.97 um/px)
    from wsi_vssm.models.slide_model import domain_text

    trained = load_model(out)
    assert domain_text(trained) == "patches of train at about 0.97 um/px" and trained.mpp == 0.97
    half = tmp_path / "h.pt"
    res = CliRunner().invoke(command, ["--data", str(tiny_folder / "train"), "--valid", str(tiny_folder / "valid"),
                                       "--out", str(half), "--epochs", "1", "--batch-size", "8", "--max-train", "16",
                                       "--mpp", "0.5", "--domain", "H&E tonsil patches at 20x"])
    assert res.exit_code == 0, res.output
    assert load_model(half).mpp == 0.5 and domain_text(load_model(half)) == "H&E tonsil patches at 20x"
    tuned = tmp_path / "t.pt"  # fine-tune it on patches and 2 x 2 mosaics
    res = CliRunner().invoke(command, ["--data", str(tiny_folder / "train"), "--valid", str(tiny_folder / "valid"),
                                       "--out", str(tuned), "--epochs", "1", "--batch-size", "8", "--max-train", "16",
                                       "--init", str(out), "--mosaic-grid", "2", "--region-batch", "1",
                                       "--ema", "0.5"])
    assert res.exit_code == 0, res.output
    cfg = load_model(tuned).metadata["config"]
    assert (cfg["init"], cfg["mosaic_grid"], cfg["region_batch"], cfg["ema"]) == (str(out), 2, 1, 0.5)
    # the file knows which patches trained it and which selected it, and evaluate says so of a folder that holds
    # them (the default model's selection patches were evaluated as if new, with no word)
    from conftest import run_cli_captured

    from wsi_vssm.training.data.fingerprints import patch_digests, patches_seen

    valid = patch_digests(load_patches(tiny_folder / "valid"))
    assert patches_seen(patch_digests(load_patches(tiny_folder / "train")), trained.metadata)["trained"] == 16
    assert patches_seen(valid, trained.metadata) == {"trained": 0, "selected": 12, "either": 12}
    code, _, err = run_cli_captured(["evaluate", tiny_folder / "valid", "--mpp", "0.97", "--model", out,
                                     "--out", tmp_path / "ev", "--bootstrap", "100"], capsys)
    assert code == 0 and "12 of the 24 scored patches trained (0) or selected (12) this model" in err
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["model_patches"] == {"trained": 0, "selected": 12, "either": 12}
    # and names them (the warning asked for a folder without them, and nothing said which)
    import csv

    with open(tmp_path / "ev" / "model_patches.csv", newline="") as f:
        named = list(csv.DictReader(f))
    assert len(named) == 12 and {r["part"] for r in named} == {"selected"}
    assert "model_patches.csv names them" in err
    digests = dict(zip([it.name for it in load_patches(tiny_folder / "valid").items], valid, strict=True))
    assert patches_seen(np.array([digests[r["patch"]] for r in named]), trained.metadata)["selected"] == 12
    # --init trains the file's backbone: a --model naming another was recorded as if it had been trained
    res = CliRunner().invoke(command, ["--data", str(tiny_folder / "train"), "--valid", str(tiny_folder / "valid"),
                                       "--out", str(tmp_path / "x.pt"), "--epochs", "1", "--init", str(out),
                                       "--model", "tiny"])
    assert res.exit_code != 0 and "stage widths [32, 64, 128, 256], not tiny's" in str(res.exception)
    assert not (tmp_path / "x.pt").exists()


def test_run_recipe_with_overrides(tiny_folder, tmp_path):
    from click.testing import CliRunner

    from wsi_vssm.commands.run import command

    recipe = REPO / "pipelines" / "default.toml"
    res = CliRunner().invoke(command, [str(recipe), "--out", str(tmp_path / "run"),
                                       "--set", f"data.train={tiny_folder / 'train'}",
                                       "--set", f"data.valid={tiny_folder / 'valid'}",
                                       "--set", "cells.epochs=1", "--set", "cells.epoch_size=16",
                                       "--set", "cells.batch_size=8", "--set", "cells.valid_select=12",
                                       "--set", "cells.mil_bags=8", "--set", "cells.mil_patches=16",
                                       "--set", "cells.mil_steps=10", "--set", 'recipe.stages=["cells"]'])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "model.pt").is_file() and (tmp_path / "run" / "recipe.resolved.json").is_file()
    assert load_model(tmp_path / "run" / "model.pt").metadata["config"]["epoch_size"] == 16


def _tiny_recipe(tiny_folder, *extra: str) -> list[str]:
    return ["--set", f"data.train={tiny_folder / 'train'}", "--set", f"data.valid={tiny_folder / 'valid'}",
            "--set", "cells.epochs=1", "--set", "cells.epoch_size=16", "--set", "cells.batch_size=8",
            "--set", "cells.valid_select=12", "--set", "cells.mil_bags=0", "--set", "context.epochs=1",
            "--set", "context.mosaic_grid=2", *extra]


def test_run_resume_skips_finished_stages_and_reruns_changed_ones(tiny_folder, tmp_path):
    """`run --resume` retrained every finished stage, and the context stage then started from the old cells.pt
    (its new cells were thrown away). Finished stages with the same settings are now skipped; a stage that runs
    again feeds the next one."""
    import hashlib
    import json

    from click.testing import CliRunner

    from wsi_vssm.commands.run import command

    recipe, out = str(REPO / "pipelines" / "default.toml"), tmp_path / "run"
    stages = ["--set", 'recipe.stages=["cells","context"]']

    def run(*extra):
        res = CliRunner().invoke(command, [recipe, "--out", str(out), *_tiny_recipe(tiny_folder, *stages, *extra)])
        assert res.exit_code == 0, res.output
        return res.output

    def digest(name):
        return hashlib.sha256((out / name).read_bytes()).hexdigest()

    run()
    assert json.loads((out / "recipe.progress.json").read_text())["done"][1]["stage"] == "context"
    assert load_model(out / "model.pt").metadata["stage"] == "context"  # it said "cells"
    first = {n: digest(n) for n in ("cells.pt", "context.pt", "model.pt")}
    printed = run("--resume")
    assert printed.count("skipped (--resume)") == 2 and digest("model.pt") == first["model.pt"]
    printed = run("--resume", "--set", "cells.seed=1")  # the cells stage changes: both run again
    assert "skipped" not in printed and digest("cells.pt") != first["cells.pt"]
    assert "cells: settings changed since the earlier run (settings.seed 0 -> 1); runs again" in printed
    context_init = load_model(out / "model.pt").metadata["config"]["init"]
    assert context_init == str(out / "cells.pt")  # the new cells, not the old ones
    assert load_model(out / "cells.pt").metadata["config"]["seed"] == 1
    run("--set", "cells.seed=2", "--set", 'recipe.stages=["cells"]')  # cells alone: context's record goes stale
    printed = run("--resume", "--set", "cells.seed=2")
    assert "cells: done before" in printed and "context: done before" not in printed


def test_run_resume_after_a_stop_in_cells_and_in_context_ends_as_an_uninterrupted_run(tiny_folder, tmp_path,
                                                                                         monkeypatch):
    """`run --resume` after a stop in the cells stage deleted OUT/model.work.pt, which holds the stage's best epoch
    so far, then refused to go on without it ("put it back"); after a stop in the context stage it copied cells.pt
    over that file, so a resumed context stage that found no better epoch ended with the cells stage's weights."""
    from click.testing import CliRunner

    import wsi_vssm.training.recipe as recipe_mod
    from wsi_vssm.commands.run import command
    from wsi_vssm.training import cells

    recipe = str(REPO / "pipelines" / "default.toml")
    extra = ["--set", 'recipe.stages=["cells","context"]', "--set", "cells.epochs=2", "--set", "context.epochs=2",
             "--set", "cells.min_epochs=0", "--set", "context.min_epochs=0"]

    def run(out, *more):
        return CliRunner().invoke(command, [recipe, "--out", str(out), *_tiny_recipe(tiny_folder, *extra, *more)])

    whole = run(tmp_path / "a")
    assert whole.exit_code == 0, whole.output
    real, second_epochs = cells._train_epoch, []

    def stops(*args, **kwargs):  # Ctrl-C in the cells stage's second epoch, then in the context stage's
        if args[6] == 2:
            second_epochs.append(1)
            if len(second_epochs) in (1, 3):  # the 2nd is the resumed cells stage's second epoch
                raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cells, "_train_epoch", stops)
    out = tmp_path / "b"
    assert run(out).exit_code != 0 and (out / "cells.checkpoint.pt").is_file()
    res = run(out, "--resume")
    assert res.exit_code != 0 and "is missing" not in res.output, res.output
    assert (out / "cells.pt").is_file() and (out / "context.checkpoint.pt").is_file(), res.output
    best_so_far = (out / "model.work.pt").read_bytes()  # the context stage's first epoch
    # a later run (other cells settings, stopped) wrote the work model after that checkpoint: not its best epoch
    ckpt_ns = (out / "context.checkpoint.pt").stat().st_mtime_ns
    os.utime(out / "model.work.pt", ns=(ckpt_ns + 10**9, ckpt_ns + 10**9))
    res = run(out, "--resume")
    assert res.exit_code != 0 and "was written after" in str(res.exception), (res.output, res.exception)
    os.utime(out / "model.work.pt", ns=(ckpt_ns - 10**9, ckpt_ns - 10**9))
    real_stage, handed = recipe_mod._stage_context, []

    def context_stage(recipe, path, *args, **kwargs):
        handed.append(path.read_bytes())
        return real_stage(recipe, path, *args, **kwargs)

    monkeypatch.setattr(recipe_mod, "_stage_context", context_stage)
    res = run(out, "--resume")
    assert res.exit_code == 0, res.output
    assert handed == [best_so_far], "the resumed context stage was handed another model than its best so far"
    for name in ("cells.pt", "model.pt"):
        a, b = (load_model(d / name).state_dict() for d in (tmp_path / "a", out))
        assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) == 0.0, name


def test_a_rerun_stage_stopped_early_keeps_the_later_stages_checkpoints(tiny_folder, tmp_path, monkeypatch):
    """`run --resume` after a default had changed (here: a setting given differently) reran the finished stage
    and deleted the later stages' checkpoints before that stage had trained at all, so stopping at once on
    reading "settings changed" still lost the later stage's hours. They are now removed only when the rerun
    stage finishes, and a resume with the old settings finds them."""
    from click.testing import CliRunner

    import wsi_vssm.training.recipe as recipe_mod
    from wsi_vssm.commands.run import command

    recipe, out = str(REPO / "pipelines" / "default.toml"), tmp_path / "run"
    stages = ["--set", 'recipe.stages=["cells"]']

    def run(*extra):
        return CliRunner().invoke(command, [recipe, "--out", str(out), *_tiny_recipe(tiny_folder, *stages, *extra)])

    assert run().exit_code == 0
    later = out / "context.checkpoint.pt"  # a later stage's work, built on these cells
    later.write_bytes(b"hours of context training")
    real = recipe_mod._stage_cells

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # the user stops the rerun at once

    monkeypatch.setattr(recipe_mod, "_stage_cells", stopped)
    res = run("--resume", "--set", "cells.seed=1")
    assert res.exit_code != 0 and "cells: settings changed since the earlier run (settings.seed 0 -> 1)" in res.output
    assert later.read_bytes() == b"hours of context training"
    monkeypatch.setattr(recipe_mod, "_stage_cells", real)
    res = run("--resume")  # the old settings: cells is done, the later checkpoint still there
    assert res.exit_code == 0 and "cells: done before with these settings" in res.output and later.is_file()
    res = run("--resume", "--set", "cells.seed=1")  # the rerun finishes: only then is the later checkpoint stale
    assert res.exit_code == 0, res.output
    assert not later.exists() and "its checkpoint" in res.output and "ran again: removed" in res.output


def test_a_recipe_run_records_how_and_on_what_and_resumes_what_changed(tiny_folder, tmp_path, monkeypatch):
    """Found running recipes as users edit them: the model claimed the default model's PCam lymph-node domain for
    anyone's patches and kept no record of the recipe; recipe.resolved.json said `out = "runs/default"`; `~` in a
    data path was not found; a finished stage was skipped on --resume although its folder's patches had changed;
    and a later failed run's checkpoint blocked every run while --resume said "done before" and kept it."""
    import json
    import shutil

    from click.testing import CliRunner

    from wsi_vssm.commands.run import command

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_folder / "train", tmp_path / "mine")
    out = tmp_path / "run"

    def run(*extra):
        res = CliRunner().invoke(command, [str(REPO / "pipelines" / "default.toml"), "--out", str(out),
                                           *_tiny_recipe(tiny_folder, "--set", "data.train=~/mine",
                                                         "--set", 'recipe.stages=["cells"]', *extra)])
        assert res.exit_code == 0, res.output
        return res.output

    run()
    meta = load_model(out / "model.pt").metadata
    from wsi_vssm.models.slide_model import DEFAULT_DOMAIN
    from wsi_vssm.training.recipe import _domain

    assert meta["domain"] == DEFAULT_DOMAIN  # pipelines/default.toml states PCam's; a recipe without one says:
    assert _domain(TrainCellsConfig(mpp=0.5), {"train": "~/mine"}) == "patches of mine at about 0.5 um/px"
    line = meta["recipe"]["command"]
    assert line.startswith("wsi-vssm run ") and "--set 'data.train=~/mine'" in line
    assert meta["recipe"]["stages"] == ["cells"] and meta["recipe"]["resolved"]["cells"]["epochs"] == 1
    assert json.loads((out / "recipe.resolved.json").read_text())["recipe"]["out"] == str(out)
    (out / "cells.checkpoint.pt").write_bytes(b"a failed run's")  # a later run with other settings stopped
    printed = run("--resume")
    assert "cells: done before" in printed and "removed" in printed and not (out / "cells.checkpoint.pt").exists()
    next(iter((tmp_path / "mine" / "1").iterdir())).unlink()  # the folder changes under the same name
    printed = run("--resume")
    assert "settings changed since the earlier run (data_contents.train [" in printed and "skipped" not in printed


def test_a_finished_dense_stage_keeps_its_checkpoint_when_skipped(tiny_folder, tmp_path):
    """The dense stage keeps its checkpoint on purpose (--resume with a larger dense.epochs extends it); a skip
    on --resume removed it as stale, so the extension trained dense from its first epoch."""
    import json

    from conftest import write_tiny_model

    from wsi_vssm.training.recipe import _data_contents, _stage_settings, load_recipe, run_recipe

    recipe = load_recipe(REPO / "pipelines" / "default.toml")
    recipe["data"] = {"train": str(tiny_folder / "train"), "valid": str(tiny_folder / "valid")}
    recipe["recipe"]["stages"] = ["dense"]
    out = tmp_path / "run"
    (out / "dense").mkdir(parents=True)
    write_tiny_model(out / "dense.pt")
    (out / "dense" / "checkpoint.pt").write_bytes(b"the finished stage's own")
    settings = {**_stage_settings(recipe, "dense"), "data_contents": _data_contents(recipe["data"])}
    (out / "recipe.progress.json").write_text(json.dumps({"done": [{"stage": "dense", "settings": settings}]}))
    run_recipe(recipe, out, progress=False, resume=True)
    assert (out / "dense" / "checkpoint.pt").read_bytes() == b"the finished stage's own"


def test_a_rerun_that_stops_leaves_the_finished_model_in_place(tiny_folder, tmp_path, monkeypatch):
    """A rerun of a finished recipe copied an earlier stage's model over OUT/model.pt before the changed stage
    trained, so a rerun that stopped (or was refused) left the cells model where the finished one had been,
    with nothing to say so. OUT/model.pt is now replaced only when every stage is through."""
    import hashlib

    from click.testing import CliRunner

    import wsi_vssm.training.recipe as recipe_mod
    from wsi_vssm.commands.run import command

    out = tmp_path / "run"

    def run(*extra):
        return CliRunner().invoke(command, [str(REPO / "pipelines" / "default.toml"), "--out", str(out),
                                            *_tiny_recipe(tiny_folder, "--set", 'recipe.stages=["cells","context"]',
                                                          *extra)])

    def digest(name):
        return hashlib.sha256((out / name).read_bytes()).hexdigest()

    assert run().exit_code == 0
    finished = digest("model.pt")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe_mod, "_stage_context", stopped)
    res = run("--resume", "--set", "context.lr=0.0007")
    assert res.exit_code != 0 and "context: settings changed" in res.output, res.output
    assert digest("model.pt") == finished and load_model(out / "model.pt").metadata["stage"] == "context"
    assert digest("model.pt") != digest("cells.pt")


def test_a_finished_dense_stage_with_other_settings_starts_over_or_goes_on(tmp_path, monkeypatch, capsys):
    """`run --resume --set dense.lr=...` on a finished dense stage said "runs again", then refused the stage's
    own kept checkpoint ("made with other settings"). Its checkpoint is now set aside while it runs again and
    removed when it finishes; a change the checkpoint allows (more epochs) goes on from it, as before."""
    import json
    import shutil

    from conftest import write_tiny_model

    import wsi_vssm.training.recipe as recipe_mod
    from wsi_vssm.training.recipe import _data_contents, _stage_settings, load_recipe, run_recipe

    recipe = load_recipe(REPO / "pipelines" / "default.toml")
    (tmp_path / "patches").mkdir()
    recipe["data"] = {"train": str(tmp_path / "patches"), "valid": str(tmp_path / "patches")}
    recipe["recipe"]["stages"] = ["dense"]
    out = tmp_path / "run"
    (out / "dense").mkdir(parents=True)
    write_tiny_model(out / "dense.pt")
    ckpt = out / "dense" / "checkpoint.pt"
    ckpt.write_bytes(b"the finished stage's own")
    settings = {**_stage_settings(recipe, "dense"), "data_contents": _data_contents(recipe["data"])}
    (out / "recipe.progress.json").write_text(json.dumps({"done": [{"stage": "dense", "settings": settings}]}))
    seen = []

    def dense(recipe, model_path, out, progress, resume):  # what the stage finds, then a model as it writes one
        seen.append(ckpt.read_bytes() if ckpt.exists() else None)
        shutil.copyfile(out / "dense.pt", model_path)

    monkeypatch.setattr(recipe_mod, "_stage_dense", dense)
    more = {**recipe, "dense": {**recipe.get("dense", {}), "epochs": 99}}
    run_recipe(more, out, progress=False, resume=True)
    assert seen == [b"the finished stage's own"] and "goes on from its checkpoint" in capsys.readouterr().out
    other = {**more, "dense": {**more["dense"], "lr": 1e-5}}
    run_recipe(other, out, progress=False, resume=True)
    assert seen[-1] is None and "set aside" in capsys.readouterr().out  # starts over, as the line says
    assert not (out / "dense" / "checkpoint.pt.replaced").exists()  # the stage finished: the old one is gone


def test_a_recipe_without_a_stage_section_says_it_trains_on_defaults(tiny_folder, tmp_path, capsys):
    from conftest import run_cli_captured

    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[data]\ntrain = "{tiny_folder / "train"}"\nvalid = "{tiny_folder / "nowhere"}"\n')
    code, out, err = run_cli_captured(["run", recipe, "--out", tmp_path / "o"], capsys)
    assert code == 1 and "cells: the recipe has no [cells] section: it trains with the built-in defaults" in out


def test_run_resume_takes_a_path_spelt_differently_as_the_same_setting(tiny_folder, tmp_path, monkeypatch):
    """`--set data.train=./pcam` on the first run and `data.train=pcam/` on the resume named the same folder,
    yet the settings compared as written, so a finished stage trained again."""
    from click.testing import CliRunner

    from wsi_vssm.commands.run import command

    monkeypatch.chdir(tiny_folder.parent)
    name, out = tiny_folder.name, str(tmp_path / "run")

    def run(train, *extra):
        res = CliRunner().invoke(command, [str(REPO / "pipelines" / "default.toml"), "--out", out,
                                           *_tiny_recipe(tiny_folder, "--set", 'recipe.stages=["cells"]',
                                                         "--set", f"data.train={train}", *extra)])
        assert res.exit_code == 0, res.output
        return res.output

    run(f"./{name}/train")
    assert "cells: done before" in run(f"{name}/train/", "--resume")
    import shutil

    shutil.copytree(tiny_folder / "train", tmp_path / "copy")  # (the valid folder as training data is refused now)
    assert "settings changed" in run(tmp_path / "copy", "--resume")  # another folder is still another setting


def test_an_attach_stage_without_its_checkpoint_is_refused_before_any_stage_trains(tiny_folder, tmp_path):
    """`recipe.stages=["cells","attach_mil"]` without attach_mil.checkpoint (or naming a file that is not there)
    trained the cells stage in full, then failed at attach_mil: hours lost to a missing setting."""
    from click.testing import CliRunner

    from wsi_vssm.commands.run import command

    out = tmp_path / "run"
    for extra, said in ([], "attach_mil.checkpoint: stage attach_mil needs it"),\
                       (["--set", f"attach_mil.checkpoint={tmp_path / 'none.pt'}"], "no such file"):
        res = CliRunner().invoke(command, [str(REPO / "pipelines" / "default.toml"), "--out", str(out),
                                           *_tiny_recipe(tiny_folder, "--set", 'recipe.stages=["cells","attach_mil"]',
                                                         *extra)])
        assert res.exit_code != 0 and said in (res.output + str(res.exception)), res.output
        assert not (out / "cells.pt").exists()


def test_run_without_resume_stops_before_any_stage_on_an_interrupted_stages_checkpoint(tiny_folder, tmp_path):
    """A rerun without --resume retrained cells and context over the finished model, then failed on the dense
    checkpoint. The checkpoint is now found before any stage trains."""
    from click.testing import CliRunner

    from wsi_vssm.commands.run import command

    out = tmp_path / "run"
    (out / "dense").mkdir(parents=True)
    (out / "dense" / "checkpoint.pt").write_bytes(b"an interrupted dense stage")
    res = CliRunner().invoke(command, [str(REPO / "pipelines" / "default.toml"), "--out", str(out),
                                       *_tiny_recipe(tiny_folder, "--set", 'recipe.stages=["cells","dense"]')])
    assert res.exit_code != 0 and "dense/checkpoint.pt exists" in str(res.exception), res.output
    assert not (out / "model.pt").exists() and not (out / "cells.pt").exists()


def test_run_recipe_needs_data(tmp_path):
    from wsi_vssm.errors import UsageError
    from wsi_vssm.training.dense import DenseConfig
    from wsi_vssm.training.mosaic import MosaicMILConfig
    from wsi_vssm.training.recipe import apply_overrides, load_recipe, run_recipe

    recipe = load_recipe(REPO / "pipelines" / "default.toml")
    assert TrainCellsConfig(**recipe["cells"]).ema > 0  # the shipped recipe's sections are valid configs
    mil = MosaicMILConfig(**recipe["mosaic_mil"])
    assert mil.reuse and mil.pool == ["attention", "topk", "mix", "count"] and mil.grid == [8, 32]
    assert mil.pooled_sizes == [2, 4, 8, 16, 32] and mil.calibrate  # chosen and calibrated for real-size slides
    assert DenseConfig(**recipe["dense"]).augment.hed_scale == recipe["dense"]["augment"]["hed_scale"]
    assert recipe["recipe"]["stages"] == ["cells", "context", "dense", "mosaic_mil"]
    with pytest.raises(UsageError, match="data.train"):
        run_recipe(recipe, tmp_path / "r", progress=False)
    with pytest.raises(UsageError, match="KEY=VALUE"):
        apply_overrides(recipe, ["novalue"])
    assert apply_overrides(recipe, ["cells.lr=0.5", "data.train=/x y"])["cells"]["lr"] == 0.5


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path):
    from wsi_vssm.errors import UsageError
    from wsi_vssm.training.recipe import load_recipe

    (tmp_path / "r.toml").write_bytes(b"\xff\xfe[cells]\n")
    with pytest.raises(UsageError, match=r"r\.toml: not a TOML recipe: not UTF-8 text"):
        load_recipe(tmp_path / "r.toml")


def test_training_leaves_out_undecodable_patches_with_one_warning(tmp_path):
    """One damaged file among thousands must not stop a training run hours in: it is left out, named once."""
    write_patch_folder(tmp_path / "train", 6, 0)
    write_patch_folder(tmp_path / "valid", 4, 1)
    (tmp_path / "train" / "1" / "junk.jpg").write_text("not an image")
    (tmp_path / "train" / "0" / "empty.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"2 of 14 patches cannot be decoded and are left out: 0/empty.jpg: empty"):
        ds = training_patches(tmp_path / "train")
    assert len(ds) == 12 and not {"1/junk.jpg", "0/empty.jpg"} & {it.name for it in ds.items}
    assert training_patches(ds) is ds  # nothing left to drop: the same dataset, no second warning

    cfg = TrainCellsConfig(epochs=1, batch_size=8, seed=0, mil_bags=0)
    with pytest.warns(UserWarning, match="cannot be decoded"):
        r = train_cells(tmp_path / "train", tmp_path / "valid", tmp_path / "m.pt", cfg, progress=False)
    assert np.isfinite(r.log[0]["train_loss"]) and load_model(tmp_path / "m.pt").metadata["train_data"]["n"] == 12

    for f in (tmp_path / "valid").glob("*/*.jpg"):
        f.write_bytes(b"")
    with pytest.raises(PatchDataError, match=r"valid: none of its 8 patches can be decoded"):
        training_patches(tmp_path / "valid")


def _decode_problems(ds) -> dict[str, str]:
    """{patch name: its PatchDataError's text} for the patches of `ds` that do not decode."""
    problems = {}
    for i, it in enumerate(ds.items):
        try:
            ds[i]
        except PatchDataError as e:
            problems[it.name] = str(e)
    return problems


def test_an_unreadable_patch_is_named_with_its_problem(tmp_path):
    for label in ("0", "1"):
        (tmp_path / label).mkdir()
        Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(tmp_path / label / "ok.png")
    (tmp_path / "1" / "junk.jpg").write_text("not an image")
    (tmp_path / "1" / "empty.jpg").write_bytes(b"")
    problems = _decode_problems(load_patches(tmp_path))
    assert problems["1/junk.jpg"].endswith("cannot decode 1/junk.jpg: not an image Pillow can read")
    assert problems["1/empty.jpg"].endswith("cannot decode 1/empty.jpg: empty file")
    assert set(problems) == {"1/junk.jpg", "1/empty.jpg"} and "BytesIO" not in "".join(problems.values())


def test_a_png_or_tar_member_that_declares_gigapixels_is_named_not_read(tmp_path, monkeypatch):
    """A 48 KB PNG declaring 20,000 x 20,000 px ended `evaluate` and `train cells` in a 44-line traceback (PIL's
    DecompressionBombError); a patch in a .tar.gz was read whole whatever its size (3 GiB: 3.4 GB of memory)."""
    import io
    import struct
    import tarfile
    import zlib

    import wsi_vssm.training.data.patches as patches

    def png(w, h):  # the header of a w x h RGB PNG and one empty IDAT: enough for PIL to read its size
        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")

    for label in ("0", "1"):
        (tmp_path / label).mkdir()
        Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(tmp_path / label / "ok.png")
    (tmp_path / "1" / "bomb.png").write_bytes(png(20000, 20000))  # past PIL's own limit
    (tmp_path / "1" / "big.png").write_bytes(png(9000, 9000))  # under it (PIL would only warn), over a patch's
    problems = _decode_problems(load_patches(tmp_path))
    assert set(problems) == {"1/bomb.png", "1/big.png"}, problems
    assert "decompression bomb" in problems["1/bomb.png"].lower()
    assert problems["1/big.png"].endswith("it is 9000 x 9000 px, not a patch (up to 67,108,864 px)")
    monkeypatch.setattr(patches, "PATCH_MAX_BYTES", 1 << 10)
    with tarfile.open(tmp_path / "p.tar.gz", "w:gz") as tar:
        for name, data in (("0/a.png", b"x" * 100), ("1/huge.png", b"\0" * 4096)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(PatchDataError, match=r"p\.tar\.gz: its member 1/huge\.png is 0 MiB, not a patch"):
        load_patches(tmp_path / "p.tar.gz")


def test_an_interrupted_run_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(tiny_folder, tmp_path,
                                                                                          monkeypatch):
    """`train cells` kept no checkpoint: an interrupted run (hours of the recipe's cells stage) began again at
    epoch 1. It now checkpoints every epoch (weights, optimiser, random states, log) and `resume` goes on."""
    from wsi_vssm.errors import UsageError
    from wsi_vssm.training import cells

    kw = dict(epochs=3, batch_size=16, lr=2e-3, seed=0, mil_bags=8, mil_bag_size=4, mil_patches=16, mil_steps=5,
              drop_path=0.1,  # stochastic depth draws from torch's global random state, which must be restored
              mosaic_grid=2, region_batch=1)  # and mosaic crops from a counter, which must be restored too
    whole = train_cells(tiny_folder / "train", tiny_folder / "valid", tmp_path / "a.pt", TrainCellsConfig(**kw),
                        progress=False)
    assert not (tmp_path / "a.checkpoint.pt").exists()  # a finished run leaves none

    real_epoch = cells._train_epoch

    def interrupted(*args, **kwargs):
        if args[6] == 3:  # the epoch number: Ctrl-C during the third epoch
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    import shutil

    train = tmp_path / "train"  # a copy: a patch is taken away below
    shutil.copytree(tiny_folder / "train", train)
    monkeypatch.setattr(cells, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_cells(train, tiny_folder / "valid", tmp_path / "b.pt", TrainCellsConfig(**kw), progress=False)
    monkeypatch.setattr(cells, "_train_epoch", real_epoch)
    ckpt = tmp_path / "b.checkpoint.pt"
    assert ckpt.is_file() and load_model(tmp_path / "b.pt").metadata["training_incomplete"] is True
    (tmp_path / "b.pt").rename(tmp_path / "b.pt.away")  # the best epoch so far lives in OUT: missing, found at once
    with pytest.raises(UsageError, match="b.pt is missing: it holds the best epoch so far"):
        train_cells(train, tiny_folder / "valid", tmp_path / "b.pt", TrainCellsConfig(**kw, resume=True),
                    progress=False)
    (tmp_path / "b.pt.away").rename(tmp_path / "b.pt")
    with pytest.raises(UsageError, match="continue it with --resume"):  # never thrown away silently
        train_cells(train, tiny_folder / "valid", tmp_path / "b.pt", TrainCellsConfig(**kw))
    with pytest.raises(UsageError, match=r"lr=0\.002 \(now 0\.001\)"):  # another run's settings: refused
        train_cells(train, tiny_folder / "valid", tmp_path / "b.pt",
                    TrainCellsConfig(**{**kw, "lr": 1e-3, "resume": True}))
    gone = next((train / "1").iterdir())
    kept = gone.read_bytes()
    gone.unlink()  # the same folder with a patch less: other data (it was resumed on)
    with pytest.raises(UsageError, match="patches="):
        train_cells(train, tiny_folder / "valid", tmp_path / "b.pt", TrainCellsConfig(**kw, resume=True))
    gone.write_bytes(kept)
    monkeypatch.chdir(tmp_path)  # the same folder spelt relatively is the same data (it was refused)
    resumed = train_cells("train", tiny_folder / "valid", tmp_path / "b.pt",
                          TrainCellsConfig(**kw, resume=True), progress=False)
    assert [row["epoch"] for row in resumed.log] == [1, 2, 3] and resumed.best_epoch == whole.best_epoch
    assert [row["train_loss"] for row in resumed.log] == [row["train_loss"] for row in whole.log]  # every epoch
    a, b = load_model(tmp_path / "a.pt").state_dict(), load_model(tmp_path / "b.pt").state_dict()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) == 0.0
    assert not ckpt.exists() and "training_incomplete" not in load_model(tmp_path / "b.pt").metadata


def test_a_damaged_checkpoint_is_one_line(tiny_folder, tmp_path):
    from wsi_vssm.errors import UsageError

    (tmp_path / "m.checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UsageError, match="m.checkpoint.pt: cannot read this training checkpoint") as err:
        train_cells(tiny_folder / "train", tiny_folder / "valid", tmp_path / "m.pt",
                    TrainCellsConfig(epochs=1, batch_size=16, mil_bags=0, resume=True), progress=False)
    assert "\n" not in str(err.value)


class _Planted:
    """A pickle that runs a command when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_model_fine_tuned_in_place_resumes(tiny_folder, tmp_path, monkeypatch):
    """`train cells --init X --out X`: the run writes its best epochs over its own start file, so that file is
    compared by path, not by the contents it had when the run started (which would refuse every resume)."""
    from wsi_vssm.training import cells

    kw = dict(epochs=1, batch_size=16, lr=2e-3, seed=0, mil_bags=0)
    x = tmp_path / "x.pt"
    train_cells(tiny_folder / "train", tiny_folder / "valid", x, TrainCellsConfig(**kw), progress=False)
    real_epoch = cells._train_epoch

    def interrupted(*args, **kwargs):
        if args[6] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    tune = {**kw, "epochs": 2, "init": str(x)}
    monkeypatch.setattr(cells, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_cells(tiny_folder / "train", tiny_folder / "valid", x, TrainCellsConfig(**tune), progress=False)
    monkeypatch.setattr(cells, "_train_epoch", real_epoch)
    resumed = train_cells(tiny_folder / "train", tiny_folder / "valid", x, TrainCellsConfig(**tune, resume=True),
                          progress=False)
    assert [row["epoch"] for row in resumed.log] == [1, 2]


def test_a_planted_checkpoint_runs_no_code_on_resume(tiny_folder, tmp_path):
    """`--resume` read the checkpoint with torch.load(weights_only=False): a file planted under its name ran a
    command before "not a wsi-vssm training checkpoint"; pickle garbage was a traceback (UnpicklingError)."""
    from wsi_vssm.errors import UsageError

    marker = tmp_path / "ran"
    ckpt = tmp_path / "m.checkpoint.pt"
    for plant in (lambda: torch.save({"format": "x", "e": _Planted(marker)}, ckpt),
                  lambda: ckpt.write_bytes(b"\x80\x02garbage")):
        plant()
        with pytest.raises(UsageError, match="m.checkpoint.pt: not a training checkpoint .*remove it") as err:
            train_cells(tiny_folder / "train", tiny_folder / "valid", tmp_path / "m.pt",
                        TrainCellsConfig(epochs=1, batch_size=16, mil_bags=0, resume=True), progress=False)
        assert "\n" not in str(err.value) and not marker.exists()


def test_a_damaged_checkpoint_is_not_resumed(tmp_path):
    """torch.load ignores the zip's checksums: a checkpoint with one flipped bit in its weights resumed silently
    with altered weights (a model file's damage was already caught)."""
    import zipfile

    from wsi_vssm.errors import UsageError
    from wsi_vssm.training.checkpoint import load_checkpoint, save_checkpoint

    ckpt = tmp_path / "c.pt"
    save_checkpoint(ckpt, {"model": {"w": torch.arange(4096, dtype=torch.float32)}}, {"lr": 1.0})
    assert load_checkpoint(ckpt, {"lr": 1.0})["model"]["w"][5] == 5  # intact: read back
    with zipfile.ZipFile(ckpt) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)  # the weights' storage
    raw = bytearray(ckpt.read_bytes())
    raw[info.header_offset + len(info.FileHeader()) + 2000] ^= 0x01  # one bit inside the tensor's bytes
    ckpt.write_bytes(bytes(raw))
    with pytest.raises(UsageError, match=r"c.pt: this training checkpoint is damaged \(.*\); remove it") as err:
        load_checkpoint(ckpt, {"lr": 1.0})
    assert "\n" not in str(err.value)


def test_an_attached_mil_head_says_which_slides_trained_it(tmp_path):
    """After `run ... attach_mil` the model named only `{'checkpoint': 'mil.pt'}` (relative): a reader of the model
    could not check it for leakage."""
    import torch
    from click.testing import CliRunner

    from wsi_vssm.commands.run import command
    from wsi_vssm.models.slide_model import SlideModel, save_model

    torch.manual_seed(0)
    base = save_model(SlideModel.create("micro", name="dense").eval(), tmp_path / "base.pt")
    head = SlideModel.create("micro").mil
    sd = {k: v for k, v in head.state_dict().items() if not k.startswith("cell_head.")}
    meta = {"train_slides": ["t1", "t2"], "valid_slides": ["v1"], "best_epoch": 3, "valid_auc": 0.75,
            "features": {"model_id": "dense", "region_px": 2048, "overlap_px": 128, "min_tissue": 0.25}}
    torch.save({"format": "wsi-vssm-mil/1", "mil_config": head.config.to_dict(), "state_dict": sd,
                "metadata": meta}, tmp_path / "mil.pt")
    res = CliRunner().invoke(command, [str(REPO / "pipelines" / "default.toml"), "--out", str(tmp_path / "run"),
                                       "--set", 'recipe.stages=["attach_mil"]',
                                       "--set", f"attach_mil.checkpoint={tmp_path / 'mil.pt'}",
                                       "--set", f"attach_mil.model={base}"])
    assert res.exit_code == 0, res.output
    model = load_model(tmp_path / "run" / "model.pt")
    stage = model.metadata["mil_stage"]
    # the name stays its base's: feature stores name their backbone by it (train mil refuses mixed names); the
    # hashes in every output tell the two models apart
    assert model.name == "dense" and stage["checkpoint"] == str(tmp_path / "mil.pt")
    assert (stage["train_slides"], stage["valid_slides"], stage["best_epoch"]) == (["t1", "t2"], ["v1"], 3)
    from wsi_vssm.commands.model_info import format_model_info, model_info

    said = format_model_info(model_info(str(tmp_path / "run" / "model.pt")))  # `info` told none of it
    assert f"head from:   {tmp_path / 'mil.pt'} (`train mil`): 2 slides trained it, 1 selected it (best epoch 3; " \
           "valid AUC 0.750)" in said
    assert "head extract: regions 2048 px, overlap 128 px, min tissue 0.25" in said


def test_sets_a_cell_model_cannot_learn_from_are_refused_before_the_first_epoch(tmp_path):
    """A probe's own data: one class only wrote a model with exit 0; a selection part of one class ran every epoch
    at AUC NaN and ended "model file not found"; mixed sizes ended in a traceback; `--data dataset --valid
    dataset/valid` trained on the validation patches (labels are read at any depth)."""
    import warnings

    from wsi_vssm.training.data.patches import check_training_sets, mosaic_order, stratified_subset

    write_patch_folder(tmp_path / "d" / "train", 6, 0)
    write_patch_folder(tmp_path / "d" / "valid", 4, 1)
    train, valid = training_patches(tmp_path / "d" / "train"), training_patches(tmp_path / "d" / "valid")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_training_sets(train, valid, None)  # a sound pair passes, unwarned
    skewed = train.subset([*np.flatnonzero(train.labels == 0), np.flatnonzero(train.labels == 1)[0]])
    assert np.bincount(skewed.labels).tolist() == [6, 1]
    with pytest.warns(UserWarning, match=r"imbalanced \(6 of class 0, 1 of class 1\).*leans to class 0"):
        check_training_sets(skewed, valid, None)
    only0 = train.subset(np.flatnonzero(train.labels == 0))
    with pytest.raises(PatchDataError, match="its training patches have no class 1"):
        check_training_sets(only0, valid, None)
    with pytest.raises(PatchDataError, match="selection part of the validation patches have no class 1"):
        check_training_sets(train, valid.subset(np.flatnonzero(valid.labels == 0)), None)
    with pytest.raises(PatchDataError, match="holds every validation patch"):
        check_training_sets(training_patches(tmp_path / "d"), valid, None)
    # in-mosaic selection (--mosaic-grid): every epoch's in-mosaic AUC was NaN when the selection part filled
    # no mosaic, or its mosaics held one class; no epoch was kept and the run ended "model file not found"
    # (`run`: KeyError 'auc')
    check_training_sets(train, valid, None, mosaic=(2, 0))  # 8 patches: two 2 x 2 mosaics of both classes
    with pytest.raises(PatchDataError, match=r"valid: the selection part of the validation patches holds 8 "
                                             r"patches, fewer than one 3 x 3 mosaic: .*--valid-select"):
        check_training_sets(train, valid, None, mosaic=(3, 0))
    one_class = valid.subset([*np.flatnonzero(valid.labels == 0), np.flatnonzero(valid.labels == 1)[0]])
    seed = next(s for s in range(100) if 1 not in one_class.labels[mosaic_order(len(one_class), 2, s)])
    with pytest.raises(PatchDataError, match=r"tiles 4 patches into 2 x 2 mosaics, all of class 0"):
        check_training_sets(train, one_class, None, mosaic=(2, seed))
    with pytest.raises(PatchDataError, match="fewer than one 3 x 3 mosaic"):  # the command refuses before training
        train_cells(tmp_path / "d" / "train", tmp_path / "d" / "valid", tmp_path / "m.pt",
                    TrainCellsConfig(epochs=1, batch_size=8, mil_bags=0, mosaic_grid=3, valid_select=8),
                    progress=False)
    assert not (tmp_path / "m.pt").exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_training_sets(train, training_patches(tmp_path / "d").subset(range(0, 20, 2)), None)
    assert any("also training patches" in str(w.message) for w in caught)
    # 5 tumour patches among 205: a subset of 20 kept none of them
    labels = np.repeat([0, 1], [200, 5])
    assert np.bincount(labels[stratified_subset(labels, 20, 0)]).tolist() == [20, 1]
    Image.new("RGB", (64, 64), (220, 170, 200)).save(tmp_path / "d" / "train" / "0" / "small.png")
    with pytest.raises(PatchDataError, match=r"patches of 2 sizes: 96 x 96 px .*64 x 64 px \(0/small.png\)"):
        training_patches(tmp_path / "d" / "train")
    write_patch_folder(tmp_path / "v64", 2, 0)
    small = training_patches(tmp_path / "v64").subset([0, 1, 2, 3])
    small.patch_size = (64, 64)
    with pytest.raises(PatchDataError, match="differ in size"):
        check_training_sets(train, small, None)


def test_an_epoch_size_or_a_selection_part_larger_than_the_patches_is_said(tmp_path):
    """`--epoch-size 3000` on 300 patches drew each once without a word (the docs say N patches an epoch), and
    `--valid-select 1000` on 200 validation patches silently dropped the held-back figure."""
    import warnings

    from wsi_vssm.training.data.patches import check_training_sets, select_and_holdout

    write_patch_folder(tmp_path / "train", 6, 0)
    write_patch_folder(tmp_path / "valid", 4, 1)
    train, valid = training_patches(tmp_path / "train"), training_patches(tmp_path / "valid")
    with pytest.warns(UserWarning, match=f"epoch_size 500 is more than its {len(train)} training patches"):
        check_training_sets(train, valid, None, epoch_size=500)
    with pytest.warns(UserWarning, match=f"valid_select 50 is more than its {len(valid)} validation patches: all of "
                                         "them select and none is held back"):
        assert select_and_holdout(valid, 50, 0)[1] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_training_sets(train, valid, None, epoch_size=len(train))  # at most every patch: no word
        assert select_and_holdout(valid, len(valid), 0)[1] is None


def test_linked_class_folders_and_16_bit_grey_patches_are_read(tmp_path):
    """Symlinked 0/ and 1/ folders were skipped ("no images under folders named 0/ or 1/", or one class silently);
    a 16-bit grey patch became all white."""
    write_patch_folder(tmp_path / "real", 3, 0)
    (tmp_path / "linked").mkdir()
    for c in "01":
        (tmp_path / "linked" / c).symlink_to(tmp_path / "real" / c, target_is_directory=True)
    (tmp_path / "linked" / "loop").symlink_to(tmp_path / "linked", target_is_directory=True)  # not walked twice
    ds = load_patches(tmp_path / "linked")
    assert sorted(ds.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    grey = np.linspace(5000, 60000, 96 * 96).reshape(96, 96).astype(np.uint16)
    (tmp_path / "g" / "0").mkdir(parents=True)
    Image.fromarray(grey).save(tmp_path / "g" / "0" / "grey16.png")
    img, _ = load_patches(tmp_path / "g")[0]
    assert img.shape == (96, 96, 3) and 15 <= img.min() <= 25 and 228 <= img.max() <= 238


def test_resume_beside_a_finished_model_is_refused(tiny_folder, tmp_path, capsys):
    """`train cells --resume` with no checkpoint left retrained from scratch over the finished model."""
    from conftest import run_cli_captured, write_tiny_model

    out = write_tiny_model(tmp_path / "m.pt", purpose="test")
    before = out.read_bytes()
    code, _, err = run_cli_captured(["train", "cells", "--data", tiny_folder / "train", "--valid",
                                     tiny_folder / "valid", "--out", out, "--epochs", "1", "--resume"], capsys)
    assert code == 1 and "is a finished model" in err and "Traceback" not in err
    assert out.read_bytes() == before


def test_the_patch_scorer_says_bad_input_in_one_line(tiny_folder, tmp_path, capsys):
    """`python -m wsi_vssm.training.cells --evaluate` gave tracebacks for a missing model or folder, and AUC nan
    with exit 0 for patches of one class."""
    from wsi_vssm.training.cells import main

    assert main(["--evaluate", str(tmp_path / "none.pt"), "--valid", str(tiny_folder / "valid")]) == 1
    assert main(["--evaluate", "default", "--valid", str(tmp_path / "nowhere")]) == 1
    write_patch_folder(tmp_path / "one", 3, 0)
    import shutil

    shutil.rmtree(tmp_path / "one" / "1")
    assert main(["--evaluate", "default", "--valid", str(tmp_path / "one")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("python -m wsi_vssm.training.cells: error: ") for line in err)
    assert "none.pt" in err[0] and "nowhere" in err[1] and "one class only" in err[2]


def test_the_patch_scorer_says_its_warnings_in_one_line(tiny_folder, model_file, tmp_path, capsys):
    """Its warnings (a patch that cannot be decoded) came in Python's format, the module's path, line number and
    source line around the message."""
    import shutil

    from wsi_vssm.training.cells import main

    shutil.copytree(tiny_folder / "valid", tmp_path / "valid")
    (tmp_path / "valid" / "1" / "junk.jpg").write_text("not an image")
    assert main(["--evaluate", str(model_file), "--valid", str(tmp_path / "valid")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line.lower()]
    assert err and all(line.startswith("python -m wsi_vssm.training.cells: warning: ") for line in err), err
    assert any("1/junk.jpg" in line for line in err) and not any(".py:" in line for line in err), err


def test_the_patch_scorer_names_validation_parts_as_synth_does(tiny_folder, model_file, capsys):
    """`synth --part select --split-seed S` and the patch scorer's `--split select --seed S` named one split two
    ways: the scorer takes synth's names now, and its old ones still."""
    from wsi_vssm.training.cells import main

    common = ["--evaluate", str(model_file), "--valid", str(tiny_folder / "valid"), "--valid-select", "12"]
    assert main([*common, "--part", "holdout", "--split-seed", "3"]) == 0
    new = capsys.readouterr().out
    assert main([*common, "--split", "holdout", "--seed", "3"]) == 0
    old = capsys.readouterr().out
    assert "[holdout]" in new and "n=12:" in new and new == old, (new, old)
    assert main([*common, "--part", "holdout", "--split-seed", "4"]) == 0
    assert capsys.readouterr().out != new  # the seed reaches the split: another held-back half
    # both spellings given with different values: refused before any scoring, not the last one silently
    for clash in (["--part", "select", "--split", "holdout"], ["--seed", "3", "--split-seed", "4"]):
        with pytest.raises(SystemExit) as exit_:
            main([*common, *clash])
        assert exit_.value.code == 2 and "give one" in capsys.readouterr().err, clash
    assert main([*common, "--part", "holdout", "--split", "holdout", "--seed", "3", "--split-seed", "3"]) == 0
    assert capsys.readouterr().out == new  # the same value twice is no clash


def test_info_on_a_recipe_run_says_where_each_stage_stands(tiny_folder, tmp_path, capsys):
    """`info RUN` on a recipe's output folder was refused (neither slide, model nor cohort output); a lab running
    hours of training wants to know which stages are done and how far the current one got."""
    import json

    from click.testing import CliRunner
    from conftest import run_cli_captured

    from wsi_vssm.commands.run import command
    from wsi_vssm.training.checkpoint import save_checkpoint

    out = tmp_path / "run"
    res = CliRunner().invoke(command, [str(REPO / "pipelines" / "default.toml"), "--out", str(out),
                                       *_tiny_recipe(tiny_folder, "--set", 'recipe.stages=["cells","context"]')])
    assert res.exit_code == 0, res.output
    code, text, _ = run_cli_captured(["info", out], capsys)
    assert code == 0 and "2 of 2 stage(s) done" in text and "(every stage through)" in text, text
    assert f"cells: done -> {out / 'cells.pt'}" in text
    # as a run stopped in its context stage leaves it (progress says cells only; the work file and a checkpoint)
    (out / "recipe.progress.json").write_text(json.dumps(
        {"done": json.loads((out / "recipe.progress.json").read_text())["done"][:1]}))
    save_checkpoint(out / "context.checkpoint.pt", {"epoch": 2, "best": 0.8125, "best_epoch": 1}, {"epochs": 5})
    (out / "model.work.pt").write_bytes((out / "cells.pt").read_bytes())
    code, text, _ = run_cli_captured(["info", out, "--json"], capsys)
    r = json.loads(text)
    context = r["stages"][1]
    assert (r["kind"], r["recipe"], r["model_finished"]) == ("recipe_run", "default", False)
    assert (context["status"], context["epoch"], context["epochs"], context["best"]) == (
        "in progress or stopped", 2, 5, 0.8125)
    text = run_cli_captured(["info", out], capsys)[1]
    assert "context: in progress or stopped: epoch 2 of 5, best selection score 0.8125 (epoch 1)" in text
    assert "is an earlier run's" in text
    (out / "context.checkpoint.pt").write_bytes(b"not a checkpoint")
    code, text, _ = run_cli_captured(["info", out], capsys)
    assert code == 0 and "cannot read this checkpoint" in text


def test_held_back_patches_that_repeat_a_selection_patch_are_left_out(tmp_path):
    """PCam repeats some images inside a split: 39 of the shipped model's 2,000 held-back valid patches were byte
    for byte selection patches, so held-back figures counted images that had chosen the model."""
    import shutil
    import warnings

    from wsi_vssm.training.data.fingerprints import patch_digests
    from wsi_vssm.training.data.patches import select_and_holdout, split_select_holdout

    write_patch_folder(tmp_path / "valid", 10, 2)
    for c in "01":  # every image twice, under another name
        for f in sorted((tmp_path / "valid" / c).glob("*.jpg")):
            shutil.copy(f, f.with_name(f"copy_{f.name}"))
    valid = training_patches(tmp_path / "valid")
    from wsi_vssm.training.data.patches import stratified_subset

    for n_select, split in ((8, lambda: select_and_holdout(valid, 8, 0)),
                            (len(valid) // 2, lambda: split_select_holdout(valid, 0))):
        with pytest.warns(UserWarning, match=r"of the \d+ held-back validation patches are the same image as a "
                                             "selection patch: left out"):
            select, hold = split()
        # the selection part is drawn as it was before the rule: a model selected then keeps its part
        assert [it.name for it in select.items] == [valid.items[i].name
                                                    for i in stratified_subset(valid.labels, n_select, 0)]
        sel_digests, hold_digests = set(patch_digests(select)), set(patch_digests(hold))
        assert len(hold) > 0 and not sel_digests & hold_digests
        names = {it.name for it in select.items} | {it.name for it in hold.items}
        left_out = [it for it in valid.items if it.name not in names]  # exactly the twins of selection patches
        assert left_out and {patch_digests(valid)[[i.name for i in valid.items].index(it.name)]
                             for it in left_out} <= sel_digests
        assert len(select) + len(hold) + len(left_out) == len(valid)
    plain = training_patches(tmp_path / "valid", max_items=None)
    plain = plain.subset([i for i, it in enumerate(plain.items) if not it.name.split("/")[-1].startswith("copy_")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no repeated image: no word, and the held-back part is the whole rest
        select, hold = select_and_holdout(plain, 8, 0)
    assert len(select) + len(hold) == len(plain) == 20


def test_an_image_filed_under_both_labels_is_said_before_training(tmp_path):
    """A copy of a normal patch filed under 1/ (a labelling slip) trained both answers without a word."""
    import shutil
    import warnings

    from wsi_vssm.training.data.patches import check_training_sets

    write_patch_folder(tmp_path / "train", 4, 0)
    write_patch_folder(tmp_path / "valid", 4, 1)
    valid = training_patches(tmp_path / "valid")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # distinct images: no word
        check_training_sets(training_patches(tmp_path / "train"), valid, None)
    shutil.copy(tmp_path / "train/0/p2.jpg", tmp_path / "train/1/p2_copy.jpg")
    shutil.copy(tmp_path / "train/1/p3.jpg", tmp_path / "train/1/p3_copy.jpg")  # same label: only a repeat
    with pytest.warns(UserWarning, match=r"1 image\(s\) are filed under both labels \(byte for byte the same file, "
                                         r"e.g. .*0/p2.jpg, .*1/p2_copy.jpg\)"):
        check_training_sets(training_patches(tmp_path / "train"), valid, None)



def test_patches_in_subfolders_of_a_class_folder_keep_its_label(tmp_path):
    """The label was the image's parent folder: `1/slideA/*.jpg` was dropped without a word, and per-patient
    folders numbered 0 and 1 inside `0/` relabelled normal patches as tumour (AUC and ECE on wrong labels)."""
    import shutil

    write_patch_folder(tmp_path / "flat", 3, 0)
    root = tmp_path / "nested"
    for c in "01":
        shutil.copytree(tmp_path / "flat" / c, root / c / "slideA")
        (root / c / "slideA" / "._p0.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork: not an image
    (root / "__MACOSX" / "1").mkdir(parents=True)
    (root / "__MACOSX" / "1" / "._x.jpg").write_bytes(b"\x00\x05\x16\x07")
    ds = load_patches(root)
    assert sorted((it.name, it.label) for it in ds.items) == sorted(
        (f"{c}/slideA/p{i}.jpg", int(c)) for c in "01" for i in range(3))
    folds = tmp_path / "patients"  # patients numbered 0 and 1 inside the class folders: ambiguous, refused
    shutil.copytree(tmp_path / "flat" / "0", folds / "0" / "1")
    shutil.copytree(tmp_path / "flat" / "1", folds / "1" / "7")
    with pytest.raises(PatchDataError, match=r"3 image\(s\) lie under both a 0/ and a 1/ folder \(e.g. 0/1/p0.jpg\)"):
        load_patches(folds)


def test_a_folder_linked_as_both_classes_and_a_named_pipe_are_said(tmp_path):
    """0/ and 1/ linked to one folder: the second was skipped as a loop and one class vanished without a word;
    a named pipe called 0/pipe.jpg made evaluate wait forever."""
    write_patch_folder(tmp_path / "real", 2, 0)
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "0").symlink_to(tmp_path / "real" / "0")
    (tmp_path / "linked" / "1").symlink_to(tmp_path / "real" / "0")
    with pytest.raises(PatchDataError, match=r"0/ and 1/ are the same folder \(a link\) under different labels"):
        load_patches(tmp_path / "linked")
    import os

    os.mkfifo(tmp_path / "real" / "0" / "pipe.jpg")
    with pytest.warns(UserWarning, match=r"1 entr\(ies\) named like images are not regular files .* left out: "
                                         r"0/pipe.jpg"):
        ds = load_patches(tmp_path / "real")
    assert len(ds) == 4 and "0/pipe.jpg" not in [it.name for it in ds.items]


def test_a_max_train_larger_than_the_patches_is_said(tmp_path, monkeypatch):
    """`--max-train 500` on 80 patches trained on 80 without a word (epoch_size and valid_select say so)."""
    import wsi_vssm.training.cells as cells

    write_patch_folder(tmp_path / "train", 6, 0)
    write_patch_folder(tmp_path / "valid", 4, 1)

    def stop(*args, **kwargs):  # the warning comes before the sets are checked: stop there, no model is built
        raise RuntimeError("stopped before training")

    monkeypatch.setattr(cells, "check_training_sets", stop)
    with (pytest.warns(UserWarning, match="max_train 500 is more than its 12 training patches: all of them train"),
          pytest.raises(RuntimeError, match="stopped before training")):
        cells.train_cells(tmp_path / "train", tmp_path / "valid", tmp_path / "m.pt",
                          cells.TrainCellsConfig(max_train=500), progress=False)



def test_the_normal_slides_table_is_read_as_utf8_with_or_without_excels_bom(tmp_path):
    """reference.csv was read in the platform's encoding: Excel's "CSV UTF-8" (a BOM) lost every normal slide,
    and on Windows (cp1252) a name like `Łódź` failed or vanished."""
    from wsi_vssm.training.data.region_crops import _normal_names

    (tmp_path / "reference.csv").write_bytes("\ufeffslide,label\nŁódź_1.tif,normal\nmüller_2.tif,Normal\n"
                                             "t_3.tif,tumor\n".encode())
    assert _normal_names(tmp_path / "reference.csv") == {"Łódź_1", "müller_2"}

