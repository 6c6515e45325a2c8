"""Triton kernels, one module per op; installed as mmfs_fast.kernels."""
