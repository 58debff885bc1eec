"""Report figures in words, for summary lines and `info OUT` (no numpy: `info` imports neither numpy nor torch)."""

from __future__ import annotations

from collections.abc import Sequence


def interval_words(ci: Sequence[float | None] | None, what: str = "AUC") -> str:
    """`95% CI a-b` for summary lines and figures; an interval of no width (every resample gives one value: for
    the AUC, perfectly separated classes or every score tied) is said to be undefined rather than printed as
    1.000-1.000; "" without one. `what` names the figure in that case."""
    if ci is None or any(v is None for v in ci):
        return ""
    if ci[1] - ci[0] <= 0:
        return f"95% CI undefined: every resample gives this {what}"
    return f"95% CI {ci[0]:.3f}-{ci[1]:.3f}"


def interval_text(ci: Sequence[float | None] | None, what: str = "AUC") -> str:
    """`interval_words` in parentheses after a figure (` (95% CI a-b)`), "" without an interval."""
    words = interval_words(ci, what)
    return f" ({words})" if words else ""


def group_auc_words(g: dict) -> str:
    """`0.912, 95% CI 0.85-0.96`; the interval left out where it has no width (every resample the same)."""
    if g["auc"] is None:
        return "n/a"
    ci = g["auc_ci95"]
    return f"{g['auc']:.3f}" + (f", 95% CI {ci[0]:.2f}-{ci[1]:.2f}" if ci and ci[1] > ci[0] else "")


def subgroup_lines(blocks: dict) -> list[str]:
    """One summary line per column: each group's AUC with its interval and counts, then the test's p."""
    lines = []
    for column, block in blocks.items():
        parts = []
        for g in block["groups"]:
            name = "(no value)" if g["value"] is None else g["value"]
            parts.append(f"{name} AUC {group_auc_words(g)} ({g['n_tumour']} tumour, {g['n_normal']} normal)")
        test = block["heterogeneity"]
        tail = "" if test is None else f"; groups differ: permutation p = {test['p']:.3g}"
        against = " (each against all normal slides)" if block["negatives"] == "all normal slides" else ""
        lines.append(f"subgroups by {column}{against}: {'; '.join(parts)}{tail}")
    return lines
