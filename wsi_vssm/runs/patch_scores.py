"""The scores an `evaluate` of a patch folder has made so far, kept in `OUT/.patch_scores.jsonl` so that an
interrupted run resumes where it stopped (a 300,000-patch folder is about 20 minutes on 2 cores).

Line 1 names the format and the hash of what changes a patch's logit (the weights, the patch calibration, the
model's and the patches' resolution, precision, test-time augmentation, the package version); each later line is
one patch: its name, the digest of its file's bytes and its logit. Each batch's lines are appended and flushed
together, so a killed run loses at most the batch it was scoring; a line torn by the kill is cut off before the
next run appends. A score is reused only when both the name and the file's digest match (an image replaced under
its name is scored again); another hash, or `--overwrite`, starts the file anew. A run holds an exclusive lock on
the file while it scores, so a second run on the same folder stops at once instead of mixing its lines in.
The file sits beside metrics.json, not in `OUT/.state/`, which marks a folder of slide runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from wsi_vssm.errors import WsiVssmError

PATCH_SCORES = ".patch_scores.jsonl"
SCORES_FORMAT = "wsi-vssm-patch-scores/1"


class PatchFolderBusy(WsiVssmError):
    """Another run is scoring a patch folder into the same output folder."""

    exit_code = 4  # as a cohort whose slides another run holds: not done, not failed; rerun when it ends


class PatchScores:
    """The score file of one run, open and locked; `get` a kept logit, `add` a scored batch, then `close`."""

    def __init__(self, out: str | os.PathLike, params_hash: str, params: dict, fresh: bool = False):
        self.path = Path(out) / PATCH_SCORES
        self._file = open(self.path, "a+b")  # noqa: SIM115 (held open, and locked, for the whole run)
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise PatchFolderBusy(f"{Path(out)}: another evaluate is scoring patches into this folder; wait for it "
                                  "to finish (then run this again: it resumes) or give another --out") from None
        self.earlier: dict[str, tuple[int, float]] = {}  # name -> (digest, logit) from an earlier run
        header = {"format": SCORES_FORMAT, "params_hash": params_hash, "params": params}
        if fresh or not self._load(params_hash):
            self.earlier.clear()
            self._file.truncate(0)
            self._write([header])

    def _load(self, params_hash: str) -> bool:
        """Read an earlier run's scores when they were made with `params_hash`; cut a torn last line off."""
        self._file.seek(0)
        raw = self._file.read()
        if not raw:
            return False
        end = raw.rfind(b"\n") + 1
        if end < len(raw):  # the kill came mid-line: what follows the last whole line goes
            self._file.truncate(end)
        lines = raw[:end].splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except ValueError:
            return False
        if not isinstance(header, dict) or header.get("format") != SCORES_FORMAT or \
                header.get("params_hash") != params_hash:
            return False
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                self.earlier[entry["name"]] = (int(entry["digest"]), float(entry["logit"]))
            except (ValueError, KeyError, TypeError):  # a damaged line costs that patch a new score, nothing more
                continue
        return True

    def get(self, name: str, digest: int) -> float | None:
        """The logit an earlier run gave this very file (name and bytes), or None."""
        earlier = self.earlier.get(name)
        return earlier[1] if earlier is not None and earlier[0] == digest else None

    def add(self, scored: list[tuple[str, int, float]]) -> None:
        """Keep a batch's (name, digest, logit), on disk before the next batch is scored."""
        self._write([{"name": n, "digest": d, "logit": z} for n, d, z in scored])

    def _write(self, entries: list[dict]) -> None:
        self._file.seek(0, os.SEEK_END)
        self._file.write("".join(json.dumps(e) + "\n" for e in entries).encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()  # closing releases the lock

    def __enter__(self) -> PatchScores:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def kept_scores(out: str | os.PathLike) -> int | None:
    """How many patch scores an output folder keeps (an interrupted run's, or a finished one's), or None when it
    keeps none; for `info OUT`."""
    try:
        with open(Path(out) / PATCH_SCORES, "rb") as f:
            return max(0, sum(1 for line in f if line.endswith(b"\n")) - 1)
    except OSError:
        return None
