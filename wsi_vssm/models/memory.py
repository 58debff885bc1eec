"""Peak-memory measurement of SS2D's paths, for tests and bench/ (bench/backbone.py).

Two methods:
- "tensors": counts the bytes of every tensor storage created while the call runs (a TorchDispatchMode that
  tracks storages until they are freed). Deterministic and fast; blind to memory a kernel allocates outside
  torch (e.g. numpy buffers inside a numba kernel).
- "rss": runs the call in a fresh subprocess and reads the process's peak resident memory (VmHWM, reset just
  before the call), with glibc told to return large blocks to the OS at once. Sees everything, a little noisy.

`peak_extra` is the peak beyond what exists before the call (the module, its input) minus the call's result.
It is reported as bytes and as a multiple of one inner feature map (B x D x H x W fp32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

PATHS = ("plain", "streaming", "scan_plain", "scan_streaming")


@dataclass
class MemoryReport:
    path: str
    method: str
    height: int
    width: int
    d_inner: int
    peak_extra_bytes: int
    inner_map_bytes: int  # one (B, D, H, W) fp32 map

    @property
    def inner_maps(self) -> float:
        return self.peak_extra_bytes / self.inner_map_bytes


class _LiveTensorBytes(TorchDispatchMode):
    """Tracks the storages created by ops under the mode; `peak` is the most bytes alive at once.

    Storages of `ignore` (tensors that exist before the call: inputs, parameters) are not counted.
    """

    def __init__(self, ignore=()):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._weakref = StorageWeakRef
        self._ignore = {t.untyped_storage().data_ptr() for t in ignore}
        self.live: dict[int, tuple[object, int]] = {}
        self.current = self.peak = 0  # `current` may include freed storages until the next sweep

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        new = {}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._ignore:
                    new[key] = storage
        if not new:
            return out
        # frees only lower the count, so sweeping is needed only when a new peak may be set
        if any(k in self.live for k in new) or self.current + sum(s.nbytes() for s in new.values()) > self.peak:
            self._sweep()
        for key, storage in new.items():
            if key not in self.live:
                self.live[key] = (self._weakref(storage), storage.nbytes())
                self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def _build(kw: dict):
    """The SS2D and its input: (B, C, H, W) for the whole module, u (B, D, H, W) for the scan alone."""
    from wsi_vssm.models.ss2d import SS2D

    torch.manual_seed(kw["seed"])
    m = SS2D(kw["d_model"], d_state=kw["d_state"], ssm_ratio=kw["ssm_ratio"], scan=kw["scan"],
             impl=kw.get("impl", "auto")).eval()
    channels = m.d_inner if kw["path"].startswith("scan") else kw["d_model"]
    return m, torch.randn(kw["batch"], channels, kw["height"], kw["width"])


def _call(m, x, path: str, chunk: int | None):
    if path == "plain":
        return m.forward_plain(x)
    if path == "streaming":
        return m.forward_streaming(x, chunk)
    if path == "scan_plain":
        return m.scan_plain(x)
    return m.scan_streaming(x, chunk)


def ss2d_peak_memory(
    height: int, width: int, *, path: str = "scan_streaming", d_model: int = 32, ssm_ratio: float = 2.0,
    d_state: int = 1, batch: int = 1, chunk: int | None = None, scan: str = "reference", method: str = "tensors",
    seed: int = 0, impl: str = "auto",
) -> MemoryReport:
    """Peak extra memory of one SS2D call under no_grad.

    path: "plain" / "streaming" (the whole SS2D: input is the (B, C, H, W) map) or "scan_plain" /
    "scan_streaming" (the 2D scan alone: input is u, (B, D, H, W)); the result map is not counted as extra.
    impl: the SS2D implementation; with 'auto' and scan 'auto'/'cpu' "streaming" runs the fused kernel's
    low-memory variant (the scan_* paths are always today's).
    """
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; valid: {', '.join(PATHS)}")
    if method == "rss":
        return _rss_in_subprocess(locals())
    if method != "tensors":
        raise ValueError(f"unknown method {method!r}; valid: tensors, rss")
    m, x = _build(locals())
    with torch.no_grad(), _LiveTensorBytes(ignore=[x, *m.parameters()]) as mode:
        out = _call(m, x, path, chunk)
    extra = mode.peak - out.untyped_storage().nbytes()
    return MemoryReport(path, method, height, width, m.d_inner, extra, batch * m.d_inner * height * width * 4)


def _rss_in_subprocess(kw: dict) -> MemoryReport:
    kw = {k: v for k, v in kw.items() if k != "method"}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    code = f"from wsi_vssm.models.memory import _rss_worker; _rss_worker({json.dumps(kw)!r})"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"memory worker failed: {res.stderr.strip().splitlines()[-1:]}")
    return MemoryReport(**json.loads(res.stdout.strip().splitlines()[-1]))


def _read_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss_worker(kw_json: str) -> None:
    kw = json.loads(kw_json)
    path, chunk = kw["path"], kw["chunk"]
    m, x = _build(kw)
    with torch.no_grad():
        _call(m, x[:, :, :8, :8].contiguous(), path, chunk)  # warm-up: libraries, kernels, thread pools
        base = _read_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
            f.write("5")
        out = _call(m, x, path, chunk)
        peak = _read_status("VmHWM")
    extra = peak - base - out.untyped_storage().nbytes()
    report = MemoryReport(path, "rss", kw["height"], kw["width"], m.d_inner, extra,
                          kw["batch"] * m.d_inner * kw["height"] * kw["width"] * 4)
    print(json.dumps(asdict(report)))
