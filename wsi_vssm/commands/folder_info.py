"""`wsi-vssm info` on folders that are no slide: one slide's prediction folder (`OUT/<slide>/`, the folder
`predict` prints and napari opens) is summarised from its prediction.json; a folder of slides, a patch folder,
one of its class folders or an empty folder gets one line saying what it is and what to give instead. They all
got "a directory, but not an OME-Zarr store". Neither numpy nor torch is imported."""

from __future__ import annotations

from pathlib import Path

from wsi_vssm.outputs.files import CELLS_GEOJSON, PREDICTION_JSON, SLIDE_FILES

# `training.data.patches.IMAGE_SUFFIXES`, the images a patch folder's evaluation reads (importing it loads torch)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def is_prediction_folder(path: str) -> bool:
    return Path(path).is_dir() and (Path(path) / PREDICTION_JSON).is_file()


def prediction_folder_info(path: str) -> dict:
    """The call, thresholds, domain verdict, lesions and warnings of one prediction folder, and which of
    predict's files it holds. A prediction.json that cannot be read is a one-line error (`UsageError`)."""
    from wsi_vssm.errors import UsageError
    from wsi_vssm.outputs.prediction import read_prediction_json

    folder = Path(path)
    try:
        pred = read_prediction_json(folder / PREDICTION_JSON)
    except UsageError as e:
        raise UsageError(f"{e}; predict the slide again") from None
    summary = pred.get("summary") if isinstance(pred.get("summary"), dict) else {}
    lesions = pred.get("lesions") if isinstance(pred.get("lesions"), list) else []
    model = pred.get("model") if isinstance(pred.get("model"), dict) else {}
    mpp = pred.get("mpp") if isinstance(pred.get("mpp"), dict) else {}
    return {
        "folder": str(folder), "kind": "prediction", "schema": pred.get("schema"), "slide": pred.get("slide"),
        "probability": pred.get("probability"), "label": pred.get("label"), "reason": pred.get("reason"),
        "slide_threshold": pred.get("slide_threshold", pred.get("threshold")),
        "cell_threshold": pred.get("cell_threshold"), "in_domain": pred.get("in_domain"),
        "domain_notes": _lines(pred.get("domain_notes")), "model": model.get("name"), "version": pred.get("version"),
        "mpp": mpp.get("slide"), "mpp_source": mpp.get("slide_source"), "n_cells": summary.get("n_cells"),
        "tissue_area_mm2": summary.get("tissue_area_mm2"), "warnings": _lines(summary.get("warnings")),
        "lesions": len(lesions), "categories": _categories(lesions),
        "largest_lesion_mm": summary.get("largest_lesion_mm"),
        "files": [name for name in (*SLIDE_FILES, CELLS_GEOJSON) if (folder / name).exists()],  # the last if asked
        "missing": [name for name in SLIDE_FILES if not (folder / name).exists()],
    }


def _lines(value) -> list[str]:
    """A list of notes as written, or one note (a hand-edited file may hold a bare string)."""
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value)] if value else []


def _categories(lesions: list) -> dict:
    out: dict = {}
    for lesion in lesions:
        cat = lesion.get("category") if isinstance(lesion, dict) else None
        if cat:
            out[str(cat)] = out.get(str(cat), 0) + 1
    return out


def format_prediction_folder_info(r: dict) -> str:
    p = r["probability"]
    if isinstance(p, int | float) and not isinstance(p, bool):
        call = "tumor" if r["label"] == 1 else "normal" if r["label"] == 0 else "?"
        t = r["slide_threshold"]
        at = f" at slide threshold {t:.3f}" if isinstance(t, int | float) else ""
        call = f"probability {p:.3f} -> {call}{at}"
    else:
        call = f"no probability ({r['reason'] or 'not given'})"
    lines = [f"prediction:  {r['folder']} (slide {r['slide']}, model {r['model']}, wsi-vssm {r['version']})",
             f"call:        {call}" + ("" if r["in_domain"] is not False else "; OUT OF DOMAIN")]
    for note in r["domain_notes"]:
        lines.append(f"             domain: {note}")
    area = r["tissue_area_mm2"]
    tissue = (f"{r['n_cells']} cells" if r["n_cells"] is not None else "cells not recorded") + (
        f", {area:.2f} mm2 of tissue" if isinstance(area, int | float) else "")
    shown = f"{r['mpp']:.4g}" if isinstance(r["mpp"], int | float) else r["mpp"]  # 0.228175... -> 0.2282
    mpp = f"; slide {shown} um/px ({r['mpp_source']})" if r["mpp"] is not None else ""
    lines.append(f"tissue:      {tissue}{mpp}")
    if r["lesions"]:
        cats = ", ".join(f"{n} {c}" for c, n in sorted(r["categories"].items()))
        largest = r["largest_lesion_mm"]
        lines.append(f"lesions:     {r['lesions']} ({cats})" + (f"; largest {largest:.2f} mm"
                     if isinstance(largest, int | float) else "") + (f" at cell threshold "
                     f"{r['cell_threshold']:.3f}" if isinstance(r["cell_threshold"], int | float) else ""))
    else:
        lines.append("lesions:     none")
    for w in r["warnings"]:
        lines.append(f"warning:     {w}")
    lines.append(f"files:       {', '.join(r['files'])}" + (f" (missing: {', '.join(r['missing'])})"
                                                             if r["missing"] else ""))
    return "\n".join(lines)


def folder_problem(path: str) -> str | None:
    """One line for a plain folder that `info` does not describe: what it holds and what to give instead; None
    for a store (OME-Zarr) or a file. Reached only on the way to reading `path` as a slide, so numpy may load."""
    p = Path(path)
    if not p.is_dir():
        return None
    from wsi_vssm.io.formats import is_zarr_dir
    from wsi_vssm.runs.cohort import has_class_folders
    from wsi_vssm.runs.slide_args import expand_slide_folders

    if is_zarr_dir(p):
        return None
    try:
        empty = not any(p.iterdir())
    except OSError:
        return None
    if any((p / name).exists() for name in SLIDE_FILES):  # prediction.json is written last
        return (f"{path}: a prediction folder without {PREDICTION_JSON}: the run that wrote it stopped before "
                "finishing the slide; predict it again")
    if has_class_folders(p):
        n0, n1 = _images(p / "0"), _images(p / "1")
        return (f"{path}: a patch folder (ImageFolder: {n0} images in 0/, {n1} in 1/), not a slide: `wsi-vssm "
                f"evaluate {path} --mpp UM_PER_PX` scores it (PCam: 0.97)")
    if p.name in ("0", "1") and has_class_folders(p.parent):
        return (f"{path}: a class folder of the patch folder {p.parent} ({_images(p)} images), not a slide: "
                f"`wsi-vssm evaluate {p.parent} --mpp UM_PER_PX` scores the patch folder")
    slides = [Path(s).name for s in expand_slide_folders([str(p)]) if s != str(p)]  # as predict would take them
    if slides:
        shown = ", ".join(slides[:3]) + (", ..." if len(slides) > 3 else "")
        return (f"{path}: a folder of {len(slides)} slide{'s' if len(slides) > 1 else ''} ({shown}), not a slide: "
                "give one of them to `info`; `predict` and `extract` take the whole folder")
    if empty:
        return f"{path}: an empty folder, not a slide"
    if p.name.lower().endswith(".zarr"):  # a damaged store: the reader says what it lacks
        return None
    from wsi_vssm.runs.slide_args import subfolder_hint

    return (f"{path}: a folder with no slide files directly in it (sub-folders are not searched) and no wsi-vssm "
            f"outputs: {subfolder_hint(p)}")


def _images(d: Path) -> int:
    try:
        return sum(1 for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    except OSError:
        return 0
