"""`wsi-vssm run RECIPE.toml`: run a training recipe's stages (pipelines/*.toml) through the library
(`wsi_vssm.training.recipe`)."""

from __future__ import annotations

from pathlib import Path

import click

from wsi_vssm.commands.options import NonEmptyPath


@click.command("run", short_help="Run a training recipe (pipelines/default.toml), resumable.")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set data.train=/data/pcam/train.tar (repeatable).")
@click.option("--out", "-o", type=NonEmptyPath(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: the recipe's recipe.out].")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "auto"]), default=None,
              help="Every stage's backbone arithmetic (the precision of each stage that has one: cells, context, "
                   "dense, mosaic_mil) [default: the recipe's, else fp32].")
@click.option("--resume", is_flag=True,
              help="Go on with an interrupted run in OUT: skip the stages finished before with the same settings, "
                   "continue the interrupted one from its per-epoch checkpoint (cells, context, dense).")
def command(recipe_path, sets, out, precision, resume):
    """Run a training recipe (e.g. pipelines/default.toml): its stages, in order, into OUT."""
    from wsi_vssm.commands.options import blocking_file, option_output
    from wsi_vssm.errors import OptionError, UsageError
    from wsi_vssm.training.recipe import apply_overrides, load_recipe, precision_overrides, run_recipe

    option_output("--out", out, folder=True)
    # unknown keys, wrong types, values a stage refuses in the file: bad input (exit 1), before anything trains
    recipe = load_recipe(recipe_path)
    extra = [] if precision is None else precision_overrides(precision)
    try:
        recipe = apply_overrides(recipe, extra + list(sets))
    except UsageError as e:  # a --set the recipe does not take, or a value out of range: a usage error (exit 2)
        raise OptionError(str(e)) from e
    if out is None:
        out = Path(recipe.get("recipe", {}).get("out") or "runs/recipe")
        blocked = blocking_file(out, folder=True)
        if blocked is not None:
            raise UsageError(f"recipe.out {out}: {blocked} is a file, not a folder")
    import shlex

    # how the model was made, in its metadata: the command that reruns it (docs/model_card.md quotes such lines);
    # --resume left out, as it changes how a run goes on, not what it makes
    command_line = shlex.join(["wsi-vssm", "run", str(recipe_path), "--out", str(out),
                               *[a for s in sets for a in ("--set", s)],
                               *(["--precision", precision] if precision else [])])
    provenance = {"recipe_file": str(recipe_path.absolute()), "sets": list(sets), "precision": precision,
                  "command": command_line}
    model = run_recipe(recipe, out, resume=resume, provenance=provenance)
    click.echo(f"wrote {model}")
