"""Token-cell extraction and the FeatureStore: geometry, borders, padding, round trips, atomicity, the CLI."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import shared_file

from wsi_vssm.io import ArraySlide
from wsi_vssm.io.base import resize
from wsi_vssm.io.tissue import tissue_fraction
from wsi_vssm.models import inputs
from wsi_vssm.models.model_file import load_backbone
from wsi_vssm.pipeline import geometry
from wsi_vssm.pipeline import store as feature_store
from wsi_vssm.pipeline.extract import extract_slide
from wsi_vssm.pipeline.store import CellFeatures, FeatureStore, FeatureStoreError


@pytest.fixture(scope="module")
def micro():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone("micro")


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour blobs plus pixel noise: structure at several scales, so features vary across the slide."""
    rng = np.random.default_rng(seed)
    base = resize((rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8), w, h).astype(int)
    return np.clip(base + rng.integers(-25, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def _by_cell(c: CellFeatures) -> dict:
    return {tuple(p): f.astype(np.float32) for p, f in zip(c.coords_px.tolist(), c.features, strict=True)}


def _rel_err(a: dict, ref: dict) -> np.ndarray:
    return np.array([np.linalg.norm(a[k] - ref[k]) / np.linalg.norm(ref[k]) for k in sorted(ref)])


# ---- geometry ----------------------------------------------------------------------------------------------
def test_cells_cover_tissue_once_on_the_global_grid(micro):
    backbone, info = micro
    w, h = 330, 250  # not multiples of the region step: edge regions are padded
    slide = ArraySlide(_texture(h, w), mpp=0.5)
    mask = np.zeros((h // 5, w // 5), bool)  # a coarse mask (5 level-0 px per mask px), tissue on the left
    mask[:, : 2 * mask.shape[1] // 3] = True
    mask[10:20, 40:60] = True
    c = extract_slide(slide, backbone, mpp=1.0, region_px=128, overlap_px=64, min_tissue=0.25,
                      tissue=(mask, 5.0), info=info)
    cell = 64  # token_px 32 at 1.0 um/px = 64 level-0 px at 0.5
    assert c.features.dtype == np.float16 and c.features.shape == (len(c), backbone.num_features)
    assert np.isfinite(c.features.astype(np.float32)).all()
    xy = c.coords_px
    assert (xy % cell == 0).all(), "cells sit on the global grid"
    assert (xy[:, 0] + cell <= w).all() and (xy[:, 1] + cell <= h).all(), "no cell reaches into padding"
    assert len({tuple(p) for p in xy.tolist()}) == len(c), "no cell twice"
    expected = {
        (x, y)
        for y in range(0, h - cell + 1, cell)
        for x in range(0, w - cell + 1, cell)
        if tissue_fraction(mask, (x / 5, y / 5, cell / 5, cell / 5)) >= 0.25
    }
    assert {tuple(p) for p in xy.tolist()} == expected, "every tissue cell exactly once"
    np.testing.assert_allclose(c.coords_um, xy * 0.5)
    np.testing.assert_allclose(
        c.tissue.astype(float), [tissue_fraction(mask, (x / 5, y / 5, cell / 5, cell / 5)) for x, y in xy], atol=2e-3
    )
    assert c.attrs["cell_px0"] == cell and c.attrs["slide_mpp"] == 0.5 and c.attrs["model_hash"] == info.model_hash


def test_each_cell_comes_from_the_region_where_it_is_farthest_from_an_edge(micro):
    from wsi_vssm.io.regions import RegionGrid

    backbone, info = micro
    slide = ArraySlide(_texture(192, 256), mpp=1.0)  # 2 x 3 regions: a middle column with two internal edges
    mask = np.ones((192, 256), bool)
    c = extract_slide(slide, backbone, mpp=1.0, region_px=128, overlap_px=64, tissue=(mask, 1.0), info=info)
    grid = RegionGrid(slide, 1.0, 128, 64, tissue=(mask, 1.0))
    rows, cols = grid.shape
    assert (rows, cols) == (2, 3) and len(c) == 6 * 8
    for (x, y), rid in zip(c.coords_px.tolist(), c.region_id.tolist(), strict=True):
        r = grid[rid]
        lx, ly = (x - r.x) // 32, (y - r.y) // 32
        assert 0 <= lx < 4 and 0 <= ly < 4
        # 1 cell (= overlap // 2) from every internal edge; slide edges are owned by the edge regions
        assert lx >= 1 or r.col == 0
        assert lx <= 2 or r.col == cols - 1
        assert ly >= 1 or r.row == 0
        assert ly <= 2 or r.row == rows - 1


def test_no_padding_pixel_reaches_the_backbone(micro, monkeypatch):
    """Edge regions reach past the slide; their padding colour must not change any feature."""
    import wsi_vssm.io.base as base

    backbone, info = micro
    slide = ArraySlide(_texture(200, 230, seed=3), mpp=1.0)  # 2 x 2 regions, all reaching past the slide
    kw = dict(mpp=1.0, region_px=128, overlap_px=0, tissue=(np.ones((200, 230), bool), 1.0), info=info)
    white = extract_slide(slide, backbone, **kw)
    monkeypatch.setattr(base, "BACKGROUND", 0)  # pad with black instead of white
    black = extract_slide(slide, backbone, **kw)
    assert len(white) == len(black) > 0
    np.testing.assert_array_equal(white.features, black.features)


def test_overlap_makes_border_cells_agree_with_a_single_region(micro):
    """SS2D gives every token the whole region as receptive field, so cells never equal a whole-slide pass exactly;
    what overlap guarantees is that no kept cell sits within overlap/2 of an internal region edge. Empirically
    (seeded micro weights) that brings border cells within a few percent of a single-region pass."""
    backbone, info = micro
    slide = ArraySlide(_texture(256, 384, seed=1), mpp=1.0)
    kw = dict(mpp=1.0, tissue=(np.ones((256, 384), bool), 1.0), info=info)
    ref = _by_cell(extract_slide(slide, backbone, region_px=384, overlap_px=0, **kw))
    cut = _rel_err(_by_cell(extract_slide(slide, backbone, region_px=256, overlap_px=0, **kw)), ref)
    lap = _rel_err(_by_cell(extract_slide(slide, backbone, region_px=256, overlap_px=128, **kw)), ref)
    print(f"max relative error: overlap {lap.max():.4f}, hard cut {cut.max():.4f}")
    assert lap.max() < 0.1, lap.max()
    assert cut.max() > 5 * lap.max()  # cells at a hard cut see the convs' zero padding and a truncated scan


def test_token_px_average_pools_tokens(micro):
    backbone, info = micro
    slide = ArraySlide(_texture(128, 128, seed=2), mpp=1.0)
    kw = dict(mpp=1.0, region_px=128, overlap_px=0, tissue=(np.ones((128, 128), bool), 1.0), info=info)
    t32 = _by_cell(extract_slide(slide, backbone, token_px=32, **kw))
    t64 = extract_slide(slide, backbone, token_px=64, **kw)
    assert len(t64) == 4 and t64.attrs["token_px"] == 64
    for (x, y), f in _by_cell(t64).items():
        mean = np.mean([t32[(x + dx, y + dy)] for dx in (0, 32) for dy in (0, 32)], axis=0)
        np.testing.assert_allclose(f, mean, rtol=2e-3, atol=2e-3)  # float16 storage


def test_slide_without_tissue_gives_no_cells(micro):
    backbone, info = micro
    slide = ArraySlide(np.full((128, 128, 3), 255, np.uint8), mpp=1.0)
    c = extract_slide(slide, backbone, mpp=1.0, region_px=128, overlap_px=0, info=info)
    assert len(c) == 0 and c.features.shape == (0, backbone.num_features)


def test_bad_geometry_is_rejected(micro):
    from wsi_vssm.errors import UsageError
    from wsi_vssm.io import MissingMpp

    backbone, _ = micro
    slide = ArraySlide(np.zeros((64, 64, 3), np.uint8), mpp=1.0)
    with pytest.raises(UsageError, match="multiple of token_px"):
        extract_slide(slide, backbone, mpp=1.0, region_px=100)
    with pytest.raises(UsageError, match="overlap_px"):
        extract_slide(slide, backbone, mpp=1.0, region_px=128, overlap_px=48)
    with pytest.raises(UsageError, match="unknown device"):
        extract_slide(slide, backbone, mpp=1.0, device="tpu")
    with pytest.raises(MissingMpp, match="--mpp"):
        extract_slide(ArraySlide(np.zeros((64, 64, 3), np.uint8)), backbone, mpp=1.0)


def test_to_tensor_normalises_once():
    img = np.zeros((2, 3, 3), np.uint8)
    img[..., 0] = 255
    t = inputs.to_tensor(img)
    assert t.shape == (1, 3, 2, 3)
    assert torch.allclose(t[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225]))


# ---- backbones ---------------------------------------------------------------------------------------------
def test_load_backbone_from_a_slide_model_file(micro, tmp_path):
    from wsi_vssm.models.checkpoint import CheckpointError

    backbone, info = micro
    sd = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    sd.update({"mil.cell_head.weight": torch.zeros(1, 256), "mil.cell_head.bias": torch.zeros(1)})
    path = tmp_path / "model.pt"
    torch.save({"format": "wsi-vssm-model/1", "backbone_config": backbone.config.to_dict(), "mpp": 0.5,
                "token_px": 64, "state_dict": sd}, path)
    loaded, linfo = load_backbone(path)
    assert linfo.model_hash == info.model_hash, "same weights, same hash, whichever file"
    assert (linfo.mpp, linfo.token_px, linfo.model_id, linfo.trained) == (0.5, 64, "model", True)
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(loaded.forward_features(x), backbone.forward_features(x))
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="not a wsi-vssm model file"):
        load_backbone(tmp_path / "bad.pt")


def test_load_backbone_takes_default_as_load_model_does(tmp_path, monkeypatch):
    """`load_backbone("default")` said "model file not found: default", while load_model and `extract -m default`
    take the name."""
    from wsi_vssm.models.slide_model import default_model_path

    monkeypatch.chdir(tmp_path)  # no file named "default" here
    _, info = load_backbone("default")
    assert info.trained and info == load_backbone(default_model_path())[1]


def test_load_backbone_file_errors_are_one_line(micro, tmp_path):
    """load_backbone reads model files as load_model does: one line naming the file, also for another
    architecture (the full listing stays on the chained CheckpointMismatchError)."""
    from wsi_vssm.models.checkpoint import CheckpointMismatchError
    from wsi_vssm.models.slide_model import ModelFileError

    backbone, _ = micro
    cfg = {**backbone.config.to_dict(), "depths": [1, 1, 1, 1]}  # the weights no longer fit
    torch.save({"format": "wsi-vssm-model/1", "backbone_config": cfg, "mpp": 0.5, "token_px": 32,
                "state_dict": backbone.state_dict()}, tmp_path / "arch.pt")
    for name in ("arch.pt", "nope.pt"):
        with pytest.raises(ModelFileError) as e:
            load_backbone(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)
    with pytest.raises(ModelFileError) as e:
        load_backbone(tmp_path / "arch.pt")
    assert isinstance(e.value.__cause__, CheckpointMismatchError)


def test_grid_size_is_the_region_grid_shape():
    from wsi_vssm.io.regions import RegionGrid

    slide = ArraySlide(np.zeros((250, 330, 3), np.uint8), mpp=0.5)
    for region_px, overlap_px in ((128, 64), (96, 0), (512, 32)):
        grid = RegionGrid(slide, 1.0, region_px, overlap_px, tissue=np.ones((5, 5), bool))
        assert geometry.grid_size(slide, 1.0, region_px, overlap_px) == math.prod(grid.shape) >= len(grid)


# ---- the store ---------------------------------------------------------------------------------------------
def _cells(n: int = 5, f: int = 8) -> CellFeatures:
    rng = np.random.default_rng(n)
    xy = np.stack([np.arange(n) * 64, np.zeros(n)], 1).astype(np.int64)
    return CellFeatures(
        features=rng.standard_normal((n, f)).astype(np.float16), coords_px=xy, coords_um=(xy * 0.5).astype(np.float32),
        region_id=np.arange(n, dtype=np.int32), tissue=np.full(n, 0.5, np.float16),
        attrs={"format": feature_store.STORE_FORMAT, "slide": "s", "model_hash": "h", "n_features": f, "mpp": 1.0},
    )  # fmt: skip


def test_store_round_trip(tmp_path):
    c = _cells()
    store = FeatureStore.write(tmp_path / "s.zarr", c)
    again = FeatureStore.open(tmp_path / "s.zarr")
    assert len(again) == 5 and again.name == "s" and again.attrs["model_hash"] == "h"
    assert again.features.shape == (5, 8)  # lazy zarr array
    back = again.load()
    for name in feature_store.ARRAYS:
        np.testing.assert_array_equal(getattr(back, name), getattr(c, name))
        assert getattr(back, name).dtype == getattr(c, name).dtype
    assert (tmp_path / "s.zarr" / "zarr.json").is_file() and store.path == tmp_path / "s.zarr"
    empty = FeatureStore.write(tmp_path / "e.zarr", _cells(0))
    assert len(empty) == 0 and empty.load().features.shape == (0, 8)


def test_store_write_is_atomic(tmp_path, monkeypatch):
    import zarr

    target = tmp_path / "s.zarr"
    FeatureStore.write(target, _cells(3))
    real = zarr.Group.create_array
    calls = []

    def failing(self, name, **kw):
        calls.append(name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(self, name, **kw)

    monkeypatch.setattr(zarr.Group, "create_array", failing)
    with pytest.raises(FeatureStoreError, match="s.zarr: cannot write"):
        FeatureStore.write(target, _cells(7))
    assert len(FeatureStore.open(target)) == 3, "the old store is untouched"
    assert sorted(os.listdir(tmp_path)) == ["s.zarr"], "no temporary left behind"


def test_damaged_store_is_one_clear_line(tmp_path):
    target = tmp_path / "s.zarr"
    FeatureStore.write(target, _cells())
    (target / "features" / "zarr.json").unlink()
    with pytest.raises(FeatureStoreError, match=r"s\.zarr: damaged feature store") as err:
        FeatureStore.open(target)
    assert "\n" not in str(err.value)
    (target / "zarr.json").write_text("{not json")
    with pytest.raises(FeatureStoreError, match=r"s\.zarr"):
        FeatureStore.open(target)
    with pytest.raises(FeatureStoreError, match="no feature store"):
        FeatureStore.open(tmp_path / "none.zarr")


def test_a_store_declaring_more_cells_or_larger_chunks_than_written_is_refused_before_reading(tmp_path):
    """200 KB of metadata declaring 20,000,000 cells made `train mil` allocate 9.5 GiB; one chunk of a million
    rows (the writer makes 65,536) cost 512 MB to decode for any cell of it."""
    import json

    for key, value, said in (("shape", 20_000_000, r"it declares 20,000,000 cells"),
                             ("chunks", 1_000_000, r"it declares 5 cells in 1 chunks of 1,000,000")):
        target = tmp_path / f"{key}.zarr"
        FeatureStore.write(target, _cells(5))
        for name in ("features", "coords_px", "coords_um", "region_id", "tissue") if key == "shape" else ("features",):
            meta = target / name / "zarr.json"
            m = json.loads(meta.read_text())
            if key == "shape":
                m["shape"][0] = value
            else:
                m["chunk_grid"]["configuration"]["chunk_shape"][0] = value
            meta.write_text(json.dumps(m))
        with pytest.raises(FeatureStoreError, match=rf"{key}\.zarr: damaged feature store \({said}"):
            FeatureStore.open(target)
    # a store of ours says its slide's size and cell: more cells than that slide has room for are refused too
    target = tmp_path / "room.zarr"
    FeatureStore.write(target, _cells(100))
    root = json.loads((target / "zarr.json").read_text())
    root["attributes"].update({"dims": [64, 64], "cell_px0": 32.0})
    (target / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(FeatureStoreError, match=r"it declares 100 cells in 1 chunks of 100; its slide has room for "
                                                r"9 cells"):
        FeatureStore.open(target)


def test_a_store_moved_or_rewritten_after_it_was_opened_is_not_read_as_zeros(tmp_path):
    """zarr reads a chunk that is not there as zeros: `train mil` opened its stores, an `extract` or a `mv` moved
    them, and it trained on zero features to "valid AUC 0.5000", exit 0."""
    target = tmp_path / "s.zarr"
    FeatureStore.write(target, _cells(5))
    store = FeatureStore.open(target)
    want = store.read_features()
    assert np.abs(want).sum() > 0
    target.rename(tmp_path / "away.zarr")
    with pytest.raises(FeatureStoreError, match=r"s\.zarr: moved, deleted or replaced since it was opened"):
        store.read_features()
    with pytest.raises(FeatureStoreError, match="moved, deleted or replaced"):
        store.load()
    (tmp_path / "away.zarr").rename(target)  # back where it was: the same store, read as before
    np.testing.assert_array_equal(store.read_features(), want)
    FeatureStore.write(target, _cells(5))  # rewritten in place (extract --overwrite): another folder now
    with pytest.raises(FeatureStoreError, match="moved, deleted or replaced"):
        store.read_features()
    np.testing.assert_array_equal(FeatureStore.open(target).read_features(), want)  # opened anew: read


def test_a_missing_store_chunk_is_found_not_read_as_zeros(tmp_path):
    """An absent chunk reads as zarr's fill value: a store cut in a copy trained a slide on zero features.
    Every chunk is written now (all-zero ones too: region_id of a one-region slide), and a missing one is named."""
    target = tmp_path / "s.zarr"
    cells = _cells(5)
    cells.region_id[:] = 0
    FeatureStore.write(target, cells)
    assert FeatureStore.open(target).region_id.nchunks_initialized == 1, "the all-zero chunk is on disk"
    chunk = next(p for p in (target / "features").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.unlink()
    with pytest.raises(FeatureStoreError, match=r"s\.zarr: damaged feature store \(features: 1 of 1 chunks missing\)"):
        FeatureStore.open(target)



def _damage(target, how: str) -> None:
    if how == "chunk":
        next(p for p in (target / "coords_um").rglob("*") if p.is_file() and p.name != "zarr.json").unlink()
    elif how == "array metadata":
        (target / "tissue" / "zarr.json").write_text("{not json")
    elif how == "array":
        for p in sorted((target / "region_id").rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        (target / "region_id").rmdir()
    elif how == "format":
        root = json.loads((target / "zarr.json").read_text())
        root["attributes"]["format"] = "someone-else/1"
        (target / "zarr.json").write_text(json.dumps(root))
    elif how == "shapes":
        meta = json.loads((target / "tissue" / "zarr.json").read_text())
        meta["shape"] = [meta["shape"][0] + 1]
        (target / "tissue" / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("how", ["none", "chunk", "array metadata", "array", "format", "shapes"])
def test_a_rerun_judges_a_store_from_its_files_as_opening_it_would(tmp_path, monkeypatch, how):
    """A rerun of `extract` checks each finished store; opening it through zarr took about 7 ms a store (minutes
    over a large cohort), so a store that says it holds every chunk is judged from its metadata and a stat of each
    chunk, with the verdict opening it gives."""
    target = tmp_path / "s.zarr"
    FeatureStore.write(target, _cells(70_000, 2))  # two chunks along the rows
    _damage(target, how)
    try:
        FeatureStore.open(target)
        opened = True
    except FeatureStoreError:
        opened = False
    assert opened == (how == "none")

    def not_opened(path):
        raise AssertionError(f"{path} was opened")

    monkeypatch.setattr(FeatureStore, "open", not_opened)
    assert feature_store.store_complete(target) is opened


def test_the_rerun_check_refuses_a_store_declaring_too_much_without_a_stat_per_chunk(tmp_path, monkeypatch):
    """`store_complete` judged a store that says it is complete by a stat of every chunk it declares: 20,000,000
    cells in chunks of 5 were four million stats before the bounds `FeatureStore.open` checks were applied."""
    cases = {"shape": 20_000_000, "chunks": 1_000_000, "room": None}
    for key, value in cases.items():
        target = tmp_path / f"{key}.zarr"
        FeatureStore.write(target, _cells(100 if key == "room" else 5))
        for name in ("features", "coords_px", "coords_um", "region_id", "tissue"):
            meta = target / name / "zarr.json"
            m = json.loads(meta.read_text())
            if key == "shape":
                m["shape"][0] = value
            elif key == "chunks" and name == "features":
                m["chunk_grid"]["configuration"]["chunk_shape"][0] = value
            meta.write_text(json.dumps(m))
        if key == "room":
            root = json.loads((target / "zarr.json").read_text())
            root["attributes"].update({"dims": [64, 64], "cell_px0": 32.0})
            (target / "zarr.json").write_text(json.dumps(root))
        with pytest.raises(FeatureStoreError):
            FeatureStore.open(target)
    stats = []
    real_is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda self: stats.append(self) or real_is_file(self))
    monkeypatch.setattr(FeatureStore, "open", lambda path: pytest.fail(f"{path} was opened"))
    for key in cases:
        stats.clear()
        assert feature_store.store_complete(tmp_path / f"{key}.zarr") is False, key
        assert len(stats) < 10, (key, len(stats))  # its metadata files, not its chunks


def test_a_store_written_before_stores_said_they_are_complete_is_still_opened_to_judge_it(tmp_path, monkeypatch):
    target = tmp_path / "s.zarr"
    FeatureStore.write(target, _cells())
    root = json.loads((target / "zarr.json").read_text())
    del root["attributes"][feature_store.COMPLETE_ATTR]
    (target / "zarr.json").write_text(json.dumps(root))
    opened = []
    real_open = FeatureStore.open
    monkeypatch.setattr(FeatureStore, "open", lambda path: opened.append(path) or real_open(path))
    assert feature_store.store_complete(target) and opened == [target]


# ---- the command -------------------------------------------------------------------------------------------
def _write_tiff(path, img, mpp=None):
    import tifffile

    kw = {} if mpp is None else dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    tifffile.imwrite(path, img, tile=(128, 128), photometric="rgb", **kw)


def test_cli_extract_goes_past_broken_slides_and_exits_3(tmp_path):
    from wsi_vssm.commands.extract import command

    broken = shared_file("slides", "broken.svs")
    good = tmp_path / "good.tif"
    _write_tiff(good, _texture(384, 384, seed=5), mpp=2.0)
    no_mpp = tmp_path / "nompp.tif"
    _write_tiff(no_mpp, _texture(256, 256, seed=6))
    out = tmp_path / "feat"
    args = [str(broken), str(no_mpp), str(good), "--model", "micro", "--out", str(out), "--target-mpp", "2.0",
            "--region-px", "256", "--overlap-px", "64", "--min-tissue", "0", "--device", "cpu"]
    res = CliRunner().invoke(command, args)
    assert res.exit_code == 3, res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("wsi-vssm: error:")]
    assert len(errors) == 2 and "broken.svs" in errors[0] and "nompp.tif" in errors[1] and "--mpp" in errors[1]
    assert "untrained" in res.stderr
    store = FeatureStore.open(out / "good.zarr")
    assert store.attrs["mpp"] == 2.0 and store.attrs["region_px"] == 256 and store.attrs["model_id"] == "micro"
    assert len(store) > 0 and "good: " in res.stdout
    again = CliRunner().invoke(command, [str(good), *args[3:]])
    assert again.exit_code == 0 and "up to date" in again.stdout
    assert math.isclose(store.attrs["cell_px0"], 32.0)


def test_cli_extract_takes_the_default_model_as_predict_does(tmp_path):
    from wsi_vssm.commands.extract import command

    good = tmp_path / "good.tif"
    _write_tiff(good, _texture(256, 256, seed=5), mpp=2.0)
    args = [str(good), "--model", "default", "--out", str(tmp_path / "feat"), "--target-mpp", "2.0", "--region-px",
            "256", "--overlap-px", "64", "--min-tissue", "0", "--device", "cpu"]
    res = CliRunner().invoke(command, args)
    assert res.exit_code == 0, res.output
    assert FeatureStore.open(tmp_path / "feat" / "good.zarr").attrs["model_id"] != "micro"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("token_px", [32, 64, 96])
def test_default_region_is_whole_tokens(device, token_px):
    """Each device's default region passes the geometry check for any token size (the CUDA default of 10,000
    was not a multiple of 32, so `predict --device cuda` failed without --region-px)."""
    side = geometry.default_region_px(device, token_px)
    geometry.check_geometry(token_px, side, 4 * token_px, geometry.DEFAULT_MIN_TISSUE)  # 4 tokens, as the default
    top = geometry.DEFAULT_REGION_PX[device]
    assert side % token_px == 0 and top - token_px < side <= top


@pytest.mark.parametrize("overlap", range(6))
def test_owned_ranges_tile_the_cells_once_whatever_the_overlap(overlap):
    """Odd overlaps included (--overlap 96 px = 3 cells): a cell owned by no region would be a NaN stripe."""
    cells, count, step = 10, 3, 10 - overlap
    owned = []
    for i in range(count):
        lo, hi = geometry.owned_range(i, count, cells, overlap)
        owned += range(i * step + lo, i * step + hi)
    assert owned == list(range((count - 1) * step + cells))


def test_tta_maps_each_view_back_before_averaging():
    """A backbone that commutes with flips and quarter turns (a 32 px average pool) gives the same map with and
    without --tta only if every view's map is turned back the right way (rot90 by -k, then the flip undone)."""
    import torch
    import torch.nn.functional as F

    from wsi_vssm.pipeline.extract import region_maps

    class Pool:
        def forward_features(self, x):
            return F.avg_pool2d(x, 32)

    x = torch.rand(1, 3, 96, 160)  # not square: a wrong turn back fails on the shape or the values
    mean, first = region_maps(Pool(), x, tta=True)
    torch.testing.assert_close(mean, F.avg_pool2d(x, 32))
    torch.testing.assert_close(first, F.avg_pool2d(x, 32))
