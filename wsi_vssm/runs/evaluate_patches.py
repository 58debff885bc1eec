"""`evaluate` on a patch folder in ImageFolder layout (`DIR/0/*.jpg`, `DIR/1/*.jpg`, e.g. PCam): each image is
scored alone by the cell head on the cell covering its centre, which is how PCam labels are defined. Scores are
kept as they are made (`runs.patch_scores`): an interrupted run resumes, and a rerun with only another
--cell-threshold or --bootstrap scores nothing again."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from wsi_vssm.errors import UsageError, one_line
from wsi_vssm.models.inputs import STRIDE
from wsi_vssm.outputs.files import MODEL_PATCHES_CSV, PREDICTIONS_CSV
from wsi_vssm.pipeline.predict import PredictParams
from wsi_vssm.runs.cohort_table import replaced_cohort_warning
from wsi_vssm.runs.evaluate import EvaluationResult, _provenance, _start_report, _write_metrics
from wsi_vssm.runs.patch_scores import PATCH_SCORES, PatchScores, evaluation_lock

# The cell head learnt on 96 px patches (PCam), scored at the centre token of their 3 x 3 token map. A patch more
# than a tenth smaller (48 px patches, a wrong --mpp) has its labelled centre off that token, or no 3 x 3 map at
# all: its scores fell near 0 without a word. Within a tenth (rounding, 0.9 vs 0.97 um/px) it is scored as trained.
TRAINED_PATCH_PX = 3 * STRIDE
SMALL_PATCH_PX = 0.9 * TRAINED_PATCH_PX  # 86.4: an 86 px patch is 10.4% smaller, so warned (round() let it by)


def evaluate_patches(
    folder: str | os.PathLike, model, out_dir: str | os.PathLike, mpp: float | None, batch_size: int = 64,
    n_boot: int = 2000, threshold: float | None = None, inference=None, device: str = "cpu",
    overwrite: bool = False, progress=None,
) -> EvaluationResult:
    """Score an ImageFolder patch dataset by the centre cell of each image; write predictions and metrics.
    Each patch is a cell, so sensitivity and specificity are taken at the model's `cell_threshold` (0.5 for
    older files) unless `threshold` is given. Probabilities go through the model's `patch_calibration` when
    it has one (a patch scored alone lacks the context the cell head was calibrated in). `inference`
    (`pipeline.extract.Inference`): precision and TTA as `predict` applies them to a region's feature map.
    Scores an earlier run into `out_dir` made with the same parameters are reused, unless `overwrite`;
    `progress` (`progress.Progress`) shows how far the scoring is."""
    import torch

    from wsi_vssm.atomic import prove_writable
    from wsi_vssm.models.precision import resolve_precision
    from wsi_vssm.outputs.report import write_predictions_csv
    from wsi_vssm.pipeline.extract import Inference
    from wsi_vssm.runs.state import OutputNotWritable
    from wsi_vssm.training.data.fingerprints import patch_digests, patches_seen, repeated_patches, seen_parts
    from wsi_vssm.training.data.patches import load_patches

    inference = Inference.of(inference)
    # a bad name, or bf16 without hardware, before any patch is read; recorded as resolved, as slides record it
    used = "bf16" if resolve_precision(inference.precision, device) == torch.bfloat16 else "fp32"
    if mpp is None:
        raise UsageError(f"{folder}: patch images carry no resolution; state it with --mpp (PCam: 0.97)")
    from wsi_vssm.pipeline.params import threshold_origin
    from wsi_vssm.pipeline.predict import cell_threshold

    origin = threshold_origin(model, threshold, "cell")  # patches are called at the cell threshold
    if threshold is None:
        threshold = cell_threshold(model, PredictParams())
    scale = mpp / model.mpp  # image px -> model px
    _check_enlargement(folder, mpp, model.mpp)
    ds = load_patches(folder)
    ds.read_digests = {}  # each file hashed as it is read: `patch_digests` below reads none again
    out = Path(out_dir)
    if other := _other_classes_warning(Path(folder), out):
        warnings.warn(other, stacklevel=2)
    try:  # before any patch is scored: an OUT that cannot be written failed only after the whole folder
        prove_writable(out)
    except OSError as e:
        raise OutputNotWritable(f"{out}: cannot write to the output folder ({e.strerror or e})") from None
    # locked before anything in OUT changes: a second run on it stops here, leaving the first one's files alone
    with (evaluation_lock(out, patches=True),
          PatchScores(out, *_scores_key(model, mpp, used, inference.tta), overwrite=overwrite) as scores):
        if replaced := replaced_cohort_warning(out, folder, None):
            warnings.warn(replaced, stacklevel=2)
        _start_report(out)  # an earlier report is marked not complete (and its cohort lesions.csv goes) while this runs
        _say_resumed(scores, ds, out, progress)
        rows, sizes, sample = _score(ds, model, scale, batch_size, inference, device, scores, progress)
        for warning in _size_warnings(folder, sizes, mpp, model.mpp):
            warnings.warn(warning, stacklevel=2)
        from wsi_vssm.pipeline.domain import patches_stain_check

        stain = patches_stain_check(sample)
        if stain:
            warnings.warn(f"{folder}: the patches do not look like the model's brightfield H&E: {'; '.join(stain)} "
                          "(metrics.json stain_notes): their scores are unreliable", stacklevel=2)
        write_predictions_csv(out / PREDICTIONS_CSV, rows)
        scored = [r for r in rows if r["probability"] is not None]
        parameters = {"mpp": mpp, "threshold": threshold, "batch_size": batch_size, "device": device,
                      "precision": used, "tta": inference.tta}
        # over the scored patches, what the figures count (a file that failed may not even be readable)
        scored_ds = ds.subset([i for i, r in enumerate(rows) if r["probability"] is not None])
        digests = patch_digests(scored_ds)
        seen = patches_seen(digests, getattr(model, "metadata", None))  # patches that trained or chose it
        repeats = repeated_patches(digests, scored_ds.labels, [it.name for it in scored_ds.items])
        _write_model_patches(out / MODEL_PATCHES_CSV, scored_ds, seen_parts(digests, getattr(model, "metadata", None)))
        metrics = _write_metrics(out, scored, threshold, len(rows) - len(scored), n_boot, items="patches",
                                 origin=origin,
                                 provenance={**_provenance(folder, None, model, parameters), "model_patches": seen,
                                             "repeated_patches": repeats, "stain_notes": stain})
        scores.finished()
        return EvaluationResult(metrics, rows, items="patches")


def _say_resumed(scores, ds, out: Path, progress) -> None:
    """One line on what the score file gives this run: the patches it holds scores of, or why none is reused."""
    if progress is None:
        return
    if scores.dropped:
        progress.info(f"{out / PATCH_SCORES}: {scores.dropped}")
    held = sum(it.name in scores.earlier for it in ds.items)  # by name: a file changed since is scored again
    if held and scores.going_on:
        progress.info(f"going on with the --overwrite run begun earlier: {held} of {len(ds)} patches scored by it "
                      f"({out / PATCH_SCORES})")
    elif held:
        progress.info(f"resuming: {held} of {len(ds)} patches have a score from an earlier run in "
                      f"{out / PATCH_SCORES} (a file changed since is scored again; --overwrite scores every patch)")


def _scores_key(model, mpp: float, precision: str, tta: bool) -> tuple[str, dict]:
    """(hash, parameters) of what changes a patch's logit: a kept score is reused only under the same."""
    from wsi_vssm import __version__
    from wsi_vssm.models.model_file import state_dict_hash
    from wsi_vssm.runs.state import params_hash

    meta = getattr(model, "metadata", None) or {}
    params = {"job": "patches", "model_hash": state_dict_hash(model.state_dict()), "model_mpp": model.mpp,
              "patch_calibration": meta.get("patch_calibration"), "mpp": mpp, "precision": precision,
              "tta": tta, "version": __version__}
    return params_hash(params), params


def _score(ds, model, scale: float, batch_size: int, inference, device: str, scores, progress):
    """Every patch's row (in the dataset's order), the (scored, given) shapes counted, and the stain sample.
    A patch that `scores` (`PatchScores`) holds an earlier run's score and size of is read (for its digest) but
    neither decoded nor scored again, unless the stain sample takes it; each scored batch is added to `scores`
    before the next."""
    import torch

    from wsi_vssm.io.base import resize
    from wsi_vssm.models.inputs import to_tensor
    from wsi_vssm.outputs.calibration import logistic
    from wsi_vssm.training.data.patches import PatchDataError

    logits: list[float | None] = [None] * len(ds)
    rows: list[dict] = [{"slide": it.name, "label": it.label, "probability": None, "status": "failed",
                         "error": None} for it in ds.items]
    batch, index = [], []
    sizes: dict[tuple, int] = {}  # (scored shape, given shape) -> patches: said once, after the loop
    sample: list = []  # evenly spaced patches for the stain check (slides get theirs from the thumbnail)
    model.eval().to(device)

    def flush():
        scored = centre_cell_logits(model, torch.cat(batch), inference, device).tolist()
        for i, z in zip(index, scored, strict=True):
            logits[i] = z
        scores.add([(ds.items[i].name, ds.read_digests[i], z, given[i]) for i, z in zip(index, scored, strict=True)])
        batch.clear()
        index.clear()

    def scaled(hw: tuple[int, int]) -> tuple[int, int]:  # (h, w) a patch is scored at: kept ones are not resized
        return hw if abs(scale - 1) <= 1e-3 else (max(32, round(hw[0] * scale)), max(32, round(hw[1] * scale)))

    given: dict[int, tuple[int, int]] = {}  # index -> (h, w) as given, of the patches this run scores
    step = max(1, len(ds) // STAIN_SAMPLE)
    with _bar(progress, len(ds)) as update:
        for i in range(len(ds)):
            if i % 64 == 0:
                update(i)
            try:
                raw = ds.read_raw(i)
                kept = scores.kept(ds.items[i].name, ds.read_digests[i])
                in_sample = i % step == 0 and len(sample) < STAIN_SAMPLE
                if kept is not None and kept[1] is not None and not in_sample:  # scored before: no pixels needed
                    logits[i] = kept[0]
                    key = (scaled(kept[1]), kept[1])
                    sizes[key] = sizes.get(key, 0) + 1
                    continue
                img = ds.decode(i, raw)
            except PatchDataError as e:  # one damaged image fails alone, as one broken slide does in a cohort
                rows[i]["error"] = one_line(e)
                continue
            given[i] = img.shape[:2]
            h, w = scaled(given[i])
            if (h, w) != given[i]:
                img = resize(img, w, h)
            key = ((h, w), given[i])
            sizes[key] = sizes.get(key, 0) + 1
            if in_sample:
                sample.append(img)
            logits[i] = None if kept is None else kept[0]
            if logits[i] is not None:
                continue
            if batch and batch[0].shape[2:] != img.shape[:2]:
                flush()
            batch.append(to_tensor(img))
            index.append(i)
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
        update(len(ds))
    done = [i for i, z in enumerate(logits) if z is not None]
    # one vectorised logistic over kept and new logits alike: a resumed run's figures equal an uninterrupted one's
    for i, p in zip(done, logistic(np.array([logits[i] for i in done], np.float64)).tolist(), strict=True):
        rows[i].update(probability=p, status="done", logit=logits[i])
    return rows, sizes, sample


def _bar(progress, total: int):
    """The progress bar of the scoring (a line a minute off a terminal), or a no-op without `progress`."""
    import contextlib

    if progress is None:
        return contextlib.nullcontext(lambda done=None: None)
    return progress.bar(total, "evaluate patches", unit="patch")


def _write_model_patches(path: Path, ds, parts: list[str | None]) -> None:
    """model_patches.csv (patch, part): the patches whose files trained or selected the model, so that a figure
    without them can be had; none: no file (an earlier run's is removed, it would name other patches)."""
    import csv
    import io

    from wsi_vssm.atomic import atomic_write_text
    from wsi_vssm.outputs.files import spreadsheet_safe

    rows = [(spreadsheet_safe(it.name), part) for it, part in zip(ds.items, parts, strict=True) if part]
    if not rows:
        path.unlink(missing_ok=True)
        return
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([("patch", "part"), *rows])  # quoted: names may hold commas
    atomic_write_text(path, buf.getvalue())


STAIN_SAMPLE = 256  # patches a stain check looks at


def _other_classes_warning(folder: Path, out: Path) -> str | None:
    """One line naming the folders beside 0/ and 1/ that hold images (an ImageFolder of more classes, `2/`): the
    model scores tumour against normal only, so their images are in no figure; they were left out silently. An
    evaluation's own output inside the folder (its plots) is not one."""
    from wsi_vssm.outputs.files import METRICS_JSON
    from wsi_vssm.training.data.patches import IMAGE_SUFFIXES, LABELS

    def candidate(p: Path) -> bool:
        return (p.is_dir() and p.name not in LABELS and not p.name.startswith(".")
                and p.resolve() != out.resolve() and not (p / METRICS_JSON).exists())

    others = {}
    for d in sorted(p for p in folder.iterdir() if candidate(p)):
        n = sum(1 for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and "/0/" not in f"/{f.relative_to(d)}"
                and "/1/" not in f"/{f.relative_to(d)}")
        if n:
            others[d.name] = n
    if not others:
        return None
    shown = ", ".join(f"{name}/ ({n} images)" for name, n in list(others.items())[:4])
    return (f"{folder}: {shown} {'is not a class' if len(others) == 1 else 'are not classes'} the model scores "
            "(0/ normal, 1/ tumour): left out of every figure")


def _check_enlargement(folder, mpp: float, model_mpp: float) -> None:
    """As slides are checked (`pipeline.geometry.check_enlargement`): patches whose --mpp is coarser than the
    model's by more than the tolerance are enlarged before scoring, without the detail the model was trained on
    (PCam at --mpp 2 scored AUC 0.75, at 0.97 0.97, without a word): warned; by more than MAX_ENLARGEMENT,
    refused before any patch is read."""
    from wsi_vssm.pipeline.domain import MPP_TOLERANCE
    from wsi_vssm.pipeline.geometry import MAX_ENLARGEMENT

    factor = mpp / model_mpp
    if factor <= MPP_TOLERANCE:
        return
    what = (f"--mpp {mpp:g} is {factor:.3g} times coarser than the model's {model_mpp:g} um/px, so each patch is "
            f"enlarged {factor:.3g}x before scoring")
    if factor > MAX_ENLARGEMENT:
        raise UsageError(f"{folder}: {what}: without detail for the model; check --mpp (PCam: 0.97)")
    warnings.warn(f"{folder}: {what}, without the detail the model was trained on: their scores are unreliable; "
                  "check --mpp (PCam: 0.97)", stacklevel=3)


def _size_warnings(folder, sizes: dict[tuple, int], mpp: float, model_mpp: float) -> list[str]:
    """The lines a folder's patch sizes call for ({(scored shape, given shape): count}): patches scored smaller
    than the model's (their scores are unreliable: a wrong --mpp halves PCam's), and patches of several sizes."""
    total, out = sum(sizes.values()), []
    small = {k: n for k, n in sizes.items() if min(k[0]) < SMALL_PATCH_PX}
    if small:
        (got, given), _ = max(small.items(), key=lambda kv: kv[1])
        resized = (f" (resized from {given[1]} x {given[0]} px: --mpp {mpp:g} to the model's {model_mpp:g} um/px)"
                   if got != given else "")
        n = sum(small.values())
        which = "patches are" if n == total else f"{n} of the {total} patches are"
        out.append(f"{folder}: {which} scored at {got[1]} x {got[0]} px{resized}, smaller than the "
                   f"{TRAINED_PATCH_PX} px patches the model was trained on: their scores are unreliable; check "
                   "--mpp, the patches' own um/px (PCam: 0.97)")
    given = {}
    for (_, g), n in sizes.items():
        given[g] = given.get(g, 0) + n
    if len(given) > 1:
        shown = ", ".join(f"{n} of {w} x {h} px" for (h, w), n in sorted(given.items(), key=lambda kv: -kv[1])[:4])
        out.append(f"{folder}: the patches come in {len(given)} sizes ({shown}): each is scored by its centre cell "
                   "at its own size, with more or less context around it; one data set's patches are usually of "
                   "one size (training refuses mixed sizes)")
    return out


def centre_cell_probabilities(model, x, inference, device: str = "cpu") -> np.ndarray:
    """Each patch of x (B, 3, H, W, normalised) scored alone: its centre token through the cell head, the
    backbone under `inference`'s precision and TTA (the head in fp32), then the model's patch calibration
    (float64: the logistic of `centre_cell_logits`)."""
    from wsi_vssm.outputs.calibration import logistic

    return logistic(centre_cell_logits(model, x, inference, device))


def centre_cell_logits(model, x, inference, device: str = "cpu") -> np.ndarray:
    """`centre_cell_probabilities` as logits (float64), which never tie where the probabilities round to 1."""
    import torch

    from wsi_vssm.models.precision import autocast, resolve_precision
    from wsi_vssm.outputs.calibration import patch_logits
    from wsi_vssm.pipeline.extract import region_features

    x = x.to(device)
    with torch.inference_mode():
        with autocast(resolve_precision(inference.precision, device), device):
            fmap = region_features(model.backbone, x, inference.tta)  # (B, F, h, w) fp32
        logits = model.cell_logits_of_map(fmap).cpu()  # (B, h, w)
    h, w = logits.shape[1:]
    cy, cx = min(h - 1, int(x.shape[2] / 2 // 32)), min(w - 1, int(x.shape[3] / 2 // 32))
    return patch_logits(logits[:, cy, cx].numpy(), getattr(model, "metadata", None))
