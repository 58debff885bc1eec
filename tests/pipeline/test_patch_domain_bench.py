"""bench/patch_domain.py: the pieces that cut a slide into a patch folder and threshold folders of patches."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import REPO, load_bench


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "bench"))  # its sibling import of bench/domain.py, as `python bench/...` has
    try:
        yield load_bench("patch_domain")
    finally:
        sys.path.remove(str(REPO / "bench"))
        sys.modules.pop("domain", None)


def test_a_folder_threshold_is_the_95th_percentile_of_folder_medians(bench):
    assert bench.folder_threshold(np.full(50, 3.0), 16) == 3.0
    d = np.arange(1000, dtype=float)
    small, large = bench.folder_threshold(d, 4), bench.folder_threshold(d, 256)
    # medians of small folders spread wider: their 95th percentile lies farther above the median of all
    assert small > large > np.median(d)


def test_slide_patches_are_cut_at_the_models_resolution(bench, cohort):
    # the cohort's slides are 1,024 px at 2 um/px: about 2,111 px at 0.97 um/px, so 21 x 21 patches of 96 px
    patches = bench.slide_patches(cohort / "normal_001.tif", None, 0.97)
    assert len(patches) == 400 and all(p.shape == (96, 96, 3) and p.dtype == np.uint8 for p in patches)
    assert len(bench.slide_patches(cohort / "normal_001.tif", None, 0.97, most=10_000)) == 21 * 21


def test_centre_features_are_each_patch_alone_at_its_centre_token(bench, model_file):
    from wsi_vssm.models.inputs import to_tensor
    from wsi_vssm.models.slide_model import load_model

    model = load_model(model_file).eval()
    rng = np.random.default_rng(0)
    patches = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(3)]
    got = bench.centre_features(model, patches)
    with torch.no_grad():
        want = model.cell_features(to_tensor(patches[1]))[0, :, 1, 1].double().numpy()
    assert got.shape == (3, model.backbone.num_features)
    np.testing.assert_allclose(got[1], want, rtol=1e-5, atol=1e-5)
