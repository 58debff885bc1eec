"""napari plugin for wsi-vssm: a reader for slides and prediction folders, and a Predict dock widget.

Thin adapters over the library, declared in `napari.yaml` (npe2) and found through the `napari.manifest` entry
point. Nothing here imports Qt or napari at import time: napari imports `reader` or `widget` when it needs them.
Install with `pip install "wsi-vssm[napari]"`.
"""
