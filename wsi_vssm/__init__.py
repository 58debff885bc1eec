"""wsi-vssm: whole-slide metastasis detection with a VMamba (VSSM) backbone.

Importing the package stays light: torch, zarr and the slide backends are imported by the modules that need them.
"""

__version__ = "0.1.0"
