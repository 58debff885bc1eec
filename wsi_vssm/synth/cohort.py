"""Slides and cohorts: the public entry points `write_slide` and `make_cohort`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi_vssm.errors import UsageError

MIN_SIZE = 1024  # px: below this the tissue pieces are too small to hold even a micro-metastasis
MAX_SIZE = 400_000


class SynthError(UsageError):
    """A synthetic slide or cohort cannot be written as asked (bad arguments, unwritable output)."""


@dataclass(frozen=True)
class SlideRecord:
    name: str  # file name without extension, as in reference.csv
    label: str  # 'tumor' or 'normal'
    path: Path
    lesions: list[np.ndarray] = field(default_factory=list)  # (n, 2) polygons, level-0 px


def _check(size: int, mpp: float) -> None:
    if not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise SynthError(f"slide size must be a whole number of px from {MIN_SIZE} to {MAX_SIZE}, got {size!r}")
    if not (isinstance(mpp, (int, float)) and 0.05 <= mpp <= 20):
        raise SynthError(f"mpp must be between 0.05 and 20 um per px, got {mpp!r}")


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise SynthError(f"cannot write {path}: {e.strerror or e}") from e


def default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus))


def write_slide(
    path: str | os.PathLike,
    size: int = 20_000,
    mpp: float = 0.5,
    seed: int = 0,
    tumor: bool = False,
    *,
    workers: int | None = None,
    quality: int = 85,
    progress: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Write one synthetic H&E slide (size x size px at `mpp`) and return its lesion polygons (level-0 px).

    Same arguments, same bytes. Written to a temporary name in the same folder, then renamed.
    """
    from wsi_vssm.synth.layout import make_layout

    _check(size, mpp)
    layout = make_layout(size, mpp, seed, tumor)
    write_layout(path, layout, "tumor" if tumor else "normal", workers=workers, quality=quality, progress=progress)
    return layout.lesion_polygons()


def write_layout(
    path: str | os.PathLike,
    layout,
    label: str,
    *,
    workers: int | None = None,
    quality: int = 85,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Render a `layout.Layout` to a pyramidal TIFF at `path`, atomically; `label` goes in its description."""
    from wsi_vssm.synth.tissue import render_tile

    if not 1 <= quality <= 100:
        raise SynthError(f"JPEG quality must be 1 to 100, got {quality}")
    size, mpp = layout.size, layout.mpp
    desc = f"wsi-vssm synthetic H&E slide; seed={layout.seed}; label={label}; mpp={mpp}"
    write_pyramid_atomic(
        Path(path), (size, size), lambda x, y: render_tile(layout, x, y), mpp,
        workers=workers or default_workers(), quality=quality, description=desc, progress=progress,
    )  # fmt: skip


def write_pyramid_atomic(path: str | os.PathLike, size: tuple[int, int], render, mpp: float, **kwargs) -> None:
    """`writer.write_pyramid` to a temporary name in the same folder, then renamed into place; SynthError on
    failure, and no temporary file left behind."""
    from wsi_vssm.synth.writer import write_pyramid

    path = Path(path)
    tmp = _tmp_name(path)
    try:
        write_pyramid(tmp, size, render, mpp, **kwargs)
        os.replace(tmp, path)
    except OSError as e:
        raise SynthError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def slide_seed(seed: int, label: str, index: int) -> int:
    """Each slide's own seed, from the cohort seed, its label and its number."""
    return int(np.random.SeedSequence([int(seed), label == "tumor", int(index)]).generate_state(1)[0])


def cohort_plan(n_slides: int) -> list[tuple[str, str]]:
    """(name, label) of every slide: half of them (rounded down) tumour, the rest normal."""
    n_tumor = n_slides // 2
    normal = [(f"normal_{i:03d}", "normal") for i in range(1, n_slides - n_tumor + 1)]
    return normal + [(f"tumor_{i:03d}", "tumor") for i in range(1, n_tumor + 1)]


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SynthError(f"output {out} exists and is not a folder")
    try:
        (out / "annotations").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SynthError(f"cannot create output folder {out}: {e.strerror or e}") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise SynthError(f"output folder {out} is not writable")


def refuse_another_cohort(out: Path, names: list[str]) -> None:
    """SynthError when `out` already holds slides this cohort would not write, listed in its reference.csv (read
    as `evaluate` reads it, whatever its header, quoting or case) or lying in it as slide files: they would stay
    beside the new ones, and `predict OUT` or `evaluate OUT` would take them. The same cohort again is fine."""
    from wsi_vssm.runs.cohort import SLIDE_SUFFIXES, CohortError, read_cohort, slide_name

    ours = {n.lower() for n in names}
    found = [f.name for f in out.iterdir() if f.name.lower().endswith(SLIDE_SUFFIXES)] if out.is_dir() else []
    if (out / "reference.csv").is_file():
        try:
            found += [r.name for r in read_cohort(out / "reference.csv", find_slides=False).rows]
        except CohortError as e:
            raise SynthError(f"{out} holds a reference.csv that is not a cohort this run wrote ({e}); give an "
                             "empty or new folder") from e
    stale = sorted({slide_name(f) for f in found if slide_name(f).lower() not in ours})
    if stale:
        more = f" and {len(stale) - 3} more" if len(stale) > 3 else ""
        raise SynthError(f"{out} already holds other slides ({', '.join(stale[:3])}{more}), which this cohort "
                         "would not replace; give an empty or new folder")


def make_cohort(
    out: str | os.PathLike,
    n_slides: int,
    seed: int = 0,
    size: int = 20_000,
    mpp: float = 0.5,
    *,
    workers: int | None = None,
    quality: int = 85,
    on_slide: Callable[[SlideRecord], None] | None = None,
) -> list[SlideRecord]:
    """Write a CAMELYON16-style cohort into `out`: slides, annotations/tumor_NNN.xml, then reference.csv."""
    from wsi_vssm.synth.asap import asap_xml

    if not isinstance(n_slides, (int, np.integer)) or n_slides < 1:
        raise SynthError(f"number of slides must be at least 1, got {n_slides!r}")
    _check(size, mpp)
    out = Path(out)
    refuse_another_cohort(out, [name for name, _ in cohort_plan(n_slides)])
    _prepare_out(out)
    records = []
    for name, label in cohort_plan(n_slides):
        index = int(name.rsplit("_", 1)[1])
        path = out / f"{name}.tif"
        lesions = write_slide(
            path,
            size,
            mpp,
            slide_seed(seed, label, index),
            label == "tumor",
            workers=workers,
            quality=quality,
        )
        if label == "tumor":
            atomic_write_bytes(out / "annotations" / f"{name}.xml", asap_xml(lesions))
        rec = SlideRecord(name, label, path, lesions)
        records.append(rec)
        if on_slide is not None:
            on_slide(rec)
    csv = "slide,label\n" + "".join(f"{r.name},{r.label}\n" for r in records)
    atomic_write_bytes(out / "reference.csv", csv.encode())
    return records
