"""`wsi-vssm predict`: slide probability, heatmap, overlay and tumour contours for each slide."""

from __future__ import annotations

import sys
import warnings

import click

from wsi_vssm.commands.options import model_options, mpp_option, predict_options

EXIT_SOME_FAILED = 3


@click.command("predict")
@click.argument("slides", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_dir", default="wsi-vssm-out", show_default=True, type=click.Path(file_okay=False),
              help="Output folder; each slide gets OUT/<slide name>/.")
@model_options
@mpp_option
@predict_options
def command(slides, out_dir, model_path, mpp, **opts):
    """Predict metastasis for SLIDES: prediction.json, heatmap.ome.zarr, overlay.png, contours.geojson.

    Prints one line per slide. Exit code 3 when some slides failed (the others are done).
    """
    from wsi_vssm.commands.options import build_params, load_cli_model
    from wsi_vssm.errors import WsiVssmError
    from wsi_vssm.predict import predict_slide

    model = load_cli_model(model_path)
    params = build_params(mpp, **opts)
    failed = 0
    for path in slides:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                rec = predict_slide(path, model, out_dir, params)
            for w in caught:
                click.echo(f"wsi-vssm: warning: {w.message}", err=True)
        except WsiVssmError as e:
            if len(slides) == 1:
                raise
            failed += 1
            click.echo(f"wsi-vssm: error: {e}", err=True)
            continue
        p = rec["probability"]
        verdict = f"probability {p:.3f} -> {'tumor' if rec['label'] else 'normal'}" if p is not None else \
            f"no prediction ({rec['reason']})"
        click.echo(f"{rec['slide']}: {verdict} [{rec['parameters']['n_cells']} cells, "
                   f"{rec['timings']['total']:.1f} s] -> {out_dir}/{rec['slide']}/")
    if failed:
        click.echo(f"wsi-vssm: {failed} of {len(slides)} slides failed", err=True)
        sys.exit(EXIT_SOME_FAILED)
