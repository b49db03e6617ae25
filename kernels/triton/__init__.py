"""Triton kernels, one file per fused op (token_mixing.py, channel_mixing.py)."""
