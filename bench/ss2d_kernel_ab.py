"""The fused SS2D kernel pair against an earlier version of itself, side by side in one process.

    python bench/ss2d_kernel_ab.py [--against HEAD] [--repeats 9] [--model-repeats 5]
                                   [--out bench/results/ss2d_kernel_ab.json]

Loads `kernels/ss2d_cpu.py` as it was at git revision --against (a temporary copy, compiled afresh) beside the
working tree's version, and calls both on the same arrays: the forward and the backward at the shapes of a
`micro` training step (64 patches of 96 px: stages 1-3) and of micro's stage 2 at a 2,048 px region (batch 1).
The two run alternately, so both see the same machine load. Prints medians of wall time and of process CPU time
per element (batch x L x D x 4 directions), their ratio, and the largest difference of each output relative to
its largest value. Then the same for whole calls of the model, each kernel version in turn behind the fused SS2D
(`micro` forward on a 2,048 px region, and a `micro` training step of 64 patches of 96 px with AdamW, as in
`bench/backbone.py --speed`): medians of --model-repeats wall times, alternating.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from wsi_vssm.atomic import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
# (label, batch, H, W, D, dt_rank): micro's stages 1-3 in a training step, and its stage 2 at 2,048 px
SHAPES = [("train stage 1", 64, 24, 24, 64, 2), ("train stage 2", 64, 12, 12, 128, 4),
          ("train stage 3", 64, 6, 6, 256, 8), ("2048 px stage 2", 1, 256, 256, 128, 4)]


def load_kernels_at(rev: str, workdir: Path):
    """kernels/ss2d_cpu.py at `rev` as a module of its own (numba compiles it into workdir)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:kernels/ss2d_cpu.py"], capture_output=True,
                         text=True, check=True).stdout
    path = workdir / "ss2d_cpu_ab.py"
    path.write_text(src, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("ss2d_cpu_ab", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs(batch, h, w, d, rank, kern):
    import torch

    from wsi_vssm.ops.ss2d_fused import _kernel_params

    g = torch.Generator().manual_seed(0)
    k = 4
    u = torch.randn(batch, h * w, d, generator=g) * 0.5
    xdbl = torch.randn(batch, h * w, k, rank + 2, generator=g) * 0.5
    params = _kernel_params(torch.randn(k, d, rank, generator=g) * rank**-0.5,
                            torch.rand(k, d, generator=g) * -4, torch.zeros(k * d, 1), torch.ones(k * d))
    ckpt = torch.empty(batch, k, -(-h * w // kern.T_CHUNK), 1, d)
    return u, xdbl, params, ckpt, torch.randn(batch, h * w, d, generator=g)


def _run(mod, arrays, h, w, cb, backward):
    import torch

    u, xdbl, params, ckpt, gy = arrays
    dirs = torch.arange(4)
    p = [t.numpy() for t in params]
    if not backward:
        y = torch.empty_like(u)
        mod.ss2d_fwd(u.numpy(), xdbl.numpy(), dirs.numpy(), h, w, *p, True, True, cb, y.numpy(), ckpt.numpy())
        return (y,)
    blocks = -(-u.shape[2] // cb)
    du = torch.empty_like(u)
    dx = torch.empty(blocks, *xdbl.shape)
    rank = xdbl.shape[3] - 2  # x_dbl rows: dt_low (R), B (1), C (1)
    dp = torch.empty(u.shape[0], 4, 2 + 1 + rank, u.shape[2], dtype=torch.float64)  # dDs, d bias, dA, dW_dt
    mod.ss2d_bwd(u.numpy(), xdbl.numpy(), dirs.numpy(), h, w, *p, ckpt.numpy(), gy.numpy(), cb, du.numpy(),
                 dx.numpy(), dp.numpy())
    return du, dx, dp


def time_models(old, new, repeats: int) -> list[dict]:
    """Whole micro calls with each kernel version behind the fused SS2D, alternating."""
    import torch

    from wsi_vssm.models import create_model
    from wsi_vssm.ops import ss2d_fused

    torch.manual_seed(0)
    infer = create_model("micro", num_classes=0).eval()
    region = torch.rand(1, 3, 2048, 2048)
    train = create_model("micro", num_classes=0).train()
    head = torch.nn.Linear(train.num_features, 2)
    opt = torch.optim.AdamW([*train.parameters(), *head.parameters()], lr=1e-4)
    patches, labels = torch.rand(64, 3, 96, 96), torch.randint(0, 2, (64,))

    def forward():
        with torch.no_grad():
            infer.forward_features(region)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(head(train(patches)), labels).backward()
        opt.step()

    original = ss2d_fused._fused_kernels
    rows = []
    print(f"{'model call':<34} {'old s':>8} {'new s':>8} {'ratio':>7}")
    try:
        for label, call in (("micro forward, 2,048 px", forward), ("micro training step, 64 x 96 px", step)):
            times = {"old": [], "new": []}
            for rep in range(repeats + 1):
                for name, mod in (("old", old), ("new", new)):
                    ss2d_fused._fused_kernels = lambda mod=mod: mod
                    t0 = time.perf_counter()
                    call()
                    if rep:  # the first round warms up (compiles, sizes buffers)
                        times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"call": label, "old_s": med["old"], "new_s": med["new"], "ratio": med["old"] / med["new"]})
            print(f"{label:<34} {med['old']:>8.3f} {med['new']:>8.3f} {med['old'] / med['new']:>6.2f}x")
    finally:
        ss2d_fused._fused_kernels = original
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", default="HEAD", help="git revision of kernels/ss2d_cpu.py to compare with")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--model-repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/results/ss2d_kernel_ab.json")
    args = ap.parse_args(argv)

    from wsi_vssm.ops import scan as _scan
    from wsi_vssm.ops.ss2d_fused import _fused_kernels, block_width

    new = _fused_kernels()
    with _scan._CPU_LOCK:
        threads = _scan._set_numba_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old = load_kernels_at(args.against, Path(tmp))
        print(f"kernels/ss2d_cpu.py: working tree against {args.against}; {threads} threads; medians of "
              f"{args.repeats}, alternating")
        print(f"{'shape':<16} {'pass':<8} {'old ms':>8} {'new ms':>8} {'old ns/el':>9} {'new ns/el':>9} "
              f"{'CPU ratio':>9} {'max rel diff':>12}")
        for label, batch, h, w, d, rank in SHAPES:
            arrays = _inputs(batch, h, w, d, rank, new)
            cb = block_width(batch, d, threads)
            elements = batch * h * w * d * 4
            for backward in (False, True):
                _run(new, arrays, h, w, cb, False)  # the checkpoints the backward reads
                outs = [_run(m, arrays, h, w, cb, backward) for m in (old, new)]  # also compiles both
                diff = max(float((a.double() - b.double()).abs().max() / (a.double().abs().max() + 1e-30))
                           for a, b in zip(*outs, strict=True))
                times = {"old": [], "new": []}
                for _ in range(args.repeats):
                    for name, mod in (("old", old), ("new", new)):
                        c0, t0 = time.process_time(), time.perf_counter()
                        _run(mod, arrays, h, w, cb, backward)
                        times[name].append((time.perf_counter() - t0, time.process_time() - c0))
                med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v))
                       for k, v in times.items()}
                row = {"shape": label, "pass": "backward" if backward else "forward", "batch": batch, "h": h,
                       "w": w, "d": d, "rank": rank, "old_wall_s": med["old"][0], "new_wall_s": med["new"][0],
                       "old_cpu_ns_per_element": med["old"][1] / elements * 1e9,
                       "new_cpu_ns_per_element": med["new"][1] / elements * 1e9,
                       "cpu_ratio": med["old"][1] / med["new"][1], "max_rel_diff": diff}
                rows.append(row)
                print(f"{label:<16} {row['pass']:<8} {med['old'][0] * 1e3:>8.1f} {med['new'][0] * 1e3:>8.1f} "
                      f"{row['old_cpu_ns_per_element']:>9.2f} {row['new_cpu_ns_per_element']:>9.2f} "
                      f"{row['cpu_ratio']:>8.2f}x {diff:>12.1e}")
        model_rows = time_models(old, new, args.model_repeats)
    atomic_write_json(args.out, {"against": args.against, "threads": threads, "repeats": args.repeats,
                                 "rows": rows, "model_rows": model_rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
