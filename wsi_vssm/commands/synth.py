"""`wsi-vssm synth OUT`: write a synthetic CAMELYON16-style cohort."""

from __future__ import annotations

import time

import click

from wsi_vssm.commands.options import FiniteFloatRange, NonEmptyPath, one_spelling


@click.command("synth", short_help="Write a synthetic CAMELYON16-style cohort (or patch mosaics).")
@click.argument("out", type=NonEmptyPath(path_type=str))
@click.option("--slides", "n_slides", type=click.IntRange(min=1), default=None, metavar="N",
              help="Number of slides; half (rounded down) tumour.")
@click.option("--patients", "n_patients", type=click.IntRange(min=1), default=None, metavar="N",
              help="Instead of --slides: CAMELYON17-style patients of 5 nodes each, stages pN0, pN0(i+), pN1mi, "
                   "pN1, pN2 in turn; writes patients.csv and reference.csv with a node `category` column.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Same seed, byte-identical files.")
@click.option("--size", type=click.IntRange(min=1024, max=400_000), default=None,
              help="Level-0 side of each slide, px [default: 20,000; patients: 8,192].")
@click.option("--mpp", type=FiniteFloatRange(0.05, 20), default=None,  # the synth writers' own limits
              help="Microns per pixel at level 0 [default: 0.5; mosaics: 0.97, PCam's].")
@click.option("--threads", "--workers", "workers", type=click.IntRange(min=1), multiple=True, callback=one_spelling,
              help="Rendering/encoding threads [default: CPUs, at most 8]; --workers, its older name, still works "
                   "(elsewhere --workers is Dask processes).")
@click.option("--quality", type=click.IntRange(1, 100), default=None,
              help="JPEG quality [default: 85; mosaics: 90].")
@click.option("--from-patches", "patches", default=None, metavar="SRC",
              help="Tile mosaic slides from labelled patches instead (a folder or tar in ImageFolder layout, "
                   "e.g. PCam): normal slides of label-0 patches, tumour slides with one lesion of label-1 ones.")
@click.option("--grid", type=click.IntRange(3, 64), default=8, show_default=True,  # synth.mosaic.MIN/MAX_GRID
              help="Mosaic slides: patches per slide side (patients' mosaic nodes have their own sizes).")
@click.option("--part", type=click.Choice(["all", "select", "holdout"]), default="all", show_default=True,
              help="Mosaics: which part of SRC to use, split as `train cells` splits its validation data.")
@click.option("--valid-select", type=click.IntRange(min=1), default=None,
              help="Mosaics with --part: patches in the selection part, as in training [default: half].")
@click.option("--split-seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Mosaics with --part: the seed training split with (`train cells --seed`).")
@click.pass_context
def command(ctx, out, n_slides, n_patients, seed, size, mpp, workers, quality, patches, grid, part, valid_select,
            split_seed):
    """Write N synthetic H&E slides (pyramidal JPEG TIFF), annotations/*.xml and reference.csv into OUT.

    With --from-patches, write N mosaic slides of real labelled patches, reference.csv and mosaic.json.
    With --patients N, write N CAMELYON17-style patients of 5 node slides each (see docs/synth.md); with
    --from-patches too, their nodes are mosaics of real labelled patches."""
    from wsi_vssm.errors import OptionError
    from wsi_vssm.synth import make_cohort

    if (n_slides is None) == (n_patients is None):
        raise OptionError("give either --slides N or --patients N")
    _warn_unused(ctx, patches is not None, n_patients is not None)
    if n_patients is not None:
        if patches is not None:
            return _mosaic_patients(out, n_patients, seed, patches, part, valid_select, split_seed, mpp or 0.97,
                                    quality or 90)
        return _patients(out, n_patients, seed, size or 8192, mpp or 0.5, workers, quality or 85)
    if patches is not None:
        return _mosaics(out, n_slides, seed, patches, grid, part, valid_select, split_seed, mpp or 0.97,
                        quality or 90)
    mpp, quality, size = mpp or 0.5, quality or 85, size or 20_000
    start = time.perf_counter()
    last = [start]

    def report(rec):
        now = time.perf_counter()
        extra = f", {len(rec.lesions)} lesion(s)" if rec.label == "tumor" else ""
        click.echo(f"wrote {rec.path.name} ({rec.label}{extra}) in {now - last[0]:.1f} s")
        last[0] = now

    records = make_cohort(out, n_slides, seed, size, mpp, workers=workers, quality=quality, on_slide=report)
    n_tumor = sum(r.label == "tumor" for r in records)
    click.echo(
        f"{len(records)} slide{'' if len(records) == 1 else 's'} ({n_tumor} tumour, {len(records) - n_tumor} "
        f"normal) in {out} in {time.perf_counter() - start:.1f} s"
    )


def _patch_part(source, part, valid_select, split_seed):
    """The patches of `source` in `part`, split as `train cells` splits its validation data."""
    from wsi_vssm.errors import OptionError
    from wsi_vssm.training.cells import TrainCellsConfig, split_valid
    from wsi_vssm.training.data.patches import load_patches

    patches = load_patches(source)
    if part != "all":
        cfg = TrainCellsConfig(seed=split_seed, valid_select=valid_select)
        patches = split_valid(patches, cfg)[part == "holdout"]
        if patches is None:
            raise OptionError(f"--valid-select {valid_select} leaves no held-back part of {source}")
    return patches


def _mosaic_patients(out, n_patients, seed, source, part, valid_select, split_seed, mpp, quality) -> None:
    from wsi_vssm.synth.mosaic_patients import make_mosaic_patient_cohort

    start = time.perf_counter()
    patches = _patch_part(source, part, valid_select, split_seed)
    recs = make_mosaic_patient_cohort(out, patches, n_patients, seed, mpp, quality)
    click.echo(f"{n_patients} mosaic patients ({len(recs)} node slides) of {len(patches)} patches ({part}) from "
               f"{source} in {out} in {time.perf_counter() - start:.1f} s; evaluate with: wsi-vssm evaluate "
               f"{out} --patients {out}/patients.csv")


def _warn_unused(ctx: click.Context, mosaics: bool, patients: bool) -> None:
    """One warning naming the options given that this kind of cohort does not use (they were ignored silently):
    mosaics take no --size or --threads, drawn slides no --grid or patch-part options, mosaic patients no --grid."""
    from click.core import ParameterSource

    unused = {"size", "workers"} if mosaics else {"grid", "part", "valid_select", "split_seed"}
    if mosaics and patients:
        unused.add("grid")
    names = {p.name: p.opts[0] for p in ctx.command.params}  # workers -> --threads
    given = [names[n] for n in sorted(unused) if ctx.get_parameter_source(n) not in (None, ParameterSource.DEFAULT)]
    if given:
        kind = ("mosaic patients" if patients else "mosaic slides") if mosaics else \
            ("drawn patients" if patients else "drawn slides")
        click.echo(f"wsi-vssm: warning: {', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to "
                   f"{kind} and {'is' if len(given) == 1 else 'are'} ignored", err=True)


def _mosaics(out, n_slides, seed, source, grid, part, valid_select, split_seed, mpp, quality) -> None:
    from wsi_vssm.synth.mosaic import make_mosaic_cohort

    start = time.perf_counter()
    patches = _patch_part(source, part, valid_select, split_seed)
    recs = make_mosaic_cohort(out, patches, n_slides, seed, grid, mpp, quality=quality)
    n_tumor = sum(r.label == "tumor" for r in recs)
    click.echo(f"{len(recs)} mosaic slide{'' if len(recs) == 1 else 's'} ({n_tumor} tumour, "
               f"{len(recs) - n_tumor} normal) of {len(patches)} patches ({part}) from {source} in {out} in "
               f"{time.perf_counter() - start:.1f} s")


def _patients(out, n_patients, seed, size, mpp, workers, quality) -> None:
    from wsi_vssm.errors import OptionError
    from wsi_vssm.synth import SynthError
    from wsi_vssm.synth.patients import check_patient_slides, make_patient_cohort, patient_plan

    try:  # slides too small for the planned lesions: the fix is another --size or --mpp, so a usage error
        check_patient_slides(patient_plan(n_patients, seed), size, mpp)
    except SynthError as e:
        raise OptionError(str(e)) from e
    start = time.perf_counter()

    def report(rec):
        sizes = ", ".join(f"{d:.2f} mm" for d in rec.diameters_mm)
        click.echo(f"wrote {rec.path.name} ({rec.patient}, {rec.category}{': ' + sizes if sizes else ''})")

    recs = make_patient_cohort(out, n_patients, seed, size, mpp, workers=workers, quality=quality, on_slide=report)
    click.echo(f"{n_patients} patients ({len(recs)} node slides) in {out} in {time.perf_counter() - start:.1f} s; "
               f"evaluate with: wsi-vssm evaluate {out} --patients {out}/patients.csv")
