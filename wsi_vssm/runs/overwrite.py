"""Where an interrupted `--overwrite` run resumes: a marker in OUT/.state records when it began, with which
parameters, over which slides, until a run has been through every one of those slides. Slides finished after
that start are kept by the rerun of the same command (also when its folder or list has gained slides since). One
marker per set of slides: per-slide tasks of a workflow manager sharing one OUT each keep their own."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from wsi_vssm.atomic import atomic_write_json
from wsi_vssm.progress import Progress
from wsi_vssm.runs.state import STATE_DIR, now


def overwrite_marker(job, slides: list[str]) -> Path:
    """`overwrite-run.<job>.<12 hex of the slide names>`: no state or lock file ends so (theirs end .json, .lock)."""
    key = hashlib.blake2b("\n".join(sorted(slides)).encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()
    return Path(job.out) / STATE_DIR / f"overwrite-run.{job.kind}.{key}"


def overwrite_since(job, progress: Progress, slides: list[str]) -> str:
    """When this --overwrite run over `slides` began: now, or, when an earlier --overwrite run with the same
    parameters over these slides or some of them was interrupted, its start (slides it finished after that are
    kept; with several, the earliest). The marker is then rewritten for this run's slides."""
    wanted = set(slides)
    earlier = [(m, rec) for m, rec in _markers(job)
               if rec.get("params_hash") == job.params_hash and set(rec.get("slides", wanted)) <= wanted]
    marker = overwrite_marker(job, slides)
    if earlier:
        since = min(str(rec["since"]) for _, rec in earlier)
        progress.info(f"going on with the --overwrite run begun {since}: the slides it finished are kept")
    else:
        since = now()
    marker.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"since": since, "params_hash": job.params_hash, "slides": sorted(slides)})
    for old, _ in earlier:  # taken over by this run's marker
        if old != marker:
            old.unlink(missing_ok=True)
    return since


def end_overwrite(job, slides: list[str]) -> None:
    """After a run that has been through every one of its `slides` (with --overwrite or without): each marker of
    an --overwrite run whose slides are all among them goes, so the next --overwrite redoes everything; the
    markers of runs over other slides stay for their own reruns."""
    done = set(slides)
    for marker, rec in _markers(job):
        if set(rec.get("slides", ())) <= done:
            marker.unlink(missing_ok=True)


def _markers(job) -> list[tuple[Path, dict]]:
    """The readable markers of this job's kind in OUT/.state: `overwrite-run.<kind>.<12 hex>`, and the one
    `overwrite-run.<kind>` of versions before 2026-12-07 (no slide list: it stands for any slides). A slide named
    `overwrite-run` has state and lock files that begin the same way: the exact pattern leaves them alone."""
    folder = Path(job.out) / STATE_DIR
    pattern = re.compile(rf"overwrite-run\.{re.escape(job.kind)}(\.[0-9a-f]{{12}})?")
    try:
        names = [p for p in folder.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return []
    found = []
    for marker in sorted(names):
        try:
            rec = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("since"):
            found.append((marker, rec))
    return found
