"""Flax linen modules (issue 5: not part of this version yet)."""
