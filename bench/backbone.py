"""Backbone benchmark: SS2D and whole-backbone peak memory against input side, and CPU time per megapixel.

    python bench/backbone.py [--sides 512 1024 2048 4096] [--out bench/results/backbone.json]

Memory is each call's peak resident memory beyond what existed before it (VmHWM in a fresh subprocess, see
wsi_vssm/models/memory.py), for SS2D on a stage-1 map of the micro model (side / 4, C = 32, D = 64) through
the plain and the streaming path, and for the whole micro backbone under no_grad. A straight line is fitted to
peak memory against area: a linear-memory path has a constant slope in bytes per input pixel and a small
intercept. Times are medians of repeats. GPU figures (tiny on a 10,000 px input) need a CUDA device: without one
they are reported as pending.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from wsi_vssm.atomic import atomic_write_json


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def backbone_worker(model: str, side: int, scan: str) -> None:
    """Runs in a subprocess: the peak RSS of one forward_features call beyond the state before it."""
    import torch

    from wsi_vssm.models import create_model

    torch.manual_seed(0)
    m = create_model(model, num_classes=0, scan=scan).eval()
    x = torch.rand(1, 3, side, side)
    with torch.no_grad():
        m.forward_features(x[:, :, :64, :64])  # warm-up: thread pools, numba
        base = _vm("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        out = m.forward_features(x)
        peak = _vm("VmHWM")
    print(json.dumps({"peak_extra_bytes": peak - base, "out_shape": list(out.shape)}))


def backbone_peak(model: str, side: int, scan: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import backbone; " \
           f"backbone.backbone_worker({model!r}, {side}, {scan!r})"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def fit(areas, values) -> dict:
    slope, intercept = np.polyfit(np.asarray(areas, float), np.asarray(values, float), 1)
    return {"bytes_per_pixel": float(slope), "intercept_bytes": float(intercept)}


def time_per_mp(model: str, side: int, scan: str, repeats: int) -> float:
    import torch

    from wsi_vssm.models import create_model

    torch.manual_seed(0)
    m = create_model(model, num_classes=0, scan=scan).eval()
    x = torch.rand(1, 3, side, side)
    times = []
    with torch.no_grad():
        m.forward_features(x)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            m.forward_features(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) / (side * side / 1e6)


def gpu_one_pass(model: str, side: int) -> dict:
    """One forward_features pass of `model` on a side x side input on CUDA: time and peak GPU memory."""
    import torch

    from wsi_vssm.models import create_model

    m = create_model(model, num_classes=0).eval().cuda()
    x = torch.rand(1, 3, side, side, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        m.forward_features(x[:, :, :512, :512])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        m.forward_features(x)
        torch.cuda.synchronize()
    return {"side": side, "seconds": time.perf_counter() - t0,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--scan", default="cpu", help="scan implementation for the timings and backbone memory")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--time-side", type=int, default=1024, help="input side for the time-per-MP figures")
    ap.add_argument("--out", default="bench/results/backbone.json")
    args = ap.parse_args(argv)

    import torch

    from wsi_vssm.models.memory import ss2d_peak_memory

    rows, result = [], {"threads": torch.get_num_threads(), "scan": args.scan}
    print(f"SS2D (micro stage 1: C=32, D=64 on a side/4 map) and micro backbone peak extra RSS, "
          f"{torch.get_num_threads()} threads")
    print(f"{'side':>6} {'map':>6} {'SS2D plain MB':>14} {'x map':>6} {'SS2D stream MB':>15} {'x map':>6} "
          f"{'backbone MB':>12}")
    for side in args.sides:
        h = side // 4
        plain = ss2d_peak_memory(h, h, path="plain", d_model=32, scan=args.scan, method="rss")
        stream = ss2d_peak_memory(h, h, path="streaming", d_model=32, scan=args.scan, method="rss")
        bb = backbone_peak("micro", side, args.scan)
        row = {"side": side, "map_side": h, "inner_map_bytes": plain.inner_map_bytes,
               "ss2d_plain_bytes": plain.peak_extra_bytes, "ss2d_plain_maps": plain.inner_maps,
               "ss2d_stream_bytes": stream.peak_extra_bytes, "ss2d_stream_maps": stream.inner_maps,
               "backbone_bytes": bb.get("peak_extra_bytes"), "backbone_error": bb.get("error")}
        rows.append(row)
        print(f"{side:>6} {h:>6} {plain.peak_extra_bytes / 2**20:>14.1f} {plain.inner_maps:>6.2f} "
              f"{stream.peak_extra_bytes / 2**20:>15.1f} {stream.inner_maps:>6.2f} "
              f"{(bb.get('peak_extra_bytes') or float('nan')) / 2**20:>12.1f}")
    areas = [r["side"] ** 2 for r in rows]
    result["memory"] = rows
    result["fit"] = {
        key: fit(areas, [r[key] for r in rows])
        for key in ("ss2d_plain_bytes", "ss2d_stream_bytes", "backbone_bytes")
        if all(r[key] is not None for r in rows)
    }
    for key, f in result["fit"].items():
        print(f"fit {key}: {f['bytes_per_pixel']:.1f} bytes per input pixel, intercept "
              f"{f['intercept_bytes'] / 2**20:.1f} MB")

    result["time"] = {}
    for model in ("micro", "tiny"):
        s = time_per_mp(model, args.time_side, args.scan, args.repeats)
        result["time"][model] = {"side": args.time_side, "seconds_per_mp": s}
        print(f"{model}: {s:.2f} s per megapixel on CPU ({args.time_side} px input, median of {args.repeats})")
    if torch.cuda.is_available():
        result["gpu"] = gpu_one_pass("tiny", 10_000)
        print(f"GPU tiny 10,000 px one pass: {result['gpu']}")
    else:
        result["gpu"] = "pending: no CUDA device here (tiny on a 10,000 px input in one pass)"
        print("GPU figures: pending (no CUDA device on this machine)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
