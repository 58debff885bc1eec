"""Loading VSSM weights: upstream VMamba release checkpoints (`{"model": state_dict, ...}`) or bare state dicts,
with upstream's legacy names renamed, strictly (every tensor present, nothing extra, every shape equal).

Files are read with `torch.load(weights_only=True)`: no code from the file runs. Upstream's training checkpoints
also pickle their yacs config object; such non-tensor objects are rebuilt as inert dicts, never imported.
"""

from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from wsi_vssm.errors import WsiVssmError, one_line

# Upstream renames these on load (older checkpoints). Applied in order, on whole dotted-name components.
LEGACY_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^patch_embed\.proj\.", "patch_embed.0."),
    (r"^patch_embed\.norm\.", "patch_embed.2."),
    (r"^(layers\.\d+\.blocks\.\d+)\.ln_1\.", r"\1.norm."),
    (r"^(layers\.\d+\.blocks\.\d+)\.self_attention\.", r"\1.op."),
    (r"^norm\.", "classifier.norm."),
    (r"^head\.", "classifier.head."),
)
_STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")
_LIST_LIMIT = 20  # names shown per list in an error message


class CheckpointError(WsiVssmError):
    """A checkpoint file that cannot be read, or holds no state dict."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors do not match the model; `missing`, `unexpected`, `shape_mismatches` list them."""

    def __init__(self, path, missing: list[str], unexpected: list[str], shape_mismatches: list[tuple]):
        self.path, self.missing, self.unexpected = str(path), missing, unexpected
        self.shape_mismatches = shape_mismatches  # (name, checkpoint shape, model shape)
        summary = (
            f"checkpoint {path} does not match the model: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(shape_mismatches)} with another shape"
        )
        lines = [summary]
        lines += _listing("missing", missing)
        lines += _listing("unexpected", unexpected)
        lines += _listing(
            "shape mismatch", [f"{n}: checkpoint {tuple(a)} vs model {tuple(b)}" for n, a, b in shape_mismatches]
        )
        super().__init__("\n".join(lines))


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    shown = items[:_LIST_LIMIT]
    more = f" ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return [f"  {title}: {', '.join(shown)}{more}"]


def remap_legacy_keys(state_dict: Mapping[str, torch.Tensor]) -> OrderedDict:
    """Rename upstream's legacy names (and a DDP `module.` prefix) to the current ones."""
    items = list(state_dict.items())
    if items and all(k.startswith("module.") for k, _ in items):
        items = [(k[len("module."):], v) for k, v in items]
    out = OrderedDict()
    for key, value in items:
        for pattern, repl in LEGACY_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _inert_class(full_name: str) -> type:
    """A stand-in for a pickled class: whatever the file builds with it becomes a plain OrderedDict."""
    module, _, name = full_name.rpartition(".")
    namespace = {"__new__": staticmethod(lambda cls, *a, **k: OrderedDict()), "__module__": module}
    return type(name, (), {**namespace, "__qualname__": name})


def read_checkpoint(path: str | Path) -> dict:
    """torch.load(weights_only=True) the file; unknown pickled classes become inert dicts. One-line errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    check_inflation(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as first:
        try:  # e.g. upstream's yacs CfgNode: allow only inert stand-ins for the classes the file names
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            with torch.serialization.safe_globals([(_inert_class(n), n) for n in names]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise _unreadable(path, first) from first
    except Exception as e:  # truncated zip, not a torch file, ...
        raise _unreadable(path, e) from e
    check_crc(path)
    return obj


MAX_INFLATED = 256 * 2**20  # torch writes its members stored, not compressed: a compressed member this large is a bomb


def check_inflation(path: Path) -> None:
    """torch.save stores a file's members uncompressed; a member compressed to inflate past MAX_INFLATED (a
    15 MB file holding a 2e9-float tensor of deflated zeros took 74 s and 8 GB to load, an unreferenced 4 GiB
    member 10 s of `testzip`) is refused from the zip's directory, before anything is inflated."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            bomb = next((i for i in z.infolist() if i.compress_type != zipfile.ZIP_STORED
                         and i.file_size > MAX_INFLATED), None)
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise _unreadable(path, e) from e
    if bomb is not None:
        reason = (f"{bomb.filename} inflates from {bomb.compress_size:,} to {bomb.file_size:,} bytes (torch stores "
                  "its members uncompressed): not a file torch.save wrote")
        e = CheckpointError(f"cannot read checkpoint {path}: {reason}")
        e.reason = reason
        raise e


def check_crc(path: Path) -> None:
    """torch.load does not check the zip's CRCs: a file damaged in copy or storage loaded with altered weights and
    predicted without a word. Every member is read back against its checksum (a fraction of a second for a
    backbone; legacy, non-zip files have none)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise _unreadable(path, e) from e
    if bad is not None:
        reason = f"damaged ({bad} fails its checksum): copy it again"
        e = CheckpointError(f"cannot read checkpoint {path}: {reason}")
        e.reason, e.damaged = reason, True
        raise e


def _unreadable(path: Path, err: BaseException) -> CheckpointError:
    """A one-line CheckpointError with a short reason in `.reason`. torch's own text is not passed on: it
    suggests weights_only=False, an unsafe load that must never be offered for a file of unknown origin."""
    text = str(err)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        head = b""
    if head not in (b"PK", b"\x80\x02") and not head.startswith(b"\x80"):  # zip (torch >= 1.6) or a pickle
        reason = "not a torch checkpoint"
    elif isinstance(err, pickle.UnpicklingError) or "weights_only" in text:
        reason = "its pickled content is not plain tensors and containers"
    elif "zip archive" in text or "PytorchStreamReader" in text or "central directory" in text:
        reason = "not a torch checkpoint, or truncated"
    elif isinstance(err, EOFError):
        reason = "truncated"
    elif head == b"PK" and isinstance(err, OSError):  # a zip torch could not seek or read in (seen: Errno 22)
        reason = f"a torch checkpoint that cannot be read: damaged or truncated ({one_line(err, 80)})"
    else:
        reason = f"{type(err).__name__}: {one_line(err, 120)}"
    e = CheckpointError(f"cannot read checkpoint {path}: {reason}")
    e.reason = reason
    return e



def extract_state_dict(obj, path: str | Path = "<checkpoint>") -> OrderedDict:
    """The tensors of a checkpoint: its `model` (or `state_dict`) entry, or the dict itself if bare."""
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"checkpoint {path} holds no state dict (expected a dict of tensors, or one under "
            f"{' / '.join(repr(k) for k in _STATE_DICT_KEYS)})"
        )
    return OrderedDict(obj)


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path="<checkpoint>") -> None:
    """Raise CheckpointMismatchError unless names and shapes equal the model's exactly."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(path, missing, unexpected, shapes)


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an upstream release checkpoint or a state dict into `model`, strictly. Returns the model.

    Accepts `{"model": sd, ...}` (upstream), `{"state_dict": sd}` or a bare `sd`; legacy names are renamed as
    upstream does. Any missing, unexpected or differently shaped tensor raises CheckpointMismatchError.
    """
    return load_checkpoint_object(model, read_checkpoint(path), path)


def load_checkpoint_object(model: nn.Module, obj, path: str | Path = "<checkpoint>") -> nn.Module:
    """`load_checkpoint` of a checkpoint already read (`read_checkpoint`), e.g. after a look at its format."""
    state_dict = remap_legacy_keys(extract_state_dict(obj, path))
    check_state_dict(model, state_dict, path)
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(state_dict, strict=True, assign=on_meta)  # a meta-built model takes the tensors
    return model
