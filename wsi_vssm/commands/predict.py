"""`wsi-vssm predict`: slide probability, heatmap, overlay and tumour contours for each slide."""

from __future__ import annotations

import click

from wsi_vssm.commands.options import (
    NonEmptyPath,
    fallback_mpp_option,
    model_options,
    mpp_option,
    predict_options,
    run_options,
)


@click.command("predict", short_help="Slide probability, heatmap, lesions and overlay per slide.")
@click.argument("slides", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", "out_dir", default="wsi-vssm-out", show_default=True, type=NonEmptyPath(file_okay=False),
              help="Output folder; each slide gets OUT/<slide name>/.")
@model_options
@mpp_option
@fallback_mpp_option
@predict_options
@run_options
@click.pass_context
def command(ctx, slides, out_dir, model_path, mpp, **opts):
    """Predict metastasis for SLIDES: prediction.json, heatmap.ome.zarr, overlay.png, contours.geojson, lesions.csv.

    SLIDES are slide files, OME-Zarr folders, folders of slides (the slide files directly in them), or CSV
    slide lists (a header naming the path column, wsi / slide / path / file / slide_path, and optionally mpp:
    each row's level-0 resolution; paths relative to the CSV; other columns are not read).

    Prints one line per slide. Slides done before with the same model and parameters are skipped; exit code 3
    when some slides failed (the others are done), 1 when the only slide failed. See docs/cohorts.md.
    """
    from wsi_vssm.commands.options import (
        build_params,
        domain_note,
        exit_for,
        load_cli_model,
        model_file,
        pop_run_options,
    )
    from wsi_vssm.errors import UsageError
    from wsi_vssm.pipeline.predict import output_folder_problem
    from wsi_vssm.runs.jobs import predict_job
    from wsi_vssm.runs.runner import RESERVED_NAMES, run_slides, slide_tasks
    from wsi_vssm.runs.slide_args import expand_slide_args

    run, progress = pop_run_options(opts, ctx)
    tasks = slide_tasks(expand_slide_args(slides, progress.info), progress)
    # before the model loads: the slide's whole inference ran, then failed "File exists" (a reserved name is
    # refused by the runner, in words that fit it better)
    for task in tasks:
        problem = task.name.lower() not in RESERVED_NAMES and output_folder_problem(out_dir, task.name)
        if problem:
            raise UsageError(f"{task.path}: {problem}")
    model = load_cli_model(model_path)
    job = predict_job(out_dir, model_file(model_path), model, build_params(model, mpp, **opts))
    summary = run_slides(tasks, job, run, progress)
    if summary.count("done", "skipped"):
        progress.result(domain_note(model, job.params))  # what the model knows, so no one reads a diagnosis
    exit_for(summary, len(tasks))

