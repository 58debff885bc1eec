"""wsi-vssm: whole-slide metastasis detection with a VMamba (VSSM) backbone.

The entry points, also importable from their modules (README, "Python API"):

- `open_slide(path)` -> SlideReader (`wsi_vssm.io`); `ArraySlide(image, mpp=...)` for an image in memory
- `load_model("default" | path)` -> SlideModel (`wsi_vssm.models.slide_model`)
- `create_model("tiny", num_classes=0)` -> a VSSM backbone by config name (`wsi_vssm.models`)
- `predict_slide(slide, model, out_root, PredictParams(...))` -> the prediction.json record, with the slide's
  output folder written (`wsi_vssm.pipeline.predict`)
- `extract_slide(slide, backbone, mpp)` -> CellFeatures, the token features and their level-0 coordinates
  (`wsi_vssm.pipeline.extract`)
- every error the library raises is a `WsiVssmError` (`wsi_vssm.errors`)

Importing the package stays light: torch, zarr and the slide backends are imported by the modules that need them
(the names above are looked up on first use).
"""

import importlib
import os

__version__ = "0.1.1"

# PyTorch reads THP_MEM_ALLOC_ENABLE at its first CPU tensor allocation: when set, tensors of 2 MB or more are
# 2 MB-aligned and advised onto transparent huge pages. The backbone's large maps then cost 512x fewer page
# faults when allocated, and the SS2D kernel's column-order walks, which step a whole row of the map at a time,
# stop missing the TLB on every step (docs/scan.md, "Prefetch, huge pages, ..."). It only takes effect when this
# package is imported before torch allocates its first tensor (always so for the CLI); THP_MEM_ALLOC_ENABLE=0
# opts out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

_ENTRY_POINTS = {
    "open_slide": "wsi_vssm.io", "ArraySlide": "wsi_vssm.io", "SlideReader": "wsi_vssm.io",
    "load_model": "wsi_vssm.models.slide_model", "create_model": "wsi_vssm.models",
    "predict_slide": "wsi_vssm.pipeline.predict", "PredictParams": "wsi_vssm.pipeline.predict",
    "extract_slide": "wsi_vssm.pipeline.extract", "WsiVssmError": "wsi_vssm.errors",
}
__all__ = ["__version__", *_ENTRY_POINTS]


def __getattr__(name: str):
    if name in _ENTRY_POINTS:
        return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
    raise AttributeError(f"module 'wsi_vssm' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_ENTRY_POINTS})
