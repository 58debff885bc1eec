"""How long a Cancel waits: `predict_slide` on the demo slide with the shipped model, cancelled while a region
runs, timed from the moment the event is set to the moment `Cancelled` is raised.

    python bench/cancel.py [--slide sample_data/lymph-node-mosaic.tif] [--tries 3] [--delay 1.5] [--region-px N]

Each try starts a prediction in a thread (as napari's widget does), sets the cancel event `--delay` seconds after
the first region has started, and times the wait. Two ways side by side, alternating: the shipped one (a check
before each VSS block) and the check between regions only (the code before 2026-12-07, the block check left
out). Prints each wait and the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_cancel(slide: Path, model, params, delay: float, blocks: bool) -> float:
    from wsi_vssm.pipeline import predict as predict_module

    started, stop, done = threading.Event(), threading.Event(), {}

    def progress(_done, _total, stage):
        if stage == "regions":
            started.set()

    def run():
        try:
            predict_module.predict_slide(slide, model, out, params, progress=progress, cancel=stop)
        except predict_module.Cancelled:
            done["t"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        kept = predict_module._cancel_between_blocks
        if not blocks:  # the old behaviour: between regions only
            predict_module._cancel_between_blocks = lambda *_: contextlib.nullcontext()
        try:
            worker = threading.Thread(target=run)
            worker.start()
            started.wait()
            time.sleep(delay)
            t_set = time.perf_counter()
            stop.set()
            worker.join()
        finally:
            predict_module._cancel_between_blocks = kept
    if "t" not in done:
        raise SystemExit("the prediction finished before the cancel: give a larger slide or a shorter --delay")
    return done["t"] - t_set


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", type=Path, default=REPO / "sample_data" / "lymph-node-mosaic.tif")
    ap.add_argument("--tries", type=int, default=3)
    ap.add_argument("--delay", type=float, default=1.5, help="seconds into the first region")
    ap.add_argument("--region-px", type=int, default=None, help="region side (default: predict's on the CPU)")
    a = ap.parse_args()

    import torch

    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.pipeline.predict import PredictParams

    model = load_model("default")
    params = PredictParams(device="cpu", reader_threads=1, region_px=a.region_px)
    waits: dict[str, list[float]] = {"blocks": [], "regions": []}
    for i in range(a.tries):
        for way in ("blocks", "regions") if i % 2 == 0 else ("regions", "blocks"):
            waits[way].append(one_cancel(a.slide, model, params, a.delay, way == "blocks"))
            print(f"try {i + 1} {way:>7}: cancel waited {waits[way][-1]:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in waits.items()}
    regions = a.region_px or "default"
    print(f"{torch.get_num_threads()} torch threads, {regions} px regions; median wait: before each block "
          f"{med['blocks']:.2f} s, between regions only {med['regions']:.2f} s")


if __name__ == "__main__":
    main()
