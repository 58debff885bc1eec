"""The whole-slide model: a VSSM backbone plus the AttentionMIL head (with its per-cell tumour head), and the
model file that carries everything `predict` needs (configs, analysis mpp, token size, weights, metadata).

The file format and its one reader live in `models.model_file`.
`load_model("default")` reads the packaged weights (wsi_vssm/weights/default.pt).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from wsi_vssm.errors import is_real_number, printable
from wsi_vssm.models.checkpoint import CheckpointError, read_checkpoint
from wsi_vssm.models.inputs import STRIDE
from wsi_vssm.models.mil import AttentionMIL, MILConfig, MILEnsemble, make_mil
from wsi_vssm.models.model_file import (
    DEFAULT_NAME,
    MIL_FORMAT,
    MODEL_FORMAT,
    ModelFileError,
    check_architecture,
    check_finite,
    check_weights,
    default_model_path,
    read_model_file,
    state_dict_hash,
)
from wsi_vssm.models.vssm import VSSM, VSSMConfig

__all__ = ["SlideModel", "ModelFileError", "save_model", "load_model", "attach_mil", "resolve_model_path",
           "default_model_path", "read_model_file", "check_weights", "load_model_cached", "model_identity",
           "domain_text", "DEFAULT_NAME", "DEFAULT_DOMAIN"]
# What the default model and the shipped recipes train on; a model file may state its own `domain`.
DEFAULT_DOMAIN = "H&E-stained lymph-node sections (PCam / CAMELYON16 patches), about 0.97 um/px"
_CACHE: dict[str, SlideModel] = {}  # load_model_cached: resolved path and mtime -> model, per process
_CACHE_LOCK = threading.Lock()


class SlideModel(nn.Module):
    """backbone (VSSM, features only) + mil (AttentionMIL, or a MILEnsemble of them); `mpp`, `token_px`,
    `stride` and `name` travel with it."""

    def __init__(self, backbone: VSSM, mil: AttentionMIL | MILEnsemble, mpp: float = 0.97, token_px: int = 32,
                 name: str = "model"):
        super().__init__()
        if backbone.num_features != mil.config.in_dim:
            raise ModelFileError(
                f"MIL head expects {mil.config.in_dim}-wide features, backbone gives {backbone.num_features}"
            )
        self.backbone, self.mil = backbone, mil
        self.mpp, self.token_px, self.stride, self.name = float(mpp), int(token_px), STRIDE, str(name)

    @classmethod
    def create(cls, arch: str = "micro", mpp: float = 0.97, token_px: int = 32, name: str | None = None,
               mil: Mapping | None = None, **overrides) -> SlideModel:
        """A fresh model of the registry config `arch` (num_classes forced to 0) with a matching MIL head."""
        from wsi_vssm.models.registry import create_model

        backbone = create_model(arch, **{**overrides, "num_classes": 0})
        mil_cfg = MILConfig(**{**dict(mil or {}), "in_dim": backbone.num_features})
        return cls(backbone, make_mil(mil_cfg), mpp, token_px, name or arch)

    def cell_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised RGB -> (B, F, h, w) stride-32 token features."""
        return self.backbone.forward_features(x)

    def cell_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, h, w): the cell head's tumour logit at every stride-32 token."""
        return self.cell_logits_of_map(self.cell_features(x))

    def cell_logits_of_map(self, fmap: torch.Tensor) -> torch.Tensor:
        """(B, F, h, w) token features (e.g. a `--tta` mean map) -> (B, h, w) cell head logits."""
        return self.mil.cell_head(fmap.permute(0, 2, 3, 1)).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cell_logits(x)


# ---------------------------------------------------------------------------------------------------- files
def save_model(model: SlideModel, path: str | os.PathLike, metadata: Mapping | None = None,
               half: bool = False) -> Path:
    """Write the model file atomically (temp file beside it, then os.replace). `half`: fp16 weights."""
    from wsi_vssm.atomic import atomic_write_bytes

    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if half:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    ckpt = {
        "format": MODEL_FORMAT,
        "name": model.name,
        "backbone_config": _plain(model.backbone.config.to_dict()),
        "mil_config": model.mil.config.to_dict(),
        "mpp": model.mpp,
        "stride": model.stride,
        "token_px": model.token_px,
        "state_dict": sd,
        "metadata": _plain(dict(metadata or {})),
    }
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _plain(obj):
    """Tuples -> lists and other values -> str where needed: weights_only loading allows plain containers."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, str):
        return str.__str__(obj)  # exact str: subclasses such as torch.__version__ do not unpickle weights-only
    if obj is None or isinstance(obj, (bool, int, float, bytes)):  # bytes: the patch fingerprints
        return obj
    return str(obj)


def resolve_model_path(path_or_name: str | os.PathLike) -> Path:
    if isinstance(path_or_name, str) and not path_or_name.strip():  # Path("") is ".": "is a folder" said less
        raise ModelFileError(f"the model is empty ({path_or_name!r}): give a model file or {DEFAULT_NAME!r}")
    if str(path_or_name) == DEFAULT_NAME:
        return default_model_path()
    return Path(path_or_name)


def load_model(path_or_name: str | os.PathLike = DEFAULT_NAME, scan: str | None = None) -> SlideModel:
    """A SlideModel (eval mode) from a model file, or "default" for the packaged one. `scan` overrides the
    backbone's selective-scan implementation (e.g. "chunked")."""
    path = resolve_model_path(path_or_name)
    if str(path_or_name) == DEFAULT_NAME and not path.exists():
        raise ModelFileError(f"{path}: model file not found (the packaged default weights are missing from this "
                             "install)")
    ckpt = read_model_file(path)
    model = _build(ckpt, path, scan)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    check_finite(sd, path)  # its architecture was checked on the shell `_build` made
    model.load_state_dict(sd, strict=True)
    model.metadata = _checked_metadata(ckpt.get("metadata"), path)
    model.file_sha256 = _file_sha256(path)
    return model.eval()


# metadata values predict reads as numbers: probabilities, and a distance in cells
_PROBABILITIES = ("threshold", "slide_threshold", "cell_threshold", "lesion_extent_threshold")


def _checked_metadata(meta, path: Path) -> dict:
    """The file's metadata, its numbers checked here, naming the file: a bad threshold was a traceback, or a
    failure of every slide that blamed the slide."""
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise ModelFileError(f"{path}: its metadata is a {type(meta).__name__}, not a table of names and values")

    def number(v) -> bool:
        return is_real_number(v) and math.isfinite(v)

    for key in _PROBABILITIES:
        if key in meta and not (number(meta[key]) and 0 <= meta[key] <= 1):
            raise ModelFileError(f"{path}: its metadata {key} must be a probability in [0, 1], got {meta[key]!r}")
    key = "lesion_merge_distance_cells"
    if key in meta and not (number(meta[key]) and meta[key] >= 0):
        raise ModelFileError(f"{path}: its metadata {key} must be a number of cells >= 0, got {meta[key]!r}")
    return dict(meta)


def model_identity(model: SlideModel) -> dict:
    """What identifies a slide model in outputs (prediction.json `model`, docs/outputs.md):

    - `weights_hash`: `state_dict_hash` of every weight, whichever file holds them; a cohort run's state keys
      on it (the same weights re-saved under another name are the same model);
    - `sha256`: of the model file as loaded (None for a model built in memory), to check a download;
    - `domain`: one line on what the model was trained on (its metadata's `domain`, else the default's).
    """
    return {"weights_hash": state_dict_hash(model.state_dict()), "sha256": getattr(model, "file_sha256", None),
            "domain": domain_text(model)}


def domain_text(model: SlideModel) -> str:
    """One line on what `model` was trained on: its metadata's `domain`, else the default model's."""
    meta = getattr(model, "metadata", None) or {}
    return printable(str(meta.get("domain") or DEFAULT_DOMAIN))  # from the file: no terminal escapes


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_model_cached(path_or_name: str | os.PathLike = DEFAULT_NAME) -> SlideModel:
    """`load_model(path_or_name)`, loaded once per process for the same file (keyed by its resolved path and
    mtime, so an overwritten file is read again). Callers share the model: they must not change it."""
    path = resolve_model_path(path_or_name)
    try:
        key = f"{path.resolve()}@{path.stat().st_mtime_ns}"
    except OSError:
        key = str(path)  # load_model reports the missing file
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = load_model(path_or_name)
        return _CACHE[key]


MAX_BLOCKS = 512  # VSSM blocks a model file may state (upstream's largest has 33): more is no real model


def _build(ckpt: dict, path: Path, scan: str | None) -> SlideModel:
    try:
        bcfg = dict(ckpt["backbone_config"])
        if scan is not None:
            bcfg["scan"] = scan
        config, mil_config = VSSMConfig(**bcfg), MILConfig(**dict(ckpt["mil_config"]))
        if sum(config.depths) > MAX_BLOCKS:
            raise ValueError(f"{sum(config.depths)} blocks (depths {list(config.depths)}), more than {MAX_BLOCKS}")
        # shapes first, on torch's meta device (no memory): a file stating widths of 10^6 allocated terabytes,
        # or gigabytes before its state dict was compared
        with torch.device("meta"):
            shell = SlideModel(VSSM(config), make_mil(mil_config), 1.0, STRIDE, "shell")
        check_architecture(shell, ckpt["state_dict"], path)
        backbone, mil = VSSM(config), make_mil(mil_config)
        mpp, token_px = float(ckpt["mpp"]), int(ckpt["token_px"])
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: bad model config: {str(e).splitlines()[0]}") from e
    if int(ckpt.get("stride", STRIDE)) != STRIDE:
        raise ModelFileError(f"{path}: stride {ckpt['stride']} is not supported (expected {STRIDE})")
    if not (math.isfinite(mpp) and mpp > 0) or token_px < STRIDE or token_px % STRIDE:
        raise ModelFileError(f"{path}: invalid mpp {mpp!r} or token_px {token_px!r} (a multiple of {STRIDE})")
    if backbone.num_features != mil.config.in_dim:
        raise ModelFileError(f"{path}: MIL in_dim {mil.config.in_dim} != backbone width {backbone.num_features}")
    return SlideModel(backbone, mil, mpp, token_px, printable(str(ckpt.get("name") or path.stem)))


def attach_mil(model: SlideModel, path: str | os.PathLike) -> SlideModel:
    """Replace the MIL head's weights by those of a MIL checkpoint (`wsi-vssm-mil/1`, from the MIL trainer).

    The cell head stays the model's unless the MIL trainer trained one (`train_cell_head`): a frozen head in
    the checkpoint is either this one or a random one (`train mil` without `--model`), never better. The
    checkpoint's features must have been made by this model's backbone (its `metadata.features.model_hash`),
    else the head would score features it never saw. Every other key and shape must match the model's MIL
    head. Returns `model` (changed in place).
    """
    path = Path(path)
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as e:
        raise ModelFileError(str(e)) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != MIL_FORMAT or "state_dict" not in ckpt:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ModelFileError(f"{path}: not a wsi-vssm MIL checkpoint (format {found!r}, expected {MIL_FORMAT!r})")
    meta = ckpt.get("metadata") if isinstance(ckpt.get("metadata"), Mapping) else {}
    if meta.get("training_incomplete"):
        warnings.warn(f"{path}: an unfinished MIL training run's best head so far (it stopped after epoch "
                      f"{meta.get('epochs')}, best {meta.get('best_epoch')}): train it in full before trusting it",
                      stacklevel=2)
    cfg = dict(ckpt.get("mil_config") or {})
    if cfg and cfg.get("in_dim") != model.mil.config.in_dim:
        raise ModelFileError(f"{path}: MIL in_dim {cfg.get('in_dim')} != backbone width {model.mil.config.in_dim}")
    raw = ckpt["state_dict"]
    if not (isinstance(raw, Mapping) and all(isinstance(v, torch.Tensor) for v in raw.values())):
        raise ModelFileError(f"{path}: the MIL checkpoint's state_dict is not a mapping of tensors")
    made_with = (meta.get("features") or {}).get("model_hash")
    own_hash = state_dict_hash(model.backbone.state_dict())
    if made_with and made_with != own_hash:
        raise ModelFileError(f"{path}: its MIL head was trained on features of another backbone ({made_with[:12]}) "
                             f"than this model's ({own_hash[:12]}); extract the features with this model")
    trained_cells = bool((meta.get("train_config") or {}).get("train_cell_head"))
    sd = {k: v.float() for k, v in raw.items() if trained_cells or not k.startswith("cell_head.")}
    try:
        new_cfg = MILConfig(**cfg) if cfg else None
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: bad mil_config: {e}") from None
    if new_cfg is not None and new_cfg != model.mil.config:
        old_head = model.mil.cell_head.state_dict()
        model.mil = make_mil(new_cfg)  # other hidden sizes or members: a head of the checkpoint's shape
        model.mil.cell_head.load_state_dict(old_head)
    own = model.mil.state_dict()
    keep = {k: v for k, v in own.items() if k.startswith("cell_head.") and k not in sd}
    check_architecture(model.mil, {**sd, **keep}, path)
    model.mil.load_state_dict({**sd, **keep}, strict=True)
    return model

