"""The reference (mixer_fast.reference) against an independent float64 computation, and gradcheck."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from mixer_fast import reference as ref
from mixer64 import channel_mixing64, mixer_block64, resmlp_block64, token_mixing64
from conftest import perturb_
from tolerances import max_err

# (B, S, C, D_S, D_C): awkward shapes from DESIGN.md (S = 196, 49, 16; C = 100, 64; D not a power of two).
SHAPES = [(1, 49, 100, 24, 72), (3, 16, 64, 30, 200), (2, 196, 64, 98, 96)]
LOW_PRECISION_RTOL = {torch.float32: 1e-5, torch.bfloat16: 6e-2, torch.float16: 8e-3}


def _args(B, S, C, D, dtype, *, op="token", one_linear=False):
    g = torch.Generator().manual_seed(B * 1000 + S + C)
    r = lambda *s, std=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * std).to(dtype)  # noqa: E731
    x = r(B, S, C)
    nw, nb = 1 + r(C, std=0.1), r(C, std=0.1)
    n_in = S if op == "token" else C
    if one_linear:
        return x, nw, nb, r(S, S, std=S ** -0.5), r(S, std=0.1), None, None
    return x, nw, nb, r(D, n_in, std=n_in ** -0.5), r(D, std=0.1), r(n_in, D, std=D ** -0.5), r(n_in, std=0.1)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("norm", ["layernorm", "affine"])
def test_functional_float64_matches_independent(shape, approximate, norm):
    B, S, C, DS, DC = shape
    scale = torch.randn(C, dtype=torch.float64)
    sample_scale = torch.tensor([0.0, 2.0, 1.25][:B], dtype=torch.float64)
    kw = dict(eps=1e-5, approximate=approximate, norm=norm, scale=scale, sample_scale=sample_scale)
    for fn, fn64, op, D in ((ref.token_mixing, token_mixing64, "token", DS),
                            (ref.channel_mixing, channel_mixing64, "channel", DC)):
        args = _args(B, S, C, D, torch.float64, op=op)
        got, want = fn(*args, **kw), fn64(*args, **kw)
        assert max_err(got, want) < 1e-10, f"{op} mixing"
    args = _args(B, S, C, 0, torch.float64, one_linear=True)
    assert max_err(ref.token_mixing(*args, **kw), token_mixing64(*args, **kw)) < 1e-10, "one-linear token mixing"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op", ["token", "channel"])
def test_functional_low_precision_close_to_float64(dtype, op):
    B, S, C, DS, DC = SHAPES[0]
    D = DS if op == "token" else DC
    args = _args(B, S, C, D, dtype, op=op)
    fn, fn64 = (ref.token_mixing, token_mixing64) if op == "token" else (ref.channel_mixing, channel_mixing64)
    got, want = fn(*args), fn64(*args)
    assert got.dtype == dtype
    assert max_err(got, want) <= LOW_PRECISION_RTOL[dtype] * float(want.abs().max())


def test_functional_bias_and_norm_parameters_optional():
    x, _, _, w1, _, w2, _ = _args(2, 16, 64, 30, torch.float64)
    got = ref.token_mixing(x, None, None, w1, None, w2, None)
    want = token_mixing64(x, None, None, w1, None, w2, None)
    assert max_err(got, want) < 1e-10


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_blocks_match_independent_float64(approximate):
    act = partial(nn.GELU, approximate=approximate)
    mixer = perturb_(ref.MixerBlock(64, 49, act_layer=act, dtype=torch.float64)).eval()
    resmlp = perturb_(ref.ResMLPBlock(64, 49, act_layer=act, dtype=torch.float64)).eval()
    x = torch.randn(3, 49, 64, dtype=torch.float64)
    assert max_err(mixer(x), mixer_block64(mixer, x, approximate)) < 1e-10
    assert max_err(resmlp(x), resmlp_block64(resmlp, x, approximate)) < 1e-10


@pytest.mark.parametrize("block_cls", [ref.MixerBlock, ref.ResMLPBlock])
def test_reference_block_gradcheck(block_cls):
    block = perturb_(block_cls(12, 10, mlp_ratio=(0.5, 2.0) if block_cls is ref.MixerBlock else 2,
                               dtype=torch.float64)).eval()
    x = torch.randn(2, 10, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))
    # Gradients of the parameters too: gradcheck over them as explicit inputs.
    names, params = zip(*block.named_parameters())

    def f(x, *ps):
        return torch.func.functional_call(block, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *[p.detach().clone().requires_grad_() for p in params]))


@pytest.mark.parametrize("op", ["token", "channel"])
def test_functional_gradcheck_with_scales(op):
    B, S, C, D = 2, 6, 5, 7
    args = [t.requires_grad_() if t is not None else None for t in _args(B, S, C, D, torch.float64, op=op)]
    scale = torch.randn(C, dtype=torch.float64, requires_grad=True)
    sample = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    fn = ref.token_mixing if op == "token" else ref.channel_mixing
    assert torch.autograd.gradcheck(lambda *a: fn(*a[:7], scale=a[7], sample_scale=a[8], approximate="tanh"),
                                    (*args, scale, sample))


def test_drop_path_reference_semantics():
    torch.manual_seed(0)
    dp = ref.DropPath(0.5).train()
    x = torch.ones(64, 3, 2)
    y = dp(x)
    per_sample = y[:, 0, 0]
    assert set(per_sample.tolist()) <= {0.0, 2.0} and 0 < per_sample.count_nonzero() < 64
    assert torch.equal(y, per_sample.view(-1, 1, 1).expand_as(y))
    assert torch.equal(dp.eval()(x), x)


@pytest.mark.parametrize("name", sorted(ref.CONFIGS))
def test_named_configs_shapes(name):
    cfg = ref.get_config(name)
    model = ref.create_model(name, num_classes=7, device="meta")
    blocks = list(model.blocks)
    assert len(blocks) == cfg.num_blocks
    b = blocks[0]
    assert model.stem.num_patches == cfg.seq_len
    if cfg.kind == "mixer":
        assert (b.mlp_tokens.fc1.out_features, b.mlp_channels.fc1.out_features) == (cfg.tokens_dim, cfg.channels_dim)
    else:
        assert b.linear_tokens.weight.shape == (cfg.seq_len, cfg.seq_len)
        assert b.mlp_channels.fc1.out_features == cfg.channels_dim
    assert model.head.out_features == 7


def test_named_config_dims_are_the_papers():
    c = ref.CONFIGS
    assert (c["mixer_b16"].seq_len, c["mixer_b16"].embed_dim, c["mixer_b16"].tokens_dim,
            c["mixer_b16"].channels_dim, c["mixer_b16"].num_blocks) == (196, 768, 384, 3072, 12)
    assert (c["mixer_s32"].seq_len, c["mixer_l16"].tokens_dim, c["mixer_l16"].channels_dim) == (49, 512, 4096)
    assert (c["resmlp_big_24"].seq_len, c["resmlp_big_24"].embed_dim, c["resmlp_12"].channels_dim) == (784, 768, 1536)
    with pytest.raises(ValueError, match="name: expected one of"):
        ref.get_config("mixer_xl16")
