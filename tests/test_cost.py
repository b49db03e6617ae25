"""The cost model against hand counts (DESIGN.md's table, the Mixer paper's FLOPs)."""
from __future__ import annotations

import pytest

from mixer_fast.profiler.cost import Shape, cost

B16 = Shape.from_config("mixer_b16", 256)


def test_mixer_b16_block_forward_is_2_08_gflop_per_image():
    assert cost("block", Shape.from_config("mixer_b16", 1), "bf16").flops == pytest.approx(2.08e9, rel=2e-3)


def test_design_table_mixer_b16_batch_256():
    tok, ch = cost("token_mixing", B16, "bf16"), cost("channel_mixing", B16, "bf16")
    assert tok.flops == pytest.approx(59.2e9, rel=1e-3)
    assert ch.flops == pytest.approx(473.6e9, rel=1e-3)
    assert tok.unfused_bytes == pytest.approx(1144e6, rel=2e-3)
    assert tok.min_bytes == pytest.approx(154e6, rel=5e-3)
    assert ch.unfused_bytes == pytest.approx(1782e6, rel=2e-3)
    assert ch.fused_bytes == pytest.approx(934e6, rel=1e-2)
    assert tok.intensity("unfused") == pytest.approx(52, rel=2e-2)
    assert tok.intensity("min") == pytest.approx(383, rel=2e-2)


def test_hand_count_small_shape():
    s = Shape(batch=2, seq_len=3, dim=4, tokens_dim=5, channels_dim=6)
    tok = cost("token_mixing", s, "fp32")
    assert tok.flops == 2 * (2 * 2 * 4 * 3 * 5)  # two GEMMs of B·C·S·D multiply-adds
    X = 2 * 3 * 4 * 4
    assert tok.min_bytes == 2 * X + (2 * 3 * 5 + 5 + 3) * 4
    ch = cost("channel_mixing", s, "fp32", "fwd+bwd")
    assert ch.flops == 6 * (2 * 2 * 3 * 4 * 6)  # 2 GEMMs forward, 4 backward
    res = cost("token_mixing", Shape(2, 3, 4, 3, 6, "resmlp"), "bf16")
    assert res.flops == 2 * 2 * 4 * 3 * 3


def test_bad_arguments():
    with pytest.raises(ValueError, match="op: expected one of"):
        cost("attention", B16)
    with pytest.raises(ValueError, match="mode: expected one of"):
        cost("block", B16, mode="train")
    with pytest.raises(ValueError, match="dtype: expected one of"):
        cost("block", B16, dtype="int8")


def test_predicted_tpu_floor_and_readme_table():
    import pathlib

    from mixer_fast.profiler import predict

    shape = Shape.from_config("mixer_b16", 256)
    c = cost("channel_mixing", shape, "bf16", "fwd")
    v5e = predict.CHIPS["tpu_v5e"]
    assert predict.predicted_time("channel_mixing", shape, "tpu_v5e") == max(c.flops / v5e.peak_flops,
                                                                             c.min_bytes / v5e.bandwidth)
    assert predict.bound("channel_mixing", shape, "tpu_v5e") == "compute"
    assert predict.bound("token_mixing", Shape.from_config("resmlp_12", 256), "tpu_v5e") == "memory"
    with pytest.raises(ValueError, match="chip: expected one of"):
        predict.predicted_time("block", shape, "tpu_v9")
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    assert "<!-- tpu-table:start -->\n" + predict.table() + "\n<!-- tpu-table:end -->" in readme
