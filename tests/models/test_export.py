"""ONNX export of the backbone, checked against PyTorch with onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from wsi_vssm.cli import main  # noqa: E402
from wsi_vssm.models.export import ExportError, build_backbone, export_onnx  # noqa: E402


def test_export_matches_pytorch_on_a_new_input(tmp_path):
    import onnxruntime as ort

    model = build_backbone("micro")
    res = export_onnx(model, tmp_path / "micro.onnx", size=64)
    assert res.path.exists() and res.max_abs_diff is not None and res.max_abs_diff < 1e-4
    assert res.output_shape == (1, 256, 2, 2)
    # a second input the export never saw: the graph is not specialised to the traced values
    x = torch.rand(1, 3, 64, 64) * 4 - 2
    with torch.no_grad():
        ref = model.forward_features(x).numpy()
    (got,) = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert not list(tmp_path.glob(".*.tmp")), "temporary file left behind"


def test_export_says_in_the_file_how_to_prepare_the_input(tmp_path):
    """The .onnx file held no word of its input's normalisation: a user of the file alone fed it raw pixels."""
    import onnxruntime as ort

    from wsi_vssm.models.inputs import to_tensor

    path = export_onnx(build_backbone("micro"), tmp_path / "m.onnx", size=64, check=False).path
    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert "1 x 3 x 64 x 64" in meta["wsi_vssm.input"]
    mean = np.array([float(v) for v in meta["wsi_vssm.input_mean"].split(",")])
    std = np.array([float(v) for v in meta["wsi_vssm.input_std"].split(",")])
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    from_meta = (rgb.transpose(2, 0, 1)[None] / 255.0 - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(from_meta, to_tensor(rgb).numpy(), atol=1e-6)  # what the model was trained on


def test_export_rejects_a_size_below_one_cell(tmp_path):
    with pytest.raises(ExportError, match="at least 32"):
        export_onnx(build_backbone("micro"), tmp_path / "x.onnx", size=16)


def test_cli_export_unknown_model_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", "--model", "huge", "--onnx", str(tmp_path / "x.onnx")])
    assert exc.value.code == 2  # an option value: a usage error
    err = capsys.readouterr().err.strip()
    assert "unknown model 'huge'" in err and "\n" not in err and "Traceback" not in err


def test_an_opset_the_exporter_cannot_write_is_refused_before_exporting(tmp_path, capsys):
    """--opset 99 passed the option's check, then the exporter printed its whole graph (1,213 lines) before
    failing."""
    from wsi_vssm.models.export import max_opset

    top = max_opset()
    if top is None:
        pytest.skip("this torch no longer names its exporter's highest opset")
    with pytest.raises(SystemExit) as exc:
        main(["export", "--opset", str(top + 1), "--size", "32", "--onnx", str(tmp_path / "x.onnx")])
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and out == "" and f"writes opsets 17 to {top}" in err and err.count("\n") == 1
    with pytest.raises(ExportError, match=f"opsets 17 to {top}"):
        export_onnx(build_backbone("micro"), tmp_path / "x.onnx", size=32, opset=99)
    assert not (tmp_path / "x.onnx").exists()


def test_a_size_too_large_for_memory_is_one_line(tmp_path, monkeypatch):
    """--size 100000 was a traceback from torch's allocator (120 GB for the example input alone)."""
    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 120000000000 bytes.")

    monkeypatch.setattr(torch, "randn", no_memory)
    with pytest.raises(ExportError, match="--size 100000: out of memory .*choose a smaller --size"):
        export_onnx(build_backbone("micro"), tmp_path / "x.onnx", size=100000, check=False)


def test_an_unwritable_target_is_named_not_its_temporary(tmp_path, monkeypatch):
    import errno
    import tempfile

    def refused(*args, dir=None, prefix="", suffix="", **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/{prefix}89jq1vzq{suffix}")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(ExportError, match=r"x\.onnx: cannot write: permission denied$"):
        export_onnx(build_backbone("micro"), tmp_path / "x.onnx", size=32, check=False)


def test_without_onnx_the_error_says_what_to_install(tmp_path, monkeypatch):
    """torch said only "Module onnx is not installed!"; the error now names the extra that brings it."""
    import importlib.util

    from wsi_vssm.errors import MissingDependency

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else find_spec(name, *a))
    with pytest.raises(MissingDependency, match=r'onnx \(to write ONNX\) is not installed.*wsi-vssm\[onnx\]'):
        export_onnx(build_backbone("micro"), tmp_path / "m.onnx", size=32)
    assert not list(tmp_path.iterdir())
