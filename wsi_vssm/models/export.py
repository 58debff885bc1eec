"""ONNX export of a VSSM backbone (its `forward_features`), checked against PyTorch with onnxruntime.

The step-loop and numba scans do not trace, so the exported graph uses the `chunked` scan (a parallel form that
is exact, see wsi_vssm/ops/scan.py) and the plain (non-streaming) SS2D path.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wsi_vssm.errors import MissingDependency, WsiVssmError


class ExportError(WsiVssmError):
    """The export failed or its check against PyTorch did not pass."""


class _Features(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):  # (B, 3, H, W) -> (B, 8C, H/32, W/32)
        return self.model.forward_features(x)


@dataclass
class ExportResult:
    path: Path
    size: int
    output_shape: tuple[int, ...]
    max_abs_diff: float | None  # onnxruntime vs PyTorch on one random input; None when not checked
    export_seconds: float


def build_backbone(model_name: str, checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """The named backbone set up for export: chunked scan, no streaming, eval mode, weights loaded if given."""
    from wsi_vssm.models import create_model, load_checkpoint

    model = create_model(model_name, scan="chunked", stream_min_pixels=None)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval()


def export_onnx(
    model: nn.Module, out: str | os.PathLike, size: int = 224, opset: int = 17, check: bool = True,
    atol: float = 1e-4, seed: int = 0,
) -> ExportResult:
    """Export `model.forward_features` for a (1, 3, size, size) input to `out` (written atomically) and, when
    `check`, compare onnxruntime's output with PyTorch's on a random input."""
    out = Path(out)
    if size < 32:
        raise ExportError(f"--size must be at least 32 px (one stride-32 cell), got {size}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, size, size, generator=gen)
    wrapper = _Features(model).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The trace fixes shapes by design (a fixed-size graph); its per-shape-check warnings are noise.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            ref = wrapper(x)
            torch.onnx.export(
                wrapper, (x,), tmp, input_names=["image"], output_names=["features"], opset_version=opset,
                dynamo=False,
            )
        seconds = time.perf_counter() - t0
        diff = _check_onnxruntime(tmp, x, ref) if check else None
        if diff is not None and diff > atol:
            raise ExportError(f"{out}: onnxruntime output differs from PyTorch by {diff:.2e} (> {atol:.0e})")
        os.replace(tmp, out)
    except WsiVssmError:
        raise
    except Exception as err:  # exporter errors are long and varied; keep the first line for the user
        raise ExportError(f"{out}: ONNX export failed: {str(err).splitlines()[0] if str(err) else err!r}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ExportResult(out, size, tuple(ref.shape), diff, seconds)


def _check_onnxruntime(path: str, x: torch.Tensor, ref: torch.Tensor) -> float:
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise MissingDependency("onnxruntime (to check the export)", 'pip install "wsi-vssm[onnx]"') from err
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"image": x.numpy()})
    return float(np.abs(got - ref.numpy()).max())
