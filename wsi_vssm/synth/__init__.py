"""Synthetic CAMELYON16-style cohorts: streamed pyramidal JPEG TIFFs of procedural H&E tissue, lesion
annotations (ASAP XML) and reference.csv. See docs/synth.md.

`make_cohort` and `write_slide` are the public API; heavy imports (numba, tifffile) happen on first use.
"""

from __future__ import annotations

from wsi_vssm.synth.cohort import SlideRecord, SynthError, make_cohort, write_slide

__all__ = ["SlideRecord", "SynthError", "make_cohort", "write_slide"]
