"""Report figures in words, for summary lines and `info OUT` (no numpy: `info` imports neither numpy nor torch)."""

from __future__ import annotations

from collections.abc import Sequence

# what a subgroup's tumour slides are ranked against (metrics.json subgroups.<column>.negatives)
WITHIN_GROUP = "within group"
ALL_NORMAL = "all normal slides"


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
        against = " (each against all normal slides)" if block["negatives"] == ALL_NORMAL else ""
        lines.append(f"subgroups by {column}{against}: {'; '.join(parts)}{heterogeneity_words(block['heterogeneity'])}")
    return lines


def heterogeneity_words(test: dict | None) -> str:
    """`; groups differ: DeLong chi-square p = 0.031` (or why there is no p), "" without a test."""
    if test is None:
        return ""
    if test.get("p") is None:
        return f"; groups differ: {test['test']} undefined ({test.get('reason')})"
    return f"; groups differ: {test['test']} p = {test['p']:.3g}"


def ranking_line(m: dict) -> str | None:
    """The ranking figures beyond the AUC in one line (`outputs.ranking`), None without them (one class)."""
    at = m.get("sensitivity_at_specificity") or {}
    if m.get("average_precision") is None or None in at.values():
        return None
    sens = " / ".join(f"{v['sensitivity']:.2f}" for v in at.values())
    return (f"average precision {m['average_precision']:.3f} "
            f"({interval_words(m['average_precision_ci95'], 'average precision')}; a random ranking gives about "
            f"{m['prevalence']:.2f}); sensitivity {sens} at specificity {' / '.join(at)}")


def recalibration_words(cal: dict) -> str:
    """The Brier score, calibration slope and intercept of metrics.json's `calibration`, in words."""
    def fig(key: str, fmt: str = ".2f") -> str:
        ci = cal.get(f"{key}_ci95")
        return f"{cal[key]:{fmt}}" + (f" (95% CI {ci[0]:{fmt}} to {ci[1]:{fmt}})" if ci else "")

    words = [f"Brier {fig('brier', '.3f')}"] if cal.get("brier") is not None else []
    if cal.get("slope") is not None:
        words.append(f"slope {fig('slope')}")
    elif cal.get("recalibration_reason"):
        words.append(f"slope n/a ({cal['recalibration_reason']})")
    if cal.get("intercept") is not None:
        words.append(f"intercept {fig('intercept')} (calibrated: slope 1, intercept 0)")
    return "; ".join(words)
