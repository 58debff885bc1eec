"""bench/slide_head_spread.py: refits a run's slide-head candidates with other seeds on its cached features."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import load_bench, run_recipe_on_patches, write_tiny_model


def test_seed_0_reproduces_the_stage_and_other_seeds_are_reported(tmp_path, monkeypatch, capsys):
    from wsi_vssm.models.slide_model import load_model, save_model

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    run = tmp_path / "run"
    run.mkdir()
    write_tiny_model(run / "model.pt")
    shutil.copy(run / "model.pt", run / "dense.pt")  # as the recipe leaves it: the stage starts from dense.pt
    res = run_recipe_on_patches(tmp_path, run, '[recipe]\nstages = ["mosaic_mil"]\n[data]\ntrain = ""\nvalid = ""\n'
                                '[cells]\nvalid_select = 24\nseed = 0\n'
                                '[mosaic_mil]\ntrain_slides = 4\nvalid_slides = 6\ngrid = 3\nepochs = 3\n'
                                'patience = 3\npool = ["attention", "topk"]\ntopk = [2]\npooled_sizes = [2]\n'
                                'pooled_bags = 4\n', 24, 24)
    assert res.exit_code == 0, res.output
    stage = {c["name"]: c["pooled_auc"] for c in load_model(run / "model.pt").metadata["mil_stage"]["candidates"]}

    def files():
        return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file())

    before = files()
    bench = load_bench("slide_head_spread")
    import wsi_vssm.training.mil as mil_module

    seeds_used, real = [], mil_module.train_mil
    monkeypatch.setattr(mil_module, "train_mil", lambda tr, va, cfg, **kw: seeds_used.append(cfg.seed) or real(
        tr, va, cfg, **kw))
    out = bench.run_spread(run, seeds=[0, 1], pools=["topk2"], progress=False)
    assert seeds_used == [0, 1]  # each refit trains with its own seed
    assert out["pooled_auc"]["topk2"][0] == pytest.approx(stage["topk2"], abs=1e-9)  # the stage's own fit
    assert set(out["pooled_auc"]) == {"topk2"} and set(out["pooled_auc"]["topk2"]) == {0, 1}
    assert files() == before  # nothing written into the run, its feature cache included
    other = load_model(run / "model.pt")  # another backbone than the cached features': refused, not re-extracted
    with torch.no_grad():
        next(other.backbone.parameters()).add_(0.01)
    save_model(other, run / "dense.pt", metadata=other.metadata)
    with pytest.raises(SystemExit, match="not the backbone of the cached features"):
        bench.run_spread(run, seeds=[0], pools=["topk2"], progress=False)
    assert [f for f in files() if "mosaic_mil" in f[0]] == [f for f in before if "mosaic_mil" in f[0]]
    shutil.copy(run / "model.pt", run / "dense.pt")
    with pytest.raises(SystemExit, match="no candidate mix16"):
        bench.run_spread(run, seeds=[0], pools=["mix16"], progress=False)
    assert bench.main(["--run", str(run), "--seeds", "0", "1", "--pools", "attention", "--out",
                       str(tmp_path / "s.json")]) == 0
    printed = capsys.readouterr().out
    assert "attention" in printed and (tmp_path / "s.json").is_file()
    assert bench.summary({0: 0.8, 1: 0.9, 2: 0.85})["median"] == pytest.approx(0.85)
    assert "mean of seeds" in printed
    # the mean of the seeds' heads is what the stage's own ensemble of those seeds scores
    assert set(out["ensemble_pooled_auc"]) == {"topk2"}
    shutil.copy(run / "dense.pt", run / "model.pt")  # the stage starts again from where it started
    from click.testing import CliRunner

    from wsi_vssm.cli import cli

    recipe = tmp_path / "r.toml"  # the first run's recipe (the patch folders it wrote), one ensemble candidate
    recipe.write_text(recipe.read_text().replace('pool = ["attention", "topk"]', 'pool = ["topk"]\nensemble = 2'))
    res = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(run), "--set", f"data.train={tmp_path / 'train'}",
                                   "--set", f"data.valid={tmp_path / 'valid'}"])
    assert res.exit_code == 0, res.output
    (ensemble,) = load_model(run / "model.pt").metadata["mil_stage"]["candidates"]
    assert ensemble["pooled_auc"] == pytest.approx(out["ensemble_pooled_auc"]["topk2"], abs=1e-9)
