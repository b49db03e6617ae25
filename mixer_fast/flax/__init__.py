"""Flax linen modules (`mixer_fast.flax.MixerBlock`): not built yet in this version."""
