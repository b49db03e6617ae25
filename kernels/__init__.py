"""Kernel sources, installed as ``mixer_fast.kernels`` (never as a top-level ``kernels``).

triton/  @triton.jit kernels and their launchers, one file per fused op.
pallas/  pallas_call kernels (TPU Mosaic; GPU), one file per fused op.
"""
