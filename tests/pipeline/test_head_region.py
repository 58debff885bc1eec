"""A slide head attached from `train mil` learnt on features of some region and overlap; `predict` and `evaluate`
reading other regions fed it other features without a word (left alone since 2026-12-06). They now warn once."""

from __future__ import annotations

import pytest
from conftest import run_cli_captured, write_tiny_model

from wsi_vssm.pipeline.geometry import head_region_warning

ATTACHED = {"method": "attached MIL checkpoint", "checkpoint": "/x/mil.pt",
            "features": {"region_px": 2048, "overlap_px": 128, "min_tissue": 0.25}}


def test_a_run_with_other_regions_than_the_heads_is_warned_once(cohort, tmp_path, capsys):
    model = write_tiny_model(tmp_path / "attached.pt", mil_stage=ATTACHED)
    args = ["predict", cohort / "tumor_001.tif", "--model", model, "--reader-threads", "1"]
    code, _, err = run_cli_captured([*args, "--out", tmp_path / "a", "--region-px", "1024", "--overlap-px", "64"],
                                    capsys)
    said = [line for line in err.splitlines() if "slide head learnt from features" in line]
    assert code == 0 and len(said) == 1, err
    assert "of 2048 px regions with 128 px overlap; this run reads 1024 px regions with 64 px overlap" in said[0]
    assert said[0].endswith("--region-px 2048 --overlap-px 128 matches"), said[0]
    code, _, err = run_cli_captured([*args, "--out", tmp_path / "b", "--region-px", "2048"], capsys)
    assert code == 0 and "slide head learnt from features" not in err, err  # the CPU defaults are its own


def test_heads_that_do_not_say_and_mixed_settings():
    assert head_region_warning({}, 1024, 64) is None  # a head trained before 2026-12-06 (r9's)
    assert head_region_warning({"mil_stage": {"method": "mosaic"}}, 1024, 64) is None
    mixed = {"mil_stage": {"features": {"region_px": [2048, 9984], "overlap_px": 128}}}
    assert head_region_warning(mixed, 9984, 128) is None  # one of the values it was trained on
    other = head_region_warning(mixed, 2048, 256)
    assert "of 2048 or 9984 px regions with 128 px overlap; this run reads 2048 px regions with 256 px" in other
    unrecorded = {"mil_stage": {"features": {"region_px": [2048, None], "overlap_px": [None]}}}  # older stores
    assert head_region_warning(unrecorded, 2048, 64) is None
    said = head_region_warning(unrecorded, 1024, 64)
    assert "None" not in said and said.endswith("--region-px 2048 matches"), said
    # another tool's metadata: features as a list, not the settings' mapping
    assert head_region_warning({"mil_stage": {"features": ["x"]}}, 1024, 64) is None


def test_geometry_edges():
    """An overlap as large as the region left no step between regions (a division by zero further on); a slide
    only 1.05-1.5 times coarser than read was enlarged without the warning the tolerance promises."""
    import warnings

    import numpy as np

    from wsi_vssm.io import ArraySlide
    from wsi_vssm.pipeline.domain import MPP_TOLERANCE
    from wsi_vssm.pipeline.geometry import GeometryError, check_enlargement, check_geometry

    check_geometry(32, 512, 480, 0.25)
    with pytest.raises(GeometryError, match="overlap_px"):
        check_geometry(32, 512, 512, 0.25)
    slide = ArraySlide(np.zeros((64, 64, 3), np.uint8), mpp=1.3)
    with pytest.warns(UserWarning, match="enlarged 1.3x"):
        check_enlargement(slide, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_enlargement(ArraySlide(np.zeros((64, 64, 3), np.uint8), mpp=MPP_TOLERANCE * 0.999), 1.0)


def test_the_napari_widgets_run_warns_too(tmp_path):
    """The widget calls predict_slide itself, and its device box can pick a GPU's larger default regions."""
    import pytest

    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.napari_plugin._predict import _warn_of_head_region
    from wsi_vssm.pipeline.predict import PredictParams

    model = load_model(write_tiny_model(tmp_path / "attached.pt", mil_stage=ATTACHED))
    with pytest.warns(UserWarning, match="this run reads 1024 px regions with 128 px overlap"):
        _warn_of_head_region(model, PredictParams(device="cpu", region_px=1024))
