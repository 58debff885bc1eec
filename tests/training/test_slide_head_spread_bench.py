"""bench/slide_head_spread.py: refits a run's slide-head candidates with other seeds on its cached features."""

from __future__ import annotations

import shutil

import pytest
from conftest import load_bench, write_patch_folder, write_tiny_model


def test_seed_0_reproduces_the_stage_and_other_seeds_are_reported(tmp_path, monkeypatch, capsys):
    from click.testing import CliRunner

    from wsi_vssm.cli import cli
    from wsi_vssm.models.slide_model import load_model

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    write_patch_folder(tmp_path / "train", 24, seed=1)
    write_patch_folder(tmp_path / "valid", 24, seed=2)
    run = tmp_path / "run"
    run.mkdir()
    write_tiny_model(run / "model.pt")
    shutil.copy(run / "model.pt", run / "dense.pt")  # as the recipe leaves it: the stage starts from dense.pt
    recipe = tmp_path / "r.toml"
    recipe.write_text('[recipe]\nstages = ["mosaic_mil"]\n[data]\ntrain = ""\nvalid = ""\n'
                      '[cells]\nvalid_select = 24\nseed = 0\n'
                      '[mosaic_mil]\ntrain_slides = 4\nvalid_slides = 6\ngrid = 3\nepochs = 3\npatience = 3\n'
                      'pool = ["attention", "topk"]\ntopk = [2]\npooled_sizes = [2]\npooled_bags = 4\n')
    res = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(run), "--set", f"data.train={tmp_path / 'train'}",
                                   "--set", f"data.valid={tmp_path / 'valid'}"])
    assert res.exit_code == 0, res.output
    stage = {c["name"]: c["pooled_auc"] for c in load_model(run / "model.pt").metadata["mil_stage"]["candidates"]}
    before = sorted(p.name for p in (run / "mosaic_mil").rglob("*"))
    bench = load_bench("slide_head_spread")
    out = bench.run_spread(run, seeds=[0, 1], pools=["topk2"], progress=False)
    assert out["pooled_auc"]["topk2"][0] == pytest.approx(stage["topk2"], abs=1e-9)  # the stage's own fit
    assert set(out["pooled_auc"]) == {"topk2"} and set(out["pooled_auc"]["topk2"]) == {0, 1}
    assert sorted(p.name for p in (run / "mosaic_mil").rglob("*")) == before  # nothing written into the run
    with pytest.raises(SystemExit, match="no candidate mix16"):
        bench.run_spread(run, seeds=[0], pools=["mix16"], progress=False)
    assert bench.main(["--run", str(run), "--seeds", "0", "1", "--pools", "attention", "--out",
                       str(tmp_path / "s.json")]) == 0
    printed = capsys.readouterr().out
    assert "attention" in printed and (tmp_path / "s.json").is_file()
    assert bench.summary({0: 0.8, 1: 0.9, 2: 0.85})["median"] == pytest.approx(0.85)
