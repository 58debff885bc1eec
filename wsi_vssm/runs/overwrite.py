"""Where an interrupted `--overwrite` run resumes: a marker in OUT/.state records when it began, with which
parameters, over which slides, until a run has been through every one of those slides. Slides finished after
that start are kept by the rerun of the same command. One marker per set of slides: per-slide tasks of a
workflow manager sharing one OUT each keep their own."""

from __future__ import annotations

import hashlib
import json
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
    parameters over the same slides was interrupted, its start (slides it finished after that are kept)."""
    marker = overwrite_marker(job, slides)
    earlier = _read(marker) or _read(_old_marker(job))  # a marker of a version before 2026-12-07 names no slides
    same = earlier is not None and sorted(earlier.get("slides", slides)) == sorted(slides)
    if same and earlier.get("params_hash") == job.params_hash and earlier.get("since"):
        progress.info(f"going on with the --overwrite run begun {earlier['since']}: the slides it finished are kept")
        return str(earlier["since"])
    since = now()
    marker.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"since": since, "params_hash": job.params_hash, "slides": sorted(slides)})
    return since


def end_overwrite(job, slides: list[str]) -> None:
    """After a run that has been through every one of its `slides` (with --overwrite or without): each marker of
    an --overwrite run whose slides are all among them goes, so the next --overwrite redoes everything; the
    markers of runs over other slides stay for their own reruns."""
    done = set(slides)
    for marker in (_old_marker(job), *Path(job.out, STATE_DIR).glob(f"overwrite-run.{job.kind}.*")):
        earlier = _read(marker)
        if earlier is None or set(earlier.get("slides", ())) <= done:
            marker.unlink(missing_ok=True)


def _old_marker(job) -> Path:
    return Path(job.out) / STATE_DIR / f"overwrite-run.{job.kind}"


def _read(marker: Path) -> dict | None:
    try:
        earlier = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return earlier if isinstance(earlier, dict) else None
