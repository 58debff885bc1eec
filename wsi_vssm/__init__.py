"""wsi-vssm: whole-slide metastasis detection with a VMamba (VSSM) backbone.

Importing the package stays light: torch, zarr and the slide backends are imported by the modules that need them.
"""

import os

__version__ = "0.1.1"

# PyTorch reads THP_MEM_ALLOC_ENABLE at its first CPU tensor allocation: when set, tensors of 2 MB or more are
# 2 MB-aligned and advised onto transparent huge pages. The backbone's large maps then cost 512x fewer page
# faults when allocated, and the SS2D kernel's column-order walks, which step a whole row of the map at a time,
# stop missing the TLB on every step (docs/scan.md, "Prefetch, huge pages, ..."). It only takes effect when this
# package is imported before torch allocates its first tensor (always so for the CLI); THP_MEM_ALLOC_ENABLE=0
# opts out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
