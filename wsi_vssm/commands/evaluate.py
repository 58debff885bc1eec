"""`wsi-vssm evaluate`: a cohort's AUC with a bootstrap CI, ROC plot and per-slide table."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from wsi_vssm.commands.options import model_options, mpp_option, predict_options, run_options


@click.command("evaluate")
@click.argument("cohort", type=click.Path())
@click.option("--out", "out_dir", default="wsi-vssm-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--annotations", type=click.Path(file_okay=False), default=None,
              help="Folder of lesion annotations (ASAP XML / GeoJSON named like the slides): adds the FROC.")
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=100), default=2000, show_default=True,
              help="Bootstrap resamples for the AUC's 95% interval.")
@model_options
@mpp_option
@predict_options
@run_options
@click.pass_context
def command(ctx, cohort, out_dir, annotations, n_boot, model_path, mpp, **opts):
    """Evaluate a COHORT: a manifest CSV (slide,label[,split]), a CAMELYON16-style folder (reference.csv), or a
    patch folder in ImageFolder layout (0/, 1/; needs --mpp).

    Writes OUT/metrics.json, OUT/predictions.csv, OUT/roc.png and each slide's prediction folder. A rerun
    resumes (done slides are skipped). Exit code 3 when the cohort finished with some slides failed.
    """
    from wsi_vssm.commands.options import build_params, load_cli_model, model_file, pop_run_options
    from wsi_vssm.runs.evaluate import evaluate_cohort, evaluate_patches, is_patch_folder

    run, progress = pop_run_options(opts, ctx)
    model = load_cli_model(model_path)
    if is_patch_folder(Path(cohort)):
        res = evaluate_patches(cohort, model, out_dir, mpp, batch_size=max(16, opts["batch_size"]), n_boot=n_boot)
    else:
        params = build_params(mpp, **opts)
        res = evaluate_cohort(cohort, model, out_dir, params, annotations=annotations, n_boot=n_boot,
                              model_path=model_file(model_path), run=run, progress=progress)
    m = res.metrics
    auc = "n/a" if m["auc"] is None else f"{m['auc']:.3f} (95% CI {m['auc_ci95'][0]:.3f}-{m['auc_ci95'][1]:.3f})"
    progress.result(f"AUC {auc}; n={m['n']}, failed={m['n_failed']} -> {out_dir}/metrics.json")
    if res.n_failed:
        sys.exit(3)  # a cohort finished with some slides failed (or locked by another run)
