"""`evaluate --annotations`: the CAMELYON16 lesion-level FROC over a cohort run's heatmaps
(`outputs.froc`), and the annotation files read before any slide runs."""

from __future__ import annotations

import warnings
from pathlib import Path

from wsi_vssm.outputs.files import FROC_DETECTIONS, FROC_PNG, HEATMAP_ZARR, is_detections_folder

FROC_MIN_PROBABILITY = 0.01


def cohort_froc(out: Path, scored: list[dict], annotated: dict, folders: dict[str, str], n_boot: int = 2000) -> dict:
    """CAMELYON16 lesion-level FROC from each slide's heatmap and its annotations (`read_cohort_annotations`; slides
    without any are normal), with the score's slide-bootstrap interval (`n_boot` resamples), for metrics.json; its
    curve is drawn in OUT/froc.png. `folders` maps a table's slide name to its output folder (the file's stem; the
    case may differ)."""
    from wsi_vssm.outputs.froc import detections_from_heatmap, froc, froc_png
    from wsi_vssm.outputs.heatmap import read_heatmap_zarr

    detections, truth, mpps, sizes, outside = {}, {}, {}, {}, {}
    for r in scored:
        folder = folders.get(r["slide"], r["slide"])
        prob, _, _, attrs = read_heatmap_zarr(out / folder / HEATMAP_ZARR)
        meta = attrs["wsi_vssm"]
        reach = _beyond_slide(annotated.get(r["slide"]), prob.shape, meta["cell0"])
        if reach:
            outside[r["slide"]] = reach
        # Every local maximum down to a low floor: the FROC curve sweeps the detection threshold itself.
        detections[r["slide"]] = detections_from_heatmap(prob, meta["cell0"], meta["origin"],
                                                         threshold=FROC_MIN_PROBABILITY)
        mpps[r["slide"]] = meta["mpp"]
        # the heatmap's extent: the slide's edge, to within a cell (lesions are dilated up to it, not past it)
        sizes[r["slide"]] = (prob.shape[1] * meta["cell0"], prob.shape[0] * meta["cell0"])
        if r["slide"] in annotated:
            truth[r["slide"]] = annotated[r["slide"]]
    result = froc(detections, truth, mpps, slide_size=sizes, n_boot=n_boot)
    froc_png(out / FROC_PNG, result)
    write_detections(out / FROC_DETECTIONS, {folders.get(name, name): det for name, det in detections.items()})
    return {**result.as_dict(), "detection_floor": FROC_MIN_PROBABILITY, "annotations_outside_slide": outside}


def write_detections(folder: Path, detections: dict) -> None:
    """`folder/<slide>.csv` for each scored slide, in CAMELYON16's submission format, so that the challenge's own
    evaluation script (or any other) can score the same detections: one line per detection, `probability,x,y`,
    level-0 pixels rounded to integers (the script reads them with int()), no header; an empty file for a slide
    without one. The folder is replaced whole, so a rerun over fewer slides leaves none of the earlier run's.
    A folder of that name holding a slide's outputs (an old slide named so) is left alone, with a warning."""
    from wsi_vssm.atomic import atomic_dir

    if folder.exists() and not is_detections_folder(folder):
        warnings.warn(f"{folder}: a slide's output folder, not replaced: no FROC detection files", stacklevel=3)
        return
    with atomic_dir(folder) as tmp:
        for name, det in detections.items():
            lines = [f"{p!r},{round(x)},{round(y)}\n" for x, y, p in det.tolist()]
            (tmp / f"{name}.csv").write_text("".join(lines), encoding="utf-8")


def _beyond_slide(annotation, grid_shape: tuple[int, int], cell0: float) -> list[float] | None:
    """The tumour annotation's level-0 bounds when they reach more than a cell past the slide's scored extent
    (annotations drawn in another frame: a lower level's pixels, micrometres), else None."""
    tumor = getattr(annotation, "tumor", None)
    if tumor is None or tumor.is_empty:
        return None
    x0, y0, x1, y1 = tumor.bounds
    width, height = (grid_shape[1] + 1) * cell0, (grid_shape[0] + 1) * cell0  # a partial cell at each edge
    return [round(v, 1) for v in (x0, y0, x1, y1)] if x0 < -cell0 or y0 < -cell0 or x1 > width or y1 > height \
        else None


def read_cohort_annotations(annotations: Path, folders: dict[str, str], labels: dict[str, int] | None = None,
                            paths: dict[str, object] | None = None) -> dict:
    """Each slide's parsed annotations, for the slides that have a file: named exactly like its table name or
    its output folder (the extension in any case: .xml, .geojson, .json, .annotations, or NDP.view's
    `.ndpi.ndpa`, placed on the slide's file from `paths`; no wildcards, so `tumor[1]` finds only
    `tumor[1].xml`). Read before the cohort runs, so that a malformed file fails with its
    one-line error then, not after every slide has been analysed. A slide labelled tumour (`labels`) without a
    file, or whose file holds no tumour area, is named in a warning: the FROC counts its detections as false
    positives."""
    from wsi_vssm.io.annotations import AnnotationClasses, annotation_file_names, annotation_key, read_annotations
    from wsi_vssm.io.base import SLIDE_SUFFIXES

    by_name: dict[str, Path] = {}
    others: list[Path] = []
    for p in sorted(annotations.iterdir()):
        key = annotation_key(p) if p.is_file() else None
        if key is not None:
            by_name.setdefault(key, p)
        elif p.is_file() and not p.name.lower().endswith(SLIDE_SUFFIXES):  # slides may lie beside their files
            others.append(p)
    found, unfiled, no_tumour, excluded_all, several = {}, [], [], [], []
    for slide, folder in folders.items():
        files = list(dict.fromkeys(by_name[n] for name in (slide, folder) for n in annotation_file_names(name)
                                   if n in by_name))
        if len(files) > 1:
            several.append(f"{slide} ({', '.join(p.name for p in files)}: {files[0].name} used)")
        if files:
            found[slide] = read_annotations(files[0], slide=(paths or {}).get(slide))  # NDP.view's is placed on it
        if (labels or {}).get(slide) == 1 and not files:
            unfiled.append(slide)
        elif (labels or {}).get(slide) == 1 and found[slide].tumor.is_empty:
            classes = ", ".join(repr(c) for c in sorted(found[slide].classes)) or "no polygons"
            kinds = {AnnotationClasses().kind(c) for c in found[slide].classes}
            (excluded_all if "tumor" in kinds else no_tumour).append(f"{files[0].name} ({classes})")
    if several:
        warnings.warn(f"{len(several)} slide(s) have several annotation files in {annotations}: "
                      f"{'; '.join(several[:5])}", UserWarning, stacklevel=3)
    unread = [p.name for p in others if any(p.name.lower().startswith(f"{s.lower()}.") for s in unfiled)]
    _say_missing(annotations, unfiled, "no file named like the slide" + (
        f"; not read, in a format this does not read: {', '.join(unread[:5])}" if unread else ""))
    _say_missing(annotations, no_tumour, "no tumour class in its file: the classes found are neither tumour "
                                         "names nor derived from one (docs/io.md)")
    _say_missing(annotations, excluded_all, "its tumour areas lie wholly in its excluded ones")
    return found


def _say_missing(folder: Path, slides: list[str], why: str) -> None:
    if slides:
        more = f" and {len(slides) - 5} more" if len(slides) > 5 else ""
        warnings.warn(f"{len(slides)} slide(s) labelled tumour have no tumour annotation in {folder} ({why}): "
                      f"{', '.join(slides[:5])}{more}; the FROC counts the detections of those it scores as false "
                      "positives", UserWarning, stacklevel=4)
