"""Region reading throughput: RegionStream versus the backend's own reads, OpenSlide and tifffile.

    python bench/read.py [--size 40000] [--region-px 2048] [--max-regions 40] [--repeats 5] [--out read.json]

A synthetic slide (`wsi-vssm synth OUT --slides 1 --seed 0 --size N`; a plain tiled pyramidal JPEG
TIFF written here when that command is missing) is cached under --workdir. The regions are a RegionGrid at
the slide's own resolution, so every read is a level-0 `read_region` with no resampling. "raw" is a plain
loop over the same regions calling the backend's `read_region` on the same number of threads, one reader
per thread (as RegionStream opens one per worker from a path). Figures are medians over --repeats, in
megapixels per second. Target (DESIGN.md): RegionStream >= 80% of raw.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from wsi_vssm.atomic import atomic_write_json
from wsi_vssm.io.regions import Region, RegionGrid, RegionStream


def make_slide(size: int, workdir: Path) -> Path:
    """The cached synthetic slide of side `size`, made with `wsi-vssm synth` or, failing that, tifffile."""
    out = workdir / f"synth-{size}"
    found = sorted(out.glob("**/*.tif")) if out.exists() else []
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "wsi_vssm", "synth", str(out), "--slides", "1", "--seed", "0"]
    cmd += ["--size", str(size)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(out.glob("**/*.tif"))
    if done.returncode == 0 and found:
        print(f"made {found[0]} with `wsi-vssm synth` in {time.perf_counter() - t0:.0f} s", flush=True)
        return found[0]
    print(f"`wsi-vssm synth` unavailable ({done.stderr.strip()[-200:]}); writing a plain TIFF", flush=True)
    return _write_tiff(size, workdir / f"plain-{size}.tif")


def _write_tiff(size: int, path: Path, tile: int = 256, mpp: float = 0.5) -> Path:
    """A tiled pyramidal JPEG TIFF of noisy pink 'tissue' on white, mpp in the resolution tags."""
    import tifffile

    rng = np.random.default_rng(0)
    base = np.clip(rng.normal((205, 130, 180), 25, (tile * 4, tile * 4, 3)), 0, 255).astype(np.uint8)

    def tiles(side: int):
        for y in range(0, side, tile):
            for x in range(0, side, tile):
                ty, tx = (y // tile) % 4 * tile, (x // tile) % 4 * tile
                t = base[ty : ty + tile, tx : tx + tile]
                yield t if (x + y) // tile % 7 else np.full_like(t, 240)

    path.parent.mkdir(parents=True, exist_ok=True)
    sides = [size]
    while sides[-1] > 2048:
        sides.append(sides[-1] // 2)
    res = (1e4 / mpp, 1e4 / mpp)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for i, side in enumerate(sides):
            tif.write(
                tiles(side), shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile),
                compression="jpeg", photometric="rgb", subfiletype=0 if i == 0 else 1,
                resolution=res, resolutionunit="CENTIMETER",
            )  # fmt: skip
    return path


def _open(path: Path, backend: str):
    from wsi_vssm.io import open_slide

    return open_slide(path, backend=backend)


def run_raw(path: Path, backend: str, regions: list[Region], threads: int) -> float:
    """Seconds for `threads` threads, each with its own reader, to read_region every region at level 0."""
    errors: list[BaseException] = []

    def work(part: list[Region]) -> None:
        try:
            with _open(path, backend) as reader:
                for r in part:
                    reader.read_region((r.x, r.y), 0, (r.w, r.h))
        except BaseException as err:  # surfaced below; a bench must not report a half-done run
            errors.append(err)

    parts = [regions[i::threads] for i in range(threads)]
    workers = [threading.Thread(target=work, args=(p,)) for p in parts]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def run_stream(path: Path, backend: str, regions: list[Region], mpp: float, threads: int) -> float:
    t0 = time.perf_counter()
    with RegionStream(path, regions, mpp=mpp, workers=threads, backend=backend) as stream:
        for _region, img in stream:
            del img
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=40_000, help="synthetic slide side, level-0 px")
    ap.add_argument("--region-px", type=int, default=2048)
    ap.add_argument("--max-regions", type=int, default=40, help="tissue regions read per run (grid order)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--backends", nargs="+", default=["openslide", "tifffile"])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "wsi_vssm_bench")
    ap.add_argument("--slide", type=Path, help="use this slide instead of a synthetic one")
    ap.add_argument("--out", type=Path, default=Path("bench_read.json"))
    args = ap.parse_args(argv)

    path = args.slide or make_slide(args.size, args.workdir)
    with _open(path, "auto") as slide:
        mpp = slide.require_mpp()
        grid = RegionGrid(slide, mpp=mpp, region_px=args.region_px)
        dims = slide.dimensions
    regions = list(grid)[: args.max_regions]
    if not regions:
        print("no tissue regions to read", file=sys.stderr)
        return 1
    mp = sum(r.w * r.h for r in regions) / 1e6
    print(f"{path} {dims[0]}x{dims[1]} mpp {mpp}: {len(regions)} regions of {args.region_px} px, {mp:.0f} MP")

    rows = []
    for backend in args.backends:
        run_raw(path, backend, regions, 1)  # warm the page cache (both paths then read from memory)
        run_stream(path, backend, regions[:2], mpp, 1)
        for threads in args.threads:
            raw, stream = [], []
            for _ in range(args.repeats):  # interleaved, so drift hits both alike
                raw.append(run_raw(path, backend, regions, threads))
                stream.append(run_stream(path, backend, regions, mpp, threads))
            r_mps, s_mps = mp / statistics.median(raw), mp / statistics.median(stream)
            rows.append(
                {
                    "backend": backend, "threads": threads, "raw_mp_s": round(r_mps, 1),
                    "stream_mp_s": round(s_mps, 1), "ratio": round(s_mps / r_mps, 3),
                    "raw_s": [round(t, 3) for t in raw], "stream_s": [round(t, 3) for t in stream],
                }
            )  # fmt: skip
            print(f"  {backend:10s} threads={threads}: raw {r_mps:7.1f} MP/s  stream {s_mps:7.1f} MP/s  "
                  f"ratio {s_mps / r_mps:.2f}", flush=True)  # fmt: skip

    print(f"\n{'backend':10s} {'threads':>7s} {'raw MP/s':>9s} {'stream MP/s':>12s} {'stream/raw':>10s}")
    for r in rows:
        ok = "ok" if r["ratio"] >= 0.8 else "BELOW 80%"
        print(f"{r['backend']:10s} {r['threads']:7d} {r['raw_mp_s']:9.1f} {r['stream_mp_s']:12.1f} "
              f"{r['ratio']:10.2f}  {ok}")  # fmt: skip
    result = {
        "slide": str(path), "dimensions": dims, "mpp": mpp, "region_px": args.region_px,
        "regions": len(regions), "megapixels_per_run": round(mp, 1), "repeats": args.repeats,
        "target_ratio": 0.8, "cpus": os.cpu_count(), "python": platform.python_version(), "results": rows,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)  # a reader never sees half a file
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
