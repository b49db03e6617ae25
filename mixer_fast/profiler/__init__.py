"""FLOP/byte cost model, device ceilings and the roofline (not part of this version yet)."""
