"""Option decorators shared by several commands, so the same option reads the same everywhere."""

from __future__ import annotations

import math
from pathlib import Path

import click

from wsi_vssm.runs.runner import DEFAULT_SPLIT_REGIONS, DEFAULT_WAIT_LOCKED_S, EXIT_INCOMPLETE


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange, refusing NaN and infinities too (NaN fails no comparison, so a plain range lets it
    through: `--threshold nan` would call every slide normal)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if number is not None and not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class NonEmptyPath(click.Path):
    """click's Path refusing an empty string: `--out ""` (an unset shell variable) would otherwise write into the
    current folder."""

    def convert(self, value, param, ctx):
        if isinstance(value, str | bytes) and not value.strip():
            self.fail("is empty: give a path (an unset shell variable?)", param, ctx)
        return super().convert(value, param, ctx)


# A resolution outside this range is a typo (nm for um, a magnification for an mpp): left alone it plans
# millions of regions or a petabyte resample. The readers' range for stated resolutions, `io.base.PLAUSIBLE_MPP`
# (not imported: it would pull numpy into every command's start; a test keeps the two equal).
MPP_RANGE = FiniteFloatRange(0.01, 20.0)

mpp_option = click.option(
    "--mpp",
    type=MPP_RANGE,
    default=None,
    help="Microns per pixel at level 0 of every input, except the rows of a manifest or slide list that give "
         "their own mpp (a stated value is overridden, with a warning). For only the slides that state none: "
         "--fallback-mpp of predict, evaluate and extract.",
)

fallback_mpp_option = click.option(
    "--fallback-mpp",
    type=MPP_RANGE,
    default=None,
    help="Microns per pixel at level 0 for the slides that store none (or only an objective power); slides that "
         "state theirs keep it. For folders mixing both. Not with --mpp; a manifest's or slide list's mpp column "
         "wins over it.",
)


reader_threads_option = click.option(
    "--reader-threads", type=click.IntRange(min=1), default=2, show_default=True,
    help="Threads reading regions ahead of the model, per slide.",
)


def amp_and_precision(ctx: click.Context, param: click.Parameter, value):
    """Callback of `--amp/--no-amp` and `--precision`: the old flag spells a precision (bf16 / fp32); given
    beside a --precision that says the other, refuse (exit 2) instead of letting one win silently. Click runs
    the two callbacks in either order, so the check runs when the second of them is parsed."""
    from click.core import ParameterSource

    from wsi_vssm.errors import OptionError

    values = {**ctx.params, param.name: value}
    given = all(ctx.get_parameter_source(n) not in (None, ParameterSource.DEFAULT) for n in ("amp", "precision"))
    amp, precision = values.get("amp"), values.get("precision")
    if given and amp is not None and precision in ("fp32", "bf16") and precision != ("bf16" if amp else "fp32"):
        flag, spelled = ("--amp", "bf16") if amp else ("--no-amp", "fp32")
        raise OptionError(f"{flag} (the old spelling of --precision {spelled}) contradicts --precision {precision}; "
                          "give only --precision")
    return value


def one_spelling(ctx: click.Context, param: click.Parameter, values: tuple):
    """Callback of an option with an old name beside its new one (`multiple=True`, so click keeps every value):
    `--arch micro --model tiny` is refused (exit 2) rather than letting the last spelling win silently."""
    from wsi_vssm.errors import OptionError

    if len(set(values)) > 1:
        names = " / ".join(o for o in param.opts)
        raise OptionError(f"{names} given {len(values)} times with different values "
                          f"({', '.join(map(str, values))}); give it once")
    return values[-1] if values else None


precision_option = click.option(
    "--precision", type=click.Choice(["fp32", "bf16", "auto"]), default="fp32", show_default=True,
    callback=amp_and_precision,
    help="Backbone arithmetic. bf16 only pays on hardware with native bf16 (AMX / AVX512-BF16 CPUs, recent GPUs); "
         "elsewhere it runs fp32 with one warning. auto: bf16 where native, else fp32.",
)


def run_options(f):
    """Cohort-run options shared by extract, predict and evaluate (see docs/cohorts.md)."""
    opts = [
        click.option("--workers", type=click.IntRange(min=1), default=None,
                     help="Run slides on a Dask LocalCluster of N processes (default: serially, in this process)."),
        click.option("--scheduler", default=None, metavar="tcp://HOST:PORT",
                     help="Run slides on an existing Dask cluster (e.g. started by dask-jobqueue on SLURM)."),
        click.option("--split-regions", type=click.IntRange(min=0), default=DEFAULT_SPLIT_REGIONS,
                     show_default=True, metavar="N",
                     help="With Dask: run a slide of more than N regions as tasks of N regions each (0: never)."),
        click.option("--retry-failed", is_flag=True,
                     help="Retry slides that failed in an earlier run (a slide whose file changed is always redone)."),
        click.option("--wait-locked", type=FiniteFloatRange(min=0), default=DEFAULT_WAIT_LOCKED_S,
                     show_default=True, metavar="SECONDS",
                     help="Wait this long for slides another run on the same OUT is doing, then report them as "
                          f"in progress (exit {EXIT_INCOMPLETE}); 0: do not wait."),
        click.option("--overwrite", is_flag=True,
                     help="Redo slides that are already done (evaluate on a patch folder: score every patch again)."),
        click.option("--json", "json_lines", is_flag=True,
                     help="Print one JSON object a line on stdout (one per slide: status, outputs, result; evaluate "
                          "adds its report's), nothing else there; the usual lines go to stderr."),
        click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors."),
        click.option("-v", "--verbose", is_flag=True, help="Also skipped slides' reasons and cluster details."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def pop_run_options(opts: dict, ctx: click.Context | None = None):
    """(RunOptions, Progress) from the options `run_options` added; removes them from `opts`."""
    from wsi_vssm.errors import OptionError
    from wsi_vssm.progress import Progress
    from wsi_vssm.runs.runner import RunOptions

    workers, scheduler = opts.pop("workers"), opts.pop("scheduler")
    quiet, verbose = opts.pop("quiet"), opts.pop("verbose")
    if scheduler is not None and not scheduler.strip():  # e.g. an unset "$SCHEDULER": never a silent serial run
        raise OptionError("--scheduler is empty; give the address of a running Dask scheduler, tcp://HOST:PORT")
    if workers and scheduler:
        raise OptionError("--workers starts a local cluster and --scheduler uses an existing one; give only one")
    if quiet and verbose:
        raise OptionError("--quiet and --verbose exclude each other")
    debug = bool(ctx and ctx.obj and ctx.obj.get("debug"))
    run = RunOptions(workers=workers, scheduler=scheduler, retry_failed=opts.pop("retry_failed"),
                     overwrite=opts.pop("overwrite"), debug=debug, split_regions=opts.pop("split_regions"),
                     wait_locked=opts.pop("wait_locked"))
    return run, Progress.from_flags(quiet, verbose, json_lines=opts.pop("json_lines"))


def exit_for(summary, n_requested: int) -> None:
    """Exit 0 when every slide is done; 4 (`EXIT_INCOMPLETE`) when some are still locked by another run (not
    done, not failed: rerun when it has finished); 1 when the only slide asked for failed (bad input); 3 when a
    cohort finished with some slides failed."""
    import sys

    n_locked, n_failed = summary.count("locked"), summary.count("failed")
    if n_locked:
        click.echo(f"wsi-vssm: {n_locked} of {n_requested} slide(s) still being done by another run (locked); "
                   f"{n_failed} failed; rerun when that run has finished", err=True)
        sys.exit(EXIT_INCOMPLETE)
    if not n_failed:
        return
    if n_requested == 1:
        sys.exit(1)  # the error line is already out
    others = "none is done" if n_failed >= n_requested else "the others are done"
    click.echo(f"wsi-vssm: {n_failed} of {n_requested} slide(s) failed; {others}", err=True)
    sys.exit(3)  # not ctx.exit: the app runs click with standalone_mode=False, which drops it


def model_options(f):
    return click.option(
        "--model", "-m", "model_path", default="default", show_default=True,
        help="Model file (wsi-vssm-model/1), or 'default' for the packaged model.",
    )(f)


def predict_options(f):
    """Options shared by predict and evaluate (analysis resolution, regions, device, threshold)."""
    opts = [
        click.option("--target-mpp", type=MPP_RANGE, default=None,
                     help="Analysis resolution in um/px (default: the model's own)."),
        click.option("--region-px", type=click.IntRange(min=32), default=None,
                     help="Region side at analysis resolution, a multiple of the model's token (32 px) "
                          "(default: 2048 on CPU, 9984 on GPU, i.e. 10,000 in whole tokens). Each region's scan "
                          "sees only its own pixels: probabilities and outlines move with the region size, more "
                          "below 1024 (docs/features.md)."),
        click.option("--overlap-px", type=click.IntRange(min=0), default=None,
                     help="Overlap between regions, a multiple of the token (default 128)."),
        click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto", show_default=True,
                     help="Where the backbone runs; auto: CUDA when there is a GPU."),
        click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Regions per forward pass (evaluate on a patch folder: patches per pass, and values below "
                          "16 are raised to 16)."),
        reader_threads_option,
        precision_option,
        click.option("--amp/--no-amp", default=False, callback=amp_and_precision, hidden=True,
                     help="Old spelling of --precision bf16 / fp32."),
        click.option("--tta", is_flag=True,
                     help="Test-time augmentation: the mean over the 8 flips and quarter turns of every region "
                          "(8 x the backbone time; the run prints what it cost)."),
        click.option("--threshold", type=FiniteFloatRange(0, 1), default=None,
                     help="Slide decision threshold (default: the model's, else 0.5)."),
        click.option("--cell-threshold", type=FiniteFloatRange(0, 1), default=None,
                     help="Cell probability at and above which a cell is tumour: contours, lesions, overlay "
                          "(default: the model's, else 0.5)."),
        click.option("--extent-threshold", type=FiniteFloatRange(0, 1), default=None,
                     help="Where a lesion ends: cells at or above it that join a cell at or above --cell-threshold "
                          "are part of its lesion and contour (default: the model's, else the cell threshold)."),
        click.option("--lesion-merge-cells", "merge_distance_cells", type=FiniteFloatRange(min=0), default=None,
                     help="Lesion pieces at most this many cell widths apart are measured as one lesion "
                          "(default: the model's, else 1)."),
        click.option("--cells-geojson", is_flag=True,
                     help="Also write cells.geojson: every tissue cell as a QuPath tile with its probability "
                          "(Measure > Show measurement maps colours the slide by it); about 250 bytes a cell. "
                          "Later runs keep it current, with this option or without."),
        click.option("--backend", type=click.Choice(["auto", "openslide", "tifffile", "zarr"]), default="auto",
                     show_default=True, help="Slide reader; auto chooses by the file's content (docs/formats.md)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def build_params(model, mpp, **opts):
    """PredictParams from predict's options, checked against the model before any slide is read."""
    from wsi_vssm.pipeline.predict import PredictParams, cell_threshold, extent_threshold

    device = option_device(opts["device"])
    option_geometry(device, model.token_px, opts["region_px"], opts["overlap_px"])
    one_resolution_rule(mpp, opts.get("fallback_mpp"))
    params = PredictParams(mpp=mpp, **opts)
    extent_threshold(model, params, cell_threshold(model, params, warn=False))  # --extent-threshold too high: exit 2
    return params


def one_resolution_rule(mpp, fallback_mpp) -> None:
    """--mpp sets every slide's resolution, so a --fallback-mpp beside it would never apply: refused (exit 2)
    rather than ignored."""
    from wsi_vssm.errors import OptionError

    if mpp is not None and fallback_mpp is not None:
        raise OptionError("--mpp sets every slide's resolution (over a stated one), --fallback-mpp only that of the "
                          "slides that state none: give one of them")


def option_device(device: str) -> str:
    """`--device` resolved (auto -> cpu or cuda); cuda on a machine without one is an OptionError (exit 2)."""
    from wsi_vssm.errors import OptionError, UsageError
    from wsi_vssm.models.device import resolve_device

    try:
        return resolve_device(device)
    except UsageError as e:
        raise OptionError(f"--device {device}: {e}") from e


def option_backbone(arch: str, scan: str = "auto") -> None:
    """A backbone named by `--arch` (a registry name; `--model` is its older name) and `--scan`, checked before any
    data is read: an unknown name is an OptionError (exit 2)."""
    from wsi_vssm.errors import OptionError
    from wsi_vssm.models.registry import get_config
    from wsi_vssm.models.vssm import ModelConfigError

    for option, value, overrides in (("--arch", arch, {}), ("--scan", scan, {"scan": scan})):
        try:
            get_config(arch, **overrides)
        except ModelConfigError as e:
            raise OptionError(f"{option} {value}: {e}") from e


# which of the given options each geometry check involves (pipeline.geometry.check_geometry)
_GEOMETRY_INPUTS = {"region_px": ("region_px",), "overlap_px": ("region_px", "overlap_px"),
                    "min_tissue": ("min_tissue",)}


def option_geometry(device: str, token_px: int, region_px: int | None, overlap_px: int | None,
                    min_tissue: float | None = None) -> tuple[int, int, float]:
    """(region_px, overlap_px, min_tissue) with the defaults filled in, checked before any slide is read, so that
    e.g. `--region-px 100` is one usage error (exit 2) naming the option, not a failure of every slide. Defaults
    that do not fit the model file's token size stay bad input (exit 1)."""
    from wsi_vssm.errors import OptionError
    from wsi_vssm.pipeline.geometry import DEFAULT_MIN_TISSUE, GeometryError, check_geometry, resolve_geometry

    given = {"region_px": region_px, "overlap_px": overlap_px, "min_tissue": min_tissue}
    region, overlap = resolve_geometry(device, token_px, region_px, overlap_px)
    tissue = DEFAULT_MIN_TISSUE if min_tissue is None else min_tissue
    try:
        check_geometry(token_px, region, overlap, tissue)
    except GeometryError as e:
        if all(given[k] is None for k in _GEOMETRY_INPUTS[e.param]):
            raise  # only defaults took part: the model file's token size does not fit them
        hint = "" if given[e.param] is not None else " (its default; give it too)"
        raise OptionError(f"--{e.param.replace('_', '-')} {e.reason}{hint}") from e
    return region, overlap, tissue


def blocking_file(path: str | Path, folder: bool = False) -> Path | None:
    """The existing file that stops `path` being written: one of its parent folders (`afile/m.pt`), or for an
    output folder `path` itself; None when there is none."""
    path = Path(path)
    for p in ([path] if folder else []) + list(path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def option_output(option: str, path: str | Path | None, folder: bool = False) -> None:
    """An OptionError (exit 2) before any work when a file stands where the output or one of its folders must
    go, instead of a bare "File exists" when the result is written (after the training)."""
    from wsi_vssm.errors import OptionError

    blocked = None if path is None else blocking_file(path, folder)
    if blocked is not None:
        raise OptionError(f"{option} {path}: {blocked} is a file, not a folder")
    if path is not None:
        _check_writable(option, Path(path), folder)


def _check_writable(option: str, path: Path, folder: bool) -> None:
    """One line (exit 1) before any work when the nearest existing folder of an output cannot take a file (read-only,
    no permission): training wrote a whole epoch before failing. An unnamed temporary file is the only sure test
    (os.access says yes to root on folders such as /sys)."""
    import tempfile

    from wsi_vssm.errors import WsiVssmError

    where = next((p for p in ([path] if folder else []) + list(path.parents) if p.is_dir()), None)
    if where is None:
        return
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise WsiVssmError(f"{option} {path}: cannot write in {where} ({e.strerror or e})") from None


def model_file(model_path: str) -> str:
    """The file a model option names ('default' -> the packaged weights), as an absolute path: workers load it
    by path, and a worker of a remote scheduler does not share our working directory."""
    from wsi_vssm.models.slide_model import resolve_model_path

    return str(Path(resolve_model_path(model_path)).absolute())


def load_cli_model(model_path: str):
    import warnings

    from wsi_vssm.models.slide_model import load_model

    model = load_model(model_path)
    if model.metadata.get("training_incomplete"):  # `train cells` writes its best epoch so far under the final name
        warnings.warn(f"{model_path}: the best epoch so far of a training run that has not finished (its slide head "
                      "is not fitted yet): finish it with --resume, or expect unreliable slide probabilities",
                      stacklevel=2)
    return model


def domain_note(model, params=None) -> str:
    """The line every prediction run ends with: what the model knows, so that no one reads it as a diagnosis;
    and, when `--target-mpp` read the slides far from the model's resolution, that this run did (as extract
    warns: cells and lesions change scale, so the calibration no longer holds)."""
    from wsi_vssm.models.slide_model import domain_text

    target = getattr(params, "target_mpp", None)
    off = (f" This run read the slides at {target:g} um/px (--target-mpp), not the model's {model.mpp:g}: its "
           "probabilities and lesion sizes are not calibrated there." if target and
           abs(target - model.mpp) > 0.05 * model.mpp else "")
    return (f"note: model {model.name!r} was trained on {domain_text(model)} only; on other tissue, "
            f"stains or magnifications its probabilities mean nothing.{off} Research software, not a diagnosis.")
