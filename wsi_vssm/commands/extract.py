"""`wsi-vssm extract SLIDE... --model M --out DIR`: token-cell features of each slide into DIR/<slide>.zarr.

Slides are read at the model's own resolution (its checkpoint's mpp; --target-mpp overrides). A slide that
fails is reported on one stderr line and the rest go on; the exit code is then 3. A store already made with the
same model and parameters is skipped (use --overwrite to redo it).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import click

from wsi_vssm.commands.options import mpp_option

EXIT_SOME_FAILED = 3
# Attributes that must match for an existing store to count as done.
SAME_RUN_KEYS = ("model_hash", "mpp", "token_px", "region_px", "overlap_px", "min_tissue")


@click.command("extract")
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--model", "-m", "model", required=True,
              help="A wsi-vssm model file, or a registry name (e.g. micro: random weights, for tests only).")
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the feature stores (<slide>.zarr).")
@click.option("--target-mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Analysis resolution in um/px (default: the model's own).")
@mpp_option
@click.option("--region-px", type=click.IntRange(min=32), default=None,
              help="Region side at the analysis mpp (default 2048 on CPU, 10000 on GPU).")
@click.option("--overlap-px", type=click.IntRange(min=0), default=None, help="Overlap of neighbouring regions.")
@click.option("--min-tissue", type=click.FloatRange(0, 1), default=None,
              help="Drop cells with a smaller tissue fraction (default 0.25).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Regions per forward pass.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Reader threads.")
@click.option("--amp/--no-amp", default=None, help="bfloat16 autocast on GPU (default: on for cuda).")
@click.option("--overwrite", is_flag=True, help="Redo slides whose store already exists for this model.")
@click.pass_context
def command(ctx, slides, model, out, target_mpp, mpp, region_px, overlap_px, min_tissue, device, batch_size,
            workers, amp, overwrite):
    """Extract token-cell features of SLIDE(s) with a VSSM backbone."""
    from wsi_vssm import features as fx

    dev = fx.resolve_device(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backbone, info = fx.load_backbone(model)
    _echo_warnings(caught)
    analysis_mpp = target_mpp or info.mpp
    if target_mpp and abs(target_mpp - info.mpp) > 1e-6 * info.mpp:
        click.echo(f"wsi-vssm: warning: reading at {target_mpp:g} um/px; the model was trained at {info.mpp:g}",
                   err=True)
    params = dict(
        mpp=analysis_mpp, token_px=info.token_px, region_px=region_px or fx.default_region_px(dev),
        overlap_px=fx.DEFAULT_OVERLAP_PX if overlap_px is None else overlap_px,
        min_tissue=fx.DEFAULT_MIN_TISSUE if min_tissue is None else min_tissue,
        batch_size=batch_size, workers=workers, device=dev, amp=(dev == "cuda") if amp is None else amp,
    )  # fmt: skip
    if amp and dev == "cpu":
        click.echo("wsi-vssm: warning: --amp applies to CUDA only; running in float32 on the CPU", err=True)
    fx.check_geometry(params["token_px"], params["region_px"], params["overlap_px"], params["min_tissue"])
    click.echo(f"model {info.model_id} ({info.model_hash[:12]}) at {analysis_mpp:g} um/px, "
               f"regions {params['region_px']} px (overlap {params['overlap_px']}), device {dev}")
    from wsi_vssm.errors import WsiVssmError

    failed = 0
    for path in slides:
        try:
            _extract_one(path, backbone, info, out, params, mpp, overwrite)
        except (WsiVssmError, OSError) as err:  # one broken slide must not stop the rest; reported, exit 3
            if ctx.obj and ctx.obj.get("debug"):
                raise
            failed += 1
            text = _one_line(err)
            click.echo(f"wsi-vssm: error: {text if path in text else f'{path}: {text}'}", err=True)
    if failed:
        click.echo(f"{failed} of {len(slides)} slide(s) failed", err=True)
        sys.exit(EXIT_SOME_FAILED)  # not ctx.exit: the app runs click with standalone_mode=False, which drops it


def _extract_one(path: str, backbone, info, out: Path, params: dict, mpp: float | None, overwrite: bool) -> None:
    from wsi_vssm.features import FeatureStore, FeatureStoreError, extract_slide
    from wsi_vssm.io import open_slide

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slide = open_slide(path, mpp=mpp)
    _echo_warnings(caught)
    with slide:
        slide.require_mpp()  # MissingMpp: "...state it with --mpp"
        target = out / f"{slide.name}.zarr"
        if target.exists() and not overwrite:
            try:
                old = FeatureStore.open(target).attrs
                if all(_same(old.get(k), v) for k, v in _expected(info, params).items()):
                    click.echo(f"{slide.name}: up to date ({target})")
                    return
            except FeatureStoreError:
                pass  # a damaged store is simply redone
        t0 = time.perf_counter()
        with _progress(slide.name) as update:
            cells = extract_slide(slide, backbone, info=info, progress=update, **params)
        FeatureStore.write(target, cells)
        n_regions = len(set(cells.region_id.tolist()))
        click.echo(f"{slide.name}: {len(cells)} cells from {n_regions} region(s) in "
                   f"{time.perf_counter() - t0:.1f} s -> {target}")


def _expected(info, params: dict) -> dict:
    return {"model_hash": info.model_hash, **{k: params[k] for k in SAME_RUN_KEYS if k != "model_hash"}}


def _same(a, b) -> bool:
    if isinstance(b, float) and isinstance(a, (int, float)):
        return abs(a - b) <= 1e-9 * max(1.0, abs(b))
    return a == b


class _progress:
    """A tqdm bar over a slide's regions on a terminal; nothing otherwise (the caller prints one line)."""

    def __init__(self, name: str):
        self.name, self.bar = name, None

    def __enter__(self):
        return self.update

    def update(self, done: int, total: int) -> None:
        if not sys.stderr.isatty():
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.name, unit="region", leave=False)
        self.bar.n = done
        self.bar.refresh()

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def _echo_warnings(caught) -> None:
    for w in caught:
        if issubclass(w.category, UserWarning):
            click.echo(f"wsi-vssm: warning: {' '.join(str(w.message).split())}", err=True)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) < 400 else text[:397] + "..."
