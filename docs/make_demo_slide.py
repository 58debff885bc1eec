"""Make sample_data/lymph-node-mosaic.tif and its lesion annotation from PCam *training* patches.

    python docs/make_demo_slide.py ../shared/data/pcam/train.tar sample_data

A 24 x 24 mosaic (2,304 px at 0.972 um/px, about 2.2 mm a side) of real lymph-node patches with one compact
lesion of label-1 patches, written as a pyramidal JPEG TIFF that OpenSlide and tifffile both read, and the lesion
as a GeoJSON polygon in level-0 pixels (QuPath's convention). Training patches only: the held-back validation
patches that model figures are reported on never reach a file a user sees as a demo.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

GRID = 24
MPP = 0.972  # PCam's ~10x
LESION_CELLS = (8, 16)  # patches of 96 px: a lesion of roughly 0.3 to 0.4 mm across


def main(source: str, out: str) -> None:
    from shapely.geometry import box, mapping
    from shapely.ops import unary_union

    from wsi_vssm.synth.mosaic import plan_mosaic, render_mosaic, write_image_slide
    from wsi_vssm.training.data.patches import load_patches

    patches = load_patches(source)
    labels = np.asarray(patches.labels)
    for seed in range(1000):  # the first seed whose lesion has a demo-friendly size
        index, lesion = plan_mosaic(labels, GRID, True, np.random.default_rng(seed), max_lesion_frac=0.1)
        if LESION_CELLS[0] <= len(lesion) <= LESION_CELLS[1]:
            break
    tissue = index >= 0
    px = int(patches[0][0].shape[0])
    img = render_mosaic(index, lambda i: patches[i][0], px)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slide = out_dir / "lymph-node-mosaic.tif"
    write_image_slide(slide, img, MPP, f"wsi-vssm demo: mosaic of PCam training patches; mpp={MPP}", quality=90)
    shape = unary_union([box(c * px, r * px, (c + 1) * px, (r + 1) * px) for r, c in lesion])
    doc = {"type": "FeatureCollection", "features": [{
        "type": "Feature", "geometry": mapping(shape),
        "properties": {"objectType": "annotation", "name": "metastasis (label-1 PCam patches)",
                       "classification": {"name": "Tumor", "color": [200, 0, 0]}}}]}
    (out_dir / "lymph-node-mosaic.geojson").write_text(json.dumps(doc, indent=1))
    items = getattr(patches, "items", None)
    names = [[None if i < 0 else items[int(i)].name if items is not None else int(i) for i in row] for row in index]
    card = {"source": str(source), "seed": seed, "grid": GRID, "mpp": MPP,
            "lesion_cells": [[int(v) for v in c] for c in lesion], "patches": names}
    (out_dir / "lymph-node-mosaic.json").write_text(json.dumps(card))
    print(f"wrote {slide} ({slide.stat().st_size / 1e6:.1f} MB), lesion of {len(lesion)} patches, "
          f"{int(tissue.sum())} tissue cells")


if __name__ == "__main__":
    main(*sys.argv[1:3])
