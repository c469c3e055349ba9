"""Triton kernels of fastkd, installed as the subpackage ``fastkd.kernels`` (one module per op)."""
