"""The one-line warnings `evaluate` prints under a cohort's figures: scores that do not separate the classes,
classes or patients too few for the bootstrap to mean much, mosaic slides tiled from the same patches, slides out
of the model's domain, slides that trained the model's slide head, patches that trained or selected the model,
patches that repeat another's image. Each takes an `EvaluationResult` (`runs.evaluate`) and returns the line, or
None when there is nothing to say."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wsi_vssm.runs.evaluate import EvaluationResult

SEPARATION_TIE = 1e-6  # scores closer than this count as equal


def separation_warning(result: EvaluationResult) -> str | None:
    """One line when the scores do not separate the classes: every slide scores the same, or the AUC's 95% CI
    covers 0.5 (chance). None when they do, or when there are too few scored slides to say."""
    done = [r for r in result.rows if r["status"] == "done" and r["probability"] is not None]
    # ties judged as the AUC ranked them (metrics.json auc_ranked_by): probabilities of 0.000 can still rank by
    # logits -23 to -15
    key = "logit" if result.metrics.get("auc_ranked_by") == "logit" else "probability"
    scores = [r[key] for r in done]
    m = result.metrics
    if len(scores) >= 2 and max(scores) - min(scores) <= SEPARATION_TIE:
        return (f"every one of the {len(scores)} {result.items} scores {done[0]['probability']:.3f}: the scores do "
                f"not separate tumour from normal {result.items} (is the cohort within the model's domain?)")
    ci = m.get("auc_ci95")
    if m.get("auc") is not None and ci and ci[0] <= 0.5 <= ci[1]:
        return (f"the scores do not separate tumour from normal {result.items}: AUC {m['auc']:.3f}, its 95% CI "
                f"{ci[0]:.3f}-{ci[1]:.3f} covers 0.5 (chance)")
    return None


def unranked_logits_warning(result: EvaluationResult) -> str | None:
    """One line when the AUC ranked probabilities because some scored slides have no logit (predicted by a
    version before logits were recorded): probabilities of 1.000 tie, however differently the model called them."""
    if result.metrics.get("auc_ranked_by") != "probability":
        return None
    done = [r for r in result.rows if r["status"] == "done" and r["probability"] is not None]
    names = [r["slide"] for r in done if r.get("logit") is None]
    if not names:
        return None
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    tied = sum(r["probability"] >= 1.0 for r in done)
    return (f"{len(names)} of {len(done)} scored {result.items} were predicted before logits were recorded "
            f"({shown}): the AUC ranks probabilities, which tie at 1.000 ({tied} do here); to rank by logits, "
            "delete those slides' folders in the output folder and run the same command again (only they run)")


def domain_warning(result: EvaluationResult) -> str | None:
    """One line when scored slides are out of the model's domain: the AUC includes them."""
    n_out, n = result.metrics.get("n_out_of_domain"), result.metrics.get("n")
    if not n_out:
        return None
    names = [r["slide"] for r in result.rows if r.get("in_domain") is False and r["probability"] is not None]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    counted = "the AUC includes them" if result.metrics.get("auc") is not None else "the figures include them"
    return (f"{n_out} of {n} scored slide(s) are out of the model's domain ({shown}; predictions.csv column "
            f"in_domain): {counted}, and their probabilities are unreliable")


SMALL_CLASS = 10  # fewer patients than this: the kappa and its interval say little
# fewer slides of a class than this: the AUC's percentile bootstrap interval is too narrow (it covered the true
# AUC about 89-93% of the time at 10-15 slides a class in simulated binormal cohorts, 2026-12-04)
SMALL_CLASS_AUC = 20


def small_cohort_warning(result: EvaluationResult) -> str | None:
    """One line when a class has fewer than SMALL_CLASS_AUC scored slides: the percentile bootstrap then gives
    intervals too narrow for 95%, down to 1.000-1.000 on four perfectly separated slides. It quotes the DeLong
    interval where that is defined (`bench/auc_interval.py` measures both)."""
    labels = [r["label"] for r in result.rows
              if r["status"] == "done" and r["probability"] is not None and r["label"] is not None]
    n1, n0 = sum(1 for y in labels if y == 1), sum(1 for y in labels if y == 0)
    if result.metrics.get("auc") is None or min(n1, n0) >= SMALL_CLASS_AUC:
        return None
    delong = result.metrics.get("auc_ci95_delong")
    better = (f"; DeLong's interval {delong[0]:.3f}-{delong[1]:.3f} (auc_ci95_delong) holds the true AUC more "
              f"often from 10 {result.items} a class" if delong else "")
    return (f"the AUC rests on {n1} tumour and {n0} normal {result.items}: with fewer than {SMALL_CLASS_AUC} of a "
            f"class its bootstrap interval is not a reliable measure of uncertainty (often too narrow){better}")


# a typical label-0 patch of a mosaic cohort in this share of the other normal slides, or more: the slides are far
# from independent (bench/detector.py's 32 x 32 held-back cohort: 69%; one reused patch that the model reads as
# tumour turned 28 of its 40 normal slides into false positives, 2026-12-05)
SHARED_PATCHES = 0.2


def shared_patches_warning(result: EvaluationResult) -> str | None:
    """One line when a mosaic cohort's normal slides (`synth --from-patches`, whose mosaic.json names each cell's
    patch) are tiled from largely the same patches: one patch then sits in most of them, and their specificity,
    the ECE and the AUC interval can hinge on it."""
    path = result.metrics.get("mosaics")
    if not path:
        return None
    from wsi_vssm.synth.mosaic import patch_recurrence, slide_patches

    try:
        held = slide_patches(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # a patients cohort or an unknown layout
        return None
    scored = {r["slide"] for r in result.rows if r.get("status") == "done"}
    if scored:  # the slides this evaluation scored (a --split, failed slides)
        held = {name: names for name, names in held.items() if name in scored}
    share = patch_recurrence(held)
    if share is None or share < SHARED_PATCHES:
        return None
    pool = set().union(*held.values())
    return (f"the {len(held)} normal {result.items} are tiled from largely the same patches: a typical one of "
            f"their {len(pool)} label-0 patches sits in {share:.0%} of the other normal slides ({path}), so they "
            "are not independent slides, and their specificity, the ECE and the AUC interval can hinge on a few "
            "patches (the source tree's bench/patch_drivers.py names them)")


def few_patients_warning(result: EvaluationResult) -> str | None:
    """One line when the pN kappa rests on fewer than SMALL_CLASS patients: one patient gives kappa 1.000
    (1.000-1.000) when its stage is right and 0.000 (0.000-0.000) when it is not."""
    n = result.metrics.get("n_patients")
    if result.metrics.get("kappa") is None or not n or n >= SMALL_CLASS:
        return None
    return (f"the pN kappa rests on {n} patient(s): with fewer than {SMALL_CLASS} its value and bootstrap interval "
            "say little")


def training_slides_warning(result: EvaluationResult, model) -> str | None:
    """One line when slides of the cohort have the names of slides that trained or selected the model's slide
    head, as its metadata names them (`mil_stage.train_slides` / `valid_slides`, which `run ... attach_mil`
    records): if they are those slides, their figure flatters it. Names only (the metadata records no more), and
    every synthetic cohort names its slides tumor_001, normal_001, ...: the line says it matched names."""
    stage = (getattr(model, "metadata", None) or {}).get("mil_stage") or {}
    used = {str(s).lower() for key in ("train_slides", "valid_slides")
            if isinstance(stage.get(key), list) for s in stage[key]}
    hit = sorted(r["slide"] for r in result.rows if str(r["slide"]).lower() in used)
    if not hit:
        return None
    more = f" and {len(hit) - 5} more" if len(hit) > 5 else ""
    return (f"{len(hit)} of the {len(result.rows)} {result.items} have the names of slides that trained or selected "
            f"this model's slide head (its metadata mil_stage): {', '.join(hit[:5])}{more}; if they are those "
            "slides, a figure over them flatters the model (evaluate --split test on a manifest with a split "
            "column)")


def training_patches_warning(result: EvaluationResult) -> str | None:
    """One line when patches of a patch folder trained or selected the model, as the fingerprints in its file
    say (metrics.json `model_patches`; `training.data.fingerprints`): their figure flatters it."""
    seen = result.metrics.get("model_patches") or {}
    if not seen.get("either"):
        return None
    n = result.metrics.get("n") or len(result.rows)  # counted over the scored patches, as the figures are
    return (f"{seen['either']} of the {n} scored patches trained ({seen['trained']}) or selected "
            f"({seen['selected']}) this model (the same image files; metrics.json model_patches): a figure over "
            "them flatters the model; model_patches.csv names them: evaluate a folder without them")


def repeated_patches_warning(result: EvaluationResult) -> str | None:
    """One line when files of a patch folder repeat another's image byte for byte (metrics.json
    `repeated_patches`), or slides of a cohort are one input under several names (`repeated_slides`: a copy, a
    link; by their recorded fingerprints): each copy counts again in the AUC, and a copy filed under both
    labels is a labelling error the figure cannot show."""
    key = "repeated_slides" if result.metrics.get("repeated_slides") else "repeated_patches"
    rep = result.metrics.get(key) or {}
    if not rep.get("repeats"):
        return None
    conflict = (f"; {rep['conflicting_labels']} of those group(s) filed under both labels (e.g. "
                f"{', '.join(rep['example'])})" if rep.get("conflicting_labels") else
                f" (e.g. {', '.join(rep['example'])})")
    n = result.metrics.get("n") or len(result.rows)  # the scored items: failed ones are in no figure
    what = ("are another slide's file under another name (a copy or a link: the same size, first and last MiB; "
            if key == "repeated_slides" else "repeat another patch's image byte for byte (")
    return (f"{rep['repeats']} of the {n} scored {result.items} {what}{rep['groups']} group(s) of identical files; "
            f"metrics.json {key}){conflict}: each copy counts again in the figures")


def annotation_frame_warning(result: EvaluationResult) -> str | None:
    """One line when annotations reach past their slides: drawn in another frame (a lower level's pixels,
    micrometres), their lesions cannot be found, and the FROC counts every one as missed (or, past every
    detection, as hit: a square of 10^300 px scored 1.0)."""
    outside = ((result.metrics.get("froc") or {}).get("annotations_outside_slide")) or {}
    if not outside:
        return None
    name, bounds = next(iter(outside.items()))
    more = f" and {len(outside) - 1} more" if len(outside) > 1 else ""
    return (f"the annotations of {len(outside)} slide(s) reach past the slide ({name}: tumour bounds {bounds} "
            f"level-0 px{more}; metrics.json froc.annotations_outside_slide): are they in level-0 pixels? The "
            "FROC over them means nothing")
