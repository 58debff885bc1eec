"""`wsi-vssm export`: a VSSM backbone as ONNX, checked with onnxruntime."""

from __future__ import annotations

import click

from wsi_vssm.commands.options import NonEmptyPath, one_spelling


@click.command("export", short_help="Export a backbone to ONNX, checked with onnxruntime.")
@click.option("--arch", "--model", "model_name", default=["micro"], show_default=True, multiple=True,
              callback=one_spelling,
              help="Backbone architecture (micro, micro_wide, tiny, small, base, tiny_s1, small_s1, base_s1); with a "
                   "wsi-vssm model file as --checkpoint, the file's own backbone unless given. --model, its older "
                   "name, still works.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Weights: a wsi-vssm model file (its backbone), or an upstream VMamba release checkpoint for "
                   "--arch, loaded strictly.")
@click.option("--onnx", "out", type=NonEmptyPath(dir_okay=False, writable=True), required=True,
              help="Where to write the .onnx file.")
@click.option("--size", type=click.IntRange(min=32), default=224, show_default=True,
              help="Input side in pixels, a multiple of 32 (the graph has a fixed input size).")
@click.option("--opset", type=click.IntRange(min=17), default=17, show_default=True)
@click.option("--no-check", is_flag=True, help="Skip the onnxruntime comparison with PyTorch.")
@click.pass_context
def command(ctx, model_name, checkpoint, out, size, opset, no_check):
    """Export a backbone's forward_features (1 x 3 x S x S -> 1 x 8C x S/32 x S/32, a fixed shape) to ONNX; the
    input's normalisation is stored in the file's metadata."""
    from click.core import ParameterSource

    from wsi_vssm.commands.options import option_backbone
    from wsi_vssm.errors import OptionError
    from wsi_vssm.models.export import (
        ArchitectureMismatch,
        ExportError,
        arch_name,
        build_backbone,
        check_opset,
        export_onnx,
    )
    from wsi_vssm.models.inputs import STRIDE

    option_backbone(model_name)
    try:  # before the model loads: the option's value is what is wrong (exit 2)
        check_opset(opset)
    except ExportError as e:
        raise OptionError(str(e)) from e
    if size % STRIDE:  # the backbone takes any side, but then its last cells cover part-cells of the input
        raise OptionError(f"--size {size}: must be a multiple of {STRIDE} (one feature per {STRIDE} x {STRIDE} px), "
                          f"e.g. {size // STRIDE * STRIDE} or {(size // STRIDE + 1) * STRIDE}")
    given = ctx.get_parameter_source("model_name") != ParameterSource.DEFAULT
    try:
        model = build_backbone(model_name if given else None, checkpoint)
    except ArchitectureMismatch as e:  # --arch contradicts the model file: a usage error
        raise OptionError(f"--arch {model_name}: {e}; leave --arch out to take the file's") from e
    res = export_onnx(model, out, size=size, opset=opset, check=not no_check)
    check = "not checked" if res.max_abs_diff is None else f"onnxruntime max abs diff {res.max_abs_diff:.2e}"
    click.echo(
        f"{res.path}: {arch_name(model.config)} features {tuple(res.output_shape)} for a {size}x{size} input; "
        f"{check}; exported in {res.export_seconds:.1f} s"
    )
