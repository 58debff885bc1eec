"""`wsi-vssm info OUT`: what an output folder of `predict`, `evaluate` or `extract` holds, slide by slide, from
the per-slide states (docs/cohorts.md), so a lab can see where a long cohort run stands without opening files;
for `evaluate` on a patch folder (no slide states), its figures and failed patches from metrics.json and
predictions.csv. No slide, heatmap or model is opened (and neither numpy nor torch imported)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from wsi_vssm.outputs.files import (
    METRICS_JSON,
    PREDICTION_JSON,
    PREDICTIONS_CSV,
    is_patch_report,
    name_key,
    read_metrics,
)
from wsi_vssm.outputs.report_text import interval_text, subgroup_lines
from wsi_vssm.runs.jobs import few_cells_tag
from wsi_vssm.runs.patch_scores import PATCH_SCORES, kept_scores
from wsi_vssm.runs.state import STATE_DIR, describe_holder, live_lock

KINDS = ("predict", "extract")  # the jobs that keep a state per slide (evaluate's slides are predict's)
# extract settings that make the stores of one folder unlike: `train mil` refuses the first three mixed and
# warns about the others (training.mil_bags)
EXTRACT_SETTINGS = ("model_hash", "mpp", "token_px", "region_px", "overlap_px", "min_tissue", "precision")


def is_output_folder(path: str) -> bool:
    """A folder that a cohort command wrote: it holds the per-slide state folder."""
    return (Path(path) / STATE_DIR).is_dir()


def output_info(path: str) -> dict:
    """{folder, slides: [{slide, kind, status, probability, call, in_domain, n_cells, error, ...}], counts}:
    one entry per state file, in name order; a state that cannot be read is listed as `unreadable`."""
    out = Path(path)
    slides, counts = [], {}
    for kind in KINDS:
        for file in sorted((out / STATE_DIR).glob(f"*.{kind}.json")):
            entry = _entry(file, kind)
            if entry["status"] == "failed":  # a redo that failed: are an earlier run's outputs still there?
                entry["earlier_outputs"] = _has_outputs(out, entry["slide"], kind)
            # done, but its outputs were deleted or moved since: a rerun makes them again
            entry["outputs_gone"] = entry["status"] == "done" and not _has_outputs(out, entry["slide"], kind)
            if entry["status"] == "running":  # a live run's slide, or one a killed run left (redone on rerun)
                holder = live_lock(out, kind, entry["slide"])
                entry["status"] = "in_progress" if holder else "interrupted"
                entry["error"] = describe_holder(holder) if holder else "a run stopped during it; rerun to redo it"
            slides.append(entry)
            key = f"{kind} {entry['status']}"
            counts[key] = counts.get(key, 0) + 1
    report = _report(out)
    table = _report_rows(out) if report and report["items"] != "patches" else None
    if table is not None:  # which states the report counts, and its rows that no state stands for
        stated = set()
        for entry in slides:
            if entry["kind"] == "predict":
                row = table.get(name_key(entry["slide"]))
                entry["report_status"] = None if row is None else row[1]
                stated.add(name_key(entry["slide"]))
        report["without_state"] = [{"slide": name, "status": status, "error": error}
                                   for key, (name, status, error) in table.items() if key not in stated]
    return {"folder": str(out), "slides": slides, "counts": counts, "mixed_settings": _mixed_settings(slides),
            "report": report}


UNRECORDED = "not recorded"  # what a report written by an earlier version did not say


def _report_rows(out: Path) -> dict[str, tuple[str, str, str]] | None:
    """{name key: (slide, status, error)} of OUT's predictions.csv, or None when it cannot be read."""
    try:
        with open(out / PREDICTIONS_CSV, newline="", encoding="utf-8") as f:
            return {name_key(r["slide"]): (r["slide"], r.get("status") or "", r.get("error") or "")
                    for r in csv.DictReader(f) if r.get("slide")}
    except (OSError, ValueError, KeyError, csv.Error):
        return None


def _report(out: Path) -> dict | None:
    """What OUT's metrics.json says, when an `evaluate` wrote one: the table or patch folder it evaluated, its
    split, how many items and its AUC, and whether it is complete (a later run marks it stale while it works).
    The per-slide states below may also hold other cohorts' slides run into the same folder."""
    m = read_metrics(out)
    if m is None:
        return None
    return {"cohort": m.get("cohort"), "split": m.get("split"), "items": "patches" if is_patch_report(m)
            else m.get("mosaics") and "mosaic slides" or "slides",
            **{k: m.get(k) for k in ("n", "n_failed", "n_pending", "auc", "auc_ci95", "stale", "reason", "subgroups")},
            "complete": m.get("complete", True)}  # a report written before it said so was written at the end


def _subgroup_lines(blocks) -> list[str]:
    """`evaluate --subgroup`'s summary lines again; none for a report without them, or one `info` cannot read."""
    try:
        return subgroup_lines(blocks) if isinstance(blocks, dict) else []
    except (KeyError, TypeError, ValueError, AttributeError):  # a foreign or damaged block: the rest still shows
        return []


def _mixed_settings(slides: list[dict]) -> dict:
    """{setting: {value: slides}} for each EXTRACT_SETTINGS value that differs among the folder's finished
    extract slides (a folder filled by runs with other models or regions); {} when they agree."""
    mixed = {}
    for key in EXTRACT_SETTINGS:
        values: dict = {}
        for s in slides:
            value = (s.get("settings") or {}).get(key)
            if s["kind"] == "extract" and s["status"] == "done" and value is not None:  # None: an older state
                values[str(value)] = values.get(str(value), 0) + 1
        if len(values) > 1:
            mixed[key] = values
    return mixed


def _has_outputs(out: Path, name: str, kind: str) -> bool:
    """Whether OUT holds a slide's outputs: predict's OUT/<name>/prediction.json, extract's OUT/<name>.zarr,
    h5_files/<name>.h5 or pt_files/<name>.pt (pipeline.feature_files' layout, not imported: it loads numpy).
    False for a name that is no single file name (a foreign state's `../x`) or a path that cannot be looked at."""
    if not name or name in (".", "..") or Path(name).name != name:
        return False
    paths = ([out / name / PREDICTION_JSON] if kind == "predict" else
             [out / f"{name}.zarr", out / "h5_files" / f"{name}.h5", out / "pt_files" / f"{name}.pt"])
    try:
        return any(p.exists() for p in paths)
    except OSError:  # a name too long, a folder without permission
        return False


def _entry(file: Path, kind: str) -> dict:
    name = file.name[: -len(f".{kind}.json")]
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
        result = state.get("result") or {}
        probability = result.get("probability")
        threshold = (state.get("params") or {}).get("threshold")
        if probability is not None:
            probability = float(probability)  # a foreign value fails here, said as unreadable
        in_domain, error = result.get("in_domain"), state.get("error") or result.get("reason")
        if not (isinstance(state.get("slide", name), str) and isinstance(state.get("status", ""), str)
                and in_domain in (True, False, None) and isinstance(error, str | None)):
            raise ValueError("a field of the wrong type")
        formats, settings = None, None
        if kind == "extract":  # which files the slide's features went to (`extract --format`; zarr before it)
            formats = (state.get("params") or {}).get("formats", ["zarr"])
            settings = {k: (state.get("params") or {}).get(k) for k in EXTRACT_SETTINGS}
            if not (isinstance(formats, list) and all(isinstance(f, str) for f in formats)):
                raise ValueError("a field of the wrong type")
        source, given = result.get("mpp_source"), None
        value = state.get("fallback_mpp") if source == "fallback" else (state.get("params") or {}).get("slide_mpp")
        if source in ("fallback", "user") and isinstance(value, int | float):
            given = f"{'fallback' if source == 'fallback' else 'given'} {value:g} um/px"
        call = None
        if probability is not None and threshold is not None:
            call = "tumor" if probability >= threshold else "normal"  # as predict prints it
        return {"slide": state.get("slide", name), "kind": kind, "status": state.get("status", "unknown"),
                "probability": probability, "call": call, "in_domain": in_domain,
                "n_cells": result.get("n_cells"), "error": error, "formats": formats,
                "path": state.get("path"), "finished": state.get("finished"), "mpp_given": given,
                "earlier_outputs": False, "settings": settings, "few_cells": result.get("few_cells")}
    except (OSError, ValueError, TypeError, AttributeError, OverflowError) as err:  # damaged or foreign: said
        return {"slide": name, "kind": kind, "status": "unreadable", "probability": None, "call": None,
                "in_domain": None, "n_cells": None, "error": f"{file}: cannot read this state: {err}",
                "formats": None, "path": None, "finished": None, "mpp_given": None, "earlier_outputs": False,
                "settings": None}


def format_output_info(r: dict) -> str:
    counts = ", ".join(f"{n} {key}" for key, n in sorted(r["counts"].items())) or "no slide run yet"
    lines = [f"output folder: {r['folder']} ({counts})"]
    rep = r.get("report")
    if rep:  # the cohort figures first: what a reader of this folder came for
        auc = (f"AUC {rep['auc']:.3f}{interval_text(rep.get('auc_ci95'))}"
               if isinstance(rep.get("auc"), int | float) else f"AUC n/a ({rep.get('reason') or 'undefined'})")
        split = f", split {rep['split']}" if rep.get("split") else ""
        at_work = sum(s["status"] == "in_progress" for s in r["slides"])
        state = ("complete" if rep.get("complete") else "NOT complete: " + (
            f"a run is at work in this folder now ({at_work} slide(s) in progress); these are an earlier run's "
            "figures" if at_work and rep.get("stale") else rep.get("stale")
            or f"{rep.get('n_pending') or 0} slide(s) not finished"))
        of = rep.get("cohort") or f"a cohort {UNRECORDED}"
        lines.append(f"report:        {auc} over {rep.get('n')} {rep['items']} of {of}{split} "
                     f"({rep.get('n_failed') or 0} failed); {state} -> metrics.json")
        lines += [f"  {line}" for line in _subgroup_lines(rep.get("subgroups"))]
        if rep["items"] == "patches":
            lines.append("               (a patch evaluation: the slides below are an earlier run's)")
    for s in r["slides"]:
        domain = ", OUT OF DOMAIN" if s["in_domain"] is False else ""
        if s["probability"] is not None:
            what = (f"probability {s['probability']:.3f} -> {s['call'] or '?'}{few_cells_tag(s.get('few_cells'))}"
                    f"{domain} [{s['n_cells']} cells]")
        elif s["formats"] and s["status"] == "done":
            what = f"{s['n_cells']} cells in {', '.join(s['formats'])}"
        else:  # a slide with no probability may still be out of domain (a fluorescence slide: "no tissue found")
            what = ", ".join(filter(None, (s["error"], domain.removeprefix(", "))))
        if s["mpp_given"]:  # a resolution the file did not state (--fallback-mpp, --mpp, a manifest's mpp)
            what += f" (read at the {s['mpp_given']})"
        if s["earlier_outputs"]:
            what += (f" ({s['slide']}/ still holds an earlier run's outputs)" if s["kind"] == "predict" else
                     " (an earlier run's feature files of it are still there)")
        if s.get("outputs_gone"):
            what += " (its outputs are gone since: a rerun makes them again)"
        if "report_status" in s and s["report_status"] is None:  # run into this folder by another command
            what += " (not in the report)"
        elif s.get("report_status") not in (None, s["status"], "no_tissue"):  # its outputs went since, say
            what += f" (the report has it {s['report_status']})"
        kind = "" if s["kind"] == "predict" else f" ({s['kind']})"
        lines.append(f"  {s['slide']}{kind}: {s['status']}{': ' + what if what else ''}")
    for row in (rep or {}).get("without_state") or []:  # a missing file: failed before any state was written
        lines.append(f"  {row['slide']}: {row['status']} (in the report, no state): {row['error']}")
    for key, values in r["mixed_settings"].items():
        shown = ", ".join(f"{_short(key, v)} ({n})" for v, n in sorted(values.items()))
        lines.append(f"warning: its slides were extracted with different {key}: {shown}; {_MIXED[key]}: extract "
                     "the odd ones again")
    return "\n".join(lines)


_REFUSED = "train mil refuses stores of different models, resolutions or cell sizes together"
_WARNED = "train mil warns (a cell's features depend on its region)"
_MIXED = {"model_hash": _REFUSED, "mpp": _REFUSED, "token_px": _REFUSED, "region_px": _WARNED,
          "overlap_px": _WARNED, "min_tissue": "train mil warns (the bags keep cells by different thresholds)",
          "precision": "bf16 and fp32 features differ slightly (train mil does not check it)"}


def _short(key: str, value: str) -> str:
    return value[:12] if key == "model_hash" else value


def is_patch_evaluation(path: str) -> bool:
    """A folder that `evaluate` wrote for a patch folder: a metrics.json with the patch-only `model_patches` key,
    the scores file of a run interrupted before its first report, or (a report from before either existed) a
    metrics.json without slide states whose table's rows name patches in their label folders (`0/a.jpg`)."""
    if (Path(path) / PATCH_SCORES).is_file():
        return True
    metrics = read_metrics(path)
    if is_patch_report(metrics):
        return True
    if metrics is None and (Path(path) / METRICS_JSON).exists():  # one that cannot be read says nothing more
        return False
    if (Path(path) / STATE_DIR).is_dir():
        return False
    try:
        with open(Path(path) / PREDICTIONS_CSV, newline="", encoding="utf-8") as f:
            first = next(csv.DictReader(f), None) or {}
    except (OSError, ValueError, csv.Error):
        return False
    return "/" in str(first.get("slide") or "")  # a slide's name never holds one


def patch_evaluation_info(path: str) -> dict:
    """{folder, patches (the folder evaluated), n, n_failed, auc, auc_ci95, threshold, sensitivity, specificity,
    model_patches, repeated_patches, precision, tta, failed: [{patch, error}], report (whether metrics.json is
    there), complete, stale (why not), kept_scores (patch scores kept: `runs.patch_scores`), in_progress (a run
    is scoring into the folder now)} of a patch evaluation."""
    out = Path(path)
    m = read_metrics(out) or {}  # none: interrupted before its first report, only its kept scores
    failed = []
    try:
        with open(out / PREDICTIONS_CSV, newline="", encoding="utf-8") as f:
            failed = [{"patch": r.get("slide"), "error": r.get("error")} for r in csv.DictReader(f)
                      if r.get("status") == "failed"]
    except (OSError, ValueError, csv.Error):  # metrics.json still says how many
        pass
    kept = kept_scores(out)
    # an interrupted first run has no report: its settings are the score file's
    params = m.get("parameters") or (kept or {}).get("params") or {}
    return {"folder": str(out), "patches": m.get("cohort"), "model": (m.get("model") or {}).get("name"),
            **{k: m.get(k) for k in ("n", "n_failed", "auc", "auc_ci95", "threshold", "sensitivity", "specificity",
                                     "model_patches", "repeated_patches")},
            "precision": params.get("precision"), "tta": params.get("tta"), "failed": failed,
            "report": bool(m), "complete": m.get("complete", bool(m)), "stale": m.get("stale"),
            "kept_scores": None if kept is None else kept["scores"],
            "in_progress": bool(kept and kept["in_progress"])}


def format_patch_evaluation_info(r: dict) -> str:
    kept, busy = r.get("kept_scores"), r.get("in_progress")
    if not r.get("report"):
        if busy:
            return f"patch evaluation: {r['folder']}: being scored now by a run ({kept or 0} patch score(s) so far)"
        return (f"patch evaluation: {r['folder']}: interrupted before its first report; {kept or 0} patch scores "
                "kept: rerun the same evaluate command to resume")
    auc = "n/a" if r["auc"] is None else f"{r['auc']:.3f}{interval_text(r['auc_ci95'])}"
    model = f"model {r['model'] or UNRECORDED}, {r['precision'] or 'precision ' + UNRECORDED}"
    lines = [f"patch evaluation: {r['folder']} (of {r['patches'] or 'a patch folder ' + UNRECORDED}; {model}"
             f"{', TTA' if r['tta'] else ''})",
             f"  {r['n']} patches scored, {r['n_failed']} failed; AUC {auc}"]
    if not r.get("complete") and busy:
        lines.insert(1, f"  NOT complete: a later run is scoring into this folder now ({kept or 0} patch score(s) "
                        "so far); these are the earlier run's figures")
    elif not r.get("complete"):  # a later run was interrupted
        so_far = f" ({kept} patch scores kept)" if kept is not None else ""
        lines.insert(1, f"  NOT complete: {r.get('stale') or 'the report was not finished'}{so_far}")
    if r["threshold"] is not None and r["sensitivity"] is not None:
        lines.append(f"  at threshold {r['threshold']:.3f}: sensitivity {r['sensitivity']:.3f}, specificity "
                     f"{r['specificity']:.3f}")
    seen, rep = r["model_patches"] or {}, r["repeated_patches"] or {}
    if seen.get("either"):
        lines.append(f"  {seen['either']} of them trained ({seen['trained']}) or selected ({seen['selected']}) "
                     "the model: the figures flatter it")
    if rep.get("repeats"):
        both = f", {rep['conflicting_labels']} under both labels" if rep.get("conflicting_labels") else ""
        lines.append(f"  {rep['repeats']} repeat another patch's image ({rep['groups']} groups{both})")
    for f in r["failed"][:5]:
        lines.append(f"  failed: {f['patch']}: {f['error']}")
    if len(r["failed"]) > 5:
        lines.append(f"  ... and {len(r['failed']) - 5} more failed (predictions.csv)")
    return "\n".join(lines)

