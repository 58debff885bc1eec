"""napari reader: whole-slide images as lazy multiscale layers, and wsi-vssm prediction outputs.

`get_reader(path)` decides from the name and a few bytes (or a directory's marker files) without importing
anything heavy, and returns None for anything else. What it accepts:

- a slide file the library opens (svs, tif, ndpi, mrxs, ome.tif, ...) or an OME-Zarr slide directory;
- a `wsi-vssm predict` output folder, its `prediction.json`, or its `heatmap.ome.zarr`: heatmap + contours;
- a command's output folder (`predict` / `evaluate --out OUT`): its slide's prediction when it holds one; with
  several, a one-line error naming the slide folders to open (napari said only that no reader took the folder);
- a folder holding one DICOM series (IDC's layout: a folder per slide): that slide.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from wsi_vssm.outputs.files import HEATMAP_ZARR as _HEATMAP
from wsi_vssm.outputs.files import PREDICTION_JSON as _PREDICTION
from wsi_vssm.outputs.files import is_heatmap_zarr, zarr_root_attrs
from wsi_vssm.runs.state import STATE_DIR  # standard library only: sniffing stays light

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
TIFF_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".svslide", ".bif")
OTHER_SUFFIXES = (".mrxs", ".vms", ".vmu", ".dcm")  # OpenSlide formats with no TIFF header to sniff
# names only a slide reader claims: a damaged one is taken anyway, so the user sees why it cannot be read
# (napari said only "the reader refused the file"); a .tif that is no TIFF is left to other readers
SLIDE_ONLY_SUFFIXES = (".svs", ".ndpi", ".scn", ".svslide", ".bif")
_ZARR_MARKERS = ("zarr.json", ".zattrs", ".zgroup")

ReaderFunction = Callable[[str], list]


def get_reader(path: str | os.PathLike | list) -> ReaderFunction | None:
    """The function reading `path` as napari layers, or None (fast) when it is neither a slide nor a prediction."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None  # stacks of slides are not a thing
        path = path[0]
    p = Path(path)
    kind = sniff(p)
    if kind == "slide":
        return read_slide
    if kind in ("prediction", "heatmap"):
        return read_prediction
    if kind == "cohort":
        return read_cohort_folder
    if kind == "dicom":
        return read_dicom_folder
    return None


def sniff(p: Path) -> str | None:
    """'slide', 'prediction' (an output folder or its prediction.json), 'heatmap' (its .zarr), 'cohort' (a
    command's output folder), 'dicom' (a folder of DICOM files) or None."""
    try:
        if p.is_dir():
            return _sniff_dir(p)
        if p.name == _PREDICTION:
            return "prediction" if (p.parent / _HEATMAP).is_dir() else None
        suffix = p.suffix.lower()
        if suffix in TIFF_SUFFIXES:
            with open(p, "rb") as f:
                tiff = f.read(4) in _TIFF_MAGIC
            return "slide" if tiff or (suffix in SLIDE_ONLY_SUFFIXES and p.stat().st_size > 0) else None
        if suffix in OTHER_SUFFIXES:
            return "slide" if p.is_file() and p.stat().st_size > 0 else None
    except OSError:
        return None
    return None


def _sniff_dir(p: Path) -> str | None:
    if (p / _HEATMAP).is_dir():
        return "prediction"
    if (p / STATE_DIR).is_dir():  # a cohort command's OUT
        return "cohort"
    if not any((p / m).is_file() for m in _ZARR_MARKERS):
        return "dicom" if _holds_dicom(p) else None
    if zarr_root_attrs(p) is None:
        return None
    return "heatmap" if is_heatmap_zarr(p) else "slide"


def _holds_dicom(p: Path) -> bool:
    """A DICOM series' folder (IDC's layout): a `.dcm` name, else the first file named as DICOM media and exports
    name them (no extension, or a UID: `io.dicom.may_be_dicom`) holding `DICM` at byte 128 (132 bytes read)."""
    with os.scandir(p) as entries:
        names = sorted(e.name for e in entries if e.is_file() and not e.name.startswith("."))
    if any(n.lower().endswith(".dcm") for n in names):
        return True
    for name in names:
        ext = os.path.splitext(name)[1]
        if name.upper() != "DICOMDIR" and (ext == "" or ext[1:].isdigit()):
            with open(p / name, "rb") as f:
                return f.read(132)[128:] == b"DICM"
    return False


def read_slide(path: str | os.PathLike | list) -> list[tuple]:
    """A slide as one lazy multiscale image layer (um when its mpp is known). Raises SlideError."""
    from wsi_vssm.io import open_slide
    from wsi_vssm.napari_plugin._layers import slide_layer

    path = path[0] if isinstance(path, (list, tuple)) else path
    data, kwargs, kind = slide_layer(open_slide(path))
    _place_like_its_prediction(kwargs)
    return [(data, kwargs, kind)]


def read_dicom_folder(path: str | os.PathLike | list) -> list[tuple]:
    """A folder holding one DICOM series: its slide, as `predict FOLDER` takes it (`runs.cohort.series_folder_slide`). A
    folder of several series (or other slides beside it) is a one-line error naming what to open instead."""
    from wsi_vssm.errors import UsageError
    from wsi_vssm.runs.cohort import series_folder_slide
    from wsi_vssm.runs.slide_args import expand_slide_folders

    p = Path(path[0] if isinstance(path, (list, tuple)) else path)
    slide = series_folder_slide(p)
    if slide != p:
        return read_slide(slide)
    slides = [Path(s) for s in expand_slide_folders([str(p)]) if s != str(p)]  # as predict takes the folder
    if not slides:
        raise UsageError(f"{p}: its .dcm files are no DICOM series this app reads: open one of them to see why")
    shown = ", ".join(s.name for s in slides[:3]) + (", ..." if len(slides) > 3 else "")
    raise UsageError(f"{p}: a folder of {len(slides)} slides ({shown}): open one of them")


def read_cohort_folder(path: str | os.PathLike | list) -> list[tuple]:
    """A command's output folder: its one slide's prediction when it holds one (`predict slide --out OUT`).
    Several slides' predictions, each over its own slide, laid over one another would mean nothing: a one-line
    error names the folders to open instead."""
    from wsi_vssm.errors import UsageError

    p = Path(path[0] if isinstance(path, (list, tuple)) else path)
    try:
        slides = sorted(d.name for d in p.iterdir() if (d / _HEATMAP).is_dir())
    except OSError:
        slides = []
    if not slides:
        raise UsageError(f"{p}: {_without_predictions(p)}: nothing to show")
    if len(slides) == 1:
        return read_prediction(p / slides[0])
    shown = ", ".join(slides[:3]) + (", ..." if len(slides) > 3 else "")
    raise UsageError(f"{p}: a cohort's output folder of {len(slides)} slide predictions ({shown}): open one slide's "
                     f"folder, e.g. {p / slides[0]}, and its slide")


def _without_predictions(out: Path) -> str:
    """What an output folder with no heatmap holds, from its per-slide state files (`runs.state.state_path`): an
    `extract` run's features are no prediction, and 'not predicted yet' would send the user to wait for one."""
    state = out / STATE_DIR
    extracted = len(list(state.glob("*.extract.json")))  # glob: an unreadable folder matches nothing
    if extracted and not any(state.glob("*.predict.json")):
        return (f"an `extract` output folder (features of {extracted} slide{'s' if extracted != 1 else ''}), not "
                "predictions: napari shows what `wsi-vssm predict` writes")
    return "an output folder with no slide predicted yet"


def read_prediction(path: str | os.PathLike | list) -> list[tuple]:
    """A prediction folder (or its prediction.json or heatmap.ome.zarr) as heatmap + contours layers."""
    from wsi_vssm.napari_plugin._layers import META_KEY, heatmap_layer, prediction_layers

    p = Path(path[0] if isinstance(path, (list, tuple)) else path)
    if p.name == _PREDICTION:
        p = p.parent
    if p.name == _HEATMAP:
        p = p.parent
    if not (p / _HEATMAP).is_dir():
        return [heatmap_layer(p)]  # a heatmap .zarr renamed or moved away from its folder
    from napari.utils.notifications import show_info, show_warning

    from wsi_vssm.napari_plugin._predict import summary

    layers = prediction_layers(p)
    block = layers[0][1]["metadata"][META_KEY]
    call = block.get("prediction")
    _place_open_slide(block)
    if call is None:  # a missing or damaged prediction.json: the heatmap alone, and why
        show_warning(f"wsi-vssm: {block.get('prediction_error')}")
        return layers
    # the call and what predict warned with it (why out of domain, a call on no cell): the layers do not show it
    (show_warning if call.get("in_domain") is False else show_info)(f"wsi-vssm: {summary(call)}")
    said = [str(w) for w in call.get("warnings") or []]
    if call.get("in_domain") is False and call.get("domain_notes") and \
            not any(w.startswith("out of domain") for w in said):  # predict puts it among its warnings
        said.insert(0, f"out of domain: {'; '.join(map(str, call['domain_notes']))}")
    for warning in said:
        show_warning(f"wsi-vssm: {call.get('slide')}: {warning}")
    return layers


def _place_like_its_prediction(kwargs: dict) -> None:
    """A slide that states no resolution, opened after its prediction: at the mpp the prediction used (the open
    heatmap layer of its name), as `_place_open_slide` does the other way round."""
    import napari

    from wsi_vssm.napari_plugin._layers import META_KEY

    meta, viewer = kwargs["metadata"][META_KEY], napari.current_viewer()
    if meta.get("mpp") is not None or viewer is None:
        return
    for layer in viewer.layers:
        heat = layer.metadata.get(META_KEY) or {}
        if heat.get("kind") == "heatmap" and heat.get("slide") == kwargs["name"] and _placed(kwargs, meta, heat):
            return


def _place_open_slide(block: dict) -> None:
    """A slide without a stated resolution, open in pixels under the same name, is put in micrometres at the mpp
    its prediction used (the heatmap's `mpp`), so the layers line up: they lay 1/mpp times apart before. A slide
    opened after its prediction is placed by `_place_like_its_prediction`."""
    import napari

    from wsi_vssm.napari_plugin._layers import META_KEY

    viewer = napari.current_viewer()
    for layer in viewer.layers if viewer is not None else []:
        meta = layer.metadata.get(META_KEY) or {}
        if meta.get("kind") == "slide" and meta.get("mpp") is None and layer.name == block.get("slide"):
            settings = {"name": layer.name}
            if _placed(settings, meta, block):
                layer.scale, layer.units = settings["scale"], settings["units"]


def _placed(settings: dict, meta: dict, heatmap: dict) -> bool:
    """Put a slide layer's `settings` (its kwargs, or a stand-in) and its `meta` at the mpp of its prediction's
    `heatmap` block, and say so; False when that mpp is not a positive number."""
    from napari.utils.notifications import show_info

    mpp = heatmap.get("mpp")
    if not isinstance(mpp, int | float) or isinstance(mpp, bool) or not mpp > 0:
        return False
    settings.update(scale=(mpp, mpp), units=("um", "um"))
    meta["mpp"], meta["mpp_source"] = mpp, "its prediction"
    show_info(f"wsi-vssm: {settings['name']}: the slide states no resolution; placed at {mpp:g} um/px, the one its "
              "prediction used, so that its heatmap and contours line up")
    return True
