"""Which pyramid level a read at the model's resolution takes: the finer level only (the rule before 2026-12-05)
against a level up to 5% coarser (`wsi_vssm.io.base.LEVEL_TOLERANCE`), on a 40x-style slide.

    python bench/level_choice.py [--size 20000] [--mpp 0.25] [--repeats 2] [--workdir DIR]

A synthetic slide at --mpp (levels x4, so 1.0 um/px is a level: 3% coarser than the model's 0.97) is predicted
with the default model, each rule in its own process, the rules alternating. Prints each run's predict seconds
and peak RSS, the medians, and how far the two heatmaps lie apart on tissue cells.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = """
import json, resource, sys, time
import wsi_vssm.io.base as base
base.LEVEL_TOLERANCE = float(sys.argv[1])
from wsi_vssm.models.slide_model import load_model
from wsi_vssm.pipeline.predict import PredictParams, predict_slide
model = load_model("default")
t = time.perf_counter()
predict_slide(sys.argv[2], model, sys.argv[3], PredictParams())
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20000, help="slide side in px (default 20000)")
    ap.add_argument("--mpp", type=float, default=0.25, help="level-0 um/px (default 0.25, 40x)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "wsi-vssm-level-choice")
    args = ap.parse_args()

    cohort = args.workdir / f"synth-{args.size}-{args.mpp:g}"
    if not (cohort / "normal_001.tif").exists():
        subprocess.run([sys.executable, "-m", "wsi_vssm", "synth", str(cohort), "--slides", "1", "--seed", "3",
                        "--size", str(args.size), "--mpp", str(args.mpp)], check=True, stdout=subprocess.DEVNULL)
    slide = cohort / "normal_001.tif"
    runs: dict[str, list[dict]] = {"finer level only": [], "up to 5% coarser": []}
    for r in range(args.repeats):
        for name, tolerance in (("finer level only", 0.0), ("up to 5% coarser", 0.05)):
            out = args.workdir / f"out-{tolerance:g}"
            done = subprocess.run([sys.executable, "-c", RUN, str(tolerance), str(slide), str(out)], check=True,
                                  capture_output=True, text=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"run {r + 1}, {name:17s}: {runs[name][-1]['seconds']:6.1f} s, peak RSS "
                  f"{runs[name][-1]['peak_rss_mb']:6.0f} MB", flush=True)
    for name, rows in runs.items():
        print(f"median, {name:17s}: {statistics.median(r['seconds'] for r in rows):6.1f} s, peak RSS "
              f"{statistics.median(r['peak_rss_mb'] for r in rows):6.0f} MB")
    heatmap_difference(args.workdir, slide.stem)


def heatmap_difference(workdir: Path, name: str) -> None:
    import numpy as np

    from wsi_vssm.outputs.heatmap import read_heatmap_zarr

    a, b = (read_heatmap_zarr(workdir / f"out-{t}" / name / "heatmap.ome.zarr")[0] for t in ("0", "0.05"))
    probs = [json.loads((workdir / f"out-{t}" / name / "prediction.json").read_text())["probability"]
             for t in ("0", "0.05")]
    tissue = (a > 0) | (b > 0)
    d = np.abs(a - b)[tissue]
    print(f"heatmaps: {int(tissue.sum())} tissue cells, mean |difference| {d.mean():.5f}, max {d.max():.4f}; "
          f"slide probability {probs[0]:.4f} against {probs[1]:.4f}")


if __name__ == "__main__":
    main()
