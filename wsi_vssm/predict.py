"""Deprecated import path: prediction lives in `wsi_vssm.pipeline.predict` since the package was sorted into
wings. `from wsi_vssm.predict import predict_slide` (the README's old Python API) keeps working, with a warning.
"""

from __future__ import annotations

import warnings

from wsi_vssm.pipeline.predict import Cancelled, NonFiniteOutput, PredictParams, predict_slide, slide_threshold

__all__ = ["Cancelled", "NonFiniteOutput", "PredictParams", "predict_slide", "slide_threshold"]

warnings.warn(
    "wsi_vssm.predict is deprecated; import from wsi_vssm.pipeline.predict instead",
    DeprecationWarning,
    stacklevel=2,
)
