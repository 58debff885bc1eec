"""`wsi-vssm run RECIPE.toml`: run a training recipe's stages (pipelines/*.toml) through the library
(`wsi_vssm.training.recipe`)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("run")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set data.train=/data/pcam/train.tar (repeatable).")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: the recipe's recipe.out].")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "auto"]), default=None,
              help="Every stage's backbone arithmetic (cells.precision and mosaic_mil.precision) [default: the "
                   "recipe's, else fp32].")
@click.option("--resume", is_flag=True,
              help="Continue stages that checkpoint every epoch (dense) from their last checkpoint in OUT.")
def command(recipe_path, sets, out, precision, resume):
    """Run a training recipe (e.g. pipelines/default.toml): its stages, in order, into OUT."""
    from wsi_vssm.errors import OptionError
    from wsi_vssm.training.recipe import apply_overrides, load_recipe, run_recipe

    for item in sets:  # the recipe checks this too, but as bad input (exit 1): it is a usage error here
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"--set needs KEY=VALUE, got {item!r}")
    extra = [] if precision is None else [f'cells.precision="{precision}"', f'mosaic_mil.precision="{precision}"']
    recipe = apply_overrides(load_recipe(recipe_path), extra + list(sets))
    out = out or Path(recipe.get("recipe", {}).get("out") or "runs/recipe")
    model = run_recipe(recipe, out, resume=resume)
    click.echo(f"wrote {model}")
