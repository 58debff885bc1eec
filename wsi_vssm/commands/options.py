"""Option decorators shared by several commands, so the same option reads the same everywhere."""

from __future__ import annotations

import click

mpp_option = click.option(
    "--mpp",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Microns per pixel at level 0 for inputs that state none (a stated value is overridden, with a warning).",
)


def model_options(f):
    return click.option(
        "--model", "model_path", default="default", show_default=True,
        help="Model file (wsi-vssm-model/1), or 'default' for the packaged model.",
    )(f)


def predict_options(f):
    """Options shared by predict and evaluate (analysis resolution, regions, device, threshold)."""
    opts = [
        click.option("--target-mpp", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Analysis resolution in um/px (default: the model's own)."),
        click.option("--region-px", type=click.IntRange(min=32), default=None,
                     help="Region side at analysis resolution (default: 2048 on CPU, 10000 on GPU)."),
        click.option("--overlap-px", type=click.IntRange(min=0), default=None,
                     help="Overlap between regions (default 128)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True),
        click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
                     help="Reader threads."),
        click.option("--amp/--no-amp", default=False, help="bfloat16 autocast on GPU."),
        click.option("--threshold", type=click.FloatRange(0, 1), default=None,
                     help="Slide decision threshold (default: the model's, else 0.5)."),
        click.option("--backend", type=click.Choice(["auto", "openslide", "tifffile", "zarr"]), default="auto",
                     show_default=True),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def build_params(mpp, **opts):
    from wsi_vssm.predict import PredictParams

    return PredictParams(mpp=mpp, **opts)


def load_cli_model(model_path: str):
    from wsi_vssm.models.slide_model import load_model

    return load_model(model_path)
