"""Pallas kernels, one file per fused op (token_mixing.py, channel_mixing.py); common.py: GELU/erf, tiles."""
