"""Per-epoch training checkpoints shared by the trainers that resume (`train cells`, the recipe's cells, context
and dense stages): the trainer's own state plus what a resumed run needs to go on as the uninterrupted one
would (torch's and numpy's global random states: stochastic depth draws from torch's), and the config it was
made with, so that a resume with other data, seed or learning rate is refused instead of mixing two runs.

A checkpoint that exists when a run starts without `resume` stops it with one line (finished epochs are never
thrown away silently); one that cannot be read is one line naming it.
"""

from __future__ import annotations

import filecmp
import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from wsi_vssm.errors import UsageError, one_line
from wsi_vssm.models.checkpoint import CheckpointError, check_crc, check_inflation

FORMAT = "wsi-vssm-training-checkpoint/1"


def refuse_unless_resuming(path: Path, resume: bool, how: str) -> None:
    """One line when `path` exists and the run does not resume: `how` says how to continue it."""
    if path.exists() and not resume:
        raise UsageError(f"{path} exists: a run's last finished epoch; continue it with {how}, or remove it to "
                         "start over")


def refuse_resuming_a_finished_model(out: Path, ckpt: Path, resume: bool) -> None:
    """`--resume` with no checkpoint beside a finished model (its metadata lacks `training_incomplete`) retrained
    from scratch over it: refused. An unfinished one, or none, starts from the first epoch as before."""
    if not (resume and not ckpt.exists() and out.is_file()):
        return
    from wsi_vssm.errors import WsiVssmError
    from wsi_vssm.models.slide_model import load_model

    try:
        finished = not load_model(out).metadata.get("training_incomplete")
    except WsiVssmError:  # not a model file: not a finished run either
        return
    if finished:
        raise UsageError(f"{out} is a finished model (no checkpoint {ckpt} is left to resume): nothing to resume; "
                         "to train again, remove it or give another --out")


def save_checkpoint(path: Path, state: dict, config: dict) -> None:
    """`state` (state dicts, counters, the log...) with the global random states and `config`, atomically."""
    from wsi_vssm.atomic import atomic_write_bytes

    buf = io.BytesIO()
    torch.save({"format": FORMAT, "config": config, "torch_rng": torch.get_rng_state(),
                "numpy_rng": np.random.get_state(), **state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def peek_checkpoint(path: Path) -> dict:
    """A checkpoint's contents as saved, to look at (`info RUN`): no settings checked, no random state restored.
    Guarded as when resumed (inflation, weights only); raises CheckpointError or whatever torch.load raises."""
    check_inflation(path)
    ck = _load_weights_only(path)
    if not isinstance(ck, dict):
        raise ValueError("not a dict of training state")
    return ck


def _load_weights_only(path: Path):
    """torch.load with tensors, plain values and the numpy types the logs hold: a file planted under the
    checkpoint's name must not run code when read."""
    with torch.serialization.safe_globals(_numpy_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path: Path, config: dict, may_change: tuple[str, ...] = ()) -> dict:
    """The state `save_checkpoint` wrote, with the global random states restored. UsageError (one line) when the
    file cannot be read, or when `config` differs from the checkpoint's in a key not in `may_change`."""
    import pickle

    try:  # a member compressed to inflate to gigabytes: refused from the zip's directory
        check_inflation(path)
    except CheckpointError as err:
        raise UsageError(f"{path}: not a training checkpoint ({err.reason}); remove it to start over") from None
    try:
        ck = _load_weights_only(path)
    except (OSError, EOFError, RuntimeError, ValueError, TypeError, AttributeError, ImportError,
            pickle.UnpicklingError) as err:
        if isinstance(err, pickle.UnpicklingError):  # torch's message is a page on weights_only
            raise UsageError(f"{path}: not a training checkpoint (it holds something other than tensors and plain "
                             "values, or is damaged); remove it to start over") from None
        raise UsageError(f"{path}: cannot read this training checkpoint ({type(err).__name__}: "
                         f"{one_line(err, 160)}); remove it to start over") from err
    try:  # torch.load ignores the zip's checksums: a damaged checkpoint resumed with altered weights
        check_crc(path)
    except CheckpointError as err:
        raise UsageError(f"{path}: this training checkpoint is {err.reason.split(':')[0]}; remove it to start "
                         "over") from None
    if isinstance(ck, dict) and "format" not in ck and {"model", "opt", "state"} <= set(ck):
        # a dense checkpoint of an earlier version (before 2026-12-04): resumable, but it recorded neither the
        # settings nor the random states, so neither can be checked or restored
        warnings.warn(f"{path}: an earlier version's checkpoint: its settings are not checked and its random "
                      "state is not restored, so the resumed run may differ from an uninterrupted one", stacklevel=2)
        return ck
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise UsageError(f"{path}: not a wsi-vssm training checkpoint of this version; remove it to start over")
    before = ck["config"]
    was_digests, now_digests = (d.get(DIGESTS_KEY) if isinstance(d.get(DIGESTS_KEY), dict) else {}
                                for d in (before, config))
    changed = sorted(k for k in (set(config) | set(before)) - {DIGESTS_KEY}
                     if k not in may_change and not _same_setting(k, config.get(k), before.get(k),
                                                                 was_digests.get(k), now_digests.get(k)))
    if changed:
        was = ", ".join(f"{k}={before.get(k)!r} (now {config.get(k)!r}{_file_said(k, config.get(k))})"
                        for k in changed[:4])
        was += f" and {len(changed) - 4} more ({', '.join(changed[4:])})" if len(changed) > 4 else ""
        shown = [k for k in may_change if k != "resume"]
        allowed = f" (only {', '.join(shown)} may change)" if shown else ""
        raise UsageError(f"{path} was made with other settings: {was}{allowed}; resume with the same ones, or "
                         "remove it to start over")
    torch.set_rng_state(ck["torch_rng"])
    np.random.set_state(ck["numpy_rng"])
    return ck


def _numpy_globals() -> list:
    """What a checkpoint's numpy values unpickle through (the random state's array, numpy scalars in logs): array
    and scalar reconstruction and dtypes, none of which runs code."""
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed numpy.core
    dtypes = {type(np.dtype(t)) for t in (np.uint32, np.int64, np.int32, np.float64, np.float32, np.bool_)}
    return [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype, *dtypes]


FILE_KEYS = ("init",)  # settings that name a start file: the same contents are the same setting
DIGESTS_KEY = "file_digests"  # in a run's config: the sha256 of each start file, taken when the run starts


def with_start_digests(config: dict, output=None) -> dict:
    """`config` and, under DIGESTS_KEY, the sha256 of each start file it names (FILE_KEYS), taken now, when the
    run starts: its checkpoints record the file as it was then, wherever the run folder goes later, and a resume
    compares the file as it is when the resumed run starts. A start file that is the run's `output` (a model
    fine-tuned in place, rewritten by the run itself) is compared by path only."""
    digests = {k: d for k in FILE_KEYS
               if not (output is not None and config.get(k) and _same_file(config[k], output))
               and (d := _digest(config.get(k))) is not None}
    return {**config, DIGESTS_KEY: digests}


def _same_file(a, b) -> bool:
    """Whether two paths name one file (the same path spelt two ways, or links to it)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, TypeError, ValueError):  # one of them is missing: the same only if spelt the same
        return bool(a) and bool(b) and os.path.abspath(a) == os.path.abspath(b)


def _digest(path) -> str | None:
    """The sha256 of a file, or None when there is none to read (not a path, missing, a folder, unreadable)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        return None
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def _same_setting(key: str, now, was, digest_was: str | None = None, digest_now: str | None = None) -> bool:
    """Whether a setting is unchanged. A start file (FILE_KEYS) is the same when its contents are: by the sha256
    the run recorded when it started (so a run folder that was copied to branch an experiment, or moved, still
    resumes; its stages start from OUT/context.pt and the like, so every checkpoint names the folder it was made
    in, and a start file made again since is refused even at the same path); for checkpoints without the digest
    (older ones, or a file the run rewrites itself), by path, or by comparing the two files byte for byte."""
    now, was = _plain(now), _plain(was)
    if key in FILE_KEYS and digest_was:
        return (digest_now or _digest(now)) == digest_was
    if now == was:
        return True
    if key not in FILE_KEYS or not (isinstance(now, str) and isinstance(was, str) and now and was):
        return False
    try:
        return filecmp.cmp(now, was, shallow=False)
    except OSError:  # the recorded file is gone (a moved folder): the setting cannot be shown to be the same
        return False


def _file_said(key: str, now) -> str:
    """What a refusal adds for a start file that differs: whether it is missing or another file."""
    if key not in FILE_KEYS or not isinstance(now, str) or not now:
        return ""
    return ": no such file" if not os.path.exists(now) else ": not the file it started from"


def _plain(value):
    """Compare lists and tuples alike (a config read back from TOML or JSON has lists), paths as strings."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def stamped(metadata: dict) -> dict:
    """`metadata` with `date` (now, UTC), `package_version`, and `torch_threads` and `machine`: when, by what and
    where the file was made. Each training stage stamps its own file (before 2026-12-04 only the first stage did,
    so a model finished days later showed its first stage's date). A seed reproduces the weights only at the same
    thread count on the same kind of CPU: reductions sum in another order."""
    import platform
    from datetime import UTC, datetime

    from wsi_vssm import __version__

    return {**metadata, "date": datetime.now(UTC).isoformat(timespec="seconds"), "package_version": __version__,
            "torch_threads": torch.get_num_threads(), "machine": _cpu_name() or platform.machine()}


def _cpu_name() -> str | None:
    """The CPU's model name (Linux's /proc/cpuinfo), or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None
