"""What the annotation repair and the FROC dilation cost, on real outlines and on hostile ones.

    python bench/annotation_repair.py [--annotations ../shared/data/annotations/camelyon16_asap]

Prints, for every real CAMELYON16 outline that crosses itself, the area and time of shapely's two `make_valid`
methods ("linework", the default before 2026-12-04, and "structure", used since: `io.annotations`); the same for
random self-crossing polygons of 200 and 400 vertices; and the time `outputs.froc.lesion_regions` takes to
dilate 90,000 small disjoint squares (it dilates part by part since 2026-12-04).
"""

from __future__ import annotations

import argparse
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, box

REPO = Path(__file__).resolve().parents[1]


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--annotations", type=Path, default=REPO.parent / "shared/data/annotations/camelyon16_asap")
    args = ap.parse_args()

    def both(poly: Polygon, what: str) -> None:
        line, tl = _timed(lambda: shapely.make_valid(poly))
        struct, ts = _timed(lambda: shapely.make_valid(poly, method="structure", keep_collapsed=False))
        gap = abs(struct.area - line.area) / max(line.area, 1e-12)
        print(f"{what}: {len(poly.exterior.coords) - 1} vertices; linework {line.area:,.0f} px2 in {tl:.3f} s, "
              f"structure {struct.area:,.0f} px2 in {ts:.3f} s; areas differ by {100 * gap:.4f}%")

    for f in sorted(args.annotations.glob("*.xml")):
        for a in ET.parse(f).getroot().iter("Annotation"):
            pts = [(float(c.get("X")), float(c.get("Y"))) for c in a.iter("Coordinate")]
            if len(pts) >= 3 and not Polygon(pts).is_valid:
                both(Polygon(pts), f"{f.name} {a.get('Name')}")
    rng = np.random.default_rng(0)
    for n in (200, 400):
        both(Polygon(rng.uniform(0, 10_000, (n, 2))), "random self-crossing polygon, seed 0")

    from wsi_vssm.outputs.froc import lesion_regions

    squares = MultiPolygon([box(x * 10, y * 10, x * 10 + 1, y * 10 + 1) for x in range(300) for y in range(300)])
    (lesions, _), t = _timed(lambda: lesion_regions(squares, 0.243))
    print(f"FROC dilation of 90,000 disjoint 1 px squares: {len(lesions)} lesion(s) in {t:.1f} s")


if __name__ == "__main__":
    main()
