"""Option decorators shared by several commands, so the same option reads the same everywhere."""

from __future__ import annotations

import click

mpp_option = click.option(
    "--mpp",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Microns per pixel at level 0 for inputs that state none (a stated value is overridden, with a warning).",
)
