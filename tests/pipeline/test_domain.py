"""The domain check: stain and modality from colour deconvolution, the token-feature distance, the verdict."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import shared_file

from wsi_vssm.io.tissue import RGB_FROM_HED
from wsi_vssm.pipeline.domain import (
    METADATA_KEY,
    FeatureDomain,
    FeatureDomainError,
    domain_verdict,
    ledoit_wolf,
    slide_domain,
    stain_check,
    stain_stats,
)


def _from_hed(h: float, e: float, d: float, shape=(64, 64)) -> np.ndarray:
    """An image of one stain mixture (concentrations in OD units), with a little noise."""
    rng = np.random.default_rng(0)
    hed = np.array([h, e, d]) * rng.uniform(0.8, 1.2, (*shape, 1))
    return np.clip(255 * np.exp(-(hed @ RGB_FROM_HED)), 0, 255).astype(np.uint8)


def _on_glass(tissue: np.ndarray, side: int = 128) -> tuple[np.ndarray, np.ndarray]:
    img = np.full((side, side, 3), 240, np.uint8)
    mask = np.zeros((side, side), bool)
    h, w = tissue.shape[:2]
    img[:h, :w], mask[:h, :w] = tissue, True
    return img, mask


def test_stain_matrix_is_the_training_one():
    augment = pytest.importorskip("wsi_vssm.training.data.augment")
    np.testing.assert_allclose(RGB_FROM_HED, augment.RGB_FROM_HED.double().numpy(), atol=1e-6)


def test_synthetic_he_passes():
    assert stain_check(*_on_glass(_from_hed(0.5, 0.5, 0.0))) == []


def test_dark_fluorescence_like_image_is_flagged():
    img = np.zeros((128, 128, 3), np.uint8)
    img[20:60, 20:60, 2] = 200  # a few bright blue (DAPI-like) nuclei on black
    notes = stain_check(img, np.zeros((128, 128), bool))
    assert len(notes) == 1 and "fluorescence" in notes[0]


def test_dab_heavy_image_is_flagged_as_ihc():
    notes = stain_check(*_on_glass(_from_hed(0.2, 0.0, 0.8)))
    assert any("DAB" in n for n in notes) and any("IHC" in n for n in notes)
    assert stain_stats(*_on_glass(_from_hed(0.2, 0.0, 0.8)))["dab_share"] > 0.9


def test_haematoxylin_only_is_flagged():
    assert any("no eosin" in n for n in stain_check(*_on_glass(_from_hed(0.8, 0.0, 0.0))))


def test_grey_tissue_is_flagged_as_unstained():
    img, _ = _on_glass(np.full((96, 96, 3), 150, np.uint8))
    notes = stain_check(img, np.zeros(img.shape[:2], bool))  # the tissue mask finds no colourless tissue
    assert any("unstained" in n for n in notes)


def test_blank_glass_has_no_notes():
    assert stain_check(np.full((64, 64, 3), 243, np.uint8), None) == []


def test_mask_must_match_the_thumbnail():
    with pytest.raises(FeatureDomainError):
        stain_check(np.full((64, 64, 3), 243, np.uint8), np.zeros((32, 32), bool))


H_AND_E_TILES = ["tissue-level2-1784-6289-5880-10386.png", "tissue-level0-4302-10273-4814-10785.png",
                 "medium-nuclei-score-level1.png", "high-nuclei-score-level2.png", "low-nuclei-score-level0.png",
                 "very-low-nuclei-score-level0.png"]
IHC_TILES = ["kidney-ihc-level0-310-500-360-530.png", "kidney-ihc-level0-340-520-390-550.png"]


def _tile(name: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    from wsi_vssm.io.tissue import tissue_mask

    rgb = np.asarray(Image.open(shared_file("tiles", name)).convert("RGB"))
    return rgb, tissue_mask(rgb)


@pytest.mark.parametrize("name", H_AND_E_TILES)
def test_real_he_tiles_pass(name):
    assert stain_check(*_tile(name)) == []


@pytest.mark.parametrize("name", IHC_TILES)
def test_real_ihc_tiles_are_flagged(name):
    assert any("IHC" in n for n in stain_check(*_tile(name)))


# ---- token features ---------------------------------------------------------------------------------------
def _domain(threshold: float = 4.0) -> tuple[FeatureDomain, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8)) + 3.0
    d = FeatureDomain.fit(x, source="test")
    d.threshold = threshold
    return d, x


def test_ledoit_wolf_is_a_shrunk_positive_definite_covariance():
    rng = np.random.default_rng(2)
    mix = rng.normal(size=(20, 20))
    cov, shrink = ledoit_wolf(rng.normal(size=(15, 20)) @ mix)  # fewer samples than dimensions
    assert 0.0 < shrink <= 1.0
    assert np.linalg.eigvalsh(cov).min() > 0
    _, shrink_big = ledoit_wolf(rng.normal(size=(5000, 20)) @ mix)
    assert shrink_big < shrink  # more samples, less shrinkage
    assert ledoit_wolf(rng.normal(size=(500, 20)))[1] == pytest.approx(1.0)  # isotropic: the target itself


def test_feature_domain_flags_far_features_and_passes_training_ones():
    d, x = _domain()
    ok, notes = d.check(x[:100])
    assert ok and notes == []
    far = x[:100] + 50 * x.std(axis=0)
    ok, notes = d.check(far)
    assert not ok and "unlike the training data" in notes[0]
    assert d.slide_distance(far) > d.slide_distance(x[:100])
    # the threshold itself is in domain, anything over it is not (the selection part set it as a maximum)
    assert d.check_distance(d.threshold, 500)[0] and not d.check_distance(d.threshold * 1.001, 500)[0]


def test_feature_domain_round_trips_through_model_metadata(tmp_path):
    torch = pytest.importorskip("torch")
    d, x = _domain()
    meta = d.to_metadata()
    json.dumps(meta)  # plain data only
    torch.save({"metadata": {METADATA_KEY: meta}}, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=True)["metadata"]

    class Model:
        metadata = loaded

    back = FeatureDomain.from_model(Model())
    assert back.threshold == d.threshold and back.statistic == d.statistic and back.info["source"] == "test"
    np.testing.assert_allclose(back.token_distances(x[:20]), d.token_distances(x[:20]), rtol=1e-5)
    d.save_json(tmp_path / "d.json")
    assert FeatureDomain.load_json(tmp_path / "d.json").slide_distance(x) == pytest.approx(d.slide_distance(x),
                                                                                           rel=1e-5)


def test_feature_domain_rejects_bad_input():
    d, _ = _domain()
    with pytest.raises(FeatureDomainError, match="another model"):
        d.token_distances(np.zeros((3, 5)))
    with pytest.raises(FeatureDomainError):
        FeatureDomain.from_metadata({"format": "nope"})
    with pytest.raises(FeatureDomainError, match="statistic"):
        FeatureDomain(d.mean, d.precision, 1.0, statistic="max")
    assert FeatureDomain.from_model(type("M", (), {"metadata": {}})()) is None
    assert math.isnan(d.slide_distance(np.zeros((0, 8))))


def test_percentile_statistic():
    d, x = _domain()
    d90 = FeatureDomain(d.mean, d.precision, d.threshold, statistic="p90")
    assert d90.slide_distance(x) == pytest.approx(np.percentile(d.token_distances(x), 90))


# ---- verdict ---------------------------------------------------------------------------------------------
def test_verdict_combines_stain_and_features():
    assert domain_verdict([], (True, [])) == (True, [])
    assert domain_verdict(["looks like IHC"], (True, []))[0] is False
    ok, notes = domain_verdict([], (False, ["far"]))
    assert not ok and notes == ["far"]


def test_no_tissue_slide_gets_a_stain_only_verdict():
    ok, notes = domain_verdict([], None)
    assert ok and "stain only" in notes[0]
    dark = np.zeros((64, 64, 3), np.uint8)
    d, _ = _domain()
    rec = slide_domain(dark, np.zeros((64, 64), bool), np.zeros((0, 8)), d)
    assert rec["in_domain"] is False and rec["domain_distance"] is None
    assert "fluorescence" in rec["domain_notes"][0] and "stain only" in rec["domain_notes"][-1]
    json.dumps(rec)


def test_slide_domain_with_features():
    d, x = _domain()
    img, mask = _on_glass(_from_hed(0.5, 0.5, 0.0))
    rec = slide_domain(img, mask, x[:50], d)
    assert rec["in_domain"] is True and rec["domain_distance"] == pytest.approx(d.slide_distance(x[:50]), abs=1e-3)
    rec = slide_domain(img, mask, x[:5] + 100, d)
    assert rec["in_domain"] is False and "rough" in rec["domain_notes"][0]
    assert slide_domain(img, mask, x[:50], None)["domain_distance"] is None


def test_shipped_default_domain_fits_the_default_model():
    from pathlib import Path

    import wsi_vssm

    path = Path(wsi_vssm.__file__).parent / "weights" / "default_domain.json"
    if not path.exists():
        pytest.skip("no default_domain.json")
    d = FeatureDomain.load_json(path)
    assert d.width == 256 and math.isfinite(d.threshold) and d.threshold > 0


def test_too_little_tissue_to_judge_the_stain_is_not_called_a_stain_verdict():
    """An IHC slide read at a tiny thumbnail had no tissue pixels for the deconvolution: its note claimed it was
    "judged on the stain only" while nothing had been judged."""
    img, _ = _on_glass(_from_hed(0.3, 0.0, 0.6))  # IHC-like tissue, but the mask found none of it
    rec = slide_domain(img, np.zeros(img.shape[:2], bool), None, None)
    assert rec["in_domain"] is True and len(rec["domain_notes"]) == 1
    assert "too little tissue" in rec["domain_notes"][0] and "stain only" not in rec["domain_notes"][0]
    img, mask = _on_glass(_from_hed(0.3, 0.0, 0.6))  # the same tissue, found: judged, and flagged
    rec = slide_domain(img, mask, None, None)
    assert rec["in_domain"] is False and "stain only" in rec["domain_notes"][-1]


def test_another_magnification_is_out_of_domain():
    """--target-mpp 2 on the sample mosaic: token features under the threshold, the lesion called normal (0.287),
    and in_domain true. The resolution the slide was read at is now part of the verdict."""
    from wsi_vssm.pipeline.domain import magnification_check

    assert magnification_check(0.972, 0.972) == [] and magnification_check(1.1, 0.972) == []
    assert magnification_check(None, 0.972) == [] and magnification_check(0.972, None) == []
    note = magnification_check(2.0, 0.972)
    assert len(note) == 1 and "2 um/px" in note[0] and "2.1x" in note[0]
    assert "0.51x" in magnification_check(0.5, 0.972)[0]
    img, mask = _on_glass(_from_hed(0.5, 0.5, 0.0))
    d, x = _domain()
    rec = slide_domain(img, mask, x[:50], d, analysis_mpp=2.0, model_mpp=0.972)
    assert rec["in_domain"] is False and "another magnification" in rec["domain_notes"][0]
    assert slide_domain(img, mask, x[:50], d, analysis_mpp=0.972, model_mpp=0.972)["in_domain"] is True
    rec = slide_domain(img, np.zeros(img.shape[:2], bool), None, None, analysis_mpp=2.0, model_mpp=0.972)
    assert rec["in_domain"] is False and "another magnification" in rec["domain_notes"][0]  # also without tissue


def test_a_scan_coarser_than_it_is_read_at_is_out_of_domain():
    """A 2 um/px scan read at the model's 0.972 was enlarged 2x without a word: blurred pixels the model never saw.
    A finer scan read coarser (0.25 -> 0.972, the usual case) is not flagged, nor one within the tolerance."""
    from wsi_vssm.pipeline.domain import magnification_check

    assert magnification_check(0.972, 0.972, 0.25) == [] and magnification_check(0.972, 0.972, 1.2) == []
    note = magnification_check(0.972, 0.972, 2.0)
    assert len(note) == 1 and "scanned at 2 um/px" in note[0] and "enlarged 2.1x" in note[0]
    assert len(magnification_check(0.5, 0.972, 2.0)) == 2  # both: read finer than the model, and enlarged
    img, mask = _on_glass(_from_hed(0.5, 0.5, 0.0))
    d, x = _domain()
    rec = slide_domain(img, mask, x[:50], d, analysis_mpp=0.972, model_mpp=0.972, slide_mpp=2.0)
    assert rec["in_domain"] is False and "enlarged" in rec["domain_notes"][0]
    assert slide_domain(img, mask, x[:50], d, analysis_mpp=0.972, model_mpp=0.972, slide_mpp=0.5)["in_domain"]


def test_the_note_says_which_check_could_not_run():
    """One note covered two cases ("no tissue tokens, or no feature domain"); a slide without tissue also lost
    the model's threshold from prediction.json."""
    d, _ = _domain()
    img, mask = _on_glass(_from_hed(0.5, 0.5, 0.0))
    no_tokens = slide_domain(img, mask, np.zeros((0, 8)), d)
    assert "(no tissue tokens)" in no_tokens["domain_notes"][-1] and no_tokens["domain_threshold"] == round(
        d.threshold, 3)
    no_domain = slide_domain(img, mask, np.ones((5, 8)), None)
    assert "this model has no feature domain" in no_domain["domain_notes"][-1]
    assert no_domain["domain_threshold"] is None


def test_a_new_mil_head_on_the_default_backbone_keeps_the_packaged_domain():
    """A MIL head trained on the default model's features and attached (docs/features.md) changed the model's
    weights hash, so the packaged domain no longer matched: 10 slides the default model flags came out in
    domain. The token features it measures are the backbone's, so the backbone's hash decides."""
    import copy

    import torch

    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.pipeline.domain import model_domain

    default = load_model("default")
    assert model_domain(default) is not None
    attached, retrained = copy.deepcopy(default), copy.deepcopy(default)
    with torch.no_grad():
        for p in attached.mil.parameters():
            p.add_(0.01)
        next(retrained.backbone.parameters()).add_(0.01)
    assert model_domain(attached) is not None  # the same backbone: the same features, the same domain
    assert model_domain(retrained) is None  # another backbone: its features are not the domain's
