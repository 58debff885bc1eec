"""bench/cell_threshold.py --write: a new cell threshold goes into the model file, and a seed-cells lesion rule
follows it (its extent was the old threshold); weights stay as they were."""

from __future__ import annotations

import torch
from conftest import load_bench, write_tiny_model


def _rows(t: float) -> dict:
    return {"0.99": {"cell_threshold": t, "balanced_accuracy": 0.85}}


def test_write_moves_the_cell_threshold_and_a_seed_cells_extent(tmp_path):
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.pipeline.params import PredictParams, cell_threshold, extent_threshold

    bench = load_bench("cell_threshold")
    path = write_tiny_model(tmp_path / "m.pt", cell_threshold=0.78, lesion_extent_threshold=0.78,
                            lesion_merge_distance_cells=2.0)
    before = torch.load(path, weights_only=True)
    bench._write(path, 0.99, _rows(0.65), 1000, 36000)
    after = torch.load(path, weights_only=True)
    meta = after["metadata"]
    assert meta["cell_threshold"] == 0.65
    assert meta["cell_threshold_rule"]["previous"] == 0.78 and meta["cell_threshold_rule"]["token_specificity"] == 0.99
    assert meta["lesion_extent_threshold"] == 0.65 and meta["lesion_merge_distance_cells"] == 2.0
    model = load_model(path)
    assert cell_threshold(model, PredictParams(), warn=False) == 0.65
    assert extent_threshold(model, PredictParams(), 0.65) == 0.65
    for k, v in before["state_dict"].items():
        assert torch.equal(v, after["state_dict"][k]), k


def test_write_keeps_an_extent_below_the_threshold(tmp_path):
    bench = load_bench("cell_threshold")
    path = write_tiny_model(tmp_path / "m.pt", cell_threshold=0.78, lesion_extent_threshold=0.5)
    bench._write(path, 0.99, _rows(0.65), 1000, 36000)
    assert torch.load(path, weights_only=True)["metadata"]["lesion_extent_threshold"] == 0.5
