"""Thumbnail and tissue mask of a huge single-level TIFF (no pyramid): time and peak memory.

    python bench/thumbnail.py [--side 200000] [--out bench/results/thumbnail.json]

Writes a SIDE x SIDE zlib-tiled RGB TIFF from one pre-compressed 256 px tile repeated (seconds, ~100 MB at
200,000 px), then times `io.tissue.slide_tissue` (the thumbnail every command uses, streamed in blocks) in a
fresh process and reports its peak resident memory (ru_maxrss). Before streaming, `info` and `predict` failed
on such a slide with a MemoryError: the level would be 120 GB in memory.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import resource, sys, time
from wsi_vssm.io import open_slide
from wsi_vssm.io.tissue import slide_tissue
t = time.perf_counter()
with open_slide(sys.argv[1], backend="tifffile", mpp=0.5) as slide:
    tissue = slide_tissue(slide)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, tissue.fraction,
      tissue.thumbnail.shape[1], tissue.thumbnail.shape[0])
"""


def write_flat_tiff(path: Path, side: int) -> None:
    import numpy as np

    from wsi_vssm.synth.writer import write_repeated_tile_tiff

    rng = np.random.default_rng(0)
    tile = np.full((256, 256, 3), 235, np.uint8)  # a stripe of glass, then textured pink "tissue"
    tile[:, 64:] = (np.array([190, 80, 150]) + rng.integers(-40, 40, (256, 192, 3))).clip(0, 255)
    write_repeated_tile_tiff(path, side, tile)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=200_000)
    ap.add_argument("--out", default="bench/results/thumbnail.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "flat.tif"
        t = time.perf_counter()
        write_flat_tiff(path, a.side)
        t_write = time.perf_counter() - t
        size_mb = path.stat().st_size / 1e6
        proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
    seconds, rss, fraction, tw, th = proc.stdout.split()
    res = {"side": a.side, "file_mb": round(size_mb, 1), "write_s": round(t_write, 1),
           "tissue_s": round(float(seconds), 1), "peak_rss_mb": round(int(rss) / 2**20), "tissue_fraction":
           round(float(fraction), 4), "thumbnail": [int(tw), int(th)],
           "bench_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    print(f"{a.side} x {a.side} single-level TIFF ({size_mb:.0f} MB, written in {t_write:.1f} s): thumbnail + "
          f"tissue mask in {res['tissue_s']} s, peak RSS {res['peak_rss_mb']} MB, tissue {res['tissue_fraction']}")
    from wsi_vssm.atomic import atomic_write_json

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out, res)


if __name__ == "__main__":
    main()
