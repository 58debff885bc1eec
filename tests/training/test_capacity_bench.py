"""bench/capacity.py trains what it says: the [cells] recipe's settings for each config, and a throughput that
tells the wider config's slower steps apart (tiny steps: quick)."""

from __future__ import annotations

from conftest import load_bench


def _bench():
    return load_bench("capacity")


def test_each_config_trains_with_the_recipes_cells_settings():
    from wsi_vssm.training.recipe import load_recipe

    bench = _bench()
    cells = load_recipe(bench.RECIPE)["cells"]
    cfg = bench.cells_config("micro_wide", epochs=7)
    assert (cfg.arch, cfg.epochs, cfg.epoch_size) == ("micro_wide", 7, bench.EPOCH_PATCHES)
    assert cfg.patience == 7 and cfg.mil_bags == 0  # no early stop; no MIL head to fit
    for key in ("lr", "weight_decay", "warmup_frac", "batch_size", "valid_select", "ema", "mpp", "token_px"):
        assert getattr(cfg, key) == cells[key], key
    assert cfg.augment.to_dict() == {**cfg.augment.to_dict(), **cells["augment"]}


def test_step_rate_measures_both_configs_side_by_side():
    from wsi_vssm.models import create_model

    rates = _bench().step_rate(["micro", "micro_wide"], batch=4, side=64, rounds=1, steps=1)
    assert set(rates) == {"micro", "micro_wide"} and all(r > 0 for r in rates.values())
    params = {a: sum(p.numel() for p in create_model(a).parameters()) for a in rates}
    assert params["micro_wide"] > 2 * params["micro"]  # the wider candidate really is wider
