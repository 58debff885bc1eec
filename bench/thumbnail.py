"""Thumbnail and tissue mask of a huge single-level TIFF (no pyramid): time and peak memory.

    python bench/thumbnail.py [--side 200000] [--shared-tile] [--out bench/results/thumbnail.json]

Writes a SIDE x SIDE zlib-tiled RGB TIFF from one pre-compressed 256 px tile repeated, then times
`io.tissue.slide_tissue` (the thumbnail every command uses, summed tile by tile as tifffile decodes them) in a
fresh process and reports its peak resident memory (ru_maxrss). Before streaming, `info` and `predict` failed
on such a slide with a MemoryError: the level would be 120 GB in memory.

The tile is textured like tissue and compresses poorly (~140 kB), as real tiles do, so the file is large (5.4 GB
at 50,000 px, ~86 GB at 200,000). --shared-tile stores it once and points every tile offset at it: the same
decoding work in a file of a few MB at any side (the disk reads of a real file are not measured then).
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


def flat_tile():
    import numpy as np

    rng = np.random.default_rng(0)
    tile = np.full((256, 256, 3), 235, np.uint8)  # a stripe of glass, then textured pink "tissue"
    tile[:, 64:] = (np.array([190, 80, 150]) + rng.integers(-40, 40, (256, 192, 3))).clip(0, 255)
    return tile


def write_flat_tiff(path: Path, side: int) -> None:
    from wsi_vssm.synth.writer import write_repeated_tile_tiff

    write_repeated_tile_tiff(path, side, flat_tile())


def write_shared_tile_tiff(path: Path, side: int) -> None:
    """The TIFF of `write_flat_tiff` as a BigTIFF whose every TileOffsets entry points at one stored tile."""
    import struct

    import imagecodecs
    import numpy as np

    data = imagecodecs.zlib_encode(flat_tile().tobytes())  # as write_repeated_tile_tiff compresses it
    n = (-(-side // 256)) ** 2
    offsets_at = 16 + len(data)
    counts_at = offsets_at + 8 * n
    ifd_at = counts_at + 8 * n
    short, long8 = 3, 16  # TIFF field types
    entries = [(256, long8, 1, side), (257, long8, 1, side), (258, short, 3, (8, 8, 8)), (259, short, 1, 8),
               (262, short, 1, 2), (277, short, 1, 3), (284, short, 1, 1), (322, short, 1, 256),
               (323, short, 1, 256), (324, long8, n, offsets_at), (325, long8, n, counts_at)]
    ifd = struct.pack("<Q", len(entries))
    for tag, kind, count, value in entries:
        inline = struct.pack("<3H", *value) if isinstance(value, tuple) else struct.pack(
            "<H" if kind == short and count == 1 else "<Q", value)
        ifd += struct.pack("<HHQ", tag, kind, count) + inline.ljust(8, b"\0")
    with open(path, "wb") as f:
        f.write(b"II+\0" + struct.pack("<HHQ", 8, 0, ifd_at) + data)
        f.write(np.full(n, 16, "<u8").tobytes() + np.full(n, len(data), "<u8").tobytes())
        f.write(ifd + struct.pack("<Q", 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=200_000)
    ap.add_argument("--shared-tile", action="store_true",
                    help="store the tile once (a file of a few MB at any side; same decoding work)")
    ap.add_argument("--out", default="bench/results/thumbnail.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "flat.tif"
        t = time.perf_counter()
        (write_shared_tile_tiff if a.shared_tile else write_flat_tiff)(path, a.side)
        t_write = time.perf_counter() - t
        size_mb = path.stat().st_size / 1e6
        proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
    seconds, rss, fraction, tw, th = proc.stdout.split()
    res = {"side": a.side, "shared_tile": a.shared_tile, "file_mb": round(size_mb, 1), "write_s": round(t_write, 1),
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
