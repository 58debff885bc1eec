"""`wsi-vssm info SLIDE`: what a slide file holds (levels, resolution and its source, associated images,
tissue fraction). Associated images are listed by name only; their pixels (labels, macros with patient
identifiers) are never read or written."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import click

from wsi_vssm.commands.options import MPP_RANGE

MPP_SOURCE_TEXT = {
    "openslide-properties": "from the file, via OpenSlide",
    "tiff-resolution": "from the TIFF resolution tags",
    "ome-metadata": "from the OME metadata",
    "imagej-metadata": "from the ImageJ calibration",
    "vendor-metadata": "from the scanner's metadata",
    "objective-power": "ESTIMATED from the objective power (10 / power); check it, or set it with --mpp",
    "user": "given with --mpp",
}
PASS_MPP = "pass --mpp X (microns per pixel at level 0) to commands that read it"
NO_MPP_HINT = f"the file states no resolution; {PASS_MPP}"


@click.command("info", short_help="What a slide, model, output folder or feature file holds.")
@click.argument("slide", metavar="SLIDE|MODEL|HEATMAP|OUT|RUN|FEATURES", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option(
    "--backend",
    type=click.Choice(["auto", "openslide", "tifffile", "zarr"]),
    default="auto",
    show_default=True,
    help="Slide reader; auto chooses by the file's content.",
)
@click.option("--mpp", type=MPP_RANGE, default=None,
              help="Microns per pixel at level 0 of the slide, for one that states none (a stated value is "
                   "overridden, with a warning).")
def command(slide: str, as_json: bool, backend: str, mpp: float | None) -> None:
    """Show a slide's levels, resolution, associated images and tissue fraction (or what a model file or a
    heatmap.ome.zarr is, or where the slides of an output folder of predict / evaluate / extract stand, or one
    slide's prediction folder (OUT/<slide>/), or the stages of a training run's folder (run RECIPE --out RUN),
    or what a feature file of extract holds: <slide>.zarr, an h5 with features and coords, a pt tensor)."""
    from wsi_vssm.commands.feature_info import feature_folder_problem, feature_info, feature_kind, format_feature_info
    from wsi_vssm.commands.model_info import format_model_info, is_model_path, model_info
    from wsi_vssm.commands.output_info import (
        format_output_info,
        format_patch_evaluation_info,
        is_output_folder,
        is_patch_evaluation,
        output_info,
        patch_evaluation_info,
    )

    kind = feature_kind(slide)
    if kind is not None:  # extract's files (or CLAM's / TRIDENT's h5): what they hold, not read as a slide
        report = feature_info(slide, kind)
        click.echo(json.dumps(report, indent=2) if as_json else format_feature_info(report))
        return
    if is_model_path(slide):  # a model file passed between machines: what it is, before anyone predicts with it
        report = model_info(slide)
        click.echo(json.dumps(report, indent=2) if as_json else format_model_info(report))
        return
    from wsi_vssm.commands.recipe_info import format_recipe_info, is_recipe_folder, recipe_info

    if is_recipe_folder(slide):  # where a training recipe run stands, stage by stage
        report = recipe_info(slide)
        click.echo(json.dumps(report, indent=2) if as_json else format_recipe_info(report))
        return
    if is_output_folder(slide):  # where a cohort run stands, slide by slide, from its states
        report = output_info(slide)
        click.echo(json.dumps(report, indent=2) if as_json else format_output_info(report))
        return
    if is_patch_evaluation(slide):  # a patch folder's evaluation: its figures, or how far it got
        report = patch_evaluation_info(slide)
        click.echo(json.dumps(report, indent=2) if as_json else format_patch_evaluation_info(report))
        return
    from wsi_vssm.commands.folder_info import (
        folder_problem,
        format_prediction_folder_info,
        is_prediction_folder,
        prediction_folder_info,
    )

    if Path(slide).name == "prediction.json" and is_prediction_folder(str(Path(slide).parent)):
        slide = str(Path(slide).parent)  # the file napari opens: its folder's call (it was "not a slide format")
    if is_prediction_folder(slide):  # OUT/<slide>/, the folder predict prints: its call, from prediction.json
        report = prediction_folder_info(slide)
        click.echo(json.dumps(report, indent=2) if as_json else format_prediction_folder_info(report))
        return
    from wsi_vssm.commands.log_info import (
        folder_contents_problem,
        format_train_log_info,
        read_train_log,
        train_log_info,
    )

    rows = read_train_log(slide)
    if rows is not None:  # train mil's OUT.log.csv sits beside its checkpoint: what the run did, epoch by epoch
        report = train_log_info(slide, rows)
        click.echo(json.dumps(report, indent=2) if as_json else format_train_log_info(report))
        return
    from wsi_vssm.runs.cohort import series_folder_slide

    if (series := series_folder_slide(Path(slide))) != Path(slide):  # a folder of one DICOM series: its slide
        slide = str(series)
    problem = feature_folder_problem(slide) or folder_contents_problem(slide) or folder_problem(slide)
    if problem:  # train mil's output folder, a folder of slides or patches: "not an OME-Zarr store" named no way on
        from wsi_vssm.errors import UsageError

        raise UsageError(problem)
    heatmap = heatmap_info(slide)
    if heatmap is not None:  # our own output: its cells are 31 um, which as a slide would read as "implausible mpp"
        click.echo(json.dumps(heatmap, indent=2) if as_json else format_heatmap_info(heatmap))
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = slide_info(slide, backend=backend, mpp=mpp)
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    report["warnings"] = notes
    for note in notes:
        click.echo(f"wsi-vssm: warning: {' '.join(note.split())}", err=True)
    click.echo(json.dumps(report, indent=2) if as_json else format_info(report))


def slide_info(path: str, backend: str = "auto", mpp: float | None = None) -> dict:
    """The facts `info` prints, as a JSON-ready dict."""
    from wsi_vssm.io import open_slide
    from wsi_vssm.io.tissue import slide_tissue
    from wsi_vssm.pipeline.domain import stain_check

    with open_slide(path, backend=backend, mpp=mpp) as reader:
        tissue = slide_tissue(reader)  # the same mask predict and extract use
        thumb, fraction = tissue.thumbnail, tissue.fraction
        stain = stain_check(thumb, tissue.mask)  # predict's stain rule: fluorescence or IHC shows before a run
        if fraction == 0:
            warnings.warn(f"{reader.path}: no tissue found on the thumbnail", stacklevel=2)
        levels = [
            {
                "level": i,
                "width": w,
                "height": h,
                "downsample": round(reader.level_downsamples[i], 6),
                "mpp": None if reader.mpp is None else round(reader.mpp * reader.level_downsamples[i], 6),
            }
            for i, (w, h) in enumerate(reader.level_dimensions)
        ]
        return {
            "path": str(reader.path),
            "name": reader.name,
            "vendor": reader.vendor,
            "backend": reader.backend,
            "dimensions": list(reader.dimensions),
            "level_count": reader.level_count,
            "levels": levels,
            "mpp": reader.mpp,
            "mpp_source": reader.mpp_source,
            "mpp_hint": None if reader.mpp is not None else no_mpp_hint(reader),
            "associated_images": sorted(reader.associated_images),
            "tissue_fraction": round(fraction, 4),
            "thumbnail_side": max(thumb.shape[:2]),
            "stain_notes": stain,
        }


def heatmap_info(path: str) -> dict | None:
    """What a wsi-vssm heatmap.ome.zarr holds (None for anything else, e.g. a slide in OME-Zarr)."""
    import numpy as np

    from wsi_vssm.outputs.files import is_heatmap_zarr
    from wsi_vssm.outputs.heatmap import read_heatmap_zarr

    if not Path(path).is_dir() or not is_heatmap_zarr(Path(path)):
        return None
    prob, cell_um, _, attrs = read_heatmap_zarr(path)
    block = attrs["wsi_vssm"]
    threshold = block.get("cell_threshold", block.get("threshold"))  # `threshold`: its name before v2
    above = None if threshold is None else int((prob >= threshold).sum())
    return {
        "path": str(path),
        "kind": "wsi-vssm heatmap",
        "slide": block.get("slide"),
        "model": block.get("model"),
        "cells": [int(prob.shape[1]), int(prob.shape[0])],  # columns x rows, as a slide's dimensions (w, h)
        "cell_um": cell_um,
        "slide_mpp": block.get("mpp"),
        "cell_threshold": threshold,
        "cells_at_or_above_threshold": above,
        "max_probability": round(float(np.max(prob)), 4) if prob.size else None,
    }


def format_heatmap_info(r: dict) -> str:
    cols, rows = r["cells"]
    lines = [
        f"heatmap:     {r['path']}",
        "kind:        a wsi-vssm heatmap (tumour probability per token cell), not a slide; in napari it lies over"
        " its slide (docs/napari.md)",
        f"slide:       {r['slide']} (model {r['model']})",
        # slide_mpp is the slide's own level-0 resolution ("read at" it was wrong: slides are analysed at the
        # model's, which the cell size reflects)
        f"cells:       {cols} x {rows}, {r['cell_um']:.4g} um each (the slide's level 0: {r['slide_mpp']} um/px)",
    ]
    if r["cell_threshold"] is not None:
        share = r["cells_at_or_above_threshold"] / max(1, rows * cols)
        lines.append(f"threshold:   {r['cell_threshold']:.3f}: {r['cells_at_or_above_threshold']} cells at or above"
                     f" ({share:.1%} of the grid); highest probability {r['max_probability']:.3f}")
    return "\n".join(lines)


def no_mpp_hint(reader) -> str:
    """NO_MPP_HINT, or why a resolution the file states was ignored (an implausible one, e.g. 72 dpi)."""
    from wsi_vssm.io.base import ignored_mpp

    why = ignored_mpp(reader.properties)
    return NO_MPP_HINT if why is None else f"{why}; {PASS_MPP}"


def format_info(r: dict) -> str:
    if r["mpp"] is None:
        mpp = f"unknown: {r['mpp_hint']}"
    else:
        mpp = f"{r['mpp']:.4g} um/px ({MPP_SOURCE_TEXT.get(r['mpp_source'], r['mpp_source'])})"
    lines = [
        f"slide:       {r['path']}",
        f"vendor:      {r['vendor'] or 'unknown'}",
        f"backend:     {r['backend']}",
        f"dimensions:  {r['dimensions'][0]} x {r['dimensions'][1]} px",
        f"mpp:         {mpp}",
        f"levels:      {r['level_count']}",
    ]
    for lv in r["levels"]:
        level_mpp = "" if lv["mpp"] is None else f"  {lv['mpp']:.4g} um/px"
        lines.append(
            f"  {lv['level']}: {lv['width']} x {lv['height']}  downsample {lv['downsample']:.4g}{level_mpp}"
        )
    lines.append(f"associated:  {', '.join(r['associated_images']) or 'none'} (names only)")
    lines.append(
        f"tissue:      {r['tissue_fraction']:.1%} of the slide (thumbnail, {r['thumbnail_side']} px)"
    )
    plain = "looks like brightfield H&E" if r["tissue_fraction"] > 0 else "not judged: no tissue found"
    stain = "; ".join(r.get("stain_notes") or []) or plain
    lines.append(f"stain:       {stain}")
    return "\n".join(lines)
