"""Could a patch folder get a token-feature domain check, as slides do? Measures it; nothing is fitted for use.

    python bench/patch_domain.py [--model default] [--train-patches 4000] [--folder 16 64]

`evaluate DIR` scores each patch alone, so its tokens are not the in-context tokens the shipped FeatureDomain
(`bench/domain.py`) was fitted and thresholded on. This prints, for patches scored alone (their centre token):
1. the shipped slide domain: the distances of PCam valid's SELECTION-part patches and of patches cut from the
   real test slides (read at the model's um/px, 96 px, every patch) against its slide threshold;
2. a domain fitted on `--train-patches` training patches alone (centre tokens), thresholded as bench/domain.py
   thresholds slides: the 95th percentile of the median distance over random folders of `--folder` patches of
   the selection part; the same real-slide patches against it.
A check worth shipping flags the fluorescence and IHC slides' patches and not the selection folders. Beside
them, what the patch folder's stain rules (`pipeline.domain.patches_stain_check`) say of the same patches. The
held-back part of valid is never read. docs/domain.md has the results.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from domain import DATA, REAL_SLIDES, train_features  # noqa: E402  (bench/domain.py: the slides and the fit)

PATCH_PX = 96


def centre_features(model, patches: list[np.ndarray]) -> np.ndarray:
    """(n, F) centre-token features of 96 px patches, each scored alone as `evaluate DIR` scores it."""
    import torch

    from wsi_vssm.models.inputs import normalise_batch

    out = []
    with torch.no_grad():
        for s in range(0, len(patches), 128):
            x = torch.from_numpy(np.stack(patches[s:s + 128])).permute(0, 3, 1, 2).float() / 255
            f = model.cell_features(normalise_batch(x))
            out.append(f[:, :, f.shape[2] // 2, f.shape[3] // 2].double().numpy())
    return np.concatenate(out)


def slide_patches(path: Path, mpp_given: float | None, model_mpp: float, most: int = 400) -> list[np.ndarray]:
    """Up to `most` 96 px patches in reading order from the top-left 4,000 px square of a slide, resized to the
    model's um/px (a patch folder of that slide, background included: patches carry no tissue mask)."""
    from wsi_vssm.io import open_slide
    from wsi_vssm.io.base import resize

    with open_slide(path) as probe:
        stated = probe.mpp
    with open_slide(path, mpp=None if stated else mpp_given) as slide:
        w, h = slide.dimensions
        rgb = np.asarray(slide.read_region((0, 0), 0, (min(w, 4000), min(h, 4000))))[..., :3]
        k = model_mpp / slide.mpp
    rgb = resize(rgb, max(PATCH_PX, round(rgb.shape[1] / k)), max(PATCH_PX, round(rgb.shape[0] / k)))
    return [np.ascontiguousarray(rgb[y:y + PATCH_PX, x:x + PATCH_PX])
            for y in range(0, rgb.shape[0] - PATCH_PX + 1, PATCH_PX)
            for x in range(0, rgb.shape[1] - PATCH_PX + 1, PATCH_PX)][:most]


def folder_threshold(d: np.ndarray, n: int, draws: int = 2000, seed: int = 0) -> float:
    """The 95th percentile of the median distance over `draws` random folders of `n` of these patches."""
    rng = np.random.default_rng(seed)
    return float(np.percentile([np.median(rng.choice(d, n)) for _ in range(draws)], 95))


def main(argv=None) -> int:
    from wsi_vssm.models.model_file import default_model_path
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.pipeline.domain import FeatureDomain, model_domain, patches_stain_check
    from wsi_vssm.training.cells import TrainCellsConfig, split_valid
    from wsi_vssm.training.data.patches import load_patches

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--train-patches", type=int, default=4000)
    ap.add_argument("--folder", type=int, nargs="+", default=[16, 64], help="patches per simulated folder")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    model = load_model(default_model_path() if a.model == "default" else a.model).eval()
    shipped = model_domain(model)
    valid = load_patches(DATA / "pcam" / "valid.tar")
    select, _held_back = split_valid(valid, TrainCellsConfig(valid_select=1000))  # held-back: never read
    del _held_back
    select_f = centre_features(model, [select[i][0] for i in range(len(select))])
    fitted = FeatureDomain.fit(train_features(model, DATA / "pcam" / "train.tar", a.train_patches, a.seed, "centre"))
    domains = ([("shipped slide domain", shipped, shipped.threshold)] if shipped is not None else []) + [
        (f"fitted on {a.train_patches} training patches alone", fitted,
         folder_threshold(fitted.token_distances(select_f), min(a.folder), seed=a.seed))]
    sample = [select[i][0] for i in range(0, len(select), max(1, len(select) // 256))][:256]
    sources = [("PCam valid, selection part", select_f)]
    print("stain rules on the same patches (up to 256, evenly spaced):")
    print(f"  {sources[0][0]}: {'; '.join(patches_stain_check(sample)) or 'no note'}")
    for f, mpp, what in REAL_SLIDES:
        path = Path(f) if Path(f).is_absolute() else DATA / "slides" / f
        try:
            patches = slide_patches(path, mpp, model.mpp)
        except Exception as e:  # noqa: BLE001 - a bench reports every slide, failures included
            print(f"  {path.name}: skipped ({type(e).__name__}: {str(e)[:80]})")
            continue
        sources.append((f"{path.name} ({what})", centre_features(model, patches)))
        step = max(1, len(patches) // 256)
        print(f"  {path.name}: {'; '.join(patches_stain_check(patches[::step][:256])) or 'no note'}")
    for title, dom, thr in domains:
        d_sel = dom.token_distances(select_f)
        folders = ", ".join(f"{n}: {folder_threshold(d_sel, n, seed=a.seed):.2f}" for n in a.folder)
        print(f"\n{title}: threshold {thr:.2f}; selection-part folders' median distance, 95th percentile by "
              f"folder size {folders}")
        print(f"{'patches':<78} {'n':>5} {'median':>7} {'p10':>6} {'p90':>6}  flagged")
        for name, feats in sources:
            d = dom.token_distances(feats)
            med = float(np.median(d))
            print(f"{name[:78]:<78} {len(d):>5} {med:>7.2f} {np.percentile(d, 10):>6.2f} "
                  f"{np.percentile(d, 90):>6.2f}  {'yes' if med > thr else 'no' if math.isfinite(med) else '-'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
