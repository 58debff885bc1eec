"""Which source patches decide the calls on a mosaic cohort's normal slides.

    python bench/patch_drivers.py --cohort COHORT --eval OUT [--top 5]

COHORT is a mosaic cohort (`mosaic.json`, from `wsi-vssm synth --from-patches` or bench/detector.py); OUT holds
one model's `prediction.json` per slide (`wsi-vssm evaluate` or `predict`). Mosaic slides of one cohort draw
from one patch pool, so a patch is reused across many slides: one label-0 patch that the model reads as tumour
can turn most "normal" slides into false positives at once, and the cohort's specificity then measures that
patch, not many independent slides. Prints how much the normal slides share, how many the model calls tumour
(probability >= the slide's own `slide_threshold`), and the patches whose presence best separates the called
slides from the others: a patch found in every called slide and in no other is the whole explanation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wsi_vssm.synth.mosaic import patch_holders, patch_recurrence, slide_patches


def drivers(patches: dict[str, set[str]], called: set[str], top: int = 5) -> list[dict]:
    """Patches ranked by how well 'the slide holds it' predicts 'the slide is called tumour': by the called
    slides it misses plus the other slides it is in (0 = a perfect separator), then by how many slides hold it."""
    rows = [{"patch": p, "slides": len(s), "called_with": len(s & called), "called_without": len(called - s),
             "errors": len(called - s) + len(s - called)} for p, s in patch_holders(patches).items()]
    rows.sort(key=lambda r: (r["errors"], -r["slides"], r["patch"]))
    return rows[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohort", required=True, type=Path, help="mosaic cohort folder (mosaic.json)")
    ap.add_argument("--eval", required=True, type=Path, help="folder of <slide>/prediction.json")
    ap.add_argument("--top", type=int, default=5)
    a = ap.parse_args()

    try:
        patches = slide_patches(json.loads((a.cohort / "mosaic.json").read_text()))
    except (KeyError, TypeError):  # a patients cohort (`synth --patients`) stores pool indices, not patch names
        raise SystemExit(f"{a.cohort / 'mosaic.json'}: no 'slides' list naming each cell's patch (a patients "
                         "cohort?); this script reads mosaic-slide cohorts") from None
    called, unscored = set(), []
    for slide in list(patches):
        try:
            pred = json.loads((a.eval / slide / "prediction.json").read_text())
            p, t = float(pred["probability"]), float(pred["slide_threshold"])
        except (OSError, ValueError, KeyError, TypeError):  # not run, failed, or no tissue (probability null)
            unscored.append(patches.pop(slide))
            continue
        if p >= t:
            called.add(slide)
    pool = set().union(*patches.values()) if patches else set()
    share = patch_recurrence(patches)
    print(f"{a.cohort}: {len(patches)} scored normal slides from {len(pool)} distinct label-0 patches"
          + ("" if share is None else f"; a typical patch sits in {100 * share:.0f}% of the other slides")
          + (f" ({len(unscored)} normal slides without a probability left out)" if unscored else ""))
    print(f"called tumour at their slide_threshold: {len(called)} of {len(patches)}")
    if not called or len(called) == len(patches):
        return
    for r in drivers(patches, called, a.top):
        print(f"  {r['patch']}: in {r['slides']} slides, {r['called_with']} of them called; "
              f"called slides without it {r['called_without']}; separation errors {r['errors']}")


if __name__ == "__main__":
    main()
