"""The domain check of a model: fit its feature domain, set the distance threshold, and judge every real slide.

    python bench/domain.py [--model default] [--train-patches 2000] [--mosaics 40] [--grid 8 16]
        [--statistic median] [--out bench/results/domain.json] [--domain-out wsi_vssm/weights/default_domain.json]

1. Training token features: `--train-patches` PCam training patches (a seeded stratified subset of
   ../shared/data/pcam/train.tar), tiled 8 x 8 into mosaics read whole, every token kept (`--tokens context`,
   the default: tokens see neighbours as on a slide), or each patch alone (96 px -> 3 x 3 tokens: `all` 9 or
   the `centre` one). Their mean and Ledoit-Wolf-shrunk covariance make the FeatureDomain.
2. The threshold: `--mosaics` mosaic slides (half tumour, sides drawn from `--grid`) tiled from the SELECTION
   part of valid only (`training.cells.split_valid` with valid_select=1000, seed 0, as the model card); each
   slide's tissue tokens are extracted as `predict` extracts them and pooled into one distance (`--statistic`).
   The threshold is the smallest value that flags at most 5% of them (distance > threshold). The held-back part
   of valid is never read.
3. Every real test slide in ../shared/data/slides and sample_data gets the stain check, its distance and the
   verdict. Slides without an mpp get one (stated in the table).

Prints the figures and writes them with `atomic_write_json` to --out; the FeatureDomain (plain data) goes to
--domain-out, for the model file's metadata["feature_domain"]. docs/domain.md has the results.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from wsi_vssm.atomic import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
FLAG_AT_MOST = 0.05  # share of selection-part mosaics the threshold may flag
# (file, mpp given when the file states none, what it is); paths under DATA/slides unless absolute
REAL_SLIDES = [
    ("fluorescence-dapi.ndpi", None, "fluorescence (DAPI), NDPI"),
    ("fluorescence-tritc.ndpi", None, "fluorescence (TRITC), NDPI"),
    ("kidney-48-5.tif", 0.5, "IHC kidney, TIFF without mpp"),
    (str(REPO / "sample_data" / "cmu-1-small-region.svs"), None, "CMU-1 H&E skin, 0.499 um/px"),
    ("cmu-1-small-region_generic-pyramidal.tif", None, "CMU-1 re-encoded as a generic pyramidal TIFF"),
    ("tcga-cr-7395-01a-01-ts1.svs", 0.25, "TCGA head and neck frozen section, no mpp (20x/40x)"),
    (str(REPO / "sample_data" / "lymph-node-mosaic.tif"), None, "PCam training-patch mosaic (sample slide)"),
    ("boxes.tiff", 0.5, "openslide-python fixture, no mpp"),
    ("small.svs", None, "openslide-python fixture"),
    ("boxes_0.dcm", None, "openslide-python fixture (DICOM)"),
    ("boxes_1.dcm", None, "openslide-python fixture (DICOM)"),
    ("small_HE_levels.tiff", 0.5, "pathml fixture, no mpp"),
    ("broken.svs", None, "openslide-python fixture: does not open"),
    ("unopenable.tiff", None, "fixture: does not open"),
    ("unreadable.svs", None, "openslide-python fixture: pixels unreadable"),
]


def train_features(model, source: Path, n: int, seed: int, tokens: str, grid: int = 8) -> np.ndarray:
    """(N, F) token features of `n` training patches. `tokens`: "context" (default) tiles them, in a seeded
    order, into `grid` x `grid` mosaics read whole, and keeps every token (as a slide is read: each token sees its
    neighbours; left-over patches are dropped); "all" or "centre": each patch alone (96 px -> 3 x 3 tokens), all
    9 tokens or the centre one."""
    import torch

    from wsi_vssm.models.inputs import normalise_batch
    from wsi_vssm.synth.mosaic import tile
    from wsi_vssm.training.data.patches import load_patches

    ds = load_patches(source, max_items=n, seed=seed)
    if tokens == "context":
        order = np.random.default_rng(seed).permutation(len(ds))
        k = grid * grid
        batches = [tile([ds[int(i)][0] for i in order[s : s + k]], grid)[None]
                   for s in range(0, len(ds) // k * k, k)]
    else:
        batches = [np.stack([ds[i][0] for i in range(s, min(s + 128, len(ds)))]) for s in range(0, len(ds), 128)]
    out = []
    with torch.no_grad():
        for b in batches:
            x = torch.from_numpy(b).permute(0, 3, 1, 2).float() / 255
            f = model.cell_features(normalise_batch(x))  # (B, F, h, w)
            if tokens == "centre":
                f = f[:, :, f.shape[2] // 2 : f.shape[2] // 2 + 1, f.shape[3] // 2 : f.shape[3] // 2 + 1]
            out.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).double().numpy())
    return np.concatenate(out)


def slide_features(model, path, mpp: float | None):
    """(features (n, F), thumbnail, mask, stated mpp) of one slide, extracted as `predict` does."""
    from wsi_vssm.io import open_slide
    from wsi_vssm.io.tissue import slide_tissue
    from wsi_vssm.pipeline.extract import extract_slide

    with open_slide(path) as probe:
        stated = probe.mpp
    with open_slide(path, mpp=None if stated else mpp) as slide:
        tissue = slide_tissue(slide)
        cells = extract_slide(slide, model.backbone, mpp=model.mpp, token_px=model.token_px, device="cpu",
                              tissue=(tissue.mask, tissue.scale))
    return np.asarray(cells.features, np.float64), tissue.thumbnail, tissue.mask, stated


def judge(domain, feats, thumb, mask) -> dict:
    from wsi_vssm.pipeline.domain import slide_domain, stain_stats

    d = domain.token_distances(feats) if len(feats) else np.zeros(0)
    rec = slide_domain(thumb, mask, feats, domain)
    rec.update({"tokens": len(feats), "median": float(np.median(d)) if len(d) else None,
                "p90": float(np.percentile(d, 90)) if len(d) else None, "tissue_fraction": float(mask.mean()),
                "stain": {k: (None if isinstance(v, float) and math.isnan(v) else v)
                          for k, v in stain_stats(thumb, mask).items()}})
    return rec


def select_mosaics(model, n_slides: int, grid, seed: int, workdir: Path) -> list[dict]:
    """Features and distances inputs of mosaic slides tiled from the SELECTION part of valid (never held-back)."""
    from wsi_vssm.synth.mosaic import make_mosaic_cohort
    from wsi_vssm.training.cells import TrainCellsConfig, split_valid
    from wsi_vssm.training.data.patches import load_patches

    valid = load_patches(DATA / "pcam" / "valid.tar")
    select, _held_back = split_valid(valid, TrainCellsConfig(valid_select=1000))  # held-back: never used
    del _held_back
    slides = make_mosaic_cohort(workdir / "select_mosaics", select, n_slides, seed=seed, grid=tuple(grid),
                                mpp=model.mpp, prefix="select_")
    out = []
    for s in slides:
        feats, thumb, mask, _ = slide_features(model, s.path, None)
        out.append({"name": s.name, "label": s.label, "feats": feats, "thumb": thumb, "mask": mask})
    return out


def set_threshold(distances: np.ndarray, share: float = FLAG_AT_MOST) -> float:
    """The smallest threshold that flags (distance > threshold) at most `share` of `distances`."""
    d = np.sort(distances)
    return float(d[len(d) - 1 - int(math.floor(share * len(d)))])


def threshold_on_selection(model, domain, args) -> tuple[list[dict], list[str], float]:
    """Set `domain.threshold` on selection-part mosaics; (their verdict rows, the flagged names, seconds)."""
    t = time.perf_counter()
    mosaics = select_mosaics(model, args.mosaics, args.grid, args.seed, args.workdir)
    dists = np.array([domain.slide_distance(m["feats"]) for m in mosaics])
    domain.threshold = set_threshold(dists)
    domain.info.update({"threshold_rule": f"smallest threshold flagging at most {FLAG_AT_MOST:.0%} of "
                        f"{len(mosaics)} mosaic slides (grid {args.grid[0]}-{args.grid[1]}, seed {args.seed}) of "
                        "the selection part of PCam valid (valid_select=1000, seed 0)",
                        "date": datetime.now(UTC).isoformat(timespec="seconds")})
    rows = []
    for m in mosaics:
        rec = judge(domain, m["feats"], m["thumb"], m["mask"])
        rec.update({"slide": m["name"], "label": m["label"]})
        rows.append(rec)
    flagged = [r["slide"] for r in rows if not r["in_domain"]]
    seconds = time.perf_counter() - t
    print(f"selection mosaics: {len(dists)}; {domain.statistic} distance min {dists.min():.1f}, median "
          f"{np.median(dists):.1f}, max {dists.max():.1f}; threshold {domain.threshold:.2f}; flagged "
          f"{len(flagged)} ({len(flagged) / len(dists):.1%}): {flagged} ({seconds:.0f} s)")
    return rows, flagged, seconds


def real_slides(model, domain) -> list[dict]:
    rows = []
    for f, mpp, what in REAL_SLIDES:
        path = Path(f) if Path(f).is_absolute() else DATA / "slides" / f
        t = time.perf_counter()
        try:
            feats, thumb, mask, stated = slide_features(model, path, mpp)
        except Exception as e:  # noqa: BLE001 - a bench reports every slide, failures included
            rows.append({"slide": path.name, "what": what, "error": f"{type(e).__name__}: {e}"})
            continue
        rec = judge(domain, feats, thumb, mask)
        rec.update({"slide": path.name, "what": what, "mpp": stated if stated else mpp,
                    "mpp_given": None if stated else mpp, "seconds": round(time.perf_counter() - t, 1)})
        rows.append(rec)
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'slide':42s} {'in_domain':9s} {'tokens':>6s} {'median':>7s} {'p90':>7s}  notes")
    for r in rows:
        if "error" in r:
            print(f"{r['slide']:42s} {'-':9s} {'':>6s} {'':>7s} {'':>7s}  cannot read: {r['error'][:70]}")
            continue
        med = "-" if r["median"] is None else f"{r['median']:.1f}"
        p90 = "-" if r["p90"] is None else f"{r['p90']:.1f}"
        print(f"{r['slide']:42s} {r['in_domain']!s:9s} {r['tokens']:6d} {med:>7s} {p90:>7s}  "
              + " | ".join(r["domain_notes"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--train-patches", type=int, default=2000)
    ap.add_argument("--tokens", choices=["context", "all", "centre"], default="context")
    ap.add_argument("--mosaics", type=int, default=40)
    ap.add_argument("--grid", type=int, nargs=2, default=[8, 16])
    ap.add_argument("--statistic", default="median", help="median or pNN: how a slide's token distances pool")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "wsi-vssm-bench-domain")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "domain.json")
    ap.add_argument("--domain-out", type=Path, default=None,
                    help="write the FeatureDomain JSON here (default: only with --model default, to "
                         "wsi_vssm/weights/default_domain.json)")
    args = ap.parse_args(argv)

    import torch

    from wsi_vssm.models.slide_model import load_model, model_identity
    from wsi_vssm.pipeline.domain import FeatureDomain

    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "2")))
    t0 = time.perf_counter()
    model = load_model(args.model)
    ident = model_identity(model)
    feats = train_features(model, DATA / "pcam" / "train.tar", args.train_patches, args.seed, args.tokens)
    t_train = time.perf_counter() - t0
    domain = FeatureDomain.fit(feats, statistic=args.statistic, source="pcam/train.tar",
                               n_patches=args.train_patches, tokens=args.tokens, seed=args.seed,
                               model_weights_hash=ident["weights_hash"])
    train_d = domain.token_distances(feats)
    print(f"training tokens: {len(feats)} from {args.train_patches} patches ({args.tokens} tokens), F = "
          f"{feats.shape[1]}, Ledoit-Wolf shrinkage {domain.info['shrinkage']:.4f}; their own distances: median "
          f"{np.median(train_d):.1f}, p90 {np.percentile(train_d, 90):.1f} ({t_train:.0f} s)")

    mos_rows, flagged, t_mos = threshold_on_selection(model, domain, args)

    t = time.perf_counter()
    rows = real_slides(model, domain)
    print_table("real slides", rows)
    t_real = time.perf_counter() - t
    wall = time.perf_counter() - t0
    print(f"\ntimes: training features {t_train:.0f} s, mosaics {t_mos:.0f} s, real slides {t_real:.0f} s; "
          f"total {wall:.0f} s")

    domain_out = args.domain_out or (REPO / "wsi_vssm" / "weights" / "default_domain.json"
                                     if args.model == "default" else None)
    if domain_out is not None:
        domain.save_json(domain_out)
        print(f"feature domain -> {domain_out}")
    result = {"command": " ".join(sys.argv), "model": ident, "args": {k: str(v) for k, v in vars(args).items()},
              "train": {"tokens": len(feats), "shrinkage": domain.info["shrinkage"],
                        "own_median": float(np.median(train_d)), "own_p90": float(np.percentile(train_d, 90))},
              "threshold": domain.threshold, "statistic": domain.statistic,
              "select_mosaics": {"n": len(mos_rows), "flagged": flagged, "slides": mos_rows},
              "real_slides": rows, "seconds": {"train": t_train, "mosaics": t_mos, "real": t_real, "total": wall}}
    atomic_write_json(args.out, result)
    print(f"figures -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
