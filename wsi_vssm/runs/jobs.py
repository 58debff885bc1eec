"""The jobs a cohort run executes per slide: `PredictJob` (predict and evaluate) and `ExtractJob` (extract),
both following the `SlideJob` protocol the runner, the executor and the Dask driver rely on.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from wsi_vssm import __version__
from wsi_vssm.atomic import remove_temporaries
from wsi_vssm.outputs import files
from wsi_vssm.runs.execute import SlideTask
from wsi_vssm.runs.state import params_hash

_MODELS: dict = {}  # per process (driver or Dask worker): model cache, key -> loaded model


class SlideJob(Protocol):
    """What the runner needs of a job. `kind` names its state files; `task_hash(task)` decides whether a done
    slide is up to date (`params_hash`, the run's, for a slide without a resolution of its own); `run` does one
    slide (in the driver or a Dask worker) and returns a picklable dict. `fallback_mpp` is not hashed: it
    changes only the slides that store no resolution, and the runner redoes those (`state.fallback_changed`)."""

    out: str
    kind: str
    model_id: str
    model_hash: str
    params_hash: str
    fallback_mpp: float | None

    def task_params(self, task: SlideTask) -> dict: ...

    def task_hash(self, task: SlideTask) -> str: ...

    def run(self, task: SlideTask, region_progress=None, run_regions=None) -> dict: ...

    def open_slide(self, task: SlideTask): ...

    def grid_size(self, task: SlideTask) -> int: ...

    def region_backbone(self): ...

    def region_params(self) -> dict: ...

    def outputs_ok(self, name: str) -> bool: ...

    def clear_partial(self, name: str) -> None: ...

    def where(self, name: str) -> str: ...

    def outputs(self, name: str) -> list[str]: ...

    def describe(self, name: str, result: dict, timings: dict) -> str: ...


class PerSlideMpp:
    """A manifest row's `mpp` (`SlideTask.mpp`) is that slide's `--mpp`: hashed as `slide_mpp` for it alone, so
    the other slides' hash (and an older run's) stays the run's `params_hash`."""

    resolved: dict
    params_hash: str

    def task_params(self, task: SlideTask) -> dict:
        return dict(self.resolved) if task.mpp is None else {**self.resolved, "slide_mpp": task.mpp}

    def task_hash(self, task: SlideTask) -> str:
        return self.params_hash if task.mpp is None else params_hash(self.task_params(task))

    def slide_mpp(self, task: SlideTask) -> float | None:
        return self.resolved.get("slide_mpp") if task.mpp is None else task.mpp


def cached_model(key: str, load: Callable):
    """The model for `key` in this process, loaded once (the driver preloads it; Dask workers load on first use)."""
    if key not in _MODELS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # shown once by the driver already
            _MODELS[key] = load()
    return _MODELS[key]


@dataclass
class PredictJob(PerSlideMpp):
    """predict_slide for each slide into OUT/<slide>/ (used by predict and evaluate)."""

    out: str
    model_path: str
    params: object  # PredictParams
    params_hash: str
    model_id: str
    model_hash: str
    resolved: dict = field(default_factory=dict)  # what the hash covers
    kind: str = "predict"
    relabel: set = field(default_factory=set)  # done slides remade from their heatmap (runs.remake)

    @property
    def fallback_mpp(self) -> float | None:
        return self.params.fallback_mpp

    def model(self):
        from wsi_vssm.models.slide_model import load_model

        return cached_model(f"predict:{self.model_path}", lambda: load_model(self.model_path))

    def run(self, task: SlideTask, region_progress=None, run_regions=None) -> dict:
        from wsi_vssm.pipeline.predict import few_cells_of, predict_slide

        def cb(done, total, stage):  # the bar counts regions: the read/write stages' 0/1 set its total to 1
            if stage == "regions":
                region_progress(done, total)

        params = self.params if task.mpp is None else dataclasses.replace(self.params, mpp=task.mpp)
        if task.name in self.relabel:  # only thresholds changed: the outputs are made again from the heatmap
            from wsi_vssm.pipeline.relabel import relabel_slide

            rec = relabel_slide(task.path, self.model(), self.out, params)
            timings = {"relabel": rec["timings"]["relabel"]}
        else:
            rec = predict_slide(task.path, self.model(), self.out, params,
                                progress=None if region_progress is None else cb, run_regions=run_regions)
            timings = rec["timings"]
        return {"probability": rec["probability"], "slide_logit": rec.get("slide_logit"), "label": rec["label"],
                "reason": rec["reason"], "in_domain": rec["in_domain"], "n_cells": rec["summary"]["n_cells"],
                "mpp_source": (rec.get("mpp") or {}).get("slide_source"), "few_cells": few_cells_of(rec),
                "timings": timings}

    def open_slide(self, task: SlideTask):
        from wsi_vssm.io import open_slide

        return open_slide(task.path, backend=self.params.backend, mpp=self.slide_mpp(task),
                          fallback_mpp=self.params.fallback_mpp)

    def grid_size(self, task: SlideTask) -> int:
        from wsi_vssm.pipeline.geometry import grid_size

        r = self.resolved  # the geometry predict_job resolved once (defaults, device) for every slide
        with self.open_slide(task) as slide:
            return grid_size(slide, r["analysis_mpp"], r["region_px"], r["overlap_px"])

    def region_backbone(self):
        return self.model().backbone

    def region_params(self) -> dict:
        return {"batch_size": self.params.batch_size, "workers": self.params.reader_threads,
                "inference": self.params.inference()}

    def outputs_ok(self, name: str) -> bool:
        from wsi_vssm.outputs.files import CELLS_GEOJSON, slide_outputs_ok

        folder = Path(self.out) / name
        return slide_outputs_ok(folder) and (not self.params.cells_geojson or (folder / CELLS_GEOJSON).is_file())

    def clear_partial(self, name: str) -> None:
        remove_temporaries(Path(self.out) / name, "")

    def where(self, name: str) -> str:
        return f"{Path(self.out) / name}/"

    def outputs(self, name: str) -> list[str]:
        """The slide's output folder, for `--json` records."""
        return [str(Path(self.out) / name)]

    def describe(self, name: str, result: dict, timings: dict) -> str:
        p = result.get("probability")
        verdict = (f"probability {p:.3f} -> {'tumor' if result.get('label') else 'normal'}" if p is not None
                   else f"no prediction ({result.get('reason')})")
        # both also on a rerun's "up to date" line, where no warning repeats them
        verdict += few_cells_tag(result.get("few_cells"))
        if result.get("in_domain") is False:
            verdict += ", OUT OF DOMAIN (unreliable)"
        if "relabel" in timings:  # no backbone ran: "0.0 s, TTA 8 views: backbone 0.0 s" said nothing true
            took = f"{timings['relabel']:.1f} s, made again from the saved heatmap"
        else:
            took = f"{timings.get('total', 0.0):.1f} s" + (
                f", TTA 8 views: backbone {timings.get('features', 0.0):.1f} s" if self.params.tta else "")
        return f"{name}: {verdict} [{result.get('n_cells')} cells, {took}] -> {self.where(name)}"


@dataclass
class ExtractJob(PerSlideMpp):
    """extract_slide for each slide into OUT/<slide>.zarr (and/or the `formats` of pipeline.feature_files)."""

    out: str
    model: str  # model file or registry name
    extract_params: dict  # extract_slide keyword arguments
    params_hash: str
    model_id: str
    model_hash: str
    resolved: dict = field(default_factory=dict)
    kind: str = "extract"
    formats: tuple[str, ...] = ("zarr",)
    fallback_mpp: float | None = None  # level-0 mpp of the slides that store none (not hashed: PerSlideMpp)
    backend: str = "auto"  # the slide reader (`io.open_slide`)

    def backbone(self):
        from wsi_vssm.models.model_file import load_backbone

        return cached_model(f"extract:{self.model}", lambda: load_backbone(self.model))

    def run(self, task: SlideTask, region_progress=None, run_regions=None) -> dict:
        from wsi_vssm.pipeline.extract import extract_slide
        from wsi_vssm.pipeline.feature_files import write_feature_file

        backbone, info = self.backbone()
        slide = self.open_slide(task)
        with slide:
            slide.require_mpp()  # MissingMpp: "...state it with --mpp"
            t = time.perf_counter()
            cells = extract_slide(slide, backbone, info=info, progress=region_progress, run_regions=run_regions,
                                  **self.extract_params)
            t_extract = time.perf_counter() - t
        t = time.perf_counter()
        for fmt in self.formats:
            write_feature_file(self.target(task.name, fmt), cells, fmt)
        self._warn_left_over(task.name)
        if len(cells) == 0:  # CLAM-style loaders fail later on an empty bag, far from the cause: say it here
            warnings.warn(f"{task.path}: no cells (no tissue found, or no cell reaches min_tissue "
                          f"{self.extract_params['min_tissue']:g}): its feature files hold an empty bag, which "
                          "`train mil` leaves out and bag loaders of other tools may fail on", UserWarning,
                          stacklevel=2)
        return {"n_cells": len(cells), "n_regions": len(set(cells.region_id.tolist())),
                "mpp_source": slide.mpp_source, "timings": {"extract": t_extract, "write": time.perf_counter() - t}}

    def open_slide(self, task: SlideTask):
        from wsi_vssm.io import open_slide

        return open_slide(task.path, backend=self.backend, mpp=self.slide_mpp(task), fallback_mpp=self.fallback_mpp)

    def _warn_left_over(self, name: str) -> None:
        """An earlier run's file of a format this run does not write is not removed (it may be wanted as it is),
        but it may now hold other cells than the files just written: say so, as CLAM / TRIDENT read it unasked."""
        from wsi_vssm.pipeline.feature_files import FORMATS

        for fmt in FORMATS:
            path = self.target(name, fmt)
            if fmt not in self.formats and os.path.lexists(path):
                warnings.warn(f"{path}: left from an earlier run (this run wrote {', '.join(self.formats)}), so it "
                              f"may hold other cells; remove it, or add --format {fmt}", UserWarning, stacklevel=2)

    def grid_size(self, task: SlideTask) -> int:
        from wsi_vssm.pipeline.geometry import grid_size

        p = self.extract_params
        with self.open_slide(task) as slide:
            return grid_size(slide, p["mpp"], p["region_px"], p["overlap_px"])

    def region_backbone(self):
        return self.backbone()[0]

    def region_params(self) -> dict:
        p = self.extract_params
        return {"batch_size": p.get("batch_size", 1), "workers": p.get("workers", 2), "inference": p.get("inference")}

    def target(self, name: str, fmt: str | None = None) -> Path:
        from wsi_vssm.pipeline.feature_files import feature_file

        return feature_file(self.out, name, fmt or self.formats[0])

    def outputs_ok(self, name: str) -> bool:
        from wsi_vssm.pipeline.feature_files import feature_file_ok

        return all(feature_file_ok(self.target(name, fmt), fmt) for fmt in self.formats)

    def clear_partial(self, name: str) -> None:
        from wsi_vssm.pipeline.feature_files import FORMATS

        for fmt in FORMATS:  # every format's, also those of an earlier run with other formats
            path = self.target(name, fmt)
            remove_temporaries(path.parent, f"{path.name}.")

    def where(self, name: str) -> str:
        return " + ".join(self.outputs(name))

    def outputs(self, name: str) -> list[str]:
        """The slide's feature files, one per format, for `--json` records."""
        return [str(self.target(name, fmt)) for fmt in self.formats]

    def describe(self, name: str, result: dict, timings: dict) -> str:
        return (f"{name}: {result.get('n_cells')} cells from {result.get('n_regions')} region(s) in "
                f"{timings.get('total', 0.0):.1f} s -> {self.where(name)}")


def few_cells_tag(n) -> str:
    """A tumour call that rests on fewer than `pipeline.predict.FEW_CELLS` cells, as a run's line and `info OUT`
    say it (states written before it was recorded say nothing)."""
    return f" (doubtful: {n} cell(s) at the cell threshold)" if isinstance(n, int) and not isinstance(n, bool) else ""


def predict_job(out: str | os.PathLike, model_path: str | os.PathLike, model, params) -> PredictJob:
    """A PredictJob whose hash covers everything that changes predict's outputs.

    Covered: the weights (hash), analysis mpp, token size, region and overlap (after defaults), slide and cell
    thresholds, reader backend, a slide mpp override, the precision used (fp32 or bf16, as resolved on this
    machine), test-time augmentation, the package version and the output files' format. Not covered: reader
    threads, batch size and device (CPU and GPU agree within ~1e-5; a slide done on one is not redone on the
    other), and `--cells-geojson`, which adds a file and changes none (`runs.remake`).
    """
    from wsi_vssm.models.device import resolve_device
    from wsi_vssm.models.model_file import state_dict_hash
    from wsi_vssm.models.precision import resolve_precision
    from wsi_vssm.pipeline.geometry import head_region_warning, resolve_geometry
    from wsi_vssm.pipeline.predict import cell_threshold, extent_threshold, merge_distance_cells, slide_threshold

    device = resolve_device(params.device)
    region_px, overlap_px = resolve_geometry(device, model.token_px, params.region_px, params.overlap_px)
    params = dataclasses.replace(params, region_px=region_px, overlap_px=overlap_px)  # the run uses what is hashed
    if mismatch := head_region_warning(getattr(model, "metadata", None), region_px, overlap_px):
        warnings.warn(mismatch, stacklevel=2)
    model_hash = state_dict_hash(model.state_dict())
    resolved = {
        "job": "predict", "model_hash": model_hash, "analysis_mpp": float(params.target_mpp or model.mpp),
        "token_px": model.token_px, "region_px": region_px, "overlap_px": overlap_px,
        "threshold": slide_threshold(model, params, warn=False),
        "cell_threshold": cell_threshold(model, params, warn=False),
        "lesion_extent_threshold": extent_threshold(model, params, cell_threshold(model, params, warn=False)),
        "lesion_merge_distance_cells": merge_distance_cells(model, params),
        "backend": params.backend, "slide_mpp": params.mpp, "tta": params.tta,
        "precision": str(resolve_precision(params.inference().precision, device)).removeprefix("torch."),
        "version": __version__, "outputs_format": files.OUTPUTS_FORMAT,
    }  # fmt: skip
    path = os.fspath(model_path)
    _MODELS[f"predict:{path}"] = model  # serial runs use the model already loaded
    return PredictJob(os.fspath(out), path, params, params_hash(resolved), f"{model.name} ({path})", model_hash,
                      resolved)


def extract_job(out: str | os.PathLike, model: str, backbone, info, mpp_override: float | None,
                extract_params: dict, formats: tuple[str, ...] = ("zarr",),
                fallback_mpp: float | None = None, backend: str = "auto") -> ExtractJob:
    """An ExtractJob; its hash covers the weights, the geometry (mpp, token, region, overlap, min tissue),
    a slide mpp override, the precision used (as resolved on this machine), the package version and the file
    formats (not threads, batch size or device)."""
    from wsi_vssm.models.precision import resolve_precision
    from wsi_vssm.pipeline.feature_files import check_formats

    keys = ("mpp", "token_px", "region_px", "overlap_px", "min_tissue")
    inference = extract_params.get("inference")
    precision = "fp32" if inference is None else inference.precision
    dtype = resolve_precision(precision, extract_params.get("device", "cpu"))
    resolved = {"job": "extract", "model_hash": info.model_hash, **{k: extract_params[k] for k in keys},
                "slide_mpp": mpp_override, "precision": str(dtype).removeprefix("torch."), "version": __version__}
    formats = check_formats(formats)  # in one order, once each: the order given does not redo slides
    if formats != ("zarr",):  # stores made before formats existed keep their hash
        resolved["formats"] = list(formats)
    if backend != "auto":  # another reader may decode other pixels (JPEG); auto keeps the hash stores had before
        resolved["backend"] = backend
    _MODELS[f"extract:{model}"] = (backbone, info)
    return ExtractJob(os.fspath(out), model, dict(extract_params), params_hash(resolved),
                      info.model_id, info.model_hash, resolved, formats=formats, fallback_mpp=fallback_mpp,
                      backend=backend)
