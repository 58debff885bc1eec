"""The model-file format `wsi-vssm-model/1` and its one reader, the weights hash, and backbone loading.

A model file holds tensors and plain containers only, so it loads with torch.load(weights_only=True):
    {"format", "name", "backbone_config", "mil_config", "mpp", "stride", "token_px",
     "state_dict": {"backbone.*", "mil.*"}, "metadata": {...}}
`read_model_file` is the one reader (`slide_model.load_model` and `load_backbone` both use it); a bare
backbone needs no `mil_config`. MIL checkpoints of the MIL trainer have their own format, `MIL_FORMAT`.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from wsi_vssm.errors import UsageError
from wsi_vssm.models.checkpoint import CheckpointError, check_state_dict, read_checkpoint
from wsi_vssm.models.inputs import STRIDE

MODEL_FORMAT = "wsi-vssm-model/1"
MIL_FORMAT = "wsi-vssm-mil/1"  # the MIL trainer's checkpoints (wsi_vssm.training.mil.save_mil)
DEFAULT_MPP = 0.97  # PCam's ~10x: the analysis resolution of the default (registry) model
DEFAULT_TOKEN_PX = 32
REQUIRED = ("backbone_config", "mil_config", "mpp", "token_px", "state_dict")
DEFAULT_NAME = "default"  # names the packaged model wherever a model file is taken


def default_model_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("wsi_vssm") / "weights" / f"{DEFAULT_NAME}.pt"))


class ModelFileError(CheckpointError):
    """A model file that is missing, unreadable, or of another format or architecture. One line, names the file."""


@dataclass
class BackboneInfo:
    """What a feature store records about the backbone that made it."""

    model_id: str
    model_hash: str  # sha256 over the state dict (names, dtypes, shapes, bytes), see `state_dict_hash`
    mpp: float  # the resolution the model was trained at
    token_px: int
    trained: bool = True
    stride: int = STRIDE


def state_dict_hash(state_dict: Mapping) -> str:
    """sha256 over a state dict's sorted names, dtypes, shapes and bytes: the same weights, the same hash,
    whichever file (a bare backbone or a whole slide model) they came from. fp16 and bf16 tensors are hashed as
    the fp32 values every loader makes of them, so a half-precision file has one hash however it is read."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu")
        t = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        raw = t.view(torch.uint8) if t.dim() > 0 else t.reshape(1).view(torch.uint8)
        h.update(raw.numpy().tobytes())
    return h.hexdigest()



def load_backbone(model: str | os.PathLike):
    """A VSSM backbone (eval mode) and its `BackboneInfo` from a registry name, a model file, or "default" (the
    packaged model's backbone, as `load_model` takes it).

    A registry name (e.g. `micro`) gives seeded random weights (untrained: a warning says so) at DEFAULT_MPP.
    A file is read with torch.load(weights_only=True) and must hold {"format": "wsi-vssm-model/1",
    "backbone_config": {...VSSMConfig...}, "mpp": float, "token_px": int, "state_dict": {...}}; keys under
    `backbone.` are taken (a whole slide model also holds `mil.`), or all keys if none carries that prefix.
    """
    from wsi_vssm.models.registry import MODEL_CONFIGS

    if isinstance(model, str) and not model.strip():  # Path("") is "."
        raise ModelFileError(f"the model is empty ({model!r}): give a model file, {DEFAULT_NAME!r} or a config name")
    if isinstance(model, str) and model in MODEL_CONFIGS and not Path(model).exists():
        return _registry_backbone(model)
    if str(model) == DEFAULT_NAME and not Path(model).exists():
        return _file_backbone(default_model_path())
    return _file_backbone(Path(model))


def _registry_backbone(name: str):
    from wsi_vssm.models.registry import create_model

    warnings.warn(
        f"model {name!r} is a bare registry config with random (untrained) weights; its features carry no "
        "meaning beyond tests and demos. Pass a trained model file for real use.",
        stacklevel=3,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same random weights every run, so stores made with them agree (same hash)
        backbone = create_model(name, num_classes=0).eval()
    info = BackboneInfo(name, state_dict_hash(backbone.state_dict()), DEFAULT_MPP, DEFAULT_TOKEN_PX, False)
    return backbone, info


def _file_backbone(path: Path):
    from wsi_vssm.models.vssm import VSSM, VSSMConfig
    # the one model-file reader (weights_only=True, format, keys, tensors); a backbone needs no mil_config
    ckpt = read_model_file(path, required=("backbone_config", "mpp", "token_px", "state_dict"))
    sd = ckpt["state_dict"]
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    try:
        backbone = VSSM(VSSMConfig(**dict(ckpt["backbone_config"])))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad backbone_config: {e}") from e
    check_weights(backbone, sd, path)  # same architecture, finite values; sd stays as stored, for the hash
    backbone.load_state_dict(sd, strict=True)
    try:
        mpp, token_px = float(ckpt["mpp"]), int(ckpt["token_px"])
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: model file states an invalid mpp or token_px "
                              f"({ckpt['mpp']!r}, {ckpt['token_px']!r})") from None
    check_token_px(token_px)
    if not (math.isfinite(mpp) and mpp > 0):
        raise CheckpointError(f"{path}: model file states an invalid mpp {ckpt['mpp']!r}")
    model_id = str(ckpt.get("model_id") or ckpt.get("name") or path.stem)
    return backbone.eval(), BackboneInfo(model_id, state_dict_hash(sd), mpp, token_px, True)



def check_token_px(token_px: int) -> None:
    if not (isinstance(token_px, int) and token_px >= STRIDE and token_px % STRIDE == 0):
        raise UsageError(f"token_px must be a positive multiple of {STRIDE}, got {token_px!r}")



def read_model_file(path: str | os.PathLike, required: tuple[str, ...] = REQUIRED) -> dict:
    """The checkpoint dict of a `wsi-vssm-model/1` file, read by `read_checkpoint` (torch.load(weights_only=True)).

    The one reader of model files (`load_model` and `load_backbone` both use it): a folder, a missing or
    unreadable file, another format, a lacking `required` key or a state_dict that is not a mapping of tensors
    raise ModelFileError (one line, naming the file).
    """
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder, not a model file")
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as e:
        if getattr(e, "damaged", False):  # a model file all the same: say what is wrong with it
            raise ModelFileError(f"{path}: a model file {e.reason}") from e
        raise ModelFileError(f"{path}: not a wsi-vssm model file ({getattr(e, 'reason', e)})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != MODEL_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        hint = ("; it is a MIL head from `train mil`: attach it to a slide model first (docs/features.md)"
                if found == MIL_FORMAT else "")
        raise ModelFileError(f"{path}: not a wsi-vssm model file (format {found!r}, expected {MODEL_FORMAT!r})"
                             f"{hint}")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise ModelFileError(f"{path}: model file lacks {', '.join(missing)}")
    raw = ckpt["state_dict"]
    if not (isinstance(raw, Mapping) and all(isinstance(v, torch.Tensor) for v in raw.values())):
        raise ModelFileError(f"{path}: corrupt model file: its state_dict is not a mapping of tensors")
    return ckpt


def check_weights(model: nn.Module, sd: Mapping, path: Path) -> None:
    """ModelFileError (one line) unless `sd` fits `model`'s architecture exactly and holds only finite values."""
    check_architecture(model, sd, path)
    check_finite(sd, path)


def check_finite(sd: Mapping, path: Path) -> None:
    """ModelFileError (one line) when a tensor of `sd` holds NaN or inf."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # a damaged file: every feature and prediction would be NaN
        raise ModelFileError(f"{path}: corrupt model file: {len(bad)} tensor(s) hold NaN/inf values (first: {bad[0]})")


def check_architecture(model: nn.Module, sd: Mapping, path: Path) -> None:
    """Another architecture -> one line (the full listing stays on the chained CheckpointMismatchError)."""
    try:
        check_state_dict(model, sd, path)
    except CheckpointError as e:
        raise ModelFileError(str(e).splitlines()[0]) from e
