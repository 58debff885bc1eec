"""Slide paths as `predict` and `extract` take them on the command line: slide files, OME-Zarr folders, folders
of slides (as CLAM and TRIDENT take them) and CSV slide lists (TRIDENT's `--custom_list_of_wsis`, or any
manifest's path column), expanded to (path, row mpp) pairs. Cohort tables with labels are `runs.cohort`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from wsi_vssm.io.formats import is_zarr_dir
from wsi_vssm.runs.cohort import (
    _PATH_COLUMNS,
    SLIDE_SUFFIXES,
    _cell,
    _path_column,
    _read_csv,
    _table_path,
    series_folder_slide,
    slide_name,
)
from wsi_vssm.runs.table_checks import CohortError, check_row_width, mpp_column, parse_mpp


def expand_slide_folders(paths: Iterable[str], info: Callable[[str], None] | None = None) -> list[str]:
    """Command-line slide paths with each plain folder replaced by the slide files directly in it, by name
    (as CLAM and TRIDENT take a folder of slides); an OME-Zarr folder is one slide, and sub-folders (an output
    folder inside, say) are not walked. The DICOM files of one series are one slide (`io.dicom.slide_series`;
    `info` is told of each such series). A folder holding no slide file stays as given: it fails alone in the
    run, with the reader's reason, and the other slides go on."""
    from wsi_vssm.io.dicom import series_text, slide_series

    out: list[str] = []
    for path in paths:
        p = Path(path)
        if not p.is_dir() or is_zarr_dir(p):
            out.append(path)
            continue
        try:
            found = sorted((f for f in p.iterdir() if not f.name.startswith(".") and _is_slide_entry(f)),
                           key=lambda f: f.name)
        except OSError:  # a folder that cannot be listed fails alone in the run, saying so
            found = []
        for opened, series in slide_series(found):
            out.append(str(opened))
            if len(series) > 1 and info is not None:
                info(f"{opened}: one slide, a DICOM series of {len(series)} files ({series_text(series)})")
        if not found:
            out.append(path)
    return out


def expand_slide_args(paths: Iterable[str], info: Callable[[str], None] | None = None,
                      ) -> list[tuple[str, float | None]]:
    """(slide path, row mpp) for each command-line argument of predict / extract: a slide list CSV
    (`read_slide_list`) gives its rows, a folder its slides (`expand_slide_folders`), anything else itself."""
    out: list[tuple[str, float | None]] = []
    for path in paths:
        if str(path).lower().endswith(".csv") and Path(path).is_file():
            out.extend(read_slide_list(path))
        else:
            out.extend((p, None) for p in expand_slide_folders([path], info))
    return out


def read_slide_list(path: str | os.PathLike) -> list[tuple[str, float | None]]:
    """A CSV list of slides for predict / extract, as TRIDENT's `--custom_list_of_wsis` (`wsi[,mpp]`) or an
    evaluate manifest: a header naming the path column (`slide`, `path`, `file`, `slide_path`, `wsi`), paths
    relative to the CSV's folder; an `mpp` column is each row's resolution, as in a manifest; `label`, `split`
    and other columns are not needed and not read. A row whose file is missing fails alone in the run."""
    path = Path(path)
    rows = _read_csv(path)
    header = [c.strip().lower() for c in rows[0][1]] if rows else []
    column = _path_column(header)
    if column is None:
        raise CohortError(f"{path}: a slide list needs a header naming its path column ({', '.join(_PATH_COLUMNS)})"
                          f"{'; its header has: ' + ', '.join(rows[0][1]) if rows else '; the file is empty'}")
    i_path = header.index(column)
    i_mpp = mpp_column(path, header)
    out = []
    for line, cells in rows[1:]:
        check_row_width(path, line, cells, header, i_mpp)
        ref = _cell(cells, i_path)
        if not ref or slide_name(ref) in ("", ".", ".."):
            raise CohortError(f"{path}, line {line}: {'no slide path' if not ref else repr(ref) + ' names a folder'}")
        mpp = None if i_mpp is None else parse_mpp(_cell(cells, i_mpp), path, line)
        out.append((str(series_folder_slide(_table_path(ref, path))), mpp))
    if not out:
        raise CohortError(f"{path}: the slide list names no slides")
    return out


def _is_slide_entry(f: Path) -> bool:
    low = f.name.lower()
    if f.is_dir():  # an OME-Zarr slide; not a wsi-vssm heatmap or feature store (an output folder given as slides)
        from wsi_vssm.outputs.files import is_heatmap_zarr
        from wsi_vssm.pipeline.store import is_feature_store

        return low.endswith(".zarr") and is_zarr_dir(f) and not is_heatmap_zarr(f) and not is_feature_store(f)
    if not f.is_file():
        return False
    if low.endswith(SLIDE_SUFFIXES):
        return True
    from wsi_vssm.io.dicom import looks_dicom  # a DICOM file named without .dcm

    return looks_dicom(f)


def subfolder_hint(folder: Path) -> str:
    """What to give instead of a folder whose slides lie one level down: its DICOM series folders (`ROOT/*/`,
    each one slide; `ROOT/*/*.dcm` would give every file of every series), else their slide files by the suffix
    first seen (`ROOT/*/*.svs`). Looks into the first 50 sub-folders."""
    from wsi_vssm.io.dicom import dicom_files

    try:
        subs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))[:50]
    except OSError:
        subs = []
    for sub in subs:
        if dicom_files(sub):
            return f"give its DICOM series folders, each one slide: '{folder / '*'}{os.sep}'"
        try:
            names = sorted(f.name.lower() for f in sub.iterdir() if f.is_file())
        except OSError:  # a sub-folder we may not read: the next one may tell
            continue
        suffix = next((x for n in names for x in SLIDE_SUFFIXES if n.endswith(x)), None)
        if suffix:
            return f"give their slides, e.g. '{folder / '*' / ('*' + suffix)}'"
    return f"give their slides, e.g. '{folder / '*' / '*.svs'}'"
