"""`wsi-vssm export`: a VSSM backbone as ONNX, checked with onnxruntime."""

from __future__ import annotations

import click


@click.command("export")
@click.option("--model", "model_name", default="micro", show_default=True,
              help="Backbone config name (micro, tiny, small, base, tiny_s1, small_s1, base_s1).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Weights for that config (e.g. an upstream VMamba release checkpoint), loaded strictly.")
@click.option("--onnx", "out", type=click.Path(dir_okay=False, writable=True), required=True,
              help="Where to write the .onnx file.")
@click.option("--size", type=click.IntRange(min=32), default=224, show_default=True,
              help="Input side in pixels (the graph has a fixed input size).")
@click.option("--opset", type=click.IntRange(min=17), default=17, show_default=True)
@click.option("--no-check", is_flag=True, help="Skip the onnxruntime comparison with PyTorch.")
def command(model_name, checkpoint, out, size, opset, no_check):
    """Export a backbone's forward_features (B x 3 x S x S -> B x 8C x S/32 x S/32) to ONNX."""
    from wsi_vssm.commands.options import option_backbone
    from wsi_vssm.models.export import build_backbone, export_onnx

    option_backbone(model_name)
    model = build_backbone(model_name, checkpoint)
    res = export_onnx(model, out, size=size, opset=opset, check=not no_check)
    check = "not checked" if res.max_abs_diff is None else f"onnxruntime max abs diff {res.max_abs_diff:.2e}"
    click.echo(
        f"{res.path}: {model_name} features {tuple(res.output_shape)} for a {size}x{size} input; "
        f"{check}; exported in {res.export_seconds:.1f} s"
    )
