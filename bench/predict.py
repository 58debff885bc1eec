"""End-to-end `predict` benchmark on a large synthetic slide, at default settings on CPU.

    python bench/predict.py [--size 50000] [--slide PATH] [--model default] [--backend auto]
                            [--out bench/results/predict.json]

Writes (or reuses) a synthetic tumour slide of --size x --size px at 0.5 um/px with `wsi-vssm synth`'s writer,
then runs `predict_slide` once with the default parameters and reports regions/s, MP/s (level-0 megapixels of
the slide, and analysis-resolution megapixels actually processed), peak RSS, and the split of the wall time into
tissue detection, feature extraction (read + backbone, overlapped by RegionStream), MIL and writing. Reading and
backbone time are also measured separately on the same regions so their shares are visible. --backend is
predict's own option (auto, openslide, tifffile, zarr); the backend that read the slide is printed.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

from wsi_vssm.atomic import atomic_write_json


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=50_000)
    ap.add_argument("--slide", type=Path, default=None, help="use this slide instead of writing one")
    ap.add_argument("--model", default="default")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "wsi-vssm-bench")
    ap.add_argument("--out", type=Path, default=Path("bench/results/predict.json"))
    ap.add_argument("--backend", default="auto", help="slide backend, as predict's --backend")
    args = ap.parse_args(argv)

    import torch

    from wsi_vssm.io import open_slide
    from wsi_vssm.io.regions import RegionGrid
    from wsi_vssm.io.tissue import slide_tissue_mask
    from wsi_vssm.models.inputs import to_tensor
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.pipeline.geometry import DEFAULT_OVERLAP_PX, default_region_px
    from wsi_vssm.pipeline.predict import PredictParams, predict_slide
    from wsi_vssm.synth import write_slide

    args.workdir.mkdir(parents=True, exist_ok=True)
    slide_path = args.slide or args.workdir / f"bench_{args.size}.tif"
    if not slide_path.exists():
        t = time.perf_counter()
        print(f"writing {slide_path} ({args.size} px) ...", flush=True)
        write_slide(slide_path, size=args.size, mpp=0.5, seed=7, tumor=True)
        print(f"  written in {time.perf_counter() - t:.0f} s", flush=True)
    model = load_model(args.model)
    params = PredictParams(device="cpu", backend=args.backend)
    t = time.perf_counter()
    rec = predict_slide(slide_path, model, args.workdir / "out", params)
    wall = time.perf_counter() - t
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # Separate read and backbone costs on a sample of the same regions (no overlap between the two).
    with open_slide(slide_path, backend=args.backend) as slide:
        backend = slide.backend
        mask, scale = slide_tissue_mask(slide)
        grid = RegionGrid(slide, model.mpp, default_region_px("cpu"), DEFAULT_OVERLAP_PX, tissue=(mask, scale))
        regions = list(grid)
        sample = regions[:: max(1, len(regions) // 6)][:6]
        t_read = t_bb = 0.0
        with torch.inference_mode():
            for r in sample:
                t0 = time.perf_counter()
                img = slide.read(r.x, r.y, r.w, r.h, model.mpp)
                t1 = time.perf_counter()
                model.backbone.forward_features(to_tensor(img))
                t_read, t_bb = t_read + t1 - t0, t_bb + time.perf_counter() - t1
        w0, h0 = slide.dimensions
    n_regions = len(regions)
    analysis_mp = n_regions * default_region_px("cpu") ** 2 / 1e6
    result = {
        "slide": str(slide_path), "backend": backend, "size": [w0, h0], "threads": torch.get_num_threads(),
        "regions": n_regions, "cells": rec["summary"]["n_cells"], "probability": rec["probability"],
        "wall_seconds": wall, "regions_per_s": n_regions / wall, "slide_mp_per_s": w0 * h0 / 1e6 / wall,
        "analysis_mp_per_s": analysis_mp / wall, "peak_rss_bytes": peak_rss, "timings": rec["timings"],
        "per_region_sample": {"n": len(sample), "read_s": t_read / max(1, len(sample)),
                              "backbone_s": t_bb / max(1, len(sample))},
    }
    tm = rec["timings"]
    print(f"slide {w0}x{h0} px ({backend} backend), {n_regions} tissue regions of {default_region_px('cpu')} px "
          f"at {model.mpp} um/px, {result['cells']} cells, {torch.get_num_threads()} threads; slide probability "
          f"{rec['probability']:.6f}")
    print(f"wall {wall:.1f} s: tissue {tm['tissue']:.1f}, features (read+backbone) {tm['features']:.1f}, "
          f"MIL {tm['mil']:.2f}, write {tm['write']:.1f}")
    print(f"{result['regions_per_s']:.3f} regions/s, {result['slide_mp_per_s']:.1f} slide MP/s, "
          f"{result['analysis_mp_per_s']:.2f} analysis MP/s, peak RSS {peak_rss / 2**30:.2f} GiB")
    print(f"per region (sample of {len(sample)}): read {result['per_region_sample']['read_s']:.2f} s, "
          f"backbone {result['per_region_sample']['backbone_s']:.2f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
