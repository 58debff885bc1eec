"""`wsi-vssm extract SLIDE... --model M --out DIR`: token-cell features of each slide into DIR/<slide>.zarr
(`--format h5` / `pt`: also, or instead, the files CLAM and TRIDENT read; `wsi_vssm.pipeline.feature_files`).

Slides are read at the model's own resolution (its checkpoint's mpp; --target-mpp overrides). A slide that
fails is reported on one stderr line and the rest go on; the exit code is then 3 (1 when it was the only slide).
A store already made with the same model and parameters is skipped (use --overwrite to redo it); runs resume
and can be distributed with Dask (`wsi_vssm.runs`, docs/cohorts.md).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import click

from wsi_vssm.commands.options import (
    MPP_RANGE,
    FiniteFloatRange,
    NonEmptyPath,
    amp_and_precision,
    fallback_mpp_option,
    mpp_option,
    reader_threads_option,
    run_options,
)


@click.command("extract", short_help="Token-cell features of slides (zarr, CLAM/TRIDENT h5, pt).")
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--model", "-m", "model", default="default", show_default=True,
              help="A wsi-vssm model file, 'default' (the packaged model, as predict), or a registry name (e.g. "
                   "micro: random weights, for tests only).")
@click.option("--out", "-o", "out", required=True, type=NonEmptyPath(file_okay=False, path_type=Path),
              help="Folder for the feature files (<slide>.zarr; h5_files/, pt_files/ with --format).")
@click.option("--format", "formats", type=click.Choice(["zarr", "h5", "pt"]), multiple=True, default=["zarr"],
              show_default=True,
              help="Feature files, repeatable: zarr (DIR/<slide>.zarr, what train mil reads), h5 "
                   "(DIR/h5_files/<slide>.h5: features and level-0 coords, as CLAM and TRIDENT write them), pt "
                   "(DIR/pt_files/<slide>.pt: the features tensor, as CLAM's pt_files).")
@click.option("--target-mpp", type=MPP_RANGE, default=None,
              help="Analysis resolution in um/px (default: the model's own).")
@mpp_option
@fallback_mpp_option
@click.option("--region-px", type=click.IntRange(min=32), default=None,
              help="Region side at the analysis mpp, a multiple of the model's token (32 px) (default 2048 on "
                   "CPU, 9984 on GPU: 10,000 in whole tokens). "
                   "Each region's scan sees only its own pixels: features move with the region size, more below 1024.")
@click.option("--overlap-px", type=click.IntRange(min=0), default=None,
              help="Overlap between regions, a multiple of the token (default 128).")
@click.option("--min-tissue", type=FiniteFloatRange(0, 1), default=None,
              help="Drop cells with a smaller tissue fraction (default 0.25).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto", show_default=True,
              help="Where the backbone runs; auto: CUDA when there is a GPU.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Regions per forward pass.")
@reader_threads_option
@click.option("--backend", type=click.Choice(["auto", "openslide", "tifffile", "zarr"]), default="auto",
              show_default=True, help="Slide reader; auto chooses by the file's content (docs/formats.md).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "auto"]), default=None, callback=amp_and_precision,
              help="Backbone arithmetic [default: bf16 on a GPU, fp32 on the CPU; predict and evaluate default to "
                   "fp32 everywhere, so give --precision fp32 for features that match theirs on a GPU]; bf16 needs "
                   "native hardware support, else it runs fp32 with one warning. auto: bf16 where native.")
@click.option("--amp/--no-amp", default=None, callback=amp_and_precision, hidden=True,
              help="Old spelling of --precision bf16 / fp32.")
@run_options
@click.pass_context
def command(ctx, slides, model, out, formats, target_mpp, mpp, fallback_mpp, region_px, overlap_px, min_tissue, device,
            batch_size, reader_threads, backend, precision, amp, **opts):
    """Extract token-cell features of SLIDE(s) with a VSSM backbone (slide files, OME-Zarr folders, folders
    of slides, or CSV slide lists with a wsi / slide / path / file / slide_path column and an optional mpp column)."""
    from wsi_vssm.commands.options import (
        exit_for,
        model_file,
        one_resolution_rule,
        option_device,
        option_geometry,
        pop_run_options,
    )
    from wsi_vssm.models.model_file import load_backbone
    from wsi_vssm.models.slide_model import DEFAULT_NAME, default_model_path
    from wsi_vssm.pipeline.extract import Inference
    from wsi_vssm.pipeline.feature_files import prepare_folders
    from wsi_vssm.runs.jobs import extract_job
    from wsi_vssm.runs.runner import run_slides, slide_tasks
    from wsi_vssm.runs.slide_args import expand_slide_args
    from wsi_vssm.runs.state import OutputNotWritable

    run, progress = pop_run_options(opts, ctx)
    one_resolution_rule(mpp, fallback_mpp)
    # a bad slide list is refused before the model loads
    tasks = slide_tasks(expand_slide_args(slides, progress.info), progress)
    try:  # before the model loads: a file in the way failed every slide after its backbone pass
        prepare_folders(out, formats)
    except OSError as e:
        raise OutputNotWritable(str(e)) from None
    dev = option_device(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backbone, info = load_backbone(model if model != DEFAULT_NAME else default_model_path())
    for w in caught:
        if issubclass(w.category, UserWarning):
            progress.warn(str(w.message))
    analysis_mpp = target_mpp or info.mpp
    if target_mpp and abs(target_mpp - info.mpp) > 1e-6 * info.mpp:
        progress.warn(f"reading at {target_mpp:g} um/px; the model was trained at {info.mpp:g}")
    region_px, overlap_px, min_tissue = option_geometry(dev, info.token_px, region_px, overlap_px, min_tissue)
    params = dict(
        mpp=analysis_mpp, token_px=info.token_px, region_px=region_px, overlap_px=overlap_px, min_tissue=min_tissue,
        batch_size=batch_size, workers=reader_threads, device=dev,
        inference=Inference(precision or ("bf16" if amp or (amp is None and dev == "cuda") else "fp32")),
    )  # fmt: skip
    progress.info(f"model {info.model_id} ({info.model_hash[:12]}) at {analysis_mpp:g} um/px, "
                  f"regions {params['region_px']} px (overlap {params['overlap_px']}), device {dev}")
    job = extract_job(out, model_file(model), backbone, info, mpp, params, tuple(formats), fallback_mpp, backend)
    summary = run_slides(tasks, job, run, progress)
    exit_for(summary, len(tasks))
