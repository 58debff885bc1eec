"""Tensor operations: the selective scan (reference, fused CPU, CUDA/Triton) and the 2D cross-scan."""
