"""`wsi-vssm synth OUT`: write a synthetic CAMELYON16-style cohort."""

from __future__ import annotations

import time

import click


@click.command("synth")
@click.argument("out", type=click.Path(path_type=str))
@click.option("--slides", "n_slides", type=int, required=True, help="Number of slides; half (rounded down) tumour.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, byte-identical files.")
@click.option("--size", type=int, default=20_000, show_default=True, help="Level-0 side of each slide, px.")
@click.option("--mpp", type=float, default=0.5, show_default=True, help="Microns per pixel at level 0.")
@click.option("--workers", type=int, default=None, help="Rendering/encoding threads [default: CPUs, at most 8].")
@click.option("--quality", type=int, default=85, show_default=True, help="JPEG quality.")
def command(out, n_slides, seed, size, mpp, workers, quality):
    """Write N synthetic H&E slides (pyramidal JPEG TIFF), annotations/*.xml and reference.csv into OUT."""
    from wsi_vssm.synth import make_cohort

    start = time.perf_counter()
    last = [start]

    def report(rec):
        now = time.perf_counter()
        extra = f", {len(rec.lesions)} lesion(s)" if rec.label == "tumor" else ""
        click.echo(f"wrote {rec.path.name} ({rec.label}{extra}) in {now - last[0]:.1f} s")
        last[0] = now

    if workers is not None and workers < 1:
        from wsi_vssm.synth import SynthError

        raise SynthError(f"--workers must be at least 1, got {workers}")
    records = make_cohort(out, n_slides, seed, size, mpp, workers=workers, quality=quality, on_slide=report)
    n_tumor = sum(r.label == "tumor" for r in records)
    click.echo(
        f"{len(records)} slides ({n_tumor} tumour, {len(records) - n_tumor} normal) in {out} "
        f"in {time.perf_counter() - start:.1f} s"
    )
