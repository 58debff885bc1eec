"""Which patches trained and which selected a model, kept in its file so that `evaluate` can say when a patch
folder holds them: a figure over them flatters the model.

A patch is known by a 64-bit BLAKE2b digest of its file's bytes, so the same image file is recognised wherever
it lies (inside the tar, extracted, copied, renamed); re-encoded pixels make another file and are not. The
record, `metadata["patch_fingerprints"]`, is `{"hash": HASH, "train": bytes, "select": bytes}`, each a sorted
run of little-endian uint64 digests (8 bytes a patch, about 12 once torch's pickle has stored them as text: the
default model's 20,158 distinct files added 242 KB to its file). A stage that trains
on from an earlier model keeps the earlier patches too: the record is the union over the model's stages.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

KEY = "patch_fingerprints"
HASH = "blake2b-64 of each patch file's bytes"
_DTYPE = np.dtype("<u8")


def patch_digests(ds) -> np.ndarray:
    """One uint64 digest of each patch file's bytes, in the dataset's order (`patches.PatchDataset`); kept on
    the dataset, as training checks its sets and then records them (a folder's files are read once)."""
    cached = getattr(ds, "_digests", None)  # None too for a dataset-like object that keeps none
    if cached is not None:
        return cached
    out = np.empty(len(ds.items), _DTYPE)
    seen = getattr(ds, "read_digests", None) or {}  # files the dataset hashed as it read them: not read again
    for i, it in enumerate(ds.items):
        if i in seen:
            out[i] = seen[i]
            continue
        out[i] = file_digest(it.data if it.data is not None else (ds.root / it.name).read_bytes())
    if hasattr(ds, "_digests"):
        ds._digests = out
    return out


def file_digest(raw: bytes) -> int:
    """A patch file's digest (`HASH`): the first 8 bytes of BLAKE2b over its bytes, little-endian."""
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def patch_record(train, select, previous: Mapping | None = None) -> dict:
    """The record of a model trained on `train` and selected on `select` (datasets or digest arrays), merged
    with `previous` (the initial model's record, when it has one of the same hash)."""
    record = {"hash": HASH}
    for part, ds in (("train", train), ("select", select)):
        digests = ds if isinstance(ds, np.ndarray) else patch_digests(ds)
        earlier = _part(previous, part)
        if earlier is not None:
            digests = np.concatenate([earlier, digests])
        record[part] = np.unique(digests.astype(_DTYPE)).tobytes()
    return record


def patches_seen(digests: np.ndarray, metadata: Mapping | None) -> dict | None:
    """How many of `digests` trained the model (`trained`), selected it (`selected`), or either (`either`),
    from its metadata's record; None when the model file keeps no record (older files, other trainers)."""
    train, select = recorded(metadata, "train"), recorded(metadata, "select")
    if train is None or select is None:
        return None
    in_train, in_select = np.isin(digests, train), np.isin(digests, select)
    return {"trained": int(in_train.sum()), "selected": int(in_select.sum()),
            "either": int((in_train | in_select).sum())}


def seen_parts(digests: np.ndarray, metadata: Mapping | None) -> list[str | None]:
    """Per digest, "trained" or "selected" (training wins where both) when the model's record holds it, else
    None (also for every digest when the file keeps no record)."""
    train, select = recorded(metadata, "train"), recorded(metadata, "select")
    if train is None or select is None:
        return [None] * len(digests)
    in_train, in_select = np.isin(digests, train), np.isin(digests, select)
    return ["trained" if t else "selected" if v else None for t, v in zip(in_train, in_select, strict=True)]


def repeated_patches(digests: np.ndarray, labels, names) -> dict | None:
    """Patches of one folder whose files are byte for byte another's (PCam repeats some images inside a split):
    each copy counts again in an AUC. `groups` of identical files, `repeats` (the copies beyond the first of
    each), `conflicting_labels` (groups filed under both labels) and one `example` group's names; None when
    every file is distinct."""
    digests, labels = np.asarray(digests), np.asarray(labels)
    _, inverse, counts = np.unique(digests, return_inverse=True, return_counts=True)
    repeated = np.flatnonzero(counts > 1)
    if not repeated.size:
        return None
    conflicting = [g for g in repeated if len(set(labels[inverse == g].tolist())) > 1]
    members = np.flatnonzero(inverse == (conflicting[0] if conflicting else repeated[0]))
    # one file of each label first, so that a conflicting example shows the conflict
    _, first_of_label = np.unique(labels[members], return_index=True)
    shown = list(members[np.sort(first_of_label)]) + [i for i in members if i not in members[first_of_label]]
    return {"groups": int(repeated.size), "repeats": int((counts[repeated] - 1).sum()),
            "conflicting_labels": len(conflicting), "example": [str(names[i]) for i in shown[:3]]}


def recorded(metadata: Mapping | None, part: str) -> np.ndarray | None:
    """The distinct digests of `part` ("train" or "select") a model's metadata records, or None."""
    return _part((metadata or {}).get(KEY), part)


def _part(record: Mapping | None, part: str) -> np.ndarray | None:
    if not isinstance(record, Mapping) or record.get("hash") != HASH or not isinstance(record.get(part), bytes):
        return None
    raw = record[part]
    return np.frombuffer(raw[: len(raw) // 8 * 8], _DTYPE)
