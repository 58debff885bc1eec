"""The subgroup columns of a cohort table (`evaluate --subgroup COLUMN`): which column a name or number means,
and each slide's value in it. The figures are `outputs.subgroups`'."""

from __future__ import annotations

from wsi_vssm.errors import OptionError
from wsi_vssm.runs.cohort import Cohort

# besides the columns the table was read by (`Cohort.key_columns`), names of columns that name or label slides
# in other tables: no grouping (a group per slide, or one class per group)
_NOT_GROUPS = {"slide", "path", "file", "slide_path", "wsi", "label", "split", "mpp", "slide_id", "name", "image",
               "image_id", "id", "class", "diagnosis"}


def column_values(cohort: Cohort, spec: str) -> tuple[str, dict[str, str]]:
    """(the column's name, slide name -> its value, "" where the row has none) for `--subgroup spec`: a header
    name (any case) or a 1-based column number (the only way into a table without a header, such as
    CAMELYON16's own reference.csv, whose third column says Macro or Micro). OptionError (exit 2) naming the
    table when no column fits, or when the column names, labels or splits the slides."""
    header = [c.strip() for c in cohort.header] if cohort.header else None
    index, spec = None, spec.strip()
    if header is not None:
        low = [c.lower() for c in header]
        if spec.lower() in low:
            index = low.index(spec.lower())
    if index is None and spec.isdigit() and int(spec) >= 1:
        index = int(spec) - 1
    width = max((len(r.cells) for r in cohort.rows), default=0)
    if index is None or index >= max(width, len(header or ())):
        have = (f"its columns: {', '.join(header)}" if header else
                f"it has no header row and {width} column(s): give a column's number (e.g. --subgroup 3)")
        raise OptionError(f"{cohort.source}: no column {spec!r} for --subgroup; {have}")
    name = header[index] if header and index < len(header) and header[index] else f"column {index + 1}"
    if index in cohort.key_columns or name.lower() in _NOT_GROUPS:
        raise OptionError(f"{cohort.source}: --subgroup {spec}: column {name!r} names, labels or splits the slides; "
                         "a subgroup column groups them (a centre, a scanner, Macro / Micro)")
    return name, {r.name: (r.cells[index].strip() if index < len(r.cells) else "") for r in cohort.rows}


def subgroup_columns(cohort: Cohort, specs: tuple[str, ...] | list[str]) -> dict[str, dict[str, str]]:
    """`column_values` of each spec, by column name, once per column (a name and its number are one column)."""
    out: dict[str, dict[str, str]] = {}
    for spec in specs:
        name, values = column_values(cohort, spec)
        out.setdefault(name, values)
    return out
