"""Backbone benchmark: SS2D and whole-backbone peak memory against input side, and CPU time per megapixel.

    python bench/backbone.py [--sides 512 1024 2048 4096] [--out bench/results/backbone.json]
    python bench/backbone.py --speed [--out bench/results/backbone_speed.json] [--force-bf16]

--speed prints, in one process: the machine's fp32 GEMM rate (a 2048^3 matmul); for micro forward at 2048 px, tiny
forward at 1024 px and a micro training step (64 patches of 96 px, the trainers' AdamW, fused as they build it):
throughput, counted GFLOP/s, the GEMM rate timed beside that row (one matmul just before each timed call, median)
and the row's share of it, for today's path ("old": channel-first, scan 'cpu', SS2D 'reference') and the new
default ("new": channels-last, fused SS2D), in fp32 and bf16 (bf16 only where the CPU has AMX/AVX512-BF16, unless
--force-bf16; then also the bf16 GEMM rate, and each bf16 row's speed-up over fp32 on its path). FLOPs are counted
once per workload by torch's FlopCounterMode on the old path (convolutions and matmuls; the scan itself is not
counted), so moving work into a kernel does not change them.

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

# ---------------------------------------------------------------------------------------------------- --speed
SPEED_WORKLOADS = (  # name, model, batch, side, training
    ("micro forward 2048 px", "micro", 1, 2048, False),
    ("tiny forward 1024 px", "tiny", 1, 1024, False),
    ("micro train step 64 x 96 px", "micro", 64, 96, True),
)
SPEED_PATHS = {"old": dict(scan="cpu", ss2d_impl="reference"), "new": {}}


def gemm_rate(n: int = 2048, repeats: int = 5, dtype=None) -> float:
    """GFLOP/s of an n^3 matmul (median of repeats), fp32 unless `dtype`."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def _gemm_once(a, b) -> float:
    """GFLOP/s of one a @ b (square fp32 matrices)."""
    t0 = time.perf_counter()
    a @ b
    return 2 * a.shape[0] ** 3 / (time.perf_counter() - t0) / 1e9


def _speed_setup(model_name: str, batch: int, side: int, training: bool, path: dict):
    import torch

    from wsi_vssm.models import create_model
    from wsi_vssm.training.optim import adamw

    torch.manual_seed(0)
    model = create_model(model_name, num_classes=0, **path)
    x = torch.rand(batch, 3, side, side)
    if not training:
        return model.eval(), x, None
    head = torch.nn.Linear(model.num_features, 2)
    opt = adamw(torch.nn.ModuleList([model, head]), lr=1e-4, weight_decay=0.01)  # as `train cells` builds it
    return model.train(), x, (head, opt, torch.randint(0, 2, (batch,)))


def _speed_call(model, x, train, dtype):
    import torch

    from wsi_vssm.models.precision import autocast

    if train is None:
        with torch.no_grad(), autocast(dtype, "cpu"):
            return model.forward_features(x)
    head, opt, y = train
    opt.zero_grad(set_to_none=True)
    with autocast(dtype, "cpu"):
        logits = head(model(x).float())
    loss = torch.nn.functional.cross_entropy(logits.float(), y)
    loss.backward()
    opt.step()
    return logits


def counted_flops(model_name: str, batch: int, side: int, training: bool) -> int:
    """FLOPs that torch's FlopCounterMode counts for one call on today's path (convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, x, train = _speed_setup(model_name, batch, side, training, SPEED_PATHS["old"])
    import torch

    with FlopCounterMode(display=False) as counter:
        _speed_call(model, x, train, torch.float32)
    return counter.get_total_flops()


def _time_calls(model, x, train, dtype, repeats: int, gemm_mats) -> tuple[float, float, object]:
    """Median seconds of a call, and the median GEMM rate measured just before each timed call: the host's
    speed drifts (this VM's GEMM rate moved 72-142 GFLOP/s within one session), so each row's share of the
    GEMM rate is taken against GEMMs timed beside it rather than once at the start."""
    out = _speed_call(model, x, train, dtype)  # warm-up: kernels compiled, buffers sized
    times, rates = [], []
    for _ in range(repeats):
        rates.append(_gemm_once(*gemm_mats))
        t0 = time.perf_counter()
        out = _speed_call(model, x, train, dtype)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), statistics.median(rates), out


def speed(out_path: str, repeats: int = 3, force_bf16: bool = False) -> dict:
    import torch

    from wsi_vssm.models.precision import cpu_bf16_flags

    gemm = gemm_rate()
    flags = cpu_bf16_flags()
    dtypes = {"fp32": torch.float32}
    if flags or force_bf16:
        dtypes["bf16"] = torch.bfloat16
    result = {"threads": torch.get_num_threads(), "gemm_gflops": gemm, "cpu_bf16_flags": list(flags),
              "repeats": repeats, "rows": []}
    print(f"fp32 GEMM 2048^3: {gemm:.1f} GFLOP/s ({torch.get_num_threads()} threads); native bf16: "
          f"{', '.join(flags) or 'none'}{' (bf16 forced)' if force_bf16 and not flags else ''}")
    if "bf16" in dtypes:
        result["gemm_gflops_bf16"] = gemm_rate(dtype=torch.bfloat16)
        print(f"bf16 GEMM 2048^3: {result['gemm_gflops_bf16']:.1f} GFLOP/s ({result['gemm_gflops_bf16'] / gemm:.2f}x "
              "fp32; shares below are of the fp32 rate, as the issue counts them)")
    gemm_mats = (torch.randn(2048, 2048), torch.randn(2048, 2048))
    print(f"{'workload':<28} {'path':<4} {'prec':<5} {'seconds':>8} {'rate':>16} {'GFLOP/s':>8} {'GEMM':>6} "
          f"{'of GEMM':>8} {'x old fp32':>10} {'x fp32':>6} {'max|diff|':>9}")
    for name, model_name, batch, side, training in SPEED_WORKLOADS:
        flops = counted_flops(model_name, batch, side, training)
        base, ref_out = None, None
        for path_name, path in SPEED_PATHS.items():
            model, x, train = _speed_setup(model_name, batch, side, training, path)
            fp32_sec = None
            for prec, dtype in dtypes.items():
                sec, row_gemm, out = _time_calls(model, x, train, dtype, repeats, gemm_mats)
                fp32_sec = fp32_sec or sec  # fp32 is timed first on each path
                if training:  # the optimizer moved the weights: compare outputs of inference workloads only
                    diff = float("nan")
                elif ref_out is None:
                    ref_out, diff = out.float(), 0.0
                else:
                    diff = (out.float() - ref_out).abs().max().item()
                base = base or sec
                rate = f"{batch / sec:.1f} patches/s" if training else f"{batch * side * side / sec / 1e6:.2f} MP/s"
                row = {"workload": name, "path": path_name, "precision": prec, "seconds": sec,
                       "counted_gflop": flops / 1e9, "gflops": flops / sec / 1e9, "gemm_gflops_beside": row_gemm,
                       "share_of_gemm": flops / sec / 1e9 / row_gemm, "share_of_start_gemm": flops / sec / 1e9 / gemm,
                       "speedup_vs_old_fp32": base / sec, "speedup_vs_fp32_same_path": fp32_sec / sec,
                       "max_abs_diff_vs_old_fp32": diff,
                       "patches_per_s" if training else "mp_per_s": batch / sec if training else
                       batch * side * side / sec / 1e6}
                result["rows"].append(row)
                print(f"{name:<28} {path_name:<4} {prec:<5} {sec:>8.3f} {rate:>16} {row['gflops']:>8.1f} "
                      f"{row_gemm:>6.0f} {row['share_of_gemm']:>8.1%} {row['speedup_vs_old_fp32']:>10.2f} "
                      f"{fp32_sec / sec:>6.2f} {diff:>9.2g}", flush=True)
    if "bf16" not in dtypes:
        print("bf16: not timed (this CPU has no AMX-BF16/AVX512-BF16; emulated bf16 is slower than fp32). "
              "--force-bf16 times it anyway.")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--scan", default="cpu", help="scan implementation for the timings and backbone memory")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--time-side", type=int, default=1024, help="input side for the time-per-MP figures")
    ap.add_argument("--out", default=None, help="JSON output (default bench/results/backbone[_speed].json)")
    ap.add_argument("--speed", action="store_true", help="throughput against the GEMM rate, old vs new path")
    ap.add_argument("--force-bf16", action="store_true", help="--speed: time bf16 even without native bf16")
    args = ap.parse_args(argv)
    if args.speed:
        speed(args.out or "bench/results/backbone_speed.json", repeats=args.repeats, force_bf16=args.force_bf16)
        return
    args.out = args.out or "bench/results/backbone.json"

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
