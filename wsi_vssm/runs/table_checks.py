"""What cohort tables (manifests, reference tables, slide lists) share: their error, and their column of slide
resolutions (`mpp`)."""

from __future__ import annotations

from pathlib import Path

from wsi_vssm.errors import UsageError
from wsi_vssm.io.base import PLAUSIBLE_MPP


class CohortError(UsageError):
    """A cohort table that cannot be used as written; the message names the file and row."""


# a manifest's column of level-0 resolutions: `mpp`, or a name other tables give it (the first found is used)
MPP_COLUMNS = ("mpp", "mpp_um", "um_per_px", "um_per_pixel", "microns_per_pixel")
# a manifest's `mpp` cell that gives none: empty, or how tables spell a missing value (pandas writes NaN as empty)
MISSING_MPP = frozenset({"", "na", "n/a", "nan", "none", "null", "unknown", "-"})


def mpp_column(path: Path, header: list[str]) -> int | None:
    """The index of a table's column of slide resolutions (`MPP_COLUMNS`), or None; one warning for a column
    whose name says resolution but is not read (`mpp_x`, `mpp (um/px)`: its slides would fail "no resolution"
    with the column right there)."""
    found = next((c for c in MPP_COLUMNS if c in header), None)
    unread = [c for c in header if c != found and ("mpp" in c or "micron" in c)]
    if unread:
        import warnings

        warnings.warn(f"{path}: column {unread[0]!r} is not read as the slides' resolution (only "
                      f"{', '.join(MPP_COLUMNS)}{'; ' + repr(found) + ' is' if found else ''}); rename "
                      "it mpp if it holds level-0 microns per pixel", UserWarning, stacklevel=3)
    return None if found is None else header.index(found)


def check_row_width(path: Path, line: int, cells: list[str], header: list[str], i_mpp: int | None) -> None:
    """A row longer than the header of a table with resolutions: a decimal comma (`0,25`) split its mpp."""
    if i_mpp is not None and any(c.strip() for c in cells[len(header):]):
        raise CohortError(f"{path}, line {line}: {len(cells)} fields under a header of {len(header)}: a "
                          "decimal comma in the mpp (0,25)? write 0.25")


def parse_mpp(value: str, path: Path, line: int) -> float | None:
    """A manifest row's `mpp`: empty (or `NA`, `unknown`, ...: `MISSING_MPP`) is none; else a number of microns
    per pixel in the readers' plausible range (outside it is a typo: nm for um, a magnification for an mpp)."""
    v = value.strip()
    if v.lower() in MISSING_MPP:
        return None
    lo, hi = PLAUSIBLE_MPP
    try:
        mpp = float(v)
    except ValueError:
        mpp = None
    if mpp is None or not lo <= mpp <= hi:  # NaN fails too
        comma = " (a decimal comma? write 0.25)" if "," in v else ""
        raise CohortError(f"{path}, line {line}: mpp {value!r} is not a resolution in microns per pixel "
                          f"({lo:g} to {hi:g}; 0.25 at 40x, 0.5 at 20x){comma}")
    return mpp
