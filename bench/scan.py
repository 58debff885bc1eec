"""Selective-scan throughput: reference, chunked, cpu (and mamba_ssm / triton on a GPU) against the physical limit.

VMamba shape: 768 channels (4 directions x 192), B/C grouped by direction (4 groups), d_state 1, softplus on,
L = 4k, 64k, 1M. Elements = batch x channels x L. Figures are medians of repeats. The physical limit is the
bytes the scan must move (u, delta, B, C read; y written; fp32) over the machine's measured copy bandwidth.

    python bench/scan.py [--out bench/results/scan.json] [--lengths 4096 65536 1048576]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from wsi_vssm.atomic import atomic_write_json
from wsi_vssm.ops.scan import selective_scan

CHANNELS, GROUPS, NSTATE = 768, 4, 1
REF_STEPS = 256  # the reference loop is timed on this many steps and extrapolated per step
CHUNKED_MAX = 8192  # chunked is linear in L; longer sequences are timed on this prefix and extrapolated


def copy_bandwidth(nbytes=1 << 29, repeats=5) -> float:
    """Bytes/s moved by a large numpy copy (read + write), median of repeats."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t)
    return 2 * a.nbytes / statistics.median(times)


def inputs(length, channels=CHANNELS, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = {
        "u": torch.randn(1, channels, length, generator=g),
        "delta": torch.randn(1, channels, length, generator=g) * 0.5 - 1.0,
        "A": -torch.rand(channels, NSTATE, generator=g) - 0.1,
        "B": torch.randn(1, GROUPS, NSTATE, length, generator=g),
        "C": torch.randn(1, GROUPS, NSTATE, length, generator=g),
        "D": torch.ones(channels),
        "delta_bias": torch.randn(channels, generator=g) * 0.1,
    }
    if requires_grad:
        for k in ("u", "delta", "B", "C"):
            x[k].requires_grad_()
    return x


def median_time(fn, repeats):
    fn()  # warm-up (numba compile / cache load)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def scan_bytes(length, channels=CHANNELS):
    return 4 * (3 * channels * length + 2 * GROUPS * NSTATE * length)


def time_forward(impl, length, repeats):
    """Seconds for one forward over `length` steps (extrapolated where the docstring says)."""
    steps = {"reference": min(length, REF_STEPS), "chunked": min(length, CHUNKED_MAX)}.get(impl, length)
    x = inputs(steps)
    with torch.no_grad():
        t = median_time(lambda: selective_scan(**x, delta_softplus=True, impl=impl), repeats)
    return t * length / steps, steps != length


def time_backward(length, repeats):
    x = inputs(length, requires_grad=True)
    y = selective_scan(**x, delta_softplus=True, impl="cpu")
    gy = torch.randn_like(y)

    def bwd():
        y = selective_scan(**x, delta_softplus=True, impl="cpu")
        torch.autograd.backward(y, gy)

    fwd = median_time(lambda: selective_scan(**x, delta_softplus=True, impl="cpu"), repeats)
    return median_time(bwd, repeats) - fwd


def gpu_impls():
    if not torch.cuda.is_available():
        return []
    return [i for i in ("mamba_ssm", "triton") if _importable(i)]


def _importable(impl):
    import importlib.util

    return importlib.util.find_spec("mamba_ssm" if impl == "mamba_ssm" else "triton") is not None


def run(lengths, repeats):
    bw = copy_bandwidth()
    rows = []
    for length in lengths:
        elems = CHANNELS * length
        limit_s = scan_bytes(length) / bw
        row = {"L": length, "elements": elems, "limit_elem_per_s": elems / limit_s}
        for impl in ("reference", "chunked", "cpu"):
            t, extrapolated = time_forward(impl, length, 1 if length >= 1 << 20 else repeats)
            row[f"{impl}_elem_per_s"] = elems / t
            row[f"{impl}_extrapolated"] = extrapolated
        for impl in gpu_impls():  # on a GPU the inputs must live there: not measured on this CPU bench
            row[f"{impl}_elem_per_s"] = None
        if length <= 1 << 16:
            row["cpu_backward_elem_per_s"] = elems / time_backward(length, repeats)
        row["cpu_over_reference"] = row["cpu_elem_per_s"] / row["reference_elem_per_s"]
        row["cpu_over_limit"] = row["limit_elem_per_s"] / row["cpu_elem_per_s"]
        rows.append(row)
    return {"copy_bandwidth_GBps": bw / 1e9, "threads": torch.get_num_threads(), "channels": CHANNELS,
            "groups": GROUPS, "d_state": NSTATE, "rows": rows}


def print_table(res):
    print(f"copy bandwidth {res['copy_bandwidth_GBps']:.1f} GB/s, {res['threads']} threads; "
          f"{res['channels']} channels, {res['groups']} groups, d_state {res['d_state']}; Melem/s, medians")
    head = (f"{'L':>8} {'reference*':>11} {'chunked':>9} {'cpu':>8} {'cpu bwd':>8} {'limit':>8} "
            f"{'cpu/ref':>8} {'limit/cpu':>9}")
    print(head)
    for r in res["rows"]:
        bwd = r.get("cpu_backward_elem_per_s")
        print(f"{r['L']:>8} {r['reference_elem_per_s'] / 1e6:>11.2f} "
              f"{r['chunked_elem_per_s'] / 1e6:>8.2f}{'*' if r['chunked_extrapolated'] else ' '}"
              f"{r['cpu_elem_per_s'] / 1e6:>8.1f} {(bwd or float('nan')) / 1e6:>8.1f} "
              f"{r['limit_elem_per_s'] / 1e6:>8.0f} {r['cpu_over_reference']:>8.1f} {r['cpu_over_limit']:>9.2f}")
    print(f"* timed on the first {REF_STEPS} (reference) / {CHUNKED_MAX} (chunked) steps and extrapolated per "
          "step: the full loop at L=1M takes minutes; both are linear in L.")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/scan.json")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 65536, 1 << 20])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    res = run(args.lengths, args.repeats)
    res["load_average"] = os.getloadavg()
    print_table(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, res)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
