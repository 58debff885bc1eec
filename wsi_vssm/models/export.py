"""ONNX export of a VSSM backbone (its `forward_features`), checked against PyTorch with onnxruntime.

The step-loop and numba scans do not trace, so the exported graph uses the `chunked` scan (a parallel form that
is exact, see wsi_vssm/ops/scan.py) and the plain (non-streaming) SS2D path.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wsi_vssm.errors import MissingDependency, WsiVssmError, one_line
from wsi_vssm.models.inputs import IMAGE_MEAN, IMAGE_STD, STRIDE


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


# the fields that fix a backbone's weights; the others (scan, streaming, drop_path...) only change how it runs
ARCH_FIELDS = ("dims", "depths", "ssm_ratio", "d_state", "dt_rank", "mlp_ratio", "in_chans")


class ArchitectureMismatch(ExportError):
    """A model file whose backbone is not the architecture asked for."""


def build_backbone(model_name: str | None = "micro", checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """The named backbone set up for export: chunked scan, no streaming, eval mode, weights loaded if given.

    `checkpoint` is an upstream release checkpoint or state dict for `model_name` (loaded strictly), or one of
    this project's model files (`wsi-vssm-model/1`): then its backbone is taken with the architecture the file
    records, and `model_name` (None: whichever the file holds) must name that architecture.
    """
    from wsi_vssm.models import create_model
    from wsi_vssm.models.checkpoint import (
        CheckpointError,
        CheckpointMismatchError,
        load_checkpoint_object,
        read_checkpoint,
    )
    from wsi_vssm.models.model_file import MODEL_FORMAT

    obj = None if checkpoint is None else read_checkpoint(checkpoint)  # read once: release files are large
    if isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT:  # backbone keys prefixed `backbone.`
        return _model_file_backbone(checkpoint, model_name)
    model = create_model(model_name or "micro", scan="chunked", stream_min_pixels=None)
    if checkpoint is not None:
        try:
            load_checkpoint_object(model, obj, checkpoint)
        except CheckpointMismatchError as e:  # its listing runs to several lines: the CLI prints one
            raise CheckpointError(f"{str(e).splitlines()[0]} (a {model_name or 'micro'} backbone)") from e
    return model.eval()


def arch_name(cfg) -> str:
    """The registry name of a VSSMConfig's architecture (e.g. `micro`), or its dims and depths."""
    from wsi_vssm.models.registry import MODEL_CONFIGS, get_config

    for name in MODEL_CONFIGS:
        if _arch(get_config(name)) == _arch(cfg):
            return name
    return f"dims {list(cfg.dims)}, depths {list(cfg.depths)}"


def _arch(cfg) -> tuple:
    return tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in (getattr(cfg, f) for f in ARCH_FIELDS))


def _model_file_backbone(path, model_name: str | None) -> nn.Module:
    """A model file's backbone, rebuilt for export (chunked scan, no streaming) with the file's weights."""
    from wsi_vssm.models.model_file import load_backbone
    from wsi_vssm.models.registry import get_config
    from wsi_vssm.models.vssm import VSSM

    backbone, _ = load_backbone(Path(path))  # the one model-file reader: `backbone.` keys, config, checks
    cfg = backbone.config
    if model_name is not None and _arch(get_config(model_name)) != _arch(cfg):
        raise ArchitectureMismatch(f"{path} holds a {arch_name(cfg)} backbone, not {model_name}")
    model = VSSM(dataclasses.replace(cfg, scan="chunked", stream_min_pixels=None))
    model.load_state_dict(backbone.state_dict(), strict=True)
    return model.eval()


def export_onnx(
    model: nn.Module, out: str | os.PathLike, size: int = 224, opset: int = 17, check: bool = True,
    atol: float = 1e-4, seed: int = 0,
) -> ExportResult:
    """Export `model.forward_features` for a (1, 3, size, size) input to `out` (written atomically) and, when
    `check`, compare onnxruntime's output with PyTorch's on a random input."""
    out = Path(out)
    if size < STRIDE or size % STRIDE:  # any other side leaves a part-cell: features no longer one per 32 px
        raise ExportError(f"--size must be a multiple of {STRIDE} px, at least {STRIDE} (one stride-{STRIDE} cell), "
                          f"got {size}")
    import importlib.util

    if importlib.util.find_spec("onnx") is None:  # torch's own message ("Module onnx is not installed!") says less
        raise MissingDependency("onnx (to write ONNX)", 'pip install "wsi-vssm[onnx]"')
    check_opset(opset)
    gen = torch.Generator().manual_seed(seed)
    try:
        x = torch.randn(1, 3, size, size, generator=gen)
    except (MemoryError, RuntimeError) as err:  # torch's allocator: "can't allocate memory"
        raise ExportError(f"--size {size}: out of memory for a {size} x {size} input ({one_line(err, 100)}); "
                          "choose a smaller --size") from err
    wrapper = _Features(model).eval()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as err:  # named by the file asked for, not the temporary beside it
        raise ExportError(f"{out}: cannot write: {(err.strerror or str(err)).lower()}") from err
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
        _describe_input(tmp, size)
        diff = _check_onnxruntime(tmp, x, ref) if check else None
        if diff is not None and diff > atol:
            raise ExportError(f"{out}: onnxruntime output differs from PyTorch by {diff:.2e} (> {atol:.0e})")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; as every other output, readable by others
        os.replace(tmp, out)
    except WsiVssmError:
        raise
    except Exception as err:  # exporter errors are long and varied; keep the first line for the user
        raise ExportError(f"{out}: ONNX export failed: {str(err).splitlines()[0] if str(err) else err!r}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ExportResult(out, size, tuple(ref.shape), diff, seconds)


def max_opset() -> int | None:
    """The highest opset torch's TorchScript exporter writes (a private constant: None where it is gone)."""
    try:
        from torch.onnx import _constants
    except ImportError:
        return None
    return getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", None)


def check_opset(opset: int) -> None:
    """ExportError for an opset the exporter does not write: past its highest it fails only after printing its
    whole graph."""
    top = max_opset()
    if top is not None and not 17 <= opset <= top:
        raise ExportError(f"--opset {opset}: this PyTorch's exporter writes opsets 17 to {top}")


def input_metadata(size: int) -> dict[str, str]:
    """What the graph's input must be, stored in the .onnx file (metadata_props) so that a user of the file
    alone can prepare it: the file cannot be used without the normalisation."""
    return {
        "wsi_vssm.input": f"image: float32 1 x 3 x {size} x {size} (N, C, H, W), RGB scaled to [0, 1], then each "
                          "channel minus wsi_vssm.input_mean, divided by wsi_vssm.input_std",
        "wsi_vssm.input_mean": ",".join(f"{v:g}" for v in IMAGE_MEAN),
        "wsi_vssm.input_std": ",".join(f"{v:g}" for v in IMAGE_STD),
        "wsi_vssm.output": f"features: one vector per {STRIDE} x {STRIDE} input px (1 x 8C x S/{STRIDE} x S/{STRIDE})",
    }


def _describe_input(path: str, size: int) -> None:
    import onnx

    graph = onnx.load(path)
    for key, value in input_metadata(size).items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, path)


def _check_onnxruntime(path: str, x: torch.Tensor, ref: torch.Tensor) -> float:
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise MissingDependency("onnxruntime (to check the export)", 'pip install "wsi-vssm[onnx]"') from err
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"image": x.numpy()})
    return float(np.abs(got - ref.numpy()).max())
