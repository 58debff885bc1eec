"""Cohorts: which slides, with which slide labels and splits.

Two layouts:
- a manifest CSV with a header `slide,label[,split][,mpp]` (extra columns ignored; `path`, `file`, `slide_path`
  or `wsi` may name the slide column); `slide` is a path, relative to the CSV's folder unless absolute; `mpp`,
  where a row gives one, is that slide's level-0 microns per pixel (as `--mpp` is for every slide);
- a CAMELYON16-style folder (or its `reference.csv`): rows `name,label[,...]` with or without a header, as in the
  official file (`Test_001,Tumor,Macro,...`, `tumor_001,Tumor`); slides are found by name (any case) anywhere
  under the folder, with any slide extension.

Labels are 0/1 or tumor/normal in any case; anything else is an error naming the row. Duplicate slides are an
error; a slide whose file is missing becomes a failed row (the rest of the cohort goes on).
"""

from __future__ import annotations

import csv
import glob
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from wsi_vssm.io.base import (
    SLIDE_SUFFIXES,  # re-exported here, where it was defined before 2026-12-07
    folder_name,
    output_name,
    slide_name,  # the one naming rule (SlideReader.name); re-exported as cohort.slide_name
)
from wsi_vssm.io.formats import is_zarr_dir
from wsi_vssm.outputs.files import name_key
from wsi_vssm.runs.table_checks import (  # noqa: F401  (re-exported here, where they were defined before 2026-12-07)
    MISSING_MPP,
    MPP_COLUMNS,
    CohortError,
    check_row_width,
    mpp_column,
    parse_mpp,
)

# 0.0 / 1.0 as pandas writes an integer column with a gap; tumor_tissue / normal_tissue as CLAM's example tables
LABELS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "normal": 0, "tumor": 1, "tumour": 1, "normal_tissue": 0,
          "tumor_tissue": 1, "tumour_tissue": 1}
SPLITS = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid", "test": "test"}
_HEADER_NAMES = {"slide", "name", "image", "slide_id", "image_id", "id", "path", "file"}
# A manifest's column of slide paths: `slide`, or a name other tools' tables use for a path (TRIDENT's `wsi`).
_PATH_COLUMNS = ("slide", "path", "file", "slide_path", "wsi")


class SplitError(CohortError):
    """The split asked for is not in the table (`select_split`); `evaluate --split` makes it a usage error."""


@dataclass(frozen=True)
class CohortRow:
    name: str  # slide name without extension (as feature stores and outputs are named)
    label: int | None  # 1 tumour, 0 normal; None when the table gives none
    split: str | None  # 'train', 'valid', 'test' or None
    path: Path | None  # the slide file; None when not found
    line: int  # 1-based line in the table
    error: str | None = None  # why this row cannot be used (e.g. file not found)
    mpp: float | None = None  # the manifest's `mpp` for this slide: its level-0 resolution, over the file's
    cells: tuple[str, ...] = ()  # the row as the table gives it (`column_values` reads subgroup columns from it)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Cohort:
    source: Path  # the table that was read
    layout: str  # 'manifest' or 'camelyon'
    rows: list[CohortRow] = field(default_factory=list)
    header: tuple[str, ...] | None = None  # the table's header row as written; None for a table without one
    key_columns: tuple[int, ...] = ()  # the columns read for the slides' names or paths, labels, splits and mpp

    @property
    def ok(self) -> list[CohortRow]:
        return [r for r in self.rows if r.ok]

    @property
    def failed(self) -> list[CohortRow]:
        return [r for r in self.rows if not r.ok]

    @property
    def has_split(self) -> bool:
        return any(r.split is not None for r in self.rows)

    def labels(self) -> dict[str, int]:
        """slide name -> label, for every row with a label (found or not)."""
        return {r.name: r.label for r in self.rows if r.label is not None}


def is_patch_folder(path: Path) -> bool:
    """A folder `evaluate` scores as patches: class folders 0/ and 1/ and no reference.csv."""
    return path.is_dir() and has_class_folders(path) and not (path / "reference.csv").exists()


def has_class_folders(d: Path) -> bool:
    """Whether folder `d` holds both class folders of a patch folder, 0/ and 1/, directly below it."""
    return (d / "0").is_dir() and (d / "1").is_dir()


def _patch_hint(p: Path) -> str:
    """Where the patch folder is, when `p` is a class folder (`DATA/0`) or a data set's root (`DATA/{train,valid}`
    each with 0/ and 1/): evaluate reads a patch folder only where 0/ and 1/ sit directly below."""
    try:
        if p.name in ("0", "1") and has_class_folders(p.parent):
            return f"; {p.name}/ is a class folder: for its patches, give the folder above it, {p.parent}"
        below = sorted(d.name for d in p.iterdir() if d.is_dir() and has_class_folders(d))
    except OSError:
        return ""
    if below:
        shown = ", ".join(f"{b}/" for b in below[:3])
        return (f"; for patches, give a folder with 0/ and 1/ directly below it: {shown} here hold them "
                f"(e.g. {p / below[0]})")
    return ""


def read_cohort(path: str | os.PathLike, find_slides: bool = True) -> Cohort:
    """Read a manifest CSV, a CAMELYON16-style reference.csv, or a folder holding reference.csv.

    With `find_slides=False` slide files are not looked for (labels only: e.g. for cached features), so no row
    fails for a missing file.
    """
    p = Path(path)
    if p.is_dir():
        table = p / "reference.csv"
        if not table.is_file():
            one = [c for c in ("0", "1") if (p / c).is_dir()]
            if len(one) == 1:  # a patch folder of one class, taken for a cohort folder
                raise CohortError(f"{p}: a patch folder needs both class folders 0/ and 1/ (only {one[0]}/ here): "
                                  "an AUC needs both classes; or, for a cohort folder, a reference.csv")
            raise CohortError(f"{p}: a cohort folder needs a reference.csv (or pass a manifest CSV){_patch_hint(p)}")
        p = table  # read as the file itself would be: a name table, or a manifest of paths below the folder
    if not p.is_file():
        raise CohortError(f"{p}: no such cohort file or folder")
    rows = _read_csv(p)
    if rows and _is_manifest_header(rows[0][1]):
        if not _names_only(rows, p.parent):
            return read_manifest(p, find_slides=find_slides)
    elif rows and "slide" in [c.lower() for c in rows[0][1]]:  # a manifest header that lacks a column
        raise CohortError(f"{p}: a manifest needs 'slide' and 'label' columns; its header has: "
                          f"{', '.join(rows[0][1])}")
    return read_reference(p, root=p.parent, find_slides=find_slides)


SPLIT_CHOICES = ("auto", "all", "train", "valid", "test")


def select_split(cohort: Cohort, split: str = "auto") -> tuple[Cohort, str, str | None]:
    """The rows of one split, the split taken, and a line saying what was left out (None when nothing was).
    `auto`: `test` when the table has a split column (a model is judged on slides it was neither trained nor
    selected on), else `all`. A split the table does not have is a SplitError."""
    if split not in SPLIT_CHOICES:
        raise SplitError(f"split must be one of {', '.join(SPLIT_CHOICES)}, got {split!r}")
    if split == "auto":
        split = "test" if cohort.has_split else "all"
    if split == "all":
        return cohort, "all", None
    if not cohort.has_split:
        raise SplitError(f"{cohort.source} has no split column to take the {split} rows from (a manifest "
                         "slide,label,split)")
    rows = [r for r in cohort.rows if r.split == split]
    if not rows:
        raise SplitError(f"no slide of {cohort.source} has split {split!r} (--split all takes every slide)")
    note = (f"evaluating the {len(rows)} {split} slide(s) of {len(cohort.rows)} in {cohort.source} (its split "
            f"column; --split all takes every slide)")
    return Cohort(cohort.source, cohort.layout, rows, cohort.header, cohort.key_columns), split, note


def read_manifest(path: str | os.PathLike, find_slides: bool = True) -> Cohort:
    """A CSV with a header naming `slide` (or `path`, `file`, `slide_path`, `wsi`) and `label` columns, and
    optionally `split` and `mpp` (a row's level-0 microns per pixel, or a column named as in `MPP_COLUMNS`;
    empty: the file's own)."""
    path = Path(path)
    rows = _read_csv(path)
    if not rows or not _is_manifest_header(rows[0][1]):
        raise CohortError(f"{path}: a manifest needs a header row with 'slide' and 'label' columns")
    header = [c.strip().lower() for c in rows[0][1]]
    i_slide, i_label = header.index(_path_column(header)), header.index("label")
    i_split = header.index("split") if "split" in header else None
    i_mpp = mpp_column(path, header)
    cohort = Cohort(path, "manifest", header=tuple(rows[0][1]),
                    key_columns=tuple(i for i in (i_slide, i_label, i_split, i_mpp) if i is not None))
    for line, cells in rows[1:]:
        check_row_width(path, line, cells, header, i_mpp)
        ref = _cell(cells, i_slide)
        if not ref:
            raise CohortError(f"{path}, line {line}: empty slide path")
        if slide_name(ref) in ("", ".", ".."):  # `.`, `./`, `/`: no name to write its outputs under
            raise CohortError(f"{path}, line {line}: {ref!r} names a folder, not a slide file")
        label = parse_label(_cell(cells, i_label), path, line)
        split = None if i_split is None else parse_split(_cell(cells, i_split), path, line)
        mpp = None if i_mpp is None else parse_mpp(_cell(cells, i_mpp), path, line)
        file = _table_path(ref, path)
        if file.is_dir() and not is_zarr_dir(file):
            file = series_folder_slide(file)
        error = None
        if find_slides and not file.exists():
            error = f"slide file not found: {file} ({path}, line {line}){_with_extension(file)}"
        cohort.rows.append(CohortRow(slide_name(ref), label, split, file if not error else None, line, error, mpp,
                                     tuple(cells)))
    _check_duplicates(_rows_through_series(cohort))  # one series listed twice is said as that first
    return cohort


def read_reference(path: str | os.PathLike, root: str | os.PathLike | None = None, find_slides: bool = True) -> Cohort:
    """A CAMELYON16-style `name,label[,...]` table, header optional; slides are looked up under `root`. A header
    naming `label` (and `split`, as a `slide,label,split` table of names has) places those columns."""
    path = Path(path)
    root = path.parent if root is None else Path(root)
    rows = _read_csv(path)
    i_name, i_label, i_split, header_row = 0, 1, None, None
    if rows and (_is_reference_header(rows[0][1]) or _is_manifest_header(rows[0][1])):
        header = [c.strip().lower() for c in rows[0][1]]
        if "label" in header:
            # a path column, else CLAM's slide_id, else the first name-like column (`case_id,image,label`)
            name_column = _path_column(header) or ("slide_id" if "slide_id" in header else
                                                   next((c for c in header if c in _HEADER_NAMES), header[0]))
            i_name, i_label = header.index(name_column), header.index("label")
            i_split = header.index("split") if "split" in header else None
        header_row = tuple(rows[0][1])
        rows = rows[1:]
    index = index_slides(root) if find_slides else {}
    cohort = Cohort(path, "camelyon", header=header_row,
                    key_columns=tuple(i for i in (i_name, i_label, i_split) if i is not None))
    for line, cells in rows:
        name = _cell(cells, i_name)
        if not name:
            raise CohortError(f"{path}, line {line}: empty slide name")
        if len(cells) < 2:
            raise CohortError(f"{path}, line {line}: expected 'name,label', got {','.join(cells)!r}")
        label = parse_label(_cell(cells, i_label), path, line)
        split = None if i_split is None else parse_split(_cell(cells, i_split), path, line)
        if "/" in name or "\\" in name:  # its folders would be dropped and the name looked up elsewhere
            raise CohortError(f"{path}, line {line}: {name!r} is a path, but this table names slides (looked up "
                              f"by name under {root}); for slide paths, give a manifest with a header 'slide,label'")
        written, name = name, slide_name(name)  # tolerate a name written with its extension
        if name in ("", ".", ".."):  # `.`, `..`: no slide's name, and none to write outputs under
            raise CohortError(f"{path}, line {line}: {written!r} names a folder, not a slide")
        found, error = None, None
        if find_slides:  # a series folder's name is whole (`case.v2`); a file's without its extension
            hits = index.get(name_key(folder_name(written)), []) or index.get(name_key(name), [])
            if not hits:
                error = f"no slide file named {name!r} under {root}"
            elif len(hits) > 1:  # the table is ambiguous: said before any slide runs, as a repeated row is
                raise CohortError(f"{path}, line {line}: several slide files named {name!r} under {root}: "
                                  f"{', '.join(str(h) for h in hits[:4])}; keep one, or give a manifest of paths")
            else:
                found = hits[0]
        cohort.rows.append(CohortRow(name, label, split, found, line, error, cells=tuple(cells)))
    _check_duplicates(_rows_through_series(cohort))  # one series listed twice is said as that first
    return cohort


def index_slides(root: str | os.PathLike) -> dict[str, list[Path]]:
    """Slide name (`name_key`) -> slide files (or OME-Zarr folders) anywhere under `root`, hidden ones skipped; a
    folder below `root` holding one DICOM series is found by its own name too (IDC names them by series UID)."""
    out: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            if d.lower().endswith(".zarr"):  # a zarr folder is one item (a slide if .ome.zarr), never walked
                if d.lower().endswith(".ome.zarr"):
                    out.setdefault(name_key(slide_name(d)), []).append(Path(dirpath) / d)
                continue
            keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            low = f.lower()
            if not f.startswith(".") and low.endswith(SLIDE_SUFFIXES) and not low.endswith(".zarr"):
                out.setdefault(name_key(slide_name(f)), []).append(Path(dirpath) / f)
        if Path(dirpath) != Path(root) and _holds_dicom(Path(dirpath), filenames):
            # IDC's layout: a folder per series, named by it; a folder of several slides is found too, and
            # its run says so (not "no slide file named ...")
            out.setdefault(name_key(folder_name(dirpath)), []).append(series_folder_slide(Path(dirpath)))
    return {key: _one_per_series(hits) if len(hits) > 1 else hits for key, hits in out.items()}


def _one_per_series(hits: list[Path]) -> list[Path]:
    """Hits of one name that are one DICOM series (a folder `S1` and its file `S1.dcm`) as the file it is read
    through, once: such a name is no ambiguity."""
    from wsi_vssm.io.dicom import series_slide

    return list(dict.fromkeys(series_slide(h) if h.is_file() else h for h in hits))


def series_folder_slide(path: Path) -> Path:
    """A folder of one DICOM series (IDC's layout), named as a slide (a table's row, `info FOLDER`, napari), is
    the slide in it; any other path as given."""
    from wsi_vssm.io.dicom import folder_slide

    return folder_slide(path, SLIDE_SUFFIXES) or path


def _holds_dicom(folder: Path, filenames: list[str]) -> bool:
    from wsi_vssm.io.dicom import looks_dicom

    return any(looks_dicom(folder / f) for f in filenames)


def parse_label(value: str, path: Path, line: int) -> int:
    label = LABELS.get(value.strip().lower())
    if label is None:
        raise CohortError(f"{path}, line {line}: label {value!r} is not one of 0, 1, tumor (tumour), normal (any case; "
                          "also 0.0, 1.0, tumor_tissue, normal_tissue)")
    return label


def parse_split(value: str, path: Path, line: int) -> str | None:
    v = value.strip().lower()
    if not v:
        return None
    if v not in SPLITS:
        raise CohortError(f"{path}, line {line}: split {value!r} is not one of train, valid, test")
    return SPLITS[v]


def _read_csv(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every non-blank row; a BOM and surrounding spaces are dropped."""
    import tarfile

    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        if tarfile.is_tarfile(path):  # PCam's train.tar, say: `train cells` reads tars, evaluate does not
            raise CohortError(f"{path}: a tar archive, not a cohort table: evaluate takes a patch folder (DIR/0, "
                              "DIR/1), a cohort folder or a manifest CSV; extract it first") from e
        raise CohortError(f"{path}: cannot read the table: not UTF-8 text ({e.reason} at byte {e.start}); a "
                          "manifest or reference.csv is a CSV text file") from e
    except OSError as e:
        raise CohortError(f"{path}: cannot read the table: {e.strerror or e}") from e
    out = []
    reader = csv.reader(text.splitlines())
    for cells in reader:
        cells = [c.strip() for c in cells]
        if any(cells) and not cells[0].startswith("#"):
            out.append((reader.line_num, cells))
    if out and len(out[0][1]) == 1 and any(sep in out[0][1][0] for sep in ";\t"):
        sep = "semicolons" if ";" in out[0][1][0] else "tabs"
        raise CohortError(f"{path}, line {out[0][0]}: the fields are separated by {sep}; a cohort table is a CSV "
                          "with commas (save it as comma-separated)")
    return out


def _cell(cells: list[str], i: int) -> str:
    return cells[i] if i < len(cells) else ""


def _is_manifest_header(cells: list[str]) -> bool:
    low = [c.lower() for c in cells]
    return _path_column(low) is not None and "label" in low


def _either_form(file: Path) -> Path:
    """`file`, or the same path in the other Unicode form when only that exists (a table typed in NFC naming a
    file that macOS wrote in NFD, or the reverse)."""
    import unicodedata

    if file.exists():
        return file
    for form in ("NFD", "NFC"):
        other = Path(unicodedata.normalize(form, str(file)))
        if other != file and other.exists():
            return other
    return file


def _with_extension(file: Path) -> str:
    """A hint when the row gave a slide's name without its extension (`tumor_001` for `tumor_001.tif`)."""
    if file.suffix.lower() in SLIDE_SUFFIXES or not file.parent.is_dir():
        return ""
    hits = sorted(p.name for p in file.parent.glob(glob.escape(file.name) + ".*")
                  if p.name.lower().endswith(SLIDE_SUFFIXES))
    return f"; {hits[0]} is there: give the file's whole name" if hits else ""


def _table_path(ref: str, table: Path) -> Path:
    """A slide path as a table row gives it: as the file system spells it, relative to the table's folder unless
    absolute, in whichever Unicode form exists."""
    ref = _on_disk(ref)
    return _either_form(Path(ref) if Path(ref).is_absolute() else table.parent / ref)


def _on_disk(ref: str) -> str:
    """A path read from a UTF-8 table as the file system spells it: under an ASCII locale (LC_ALL=C,
    PYTHONUTF8=0) `tümor.tif` cannot be encoded, and the file was "not found"; its UTF-8 bytes are its name."""
    try:
        os.fsencode(ref)
        return ref
    except UnicodeEncodeError:
        return os.fsdecode(ref.encode("utf-8"))


def _names_only(rows: list[tuple[int, list[str]]], folder: Path) -> bool:
    """Whether a `slide,label` table names its slides instead of giving their paths: no row has a folder or
    names a file beside the table (`tumor_001`, as `synth` and CAMELYON16 write reference.csv). Such a table is
    looked up by name under its folder, not read as a manifest of paths that do not exist."""
    header = [c.strip().lower() for c in rows[0][1]]
    i = header.index(_path_column(header))
    cells = [cells[i] for _, cells in rows[1:] if i < len(cells) and cells[i]]
    return bool(cells) and not any("/" in c or "\\" in c or _slide_like(folder / _on_disk(c)) for c in cells)


def _slide_like(p: Path) -> bool:
    """A file, or an OME-Zarr folder: what a manifest row can name. A plain folder of a slide's name (predict's
    output for it, written into the cohort folder; a CLAM patch folder) says nothing about the table."""
    return p.is_file() or (p.is_dir() and is_zarr_dir(p))


def _path_column(header: list[str]) -> str | None:
    """The column of a manifest header holding the slide paths (`slide` first), or None."""
    return next((c for c in _PATH_COLUMNS if c in header), None)


def _is_reference_header(cells: list[str]) -> bool:
    low = [c.strip().lower() for c in cells]
    if len(low) >= 2 and low[1] in LABELS:
        return False
    # CLAM's dataset CSV, `case_id,slide_id,label`: a header naming `label` and a slide-name column anywhere
    return (low[0] in _HEADER_NAMES) or (len(low) >= 2 and low[1] in ("label", "class", "diagnosis")) \
        or ("label" in low and any(c in _HEADER_NAMES for c in low))


def _different_files(a: Path | None, b: Path | None) -> bool:
    """Whether two manifest paths name two files (a path written twice, `./a.tif` and `a.tif`, is one)."""
    if a is None or b is None:
        return False
    try:
        return not os.path.samefile(a, b)
    except OSError:  # one is missing: by their resolved paths
        return os.path.realpath(a) != os.path.realpath(b)


def _check_duplicates(cohort: Cohort) -> None:
    seen: dict[str, CohortRow] = {}
    for r in cohort.rows:
        key = name_key(r.name)
        first = seen.get(key)
        if (first is not None and first.name == r.name and cohort.layout == "manifest"
                and _different_files(first.path, r.path)):
            # `a/s1.tif` and `b/s1.tif`: two slides, not one listed twice, whose outputs would collide
            raise CohortError(f"{cohort.source}, line {r.line}: {r.path} and {first.path} (line {first.line}) are "
                              f"different files of one slide name {r.name!r}: their outputs would collide; "
                              "rename one")
        if first is not None and (first.name == r.name or cohort.layout == "camelyon"):  # names: one slide
            raise CohortError(f"{cohort.source}, line {r.line}: slide {r.name!r} is listed again (first on line "
                              f"{first.line})")
        if first is not None:  # two files, but one output folder on macOS and Windows, and one name to match
            raise CohortError(f"{cohort.source}, line {r.line}: slides {r.name!r} and {first.name!r} (line "
                              f"{first.line}) differ only in case or Unicode form: their outputs would collide; "
                              "rename one")
        seen[key] = r


def _rows_through_series(cohort: Cohort) -> Cohort:
    """Rows naming a file of a DICOM series read the series through the file a folder run opens (its base level),
    and take the name its outputs have (`io.base.output_name`: its folder's, for a folder of that series alone),
    so that predictions.csv, lesions.csv, patients and feature stores all use one name; two rows
    reaching one series, by any spelling (`S/..`, a link to S), are refused: its figures would count twice."""
    from wsi_vssm.io.dicom import series_of

    seen: dict[Path, CohortRow] = {}
    for i, r in enumerate(cohort.rows):
        found = None if r.path is None else series_of(r.path)
        if found is None:
            continue
        first = seen.setdefault(found[0].resolve(), r)
        if first is not r:
            raise CohortError(f"{cohort.source}, line {r.line}: {r.path} is a file of the DICOM series that line "
                              f"{first.line} names ({first.path}): one slide, listed twice; keep one row")
        cohort.rows[i] = replace(r, path=found[0], name=output_name(found[0]))  # the name its outputs take
    return cohort
