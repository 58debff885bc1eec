"""Mosaic cohorts (wsi_vssm.synth.mosaic) and the recipe's mosaic_mil stage (wsi_vssm.training.mosaic)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import run_recipe_on_patches, write_patch_folder, write_tiny_model

from wsi_vssm.io.slide import open_slide
from wsi_vssm.runs.cohort import read_cohort
from wsi_vssm.synth.cohort import SynthError
from wsi_vssm.synth.mosaic import BACKGROUND, make_mosaic_cohort, plan_mosaic
from wsi_vssm.training.data.patches import load_patches
from wsi_vssm.training.mil import load_mil
from wsi_vssm.training.mosaic import youden_threshold


@pytest.fixture(scope="module")
def patches(tmp_path_factory):
    root = tmp_path_factory.mktemp("patches")
    write_patch_folder(root, 40, seed=3)
    return load_patches(root)


@pytest.mark.parametrize("seed", range(6))
def test_plan_normal_and_tumour(seed):
    labels = np.array([0] * 100 + [1] * 60)
    rng = np.random.default_rng(seed)
    index, lesion = plan_mosaic(labels, 8, False, rng)
    tissue = index >= 0
    assert tissue.sum() >= 32 and not lesion
    assert (labels[index[tissue]] == 0).all()
    assert len(set(index[tissue].tolist())) == tissue.sum()  # no patch twice in a slide

    index, lesion = plan_mosaic(labels, 8, True, rng)
    assert 1 <= len(lesion) <= max(1, round(0.3 * (index >= 0).sum()))
    in_lesion = np.zeros(index.shape, bool)
    for rc in lesion:
        in_lesion[rc] = True
    assert (labels[index[in_lesion]] == 1).all()
    assert (labels[index[(index >= 0) & ~in_lesion]] == 0).all()
    # the lesion is one 4-connected piece
    seen, todo = {lesion[0]}, [lesion[0]]
    while todo:
        r, c = todo.pop()
        for n in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if n in set(lesion) and n not in seen:
                seen.add(n)
                todo.append(n)
    assert seen == set(lesion)


def test_plan_refuses_a_pool_too_small():
    with pytest.raises(SynthError, match="too small"):
        plan_mosaic(np.array([0] * 5 + [1] * 5), 8, False, np.random.default_rng(0))


def test_cohort_files_are_slides_with_the_patches(tmp_path, patches):
    recs = make_mosaic_cohort(tmp_path / "c", patches, 4, seed=1, grid=4)
    assert [r.label for r in recs] == ["normal", "normal", "tumor", "tumor"]
    cohort = read_cohort(tmp_path / "c")
    assert [r.label for r in cohort.rows] == [0, 0, 1, 1] and all(r.ok for r in cohort.rows)
    doc = json.loads((tmp_path / "c" / "mosaic.json").read_text())
    assert doc["grid"] == 4 and doc["mpp"] == 0.97 and len(doc["slides"]) == 4
    tumour = doc["slides"][2]
    r, c = tumour["lesion_cells"][0]
    name = tumour["patches"][r][c]
    assert name.split("/")[-2] == "1"
    with open_slide(recs[2].path) as slide:
        assert slide.dimensions == (384, 384) and abs(slide.mpp - 0.97) < 1e-6
        img = np.asarray(slide.read_region((c * 96, r * 96), 0, (96, 96)))[..., :3].astype(int)
        # the patch itself (JPEG-compressed twice) at its place: a dark centre, as write_patch_folder made it
        centre, rim = img[40:56, 40:56].mean(), img[:16].mean()
        assert centre < 0.7 * rim
        empty = [(i, j) for i, row in enumerate(tumour["patches"]) for j, v in enumerate(row) if v is None]
        if empty:
            i, j = empty[0]
            bg = np.asarray(slide.read_region((j * 96, i * 96), 0, (96, 96)))[..., :3].astype(int)
            assert abs(bg.mean() - BACKGROUND) < 4


def test_a_mosaic_cohorts_evaluation_says_it_is_one(tmp_path, patches, model_file, capsys):
    """evaluate on a `synth --from-patches` cohort printed and wrote a plain slide AUC: nothing told a reader of
    metrics.json or roc.png that it was a mosaic-slide figure."""
    from conftest import run_cli_captured

    make_mosaic_cohort(tmp_path / "c", patches, 4, seed=1, grid=4)
    code, out, err = run_cli_captured(["evaluate", tmp_path / "c", "--out", tmp_path / "ev", "--model", model_file,
                                       "--bootstrap", "100", "--device", "cpu"], capsys)
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert code == 0 and metrics["mosaics"] == str((tmp_path / "c" / "mosaic.json").resolve())
    assert "over mosaic slides; n=4" in out and "normal mosaic slides" in err, (out, err)


def test_same_seed_same_files(tmp_path, patches):
    make_mosaic_cohort(tmp_path / "a", patches, 2, seed=5, grid=4)
    make_mosaic_cohort(tmp_path / "b", patches, 2, seed=5, grid=4)
    for name in ("normal_001.tif", "tumor_001.tif", "mosaic.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_grid_range_gives_slides_of_several_sizes(tmp_path, patches):
    recs = make_mosaic_cohort(tmp_path / "r", patches, 6, seed=2, grid=(3, 5))
    sides = set()
    for r in recs:
        with open_slide(r.path) as slide:
            sides.add(slide.dimensions[0] // 96)
            assert slide.dimensions[0] == slide.dimensions[1]
    assert sides <= {3, 4, 5} and len(sides) >= 2
    assert json.loads((tmp_path / "r" / "mosaic.json").read_text())["grid"] == [3, 5]


@pytest.mark.parametrize("kwargs, match", [(dict(n_slides=0), "at least 1"), (dict(grid=2), "grid"),
                                           (dict(grid=(6, 4)), "grid"), (dict(grid=(3, 99)), "grid"),
                                           (dict(max_lesion_frac=0.0), "max_lesion_frac")])
def test_bad_arguments(tmp_path, patches, kwargs, match):
    args = {"n_slides": 2, "grid": 4, **kwargs}
    with pytest.raises(SynthError, match=match):
        make_mosaic_cohort(tmp_path / "x", patches, **args)


def test_youden_threshold():
    assert youden_threshold([0, 0, 1, 1], [0.1, 0.2, 0.6, 0.9]) == 0.6
    assert youden_threshold([0, 1, 0, 1], [0.1, 0.4, 0.5, 0.9]) == 0.9  # 0.4 and 0.9 tie: the later one
    assert youden_threshold([1, 1], [0.3, 0.8]) == 0.5
    assert youden_threshold([0, 1, 1], [0.2, float("nan"), 0.7]) == 0.7


def test_mosaic_mil_stage_end_to_end(tmp_path, monkeypatch, capsys):
    """The recipe stage on tiny patch folders: cohorts, features, MIL head attached, threshold, test cohort."""
    from wsi_vssm.models.slide_model import load_model

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    out = tmp_path / "run"
    out.mkdir()
    write_tiny_model(out / "model.pt")
    before = load_model(out / "model.pt")
    res = run_recipe_on_patches(tmp_path, out, '[recipe]\nstages = ["mosaic_mil"]\n[data]\ntrain = ""\nvalid = ""\n'
                                '[cells]\nvalid_select = 30\nseed = 0\n'
                                '[mosaic_mil]\ntrain_slides = 4\nvalid_slides = 4\ntest_slides = 2\ngrid = 3\n'
                                'epochs = 3\npatience = 3\nsynth_train_slides = 2\nsynth_valid_slides = 2\n'
                                'synth_size = 1024\npool = ["attention", "topk", "count"]\ntopk = [2]\n'
                                'pooled_sizes = [2, 3]\npooled_bags = 4\n', 30, 30)
    assert res.exit_code == 0, res.output
    assert "valid slide AUC" in res.output and "held-out test slide AUC" in res.output
    model = load_model(out / "model.pt")
    stage = model.metadata["mil_stage"]
    assert stage["train_slides"] == 4 + 2 and stage["valid_slides"] == 4 + 2 and stage["test"]["n"] == 2
    assert model.metadata["threshold"] == stage["threshold"] and stage["seconds"] > 0
    assert stage["test"]["threshold"] == stage["threshold"]  # scored as `evaluate` scores it: stored threshold
    # the features' extract settings (CPU defaults here), which predict warns about when it reads other regions
    assert {k: stage["features"][k] for k in ("region_px", "overlap_px")} == {"region_px": 2048, "overlap_px": 128}
    # every slide head was trained; the one with the best AUC over the valid mosaics and the pooled bags was kept,
    # calibrated with a bag-size term on the same bags
    assert [c["name"] for c in stage["candidates"]] == ["attention", "topk2", "count"]
    best = max(stage["candidates"], key=lambda c: c["pooled_auc"])
    assert stage["slide_head"] == best["name"] and model.mil.config.pool == best["pool"]
    assert set(stage["platt"]) == {"a", "b", "size_slope"}
    assert model.mil.config.size_slope == pytest.approx(stage["platt"]["size_slope"])
    pooled = stage["pooled_bags"]
    assert pooled["sizes"] == [2, 3] and pooled["bags"] == 6 + 2 * 4  # the 6 valid slides alone, then 4 per size
    assert [r["mosaics"] for r in pooled["by_size"]] == [1, 2, 3]
    assert "AUC over valid mosaics and pooled bags" in res.output
    # the cell head is the cell stage's; the chosen slide head's layers were trained
    assert np.allclose(model.mil.cell_head.weight.detach(), before.mil.cell_head.weight.detach())
    trained = {"attention": "attn_w", "topk": "topk_affine", "count": "count_affine"}[best["pool"]]
    start = {"attention": before.mil.attn_w.weight.detach(), "topk": 1.0, "count": torch.tensor([[1.0, -0.5]])}
    assert not np.allclose(getattr(model.mil, trained).weight.detach(), start[best["pool"]])
    # the count candidate counts the cells at or above the model's cell threshold (here 0.5: logit 0)
    count, _ = load_mil(out / "mosaic_mil" / "mil-count.pt")
    assert count.config.pool == "count" and count.config.count_threshold == pytest.approx(0.0, abs=1e-9)
    for part in ("train", "valid", "test"):
        assert (out / "mosaic_mil" / "mosaics" / part / "reference.csv").is_file()
    assert len(list((out / "mosaic_mil" / "features" / "train").glob("*.zarr"))) == 4
    assert len(list((out / "mosaic_mil" / "features" / "synth_valid").glob("*.zarr"))) == 2
    assert (out / "mosaic_mil" / "test-eval" / "metrics.json").is_file()
    assert set(stage["valid_pooling_aucs"]) == {"max", "top5_mean", "positive_share"}
    from wsi_vssm.training.mosaic import main

    assert main([str(out / "mosaic_mil"), str(out / "model.pt")]) == 0
    printed = capsys.readouterr().out
    assert "valid mosaics (n=4): MIL slide AUC" in printed and "synth valid slides (n=2)" in printed


def test_mosaic_mil_stage_ensemble_of_seeds(tmp_path, monkeypatch):
    """mosaic_mil.ensemble = 2: each candidate is the mean of two heads trained with seeds 3 and 4 (count, an exact
    fit, stays one); the kept one is attached as a MILEnsemble whose slide logit is the calibrated mean of its
    members' checkpoints."""
    from wsi_vssm.models.mil import MILEnsemble, log_cells
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.pipeline.store import FeatureStore

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    out = tmp_path / "run"
    out.mkdir()
    write_tiny_model(out / "model.pt")
    res = run_recipe_on_patches(tmp_path, out, '[recipe]\nstages = ["mosaic_mil"]\n[data]\ntrain = ""\nvalid = ""\n'
                                '[cells]\nvalid_select = 30\nseed = 0\n'
                                '[mosaic_mil]\ntrain_slides = 4\nvalid_slides = 4\ntest_slides = 2\ngrid = 3\n'
                                'epochs = 3\npatience = 3\nseed = 3\nensemble = 2\n'
                                'pool = ["count", "attention", "mix"]\ntopk = [2]\npooled_sizes = [2]\n'
                                'pooled_bags = 4\n', 30, 30)
    assert res.exit_code == 0, res.output
    assert "slide head attention-seed3" in res.output and "slide head mix2 (mean of 2)" in res.output
    model = load_model(out / "model.pt")
    stage = model.metadata["mil_stage"]
    assert [c["name"] for c in stage["candidates"]] == ["count", "attention", "mix2"]
    assert "members" not in stage["candidates"][0] and not list((out / "mosaic_mil").glob("mil-count-seed*"))
    for c in stage["candidates"][1:]:
        assert [m["seed"] for m in c["members"]] == [3, 4] and c["best_epoch"] is None
    assert stage["slide_head"] != "count"  # (these data: an ensemble is kept, so its attachment is checked)
    kept = next(c for c in stage["candidates"] if c["name"] == stage["slide_head"])
    assert isinstance(model.mil, MILEnsemble) and model.mil.config.members == 2
    assert len(stage["best_epoch"]) == 2 and len(stage["log"]) == 2
    # the attached head is the two seeds' checkpoints, averaged, then Platt-scaled with the size term
    members = [load_mil(out / "mosaic_mil" / f"mil-{kept['name']}-seed{s}.pt")[0] for s in (3, 4)]
    assert [m.config.members for m in members] == [1, 1]
    store = next((out / "mosaic_mil" / "features" / "valid").glob("*.zarr"))
    x = torch.from_numpy(np.asarray(FeatureStore.open(store).features, dtype=np.float32))
    with torch.no_grad():
        mean = torch.stack([m(x).slide_logit for m in members]).mean(0)
        platt = stage["platt"]
        want = platt["a"] * mean + platt["b"] + platt["size_slope"] * log_cells(x[None, :, 0], None)
        # (tiny separable data make Platt's slope ~1e5: float32 keeps about four digits of the result)
        assert torch.allclose(model.mil.eval()(x).slide_logit, want, rtol=1e-3)
    ensemble, meta = load_mil(out / "mosaic_mil" / f"mil-{kept['name']}.pt")
    assert isinstance(ensemble, MILEnsemble) and meta["seed"] == [3, 4] and meta["valid_auc"] == kept["valid_slide_auc"]
    assert stage["test"]["n"] == 2  # the held-out cohort scored by the file holding the ensemble


def test_pooled_plan_bags_normal_mosaics_or_one_tumour_among_normals():
    from wsi_vssm.training.mosaic import pooled_plan

    labels = [0, 1, 0, 0, 1, 0]
    plan = pooled_plan(labels, [2, 5], 6, seed=3)
    assert plan[:6] == [([i], y) for i, y in enumerate(labels)]  # every mosaic alone first
    pooled = plan[6:]
    assert [len(p) for p, _ in pooled] == [2] * 6 + [5] * 6 and [y for _, y in pooled] == [0, 1] * 6
    for pick, y in pooled:
        assert sum(labels[i] for i in pick) == y  # normal bags: no tumour mosaic; tumour bags: exactly one
    assert pooled_plan(labels, [2, 5], 6, seed=3) == plan  # seeded
    assert pooled_plan([0, 0], [2], 4, seed=0) == [([0], 0), ([1], 0)]  # one class only: nothing to pool


def test_size_table_reports_each_size():
    from wsi_vssm.training.mosaic import size_table

    labels = np.array([0, 1, 0, 1, 0, 0, 1, 1])
    probs = np.array([0.2, 0.9, 0.1, 0.3, 0.6, 0.2, 0.7, 0.8])
    sizes = np.array([1, 1, 1, 1, 4, 4, 4, 4])
    rows = size_table(labels, probs, sizes, np.log(np.array([100, 110, 90, 100, 400, 420, 380, 400])), 0.5)
    assert [r["mosaics"] for r in rows] == [1, 4] and [r["bags"] for r in rows] == [4, 4]
    assert rows[0]["auc"] == pytest.approx(1.0) and rows[0]["sensitivity"] == pytest.approx(0.5)
    assert rows[1]["specificity"] == pytest.approx(0.5) and rows[1]["normal_median_prob"] == pytest.approx(0.4)
    assert rows[1]["median_cells"] == 400


def test_mosaic_mil_stage_needs_the_cell_model(tmp_path, capsys):
    from wsi_vssm.cli import main

    recipe = tmp_path / "r.toml"
    recipe.write_text('[recipe]\nstages = ["mosaic_mil"]\n[data]\ntrain = "x"\nvalid = "y"\n')
    with pytest.raises(SystemExit) as stop:
        main(["run", str(recipe), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "run stage cells first" in err and "Traceback" not in err


def test_synth_command_mosaics_of_the_held_back_part(tmp_path, capsys):
    """`synth --from-patches --part holdout` uses only patches that training never selects with."""
    from wsi_vssm.cli import main
    from wsi_vssm.training.cells import TrainCellsConfig, split_valid

    write_patch_folder(tmp_path / "valid", 30, seed=4)
    with pytest.raises(SystemExit) as stop:
        main(["synth", str(tmp_path / "m"), "--slides", "4", "--from-patches", str(tmp_path / "valid"),
              "--grid", "4", "--part", "holdout", "--valid-select", "20"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "4 mosaic slides (2 tumour, 2 normal) of 40 patches (holdout)" in out
    select, _ = split_valid(load_patches(tmp_path / "valid"), TrainCellsConfig(valid_select=20))
    used = {n for s in json.loads((tmp_path / "m" / "mosaic.json").read_text())["slides"]
            for row in s["patches"] for n in row if n}
    assert used and not used & {it.name for it in select.items}
    with open_slide(tmp_path / "m" / "tumor_001.tif") as slide:
        assert abs(slide.mpp - 0.97) < 1e-6


# ---------------------------------------------------------------------------------------------------- training
def test_mosaic_crops_put_each_label_on_its_centre_token(patches):
    from wsi_vssm.training.data.mosaic_crops import MosaicCrops, centre_token_grid, tile

    lab, mask = centre_token_grid(np.array([0, 1, 1, 0]), 2, 96)
    assert lab.shape == mask.shape == (6, 6) and mask.sum() == 4
    assert [lab[1, 1], lab[1, 4], lab[4, 1], lab[4, 4]] == [0, 1, 1, 0]
    imgs = [np.full((96, 96, 3), v, np.uint8) for v in (10, 20, 30, 40)]
    t = tile(imgs, 2)
    assert t.shape == (192, 192, 3) and [t[0, 0, 0], t[0, 100, 0], t[100, 0, 0], t[100, 100, 0]] == [10, 20, 30, 40]

    crops = MosaicCrops(patches, 3, seed=0)
    assert len(crops) == len(patches) // 9
    crop, lab, mask = crops[0]
    assert crop.shape == (288, 288, 3) and lab.shape == (9, 9) and mask.sum() == 9
    # write_patch_folder's label-1 patches have a dark centre: the labels sit where the dark centres are
    for r in range(3):
        for c in range(3):
            centre = crop[r * 96 + 40:r * 96 + 56, c * 96 + 40:c * 96 + 56].mean()
            rim = crop[r * 96:r * 96 + 16, c * 96:c * 96 + 16].mean()
            assert (centre < 0.7 * rim) == bool(lab[3 * r + 1, 3 * c + 1])
    assert not np.array_equal(crops[0][0], crop)  # each call a fresh arrangement


def test_in_mosaic_scoring_reads_centre_tokens(patches, tmp_path):
    import torch

    from wsi_vssm.models.inputs import normalise_batch as normalise
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.training.patch_eval import centre_logits, predict_in_mosaics

    model = load_model(write_tiny_model(tmp_path / "m.pt"))
    y, p = predict_in_mosaics(model, patches, 1)  # a 1 x 1 mosaic is the patch alone
    x = torch.from_numpy(np.stack([patches[i][0] for i in range(len(patches))])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        alone = torch.sigmoid(centre_logits(model, normalise(x))).numpy()
    order = np.random.default_rng(0).permutation(len(patches))
    np.testing.assert_allclose(p, alone[order], rtol=1e-4, atol=1e-5)
    assert (y == patches.labels[order]).all()
    y, p = predict_in_mosaics(model, patches, 3)
    assert len(y) == len(p) == len(patches) // 9 * 9


def test_context_stage_continues_from_the_cell_model(tmp_path):
    from wsi_vssm.models.slide_model import load_model

    out = tmp_path / "run"
    out.mkdir()
    write_tiny_model(out / "model.pt", metrics={"valid_holdout": {"auc": 0.5}}, log=[{"epoch": 1}])
    res = run_recipe_on_patches(tmp_path, out, '[recipe]\nstages = ["context"]\n[data]\ntrain = ""\nvalid = ""\n'
                                '[cells]\nvalid_select = 18\nbatch_size = 8\nepochs = 5\nmil_bags = 0\n'
                                'scan = "cpu"\n[context]\nepochs = 1\nepoch_size = 16\nmosaic_grid = 2\n'
                                'region_batch = 1\n', 24, 18)
    assert res.exit_code == 0, res.output
    assert "in-mosaic" in res.output and (out / "cells.pt").is_file() and (out / "context.log.csv").is_file()
    model, before = load_model(out / "model.pt"), load_model(out / "cells.pt")
    meta = model.metadata
    assert meta["config"]["mosaic_grid"] == 2 and meta["config"]["init"] == str(out / "cells.pt")
    assert meta["config"]["epochs"] == 1 and meta["config"]["batch_size"] == 8  # [context] over [cells]
    assert meta["cells_stage"]["metrics"] == {"valid_holdout": {"auc": 0.5}}
    assert "mosaic_auc" in meta["metrics"]["valid_holdout"]
    w0, w1 = before.mil.cell_head.weight.detach().numpy(), model.mil.cell_head.weight.detach().numpy()
    assert w0.shape == w1.shape and not np.allclose(w0, w1)  # trained on from the cell model's weights:
    assert np.abs(w1 - w0).max() < 0.02  # two Adam steps of lr 2e-3 move a weight by ~0.004; a fresh init ~0.1


def test_the_stage_figures_command_runs_as_a_module(tmp_path):
    """The model card's `python -m wsi_vssm.training.mosaic OUT/mosaic_mil default` printed nothing and exited 0:
    the module had no `__main__` entry. Given a folder that is no stage's, it now says so."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "wsi_vssm.training.mosaic", str(tmp_path), "default"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert res.returncode == 2, res
    assert f"{tmp_path}: no mosaics/train or mosaics/valid folder" in res.stderr, res.stderr


def test_the_stage_auc_tool_says_bad_input_in_one_line(tmp_path, capsys):
    """`python -m wsi_vssm.training.mosaic STAGE MODEL` (the model card's command) ended a missing model file or a
    damaged feature store in a traceback."""
    from wsi_vssm.training.mosaic import main

    stage = tmp_path / "mosaic_mil"
    (stage / "mosaics" / "valid").mkdir(parents=True)
    (stage / "mosaics" / "valid" / "reference.csv").write_text("slide,label\na.tif,0\nb.tif,1\n")
    assert main([str(stage), str(tmp_path / "none.pt")]) == 1
    write_tiny_model(tmp_path / "m.pt")
    assert main([str(stage), str(tmp_path / "m.pt")]) == 1  # no feature stores where the stage keeps them
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("python -m wsi_vssm.training.mosaic: error: ") for line in err), err
    assert "none.pt: model file not found" in err[0] and "a.zarr" in err[1], err
