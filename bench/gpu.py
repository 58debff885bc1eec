"""GPU checks and figures in one run (for a lent GPU machine; every section also runs on CPU with --smoke).

    python bench/gpu.py [--out bench/results/gpu.json] [--golden PATH/vssm_micro_golden.pt] [--smoke]

Sections, each timed with CUDA events (medians) and each allowed to fail without stopping the others:
  scan_check    the Triton kernels (serial, tiled) and `chunked` on the device against the float64 reference on
                the CPU, on fresh random inputs of several shapes (grouped/ungrouped B, C; N = 1, 4, 16; z;
                initial state; multi-tile lengths), plus the Triton path's gradients; relative L2 error.
  scan_speed    VMamba's scan shape (768 channels, 4 groups, d_state 1) at L = 4k ... 6.25M (2,500^2: stage 1
                of a 10,000 px region), Melem/s per kernel against the device's measured copy bandwidth; also
                the training pair (forward saving tile states, fused backward) against the backward's limit.
  scan_tune     the training pair over channels per program, tile length and warps (not run by default).
  backbone      `tiny` (random weights) on CPU vs GPU (fp32 and bf16 autocast) on a 512 px input; the golden
                micro fixture on the GPU; then one 10,000 x 10,000 region through `tiny` in one pass (fp32 and
                bf16), with seconds and peak GPU memory, for each Triton variant.
  train_step    micro cell-model training steps (64 x 96 px, AdamW), fp32 and bf16 autocast: steps/s.
  profile       TF32 off (exact fp32 against the CPU and the golden fixture), streaming vs plain SS2D on
                4,096 and 10,000 px regions, and the profiler's top operations on a streamed 4,096 px region.
  predict       the default model on --slide: CPU and GPU cell features compared, then `predict_slide` at
                each device's defaults.
With --smoke every size is cut down so the script's code paths can be checked on a CPU (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from wsi_vssm.atomic import atomic_write_json
from wsi_vssm.ops.scan import _as_groups, selective_scan, selective_scan_reference

CHANNELS, GROUPS = 768, 4


class Timer:
    """Median seconds of `fn` on `device` (CUDA events there; perf_counter on CPU)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def median(self, fn, repeats=5, warmup=1):
        for _ in range(warmup):
            fn()
        self.sync()
        return statistics.median(self.once(fn) for _ in range(repeats))


def scan_inputs(batch, dim, length, nstate, groups, *, full=True, gen=None, device="cpu"):
    """Random scan inputs (fresh for each call: `gen` advances)."""
    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    bc = (batch, groups, nstate, length) if groups else (batch, nstate, length)
    x = {"u": rnd(batch, dim, length), "delta": rnd(batch, dim, length, scale=0.5) - 1.0,
         "A": -torch.rand(dim, nstate, generator=gen) * 2 - 0.05, "B": rnd(*bc), "C": rnd(*bc)}
    if full:
        x.update(D=rnd(dim), z=rnd(batch, dim, length), delta_bias=rnd(dim, scale=0.1),
                 initial_state=rnd(batch, dim, nstate))
    return {k: v.to(device) for k, v in x.items()}


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def triton_fwd(x, variant):
    from wsi_vssm_kernels import scan_triton

    f32 = torch.float32
    batch, dim, _ = x["u"].shape
    dev = x["u"].device
    return scan_triton.scan_fwd(
        x["u"].contiguous(), x["delta"].contiguous(), x["A"].contiguous(), _as_groups(x["B"]).contiguous(),
        _as_groups(x["C"]).contiguous(), x.get("D", torch.zeros(dim, device=dev)), x.get("z"),
        x.get("delta_bias", torch.zeros(dim, device=dev)),
        x.get("initial_state", torch.zeros(batch, dim, x["A"].shape[1], device=dev, dtype=f32)), True,
        variant=variant)


def section_scan_check(device, smoke):
    gen = torch.Generator().manual_seed(int(time.time()))  # fresh inputs every run
    cases = [(1, 96, 300, 1, 4, True), (2, 40, 257, 4, 2, True), (1, 24, 129, 16, 0, False)] if smoke else [
        (1, 768, 4096, 1, 4, True), (2, 100, 3000, 16, 0, True), (1, 64, 70000, 1, 4, False),
        (3, 24, 513, 4, 2, True), (1, 768, 1, 1, 4, True)]
    rows = []
    for case in cases:
        *shape, full = case
        x = scan_inputs(*shape, full=full, gen=gen)
        ref_y, ref_h = selective_scan_reference(**{k: v.double() for k, v in x.items()}, delta_softplus=True,
                                                return_last_state=True)
        xd = {k: v.to(device) for k, v in x.items()}
        row = {"shape(b,D,L,N,G)": shape, "full": full}
        for variant in ("serial", "tiled"):
            y, h = triton_fwd(xd, variant)
            row[f"triton_{variant}_y"], row[f"triton_{variant}_h"] = rel_err(y, ref_y), rel_err(h, ref_h)
        if shape[2] <= 8192:
            y, h = selective_scan(**xd, delta_softplus=True, return_last_state=True, impl="chunked")
            row["chunked_y"], row["chunked_h"] = rel_err(y, ref_y), rel_err(h, ref_h)
        yb = selective_scan(**{k: (v.bfloat16() if k in ("u", "delta", "z") else v) for k, v in xd.items()},
                            delta_softplus=True, impl="triton")
        row["triton_bf16_in_y"] = rel_err(yb, ref_y)
        rows.append(row)
    # gradients through the Triton path (tiled forward saving states, fused backward) against the reference's
    x = scan_inputs(2, 40, 300 if smoke else 1000, 4, 4, gen=gen)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")

    def grads(inputs, impl):
        inputs = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y, h = selective_scan(**inputs, delta_softplus=True, return_last_state=True, impl=impl)
        gy = torch.cos(torch.arange(y.numel(), dtype=y.dtype, device=y.device)).view_as(y)
        torch.autograd.backward([y, h], [gy, torch.ones_like(h)])
        return {k: inputs[k].grad for k in names}

    ref = grads({k: v.double() for k, v in x.items()}, "reference")
    got = grads({k: v.to(device) for k, v in x.items()}, "triton")
    rows.append({"gradients(b,D,L,N,G)": (2, 40, 300 if smoke else 1000, 4, 4),
                 **{f"d{k}": rel_err(got[k], ref[k]) for k in names}})
    # fp32 paths must agree to 1e-4; bf16 inputs are rounded first (8 bits of mantissa): 2e-2
    errs = [(k, v) for r in rows for k, v in r.items() if isinstance(v, float)]
    bad = [(k, v) for k, v in errs if math.isnan(v) or v > (2e-2 if "bf16" in k else 1e-4)]
    return {"rows": rows, "worst_fp32_rel_err": max(v for k, v in errs if "bf16" not in k), "failed": bad,
            "passed": not bad}


def copy_bandwidth(device, timer, nbytes):
    a = torch.randn(nbytes // 4, device=device)
    b = torch.empty_like(a)
    return 2 * a.nbytes / timer.median(lambda: b.copy_(a), repeats=10)


def section_scan_speed(device, smoke, timer):
    bw = copy_bandwidth(device, timer, (1 << 24) if smoke else (1 << 31))
    lengths = [128] if smoke else [4096, 65536, 1 << 20, 2500 * 2500]
    channels = 96 if smoke else CHANNELS
    gen = torch.Generator().manual_seed(1)
    rows = [_speed_row(device, timer, bw, channels, length, gen, 1 if smoke else 3 if length >= 1 << 20 else 7)
            for length in lengths]
    return {"copy_bandwidth_GBps": bw / 1e9, "channels": channels, "rows": rows}


def _speed_row(device, timer, bw, channels, length, gen, reps):
    """One length of `section_scan_speed`: every kernel variant (and `chunked` up to 64k) in Melem/s."""
    from wsi_vssm_kernels import scan_triton

    x = scan_inputs(1, channels, length, 1, GROUPS, full=False, gen=gen, device=device)
    x["D"] = torch.ones(channels, device=device)
    x["delta_bias"] = torch.zeros(channels, device=device)
    h0 = torch.zeros(1, channels, 1, device=device)
    elems = channels * length
    nbytes = 4 * (3 * channels * length + 2 * GROUPS * length)
    row = {"L": length, "limit_Melem_s": elems / (nbytes / bw) / 1e6}
    for name, variant, kw in (("serial", "serial", {}), ("tiled", "tiled", {}), ("tiled_d2", "tiled", {"block_d": 2}),
                              ("tiled_d4", "tiled", {"block_d": 4}), ("tiled_d8", "tiled", {"block_d": 8}),
                              ("tiled_l1024", "tiled", {"block_l": 1024})):
        t = timer.median(lambda variant=variant, kw=kw: scan_triton.scan_fwd(
            x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], None, x["delta_bias"], h0, True,
            variant=variant, **kw), repeats=reps)
        row[f"{name}_Melem_s"] = elems / t / 1e6
    if length <= 65536:
        with torch.no_grad():
            t = timer.median(lambda: selective_scan(**x, delta_softplus=True, impl="chunked"), repeats=reps)
        row["chunked_Melem_s"] = elems / t / 1e6
    row["tiled_over_serial"] = row["tiled_Melem_s"] / row["serial_Melem_s"]
    row["limit_over_tiled"] = row["limit_Melem_s"] / row["tiled_Melem_s"]
    # training: the forward that saves tile states, then the fused backward. The backward's least traffic reads
    # u, delta, dy (D x L each) and B, C, and writes du, ddelta and dB, dC (summed by atomics over channels)
    y, hlast, hck = scan_triton.scan_fwd(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], None,
                                         x["delta_bias"], h0, True, save_states=True)
    dy, dlast = torch.randn_like(y), torch.zeros_like(hlast)
    t = timer.median(lambda: scan_triton.scan_fwd(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], None,
                                                  x["delta_bias"], h0, True, save_states=True), repeats=reps)
    row["fwd_save_states_Melem_s"] = elems / t / 1e6
    t = timer.median(lambda: scan_triton.scan_bwd(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], None,
                                                  x["delta_bias"], hck, dy, dlast, True), repeats=reps)
    row["bwd_Melem_s"] = elems / t / 1e6
    row["bwd_limit_Melem_s"] = elems / (4 * (5 * channels * length + 4 * GROUPS * length) / bw) / 1e6
    row["bwd_limit_over_bwd"] = row["bwd_limit_Melem_s"] / row["bwd_Melem_s"]
    if length <= 65536:  # a training step's scan through autograd: the fused Triton pair against `chunked`'s
        for impl in ("triton", "chunked"):
            t = timer.median(lambda impl=impl: _scan_fwd_bwd(x, dy, impl), repeats=reps)
            row[f"{impl}_fwd_bwd_Melem_s"] = elems / t / 1e6
    return row


def _scan_fwd_bwd(x, dy, impl):
    """One forward and backward of `selective_scan` through autograd, every float input a leaf needing grad."""
    leaves = {k: v.detach().requires_grad_() for k, v in x.items()}
    y = selective_scan(**leaves, delta_softplus=True, impl=impl)
    y.backward(dy)


def section_scan_tune(device, smoke, timer, save):
    """The training pair (forward saving tile states, fused backward) over channels per program, tile length
    and warps, at VMamba's scan shape; each config's gradients against the default config's. Each config
    compiles two kernels (seconds each), so the sweep is short, and `save` keeps every row as it comes."""
    gen = torch.Generator().manual_seed(2)
    channels = 96 if smoke else CHANNELS
    # the default (4 channels x 128 steps) and others of the same register budget, then larger tiles
    configs = [(d, bl, w) for d, bl in ((1, 512), (2, 256), (4, 128), (2, 512), (4, 256), (1, 1024)) for w in (4, 8)]
    if smoke:
        configs = [(4, 128, 4), (2, 64, 2)]
    inputs = []
    for length in ([300] if smoke else [4096, 65536, 1 << 20]):
        x = scan_inputs(1, channels, length, 1, GROUPS, full=False, gen=gen, device=device)
        x["D"] = torch.ones(channels, device=device)
        x["delta_bias"] = torch.zeros(channels, device=device)
        h0 = torch.zeros(1, channels, 1, device=device)
        args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], None, x["delta_bias"], h0, True)
        inputs.append((length, args, torch.randn_like(x["u"])))
    out, refs = {"channels": channels, "rows": []}, {}
    for block_d, block_l, warps in [(None, None, None)] + configs:
        kw = {"block_d": block_d, "block_l": block_l, "num_warps": warps}
        for length, args, dy in inputs:
            try:
                t_f, t_b, grads = _tune_config(timer, args, dy, kw)
            except Exception as e:  # a config the compiler refuses (registers, shared memory) is a row
                out["rows"].append({"L": length, **kw, "error": f"{type(e).__name__}: {str(e)[:160]}"})
                continue
            ref = refs.setdefault(length, grads)
            err = max(rel_err(g, r) for g, r in zip(grads, ref, strict=True) if g is not None)
            elems = channels * length
            out["rows"].append({"L": length, **kw, "fwd_save_Melem_s": elems / t_f / 1e6,
                                "bwd_Melem_s": elems / t_b / 1e6, "pair_Melem_s": elems / (t_f + t_b) / 1e6,
                                "grads_rel_err_vs_default": err})
            print(f"  {out['rows'][-1]}", flush=True)
        save(out)
    return out


def _tune_config(timer, args, dy, kw):
    """Median seconds of the forward saving states and of the backward with `kw`, and the backward's grads."""
    from wsi_vssm_kernels import scan_triton

    _, hlast, hck = scan_triton.scan_fwd(*args, save_states=True, **kw)
    dlast = torch.zeros_like(hlast)
    grads = scan_triton.scan_bwd(*args[:8], hck, dy, dlast, True, **kw)
    t_f = timer.median(lambda: scan_triton.scan_fwd(*args, save_states=True, **kw), repeats=3)
    t_b = timer.median(lambda: scan_triton.scan_bwd(*args[:8], hck, dy, dlast, True, **kw), repeats=3)
    return t_f, t_b, grads


def section_backbone(device, smoke, timer, golden, variants=("tiled", "serial")):
    from wsi_vssm_kernels import scan_triton

    from wsi_vssm.models import create_model

    out = {}
    torch.manual_seed(0)
    name = "micro" if smoke else "tiny"
    model = create_model(name, num_classes=0, scan="auto").eval()
    x = torch.rand(1, 3, 128 if smoke else 512, 128 if smoke else 512)
    with torch.no_grad():
        ref = model.forward_features(x)
        model.to(device)
        got = model.forward_features(x.to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            got_bf16 = model.forward_features(x.to(device)).float()
    out["cpu_vs_device_rel_err"] = {"fp32": rel_err(got, ref), "bf16_autocast": rel_err(got_bf16, ref)}
    if golden and Path(golden).is_file():
        g = torch.load(golden, weights_only=True)
        out["golden_micro_logits_rel_err"] = _golden_err(g, device)
    side = 192 if smoke else 10_000
    big = torch.rand(1, 3, side, side, device=device)
    runs = []
    for variant in variants:
        scan_triton.DEFAULT_VARIANT = variant
        for amp in (False, True):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                model.forward_features(big[:, :, :min(side, 512), :min(side, 512)])  # warm-up: kernel builds
                timer.sync()
                t = timer.once(lambda: model.forward_features(big))
                f = model.forward_features(big[:, :, :2048, :2048]) if side > 2048 else None
                t2048 = timer.median(lambda: model.forward_features(big[:, :, :2048, :2048]), repeats=3) \
                    if f is not None else None
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            runs.append({"variant": variant, "bf16": amp, "side": side, "seconds": t, "MP_per_s": side**2 / t / 1e6,
                         "peak_GiB": peak, "MP_per_s_2048": (2048**2 / t2048 / 1e6) if t2048 else None})
            print(f"  backbone {name} {side}px {variant} bf16={amp}: {t:.2f} s, peak {peak} GiB", flush=True)
            if t > 120:
                break
    scan_triton.DEFAULT_VARIANT = "tiled"
    out["one_pass"] = runs
    out["model"] = name
    return out


def _golden_err(g, device):
    """The micro golden fixture (upstream VMamba's output) through our model on the device, Triton scan."""
    from wsi_vssm.models.vssm import VSSM, VSSMConfig

    c = g["config"]
    cfg = VSSMConfig(dims=c["dims"], depths=tuple(c["depths"]), ssm_ratio=c["ssm_ratio"], d_state=c["ssm_d_state"],
                     dt_rank=c["ssm_dt_rank"], mlp_ratio=c["mlp_ratio"], num_classes=c["num_classes"], scan="triton")
    model = VSSM(cfg).eval()
    model.load_state_dict(g["state_dict"], strict=True)
    with torch.no_grad():
        logits = model.to(device)(g["input"].to(device))
    return rel_err(logits, g["output"])


def section_train_step(device, smoke, timer):
    from wsi_vssm.models import create_model
    from wsi_vssm.models.ss2d import SS2D
    from wsi_vssm.ops.scan import _auto_impl

    torch.manual_seed(0)
    model = create_model("micro", num_classes=2, scan="auto").to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = 8 if smoke else 64
    x = torch.rand(batch, 3, 96, 96, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    out = {"auto_scan": _auto_impl(x, None)}
    # the default scan (on CUDA the fused Triton pair) beside `chunked`, the scan the backward recomputed
    # through before the fused backward existed
    for scan in ("auto", "chunked"):
        for m in model.modules():
            if isinstance(m, SS2D):
                m.scan = scan
        for amp in (False, True):
            def step(amp=amp):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            t = timer.median(step, repeats=3 if smoke else 20, warmup=2)
            out[f"{scan}_{'bf16' if amp else 'fp32'}"] = {"steps_per_s": 1 / t, "patches_per_s": batch / t}
    return out


def section_predict(device, slide_path, workdir):
    """The default model on a real slide: cell features from CPU and GPU (same 2,048 px regions) compared, then
    `predict_slide` on the GPU at its defaults (10,000 px regions) beside the CPU's defaults."""
    import numpy as np

    from wsi_vssm.io import open_slide
    from wsi_vssm.io.tissue import slide_tissue_mask
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.pipeline.extract import extract_slide
    from wsi_vssm.pipeline.geometry import DEFAULT_OVERLAP_PX
    from wsi_vssm.pipeline.predict import PredictParams, predict_slide

    model = load_model("default")
    out = {"slide": str(slide_path)}
    feats = {}
    with open_slide(slide_path) as slide:
        tissue = slide_tissue_mask(slide)
        for dev, amp in (("cpu", False), (device.type, False), (device.type, True)):
            t = time.perf_counter()
            cells = extract_slide(slide, model.backbone.to(dev), mpp=model.mpp, token_px=model.token_px,
                                  region_px=2048, overlap_px=DEFAULT_OVERLAP_PX, device=dev, amp=amp, tissue=tissue)
            key = f"{dev}{'_bf16' if amp else ''}"
            feats[key] = cells.features.astype(np.float32)
            with torch.inference_mode():
                res = model.mil.to("cpu").eval()(torch.from_numpy(feats[key]))
            out[key] = {"seconds": time.perf_counter() - t, "cells": len(cells),
                        "probability": float(torch.sigmoid(res.slide_logit)[0]),
                        "max_cell_probability": float(torch.sigmoid(res.cell_logits[0]).max())}
    for key in feats:
        if key != "cpu":
            out[key]["features_rel_err_vs_cpu"] = rel_err(torch.from_numpy(feats[key]), torch.from_numpy(feats["cpu"]))
    for dev in ("cpu", device.type):
        rec = predict_slide(slide_path, model, Path(workdir) / f"predict_{dev}", PredictParams(device=dev))
        out[f"predict_{dev}_defaults"] = {k: rec[k] for k in ("probability", "label")} | {
            "region_px": rec["parameters"]["region_px"], "timings": rec["timings"]}
    return out


def section_profile(device, smoke, timer, golden):
    """Where the backbone's GPU time goes: TF32 off (exact fp32), streaming vs plain SS2D, and the profiler's top
    operations on one streamed region."""
    from wsi_vssm.models import create_model
    from wsi_vssm.models.ss2d import SS2D

    out = {}
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        torch.manual_seed(0)
        model = create_model("micro" if smoke else "tiny", num_classes=0, scan="auto").eval()
        x = torch.rand(1, 3, 128 if smoke else 512, 128 if smoke else 512)
        with torch.no_grad():
            ref = model.forward_features(x)
            got = model.to(device).forward_features(x.to(device))
        out["tf32_off"] = {"cpu_vs_device_rel_err": rel_err(got, ref)}
        if golden and Path(golden).is_file():
            out["tf32_off"]["golden_micro_logits_rel_err"] = _golden_err(torch.load(golden, weights_only=True),
                                                                         device)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    ss2d = [m for m in model.modules() if isinstance(m, SS2D)]
    default_min, default_chunk = ss2d[0].stream_min_pixels, ss2d[0].stream_chunk_cuda
    rows = []
    for side in ([192] if smoke else [4096, 10_000]):
        big = torch.rand(1, 3, side, side, device=device)
        for path, min_px, chunk in (("streaming_chunk4k", 1, 4096), ("streaming_chunk256k", 1, 1 << 18),
                                    ("plain", None, default_chunk)):
            for m in ss2d:
                m.stream_min_pixels, m.stream_chunk_cuda = min_px, chunk
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                with torch.no_grad():
                    t = timer.median(lambda big=big: model.forward_features(big), repeats=1 if side > 5000 else 3)
                peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
                rows.append({"side": side, "ss2d": path, "seconds": t, "MP_per_s": side**2 / t / 1e6,
                             "peak_GiB": peak})
            except torch.OutOfMemoryError as e:
                rows.append({"side": side, "ss2d": path, "error": f"out of memory: {str(e)[:120]}"})
            print(f"  {rows[-1]}", flush=True)
        del big
    out["streaming_vs_plain"] = rows
    for m in ss2d:
        m.stream_min_pixels, m.stream_chunk_cuda = 1, 4096
    side = 192 if smoke else 4096
    big = torch.rand(1, 3, side, side, device=device)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                    if device.type == "cuda" else [])
    with torch.no_grad(), torch.profiler.profile(activities=acts) as prof:
        model.forward_features(big)
        timer.sync()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=15)
    print(table, flush=True)
    out["profile_streaming_side"] = side
    out["profile_top"] = table
    for m in ss2d:
        m.stream_min_pixels, m.stream_chunk_cuda = default_min, default_chunk
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/gpu.json")
    ap.add_argument("--golden", default=None, help="vssm_micro_golden.pt (shared/reference) to check on the GPU")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes; runs on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--variants", nargs="+", default=["tiled", "serial"], help="Triton kernels for backbone")
    ap.add_argument("--slide", default="sample_data/cmu-1-small-region.svs", help="for the predict section")
    ap.add_argument("--workdir", default="/tmp/wsi-vssm-gpu-bench")
    ap.add_argument("--sections", nargs="+",
                    default=["scan_check", "scan_speed", "backbone", "train_step", "predict"])
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        sys.exit("bench/gpu.py: no CUDA device (use --smoke with TRITON_INTERPRET=1 to check the script on a CPU)")
    import triton

    res = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "smoke": args.smoke}
    timer = Timer(device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.sections:
        t = time.perf_counter()
        try:
            if name == "scan_check":
                res[name] = section_scan_check(device, args.smoke)
            elif name == "scan_speed":
                res[name] = section_scan_speed(device, args.smoke, timer)
            elif name == "scan_tune":
                res[name] = section_scan_tune(device, args.smoke, timer, lambda part, name=name: atomic_write_json(
                    out, {**res, name: {**part, "partial": True}}))
            elif name == "backbone":
                res[name] = section_backbone(device, args.smoke, timer, args.golden, args.variants)
            elif name == "train_step":
                res[name] = section_train_step(device, args.smoke, timer)
            elif name == "profile":
                res[name] = section_profile(device, args.smoke, timer, args.golden)
            elif name == "predict":
                res[name] = section_predict(device, args.slide, args.workdir)
        except Exception as e:  # one broken section must not lose the others' figures
            res[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        res.setdefault(name, {})["section_seconds"] = time.perf_counter() - t
        print(f"== {name} ({time.perf_counter() - t:.1f} s)\n{json.dumps(res[name], indent=1, default=str)}",
              flush=True)
        atomic_write_json(out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
