"""Benchmarks of channel_mixing (`pytest bench/ --benchmark-only`); machinery in bench/conftest.py."""
import pytest

from conftest import BATCHES, CONFIGS, MODES, PROVIDERS, bench_op


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("config", CONFIGS)
def test_channel_mixing(benchmark, config, batch, mode, provider):
    bench_op(benchmark, "channel_mixing", config, batch, mode, provider)
