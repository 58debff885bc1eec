"""Fused kernels (installed as the package `wsi_vssm_kernels`): the selective scan for CPU (numba) and GPU
(Triton). Each has a plain PyTorch reference in `wsi_vssm.ops` that is its spec; `wsi_vssm.ops` dispatches here."""
