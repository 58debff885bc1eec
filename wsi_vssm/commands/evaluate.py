"""`wsi-vssm evaluate`: a cohort's AUC with a bootstrap CI, ROC plot and per-slide table."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from wsi_vssm.commands.options import (
    NonEmptyPath,
    fallback_mpp_option,
    model_options,
    mpp_option,
    predict_options,
    run_options,
)
from wsi_vssm.runs.runner import EXIT_INCOMPLETE

PATCH_ERRORS_SHOWN = 5  # a patch folder's undecodable images named on the terminal; all are in predictions.csv


@click.command("evaluate", short_help="AUC with CI, ROC and per-slide table for a cohort or patch folder.")
@click.argument("cohort", type=click.Path())
@click.option("--out", "-o", "out_dir", default="wsi-vssm-out", show_default=True, type=NonEmptyPath(file_okay=False),
              help="Output folder: metrics.json, predictions.csv, lesions.csv, roc.png, calibration.png, and "
                   "OUT/<slide name>/ per slide.")
@click.option("--annotations", type=click.Path(file_okay=False), default=None,
              help="Folder of lesion annotations (ASAP, ImageScope or HALO XML, GeoJSON, DSA JSON, NDP.view .ndpa; "
                   "named like the slides): adds "
                   "the FROC (metrics.json, froc.png).")
@click.option("--patients", type=click.Path(dir_okay=False), default=None,
              help="patients.csv (patient,slide): pN stage per patient against the reference, quadratic-weighted "
                   "kappa; writes stages.csv and confusion.png (docs/outputs.md).")
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=100), default=2000, show_default=True,
              help="Bootstrap resamples for every 95% interval (AUC, ECE, kappa); metrics.json `intervals` says how.")
# runs.cohort.SPLIT_CHOICES, spelt out: importing runs.cohort here would load numpy before a bad path is refused
@click.option("--split", type=click.Choice(["auto", "all", "train", "valid", "test"]), default="auto",
              show_default=True,
              help="Which rows of a manifest with a split column to evaluate; auto: the test rows when there is a "
                   "split column, else all.")
@click.option("--subgroup", "subgroups", multiple=True, metavar="COLUMN",
              help="A column of the cohort table (its header name, or its number: CAMELYON16's reference.csv has "
                   "Macro/Micro in column 3) whose groups (centres, scanners) get their own AUC, sensitivity and "
                   "specificity and a test of their difference; repeatable (metrics.json subgroups, "
                   "roc_subgroups.png).")
@click.option("--vector", "vector", multiple=True, type=click.Choice(["pdf", "svg"]),
              help="Also write each report figure as vector graphics for a journal (roc.pdf beside roc.png, ...); "
                   "repeatable.")
@model_options
@mpp_option
@fallback_mpp_option
@predict_options
@run_options
@click.pass_context
def command(ctx, cohort, out_dir, annotations, patients, n_boot, split, subgroups, vector, model_path, mpp, **opts):
    """Evaluate a COHORT: a manifest CSV (slide,label[,split]), a CAMELYON16-style folder (reference.csv), or a
    patch folder in ImageFolder layout (0/, 1/; needs --mpp).

    Writes OUT/metrics.json, OUT/predictions.csv, OUT/lesions.csv (every slide's lesions, with a slide column),
    OUT/roc.png, OUT/calibration.png (with --annotations also OUT/froc.png, with --patients OUT/stages.csv and
    OUT/confusion.png, with --subgroup OUT/roc_subgroups.png) and each slide's prediction folder. A rerun resumes
    (done slides are skipped). Exit code 3 when the cohort finished with some slides failed, 4 when the
    report is incomplete (slides still being done by another run on OUT; see --wait-locked; for a patch folder,
    another run is scoring into OUT). A patch folder's scores are kept as they are made: a rerun resumes, and
    --overwrite scores every patch again.
    """
    from wsi_vssm.errors import UsageError

    if not Path(cohort).exists():  # before any heavy import: a typo fails at once
        raise UsageError(f"{cohort}: no such cohort file or folder")
    from wsi_vssm.atomic import vector_copies
    from wsi_vssm.commands.options import load_cli_model, pop_run_options

    run, progress = pop_run_options(opts, ctx)
    model = load_cli_model(model_path)
    with vector_copies(vector):
        res, params = _evaluate(ctx, cohort, out_dir, annotations, patients, n_boot, split, subgroups, model,
                                model_path, mpp, run, progress, opts)
    _report(res, model, params, out_dir, progress)


def _evaluate(ctx, cohort, out_dir, annotations, patients, n_boot, split, subgroups, model, model_path, mpp, run,
              progress, opts):
    """Score the patch folder or the cohort, writing OUT's report: (its EvaluationResult, the slides' params)."""
    from wsi_vssm.commands.options import build_params, model_file
    from wsi_vssm.runs.cohort import is_patch_folder
    from wsi_vssm.runs.evaluate import evaluate_cohort
    from wsi_vssm.runs.evaluate_patches import evaluate_patches

    params = None  # a patch folder is read at its given --mpp, not resampled
    if is_patch_folder(Path(cohort)):
        from wsi_vssm.commands.options import one_resolution_rule, option_device
        from wsi_vssm.errors import OptionError

        if split not in ("auto", "all"):
            raise OptionError(f"--split {split}: a patch folder has no split column; --split takes a manifest's")
        _slide_only_options(ctx, progress)
        from wsi_vssm.pipeline.extract import Inference

        inference = Inference.of(Inference(opts["precision"], opts["tta"]), opts["amp"])
        one_resolution_rule(mpp, opts["fallback_mpp"])
        patch_mpp = mpp or opts["fallback_mpp"]  # patches store no resolution: a fallback is theirs
        res = evaluate_patches(cohort, model, out_dir, patch_mpp, batch_size=max(16, opts["batch_size"]), n_boot=n_boot,
                               threshold=opts["cell_threshold"], inference=inference,
                               device=option_device(opts["device"]), overwrite=run.overwrite, progress=progress)
        failed = [r["error"] for r in res.rows if r["status"] == "failed"]
        for line in failed[:PATCH_ERRORS_SHOWN]:
            progress.error(line)
        if len(failed) > PATCH_ERRORS_SHOWN:
            progress.error(f"and {len(failed) - PATCH_ERRORS_SHOWN} more patches that cannot be decoded "
                           f"(see {Path(out_dir) / 'predictions.csv'})")
    else:
        from wsi_vssm.errors import OptionError
        from wsi_vssm.runs.cohort import SplitError

        params = build_params(model, mpp, **opts)
        try:
            res = evaluate_cohort(cohort, model, out_dir, params, annotations=annotations, n_boot=n_boot,
                                  model_path=model_file(model_path), run=run, progress=progress, patients=patients,
                                  split=split, subgroups=subgroups)
        except SplitError as e:  # the option asked for rows the table does not have: a usage error, as click's
            raise OptionError(f"--split {split}: {e}") from e
    return res, params


def _report(res, model, params, out_dir, progress) -> None:
    """The summary lines and warnings of a finished evaluation, its --json record, and the exit code."""
    from wsi_vssm.commands.options import domain_note
    from wsi_vssm.outputs.files import METRICS_JSON
    from wsi_vssm.outputs.report_text import interval_text, interval_words, ranking_line, recalibration_words
    from wsi_vssm.runs.report_warnings import (
        annotation_frame_warning,
        domain_warning,
        few_patients_warning,
        repeated_patches_warning,
        separation_warning,
        shared_patches_warning,
        small_cohort_warning,
        training_patches_warning,
        training_slides_warning,
        unranked_logits_warning,
    )

    m = res.metrics
    auc = (f"n/a ({m['reason']})" if m["auc"] is None and m.get("reason") else "n/a" if m["auc"] is None
           else f"{m['auc']:.3f}{interval_text(m['auc_ci95'])}")
    separation = separation_warning(res)
    if separation and m["auc"] is not None:  # the line under the warning read as a result (metrics.json keeps it)
        auc += ", not meaningful: the scores do not separate the classes"
    for warning in (separation, small_cohort_warning(res), unranked_logits_warning(res), shared_patches_warning(res),
                    domain_warning(res), training_slides_warning(res, model), training_patches_warning(res),
                    repeated_patches_warning(res),
                    annotation_frame_warning(res)):
        if warning:
            progress.warn(warning)
    pending = f", not finished={m['n_pending']} (incomplete)" if m.get("n_pending") else ""
    # metrics.json's n_failed counts every slide without a probability; a slide with no tissue did not fail
    no_tissue = sum(r["status"] == "no_tissue" for r in res.rows)
    left = f"failed={res.n_failed}" + (f", no tissue={no_tissue} (not in the metrics)" if no_tissue else "")
    over = f" over {res.items}" if m.get("mosaics") else ""  # a mosaic figure is not a whole-slide one
    progress.result(f"AUC {auc}{over}; n={m['n']}, {left}{pending} -> {out_dir}/metrics.json")
    cal = m.get("calibration") or {}
    if cal.get("ece") is not None:
        floor = cal["ece_if_calibrated"]
        progress.result(f"calibration: ECE {cal['ece']:.3f} (95% CI {cal['ece_ci95'][0]:.3f}-{cal['ece_ci95'][1]:.3f});"
                        f" a perfectly calibrated model would show {floor['median']:.3f} "
                        f"({floor['range90'][0]:.3f}-{floor['range90'][1]:.3f}) on {m['n']} items"
                        f" -> {out_dir}/calibration.png")
        progress.result(f"calibration: {recalibration_words(cal)} -> {out_dir}/metrics.json")
    ranking = ranking_line(m)
    if ranking:
        progress.result(f"{ranking} -> {out_dir}/metrics.json")
    froc = m.get("froc")
    if froc and froc.get("froc") is None:  # `--annotations`: the lesion-level figure was only in metrics.json
        progress.result(f"FROC: none ({froc.get('reason') or 'undefined'}) -> {out_dir}/metrics.json")
    elif froc:
        at = froc.get("sensitivity_at_fps") or {}
        ci = interval_words(froc.get("froc_ci95"), "score")
        ci = f"{ci}; " if ci else ""  # in the parentheses with the sensitivities
        progress.result(f"FROC {froc['froc']:.3f} ({ci}lesion sensitivity {'/'.join(f'{v:.2f}' for v in at.values())} "
                        f"at {'/'.join(at)} false positives per slide) over {froc['n_lesions']} lesions on "
                        f"{froc['n_slides']} slides -> {out_dir}/metrics.json")
    if m.get("subgroups"):
        from wsi_vssm.outputs.report_text import subgroup_lines

        for line in subgroup_lines(m["subgroups"]):
            progress.result(f"{line} -> {out_dir}/roc_subgroups.png")
        for column, block in m["subgroups"].items():
            if block.get("note"):
                progress.warn(f"--subgroup {column}: {block['note']}")
    if m.get("kappa") is not None:
        few = few_patients_warning(res)
        if few:
            progress.warn(few)
        lo, hi = m["kappa_ci95"]
        progress.result(f"pN stage: quadratic-weighted kappa {m['kappa']:.3f} (95% CI {lo:.3f}-{hi:.3f}) over "
                        f"{m['n_patients']} patients -> {out_dir}/stages.csv")
    if m.get("n"):  # as predict: the model's limits, said when there is a probability to read
        progress.result(domain_note(model, params))
    progress.record({"report": str(Path(out_dir) / METRICS_JSON), "items": res.items,  # --json only
                     **{k: m.get(k) for k in ("auc", "auc_ci95", "auc_ci95_delong", "sensitivity", "specificity",
                                              "threshold", "n", "n_failed", "n_pending", "complete",
                                              "average_precision")},
                     **({"subgroups": m["subgroups"]} if m.get("subgroups") else {})})
    if not res.complete:
        progress.warn(incomplete_warning(res.rows, m["n_pending"]))
        sys.exit(EXIT_INCOMPLETE)  # slides still being done by another run, or whose outputs vanished: rerun
    if res.n_failed:
        what = "patch(es)" if res.items == "patches" else "slide(s)"
        progress.warn(f"{res.n_failed} of {len(res.rows)} {what} failed (status failed in predictions.csv); "
                      "the metrics leave them out")
        sys.exit(3)  # a cohort finished with some slides failed


def incomplete_warning(rows: list[dict], n_pending: int) -> str:
    """Why the report is incomplete: slides another run holds (`in_progress` rows), and slides with no finished
    outputs for another reason (`pending`: e.g. the output folder was deleted under the run), which the message
    had blamed on "the other run" as well."""
    from wsi_vssm.runs.cohort_table import IN_PROGRESS

    held = sum(1 for r in rows if r.get("status") == IN_PROGRESS)
    parts = [f"{held} slide(s) still being done by another run: rerun when it has finished"] if held else []
    if n_pending - held > 0:
        parts.append(f"{n_pending - held} slide(s) have no finished outputs (deleted or not written): run the same "
                     "command again")
    return f"the report is incomplete (see predictions.csv): {'; '.join(parts)}"


# A patch folder is scored patch by patch at the cell threshold: these would change slide results, and taken
# silently they let a user believe they had changed its figures (--threshold 0.3 left them as they were)
SLIDE_RESULT_OPTIONS = ("annotations", "patients", "subgroups", "threshold", "extent_threshold",
                        "merge_distance_cells", "target_mpp")
# how slides are read, run and written: without effect on a patch folder, said once
SLIDE_RUN_OPTIONS = ("region_px", "overlap_px", "reader_threads", "backend", "workers", "scheduler", "split_regions",
                     "retry_failed", "wait_locked", "cells_geojson")


def _slide_only_options(ctx: click.Context, progress) -> None:
    """Refuse the given options that change slide results, with a word on --cell-threshold; warn about the rest."""
    from click.core import ParameterSource

    from wsi_vssm.errors import OptionError

    given = {p.name: p.opts[0] for p in ctx.command.params
             if ctx.get_parameter_source(p.name) not in (None, ParameterSource.DEFAULT)}
    refused = [given[n] for n in SLIDE_RESULT_OPTIONS if n in given]
    if refused:
        hint = " (patches are called at --cell-threshold)" if "threshold" in given else ""
        raise OptionError(f"{', '.join(refused)}: a patch folder is scored patch by patch, without slides, lesions "
                          f"or patients{hint}; leave {'it' if len(refused) == 1 else 'them'} out")
    ignored = [given[n] for n in SLIDE_RUN_OPTIONS if n in given]
    if ignored:
        progress.warn(f"{', '.join(ignored)}: without effect on a patch folder (they set how slides are read, run "
                      "and written)")
