"""gMLP (timm ``SpatialGatingBlock``): the reference op ``mixer_fast.ops.spatial_gating`` against timm's block
(forward and every gradient), the Triton kernels (kernels/triton/spatial_gating.py; the interpreter without a
GPU) against the reference and float64 under DESIGN's rule (every dtype, awkward shapes, both GELUs, drop path,
strided / empty input, optional parameters, autocast, torch.compile, determinism), the fused
``SpatialGatingBlock`` as a drop-in for timm's (state dicts, block_layer, train mode), ``convert()`` on timm gMLP
models, bad input, and the dispatch rule (only backends with the "spatial_gating" feature run it: asked for by
name, the others raise NotImplementedError)."""
from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import nn

import mixer_fast
from conftest import DEVICE, grads, perturb_, use_backend
from mixer_fast import dispatch, ops
from mixer_fast import reference as ref
from mixer_fast.torch import SpatialGatingBlock
from tolerances import assert_numerics, assert_rel_close, max_err

pytestmark = pytest.mark.timm

# Argument order of the op, and the timm parameter each one is (None: not a parameter).
ARGS = (("x", None), ("norm_weight", "norm.weight"), ("norm_bias", "norm.bias"),
        ("fc1_weight", "mlp_channels.fc1.weight"), ("fc1_bias", "mlp_channels.fc1.bias"),
        ("gate_norm_weight", "mlp_channels.gate.norm.weight"), ("gate_norm_bias", "mlp_channels.gate.norm.bias"),
        ("proj_weight", "mlp_channels.gate.proj.weight"), ("proj_bias", "mlp_channels.gate.proj.bias"),
        ("fc2_weight", "mlp_channels.fc2.weight"), ("fc2_bias", "mlp_channels.fc2.bias"))


def _timm_block(C, S, ratio, dtype=torch.float64, seed=0, **kw):
    from timm.models.mlp_mixer import SpatialGatingBlock as TimmBlock

    return perturb_(TimmBlock(C, S, mlp_ratio=ratio, **kw), seed=seed, std=0.2).to(dtype).eval()


def _timm_fwd_bwd(block, x, dout):
    x = x.clone().requires_grad_()
    block.zero_grad(set_to_none=True)
    out = block(x)
    out.backward(dout)
    return out.detach(), {"x": x.grad, **grads(block)}


def _op_fwd_bwd(block, x, dout, **kw):
    """ops.spatial_gating with fresh leaves holding ``block``'s parameters; (out, grads by timm name)."""
    params = dict(block.named_parameters())
    leaves = {"x": x.clone().requires_grad_()}
    leaves.update({timm: params[timm].detach().clone().requires_grad_() for _, timm in ARGS[1:]})
    args = [leaves["x" if timm is None else timm] for _, timm in ARGS]
    mlp = block.mlp_channels
    out = ops.spatial_gating(*args, eps=block.norm.eps, gate_eps=mlp.gate.norm.eps, approximate=mlp.act.approximate,
                             **kw)
    out.backward(dout)
    return out.detach(), {k: t.grad for k, t in leaves.items()}


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(3, 10, 12, 3), (1, 49, 20, 6)], ids=["3x10x12-r3", "1x49x20-r6"])
def test_reference_op_matches_timm_block(timm, shape, approximate):
    B, S, C, ratio = shape
    block64 = _timm_block(C, S, ratio, act_layer=partial(nn.GELU, approximate=approximate))
    block32 = copy.deepcopy(block64).float()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, S, C, generator=g, dtype=torch.float64)
    dout = torch.randn(B, S, C, generator=g, dtype=torch.float64)

    # float64: the same maths in the same order as timm, so equal up to (at most) last-bit rounding.
    want64, gwant64 = _timm_fwd_bwd(block64, x, dout)
    got64, g64 = _op_fwd_bwd(block64, x, dout)
    assert max_err(got64, want64) <= 1e-12 * float(want64.abs().max())
    assert g64.keys() == gwant64.keys() and len(g64) == len(ARGS)
    for name in g64:
        assert max_err(g64[name], gwant64[name]) <= 1e-12 * float(gwant64[name].abs().max()), name

    # float32: the DESIGN.md rule against float64, with timm's own float32 as "eager".
    eager32, geager32 = _timm_fwd_bwd(block32, x.float(), dout.float())
    got32, g32 = _op_fwd_bwd(block32, x.float(), dout.float())
    assert got32.dtype == torch.float32
    assert_numerics(got32, eager32, want64, "spatial_gating output")
    for name in g32:
        assert_numerics(g32[name], geager32[name], gwant64[name], f"spatial_gating grad {name}")


def test_sample_scale_scales_the_branch_per_sample(timm):
    block = _timm_block(12, 10, 2)
    x = torch.randn(4, 10, 12, dtype=torch.float64)
    s = torch.tensor([0.0, 1.25, 2.5, 1.0], dtype=torch.float64)
    branch = block(x) - x
    out, _ = _op_fwd_bwd(block, x, torch.ones_like(x), sample_scale=s)
    assert max_err(out, x + s.view(-1, 1, 1) * branch) <= 1e-12
    assert torch.equal(out[0], x[0])


def test_reference_module_is_timms_block(timm):
    from timm.models.mlp_mixer import SpatialGatingBlock as TimmBlock

    theirs = perturb_(TimmBlock(16, 9, mlp_ratio=4)).eval()
    ours = ref.SpatialGatingBlock(16, 9, mlp_ratio=4).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 9, 16)
    assert torch.equal(ours(x), theirs(x))


def _fused_pair(C=24, S=10, ratio=3, dtype=torch.float32, **kw):
    from timm.models.mlp_mixer import SpatialGatingBlock as TimmBlock

    theirs = perturb_(TimmBlock(C, S, mlp_ratio=ratio, dtype=dtype, **kw), std=0.2).eval()
    ours = SpatialGatingBlock(C, S, mlp_ratio=ratio, dtype=dtype, **kw).eval()
    return ours, theirs


@pytest.mark.parametrize("kw", [{}, {"act_layer": partial(nn.GELU, approximate="tanh")},
                                {"norm_layer": partial(nn.LayerNorm, eps=1e-3)}], ids=["default", "tanh", "eps"])
def test_fused_block_is_a_drop_in_for_timms(timm, kw):
    from timm.layers import GatedMlp

    ours, theirs = _fused_pair(mlp_layer=GatedMlp, **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert list(SpatialGatingBlock(24, 10, mlp_ratio=3).state_dict()) == list(theirs.state_dict())  # reference parts
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 10, 24)
    dout = torch.randn(3, 10, 24)
    out_t, g_t = _timm_fwd_bwd(theirs, x, dout)
    out_o, g_o = _timm_fwd_bwd(ours, x, dout)
    assert_rel_close(out_o, out_t, rtol=1e-6, what="block output")
    assert g_o.keys() == g_t.keys() and len(g_o) == len(ARGS)
    for name in g_t:
        assert_rel_close(g_o[name], g_t[name], rtol=1e-6, what=f"grad {name}")


def test_fused_block_gradcheck_float64():
    block = perturb_(SpatialGatingBlock(6, 5, mlp_ratio=2, dtype=torch.float64), std=0.2).eval()
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))


@pytest.mark.parametrize("drop_path, drop", [(0.5, 0.0), (0.0, 0.3)])
def test_train_mode_drop_path_and_dropout_match_timm(timm, drop_path, drop):
    # Masks are drawn in timm's order, so a training step is identical under the same seed.
    ours, theirs = _fused_pair(drop=drop, drop_path=drop_path)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.train(), theirs.train()
    x, dout = torch.randn(6, 10, 24), torch.randn(6, 10, 24)
    torch.manual_seed(7)
    out_t, g_t = _timm_fwd_bwd(theirs, x, dout)
    torch.manual_seed(7)
    out_o, g_o = _timm_fwd_bwd(ours, x, dout)
    assert not torch.equal(out_t, _timm_fwd_bwd(theirs.eval(), x, dout)[0])  # something was dropped
    assert_rel_close(out_o, out_t, rtol=1e-6, what="train-mode output")
    for name in g_t:
        assert_rel_close(g_o[name], g_t[name], rtol=1e-6, what=f"train-mode grad {name}")


def test_low_precision_autocast_empty_and_strided():
    block = perturb_(SpatialGatingBlock(16, 8, mlp_ratio=2)).eval()
    twin = ref.SpatialGatingBlock(16, 8, mlp_ratio=2).eval()
    twin.load_state_dict(block.state_dict(), strict=True)
    x = torch.randn(3, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = block(x), twin(x)
    assert got.dtype == want.dtype and torch.equal(got, want)
    for dtype in (torch.bfloat16, torch.float16):
        b = copy.deepcopy(block).to(dtype)
        assert torch.equal(b(x.to(dtype)), copy.deepcopy(twin).to(dtype)(x.to(dtype)))
    assert block(torch.randn(0, 8, 16)).shape == (0, 8, 16)
    xt = torch.randn(3, 16, 8).transpose(1, 2)  # stride 1 along S
    assert torch.equal(block(xt), block(xt.contiguous()))


def _small_gmlp(**kw):
    """A small timm gMLP, built as timm's gmlp_* entry points build theirs."""
    from timm.layers import GatedMlp
    from timm.models.mlp_mixer import MlpMixer, SpatialGatingBlock as TimmBlock

    kw = {"block_layer": TimmBlock, **kw}
    return MlpMixer(img_size=32, patch_size=8, embed_dim=32, num_blocks=2, mlp_ratio=6, mlp_layer=GatedMlp, **kw)


def _model_fwd_bwd(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), grads(model)


def test_convert_small_timm_gmlp(timm):
    theirs = perturb_(_small_gmlp(), seed=4).eval()
    ours = copy.deepcopy(theirs)
    before = dict(ours.named_parameters())
    assert mixer_fast.convert(ours, strict=True) is ours
    assert all(type(b) is SpatialGatingBlock for b in ours.blocks)
    after = dict(ours.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32)
    out_t, g_t = _model_fwd_bwd(theirs, x)
    out_o, g_o = _model_fwd_bwd(ours, x)
    assert_rel_close(out_o, out_t, what="gMLP logits")
    assert g_o.keys() == g_t.keys()
    for name in g_t:
        assert_rel_close(g_o[name], g_t[name], what=f"gMLP grad {name}")


def test_fused_block_as_timm_block_layer_gets_timms_init_and_weights(timm):
    # timm's MlpMixer init (gMLP's gate: proj ~ N(0, 1e-6), bias 1) reaches the fused block's gate too:
    # under the same seed both models get the same weights.
    torch.manual_seed(3)
    theirs = _small_gmlp().eval()
    torch.manual_seed(3)
    ours = _small_gmlp(block_layer=SpatialGatingBlock).eval()
    assert all(type(b) is SpatialGatingBlock for b in ours.blocks)
    sd_t, sd_o = theirs.state_dict(), ours.state_dict()
    assert list(sd_o) == list(sd_t) and all(torch.equal(sd_o[k], sd_t[k]) for k in sd_t)
    perturb_(theirs, seed=5)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    assert_rel_close(ours(x), theirs(x), what="block_layer logits")


def test_convert_gmlp_ti16_224(timm):
    theirs = timm.create_model("gmlp_ti16_224", pretrained=False).eval()
    ours = mixer_fast.convert(copy.deepcopy(theirs), strict=True)
    assert len(ours.blocks) == 30 and all(type(b) is SpatialGatingBlock for b in ours.blocks)
    assert ours.blocks[0].seq_len == 196 and ours.blocks[0].mlp_channels.fc1.out_features == 768
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert_rel_close(ours(x), theirs(x), what="gmlp_ti16_224 logits")


def test_convert_reference_block_and_unconvertible_gmlp(timm):
    block = ref.SpatialGatingBlock(16, 8)
    assert type(mixer_fast.convert(block, backend="reference")) is SpatialGatingBlock
    model = _small_gmlp(act_layer=nn.SiLU)
    with pytest.warns(UserWarning, match=r"2 block\(s\) left unconverted: blocks\.0 \(SpatialGatingBlock\).*SiLU"):
        mixer_fast.convert(model)
    assert all(type(b).__module__ == "timm.models.mlp_mixer" for b in model.blocks)


# ---------------------------------------------------------------------------------------------------------
# Dispatch: only backends with the "spatial_gating" feature run the op.

def _op_args(B=2, S=8, C=12, H=20, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    return dict(x=r(B, S, C), norm_weight=r(C), norm_bias=r(C), fc1_weight=r(H, C), fc1_bias=r(H),
                gate_norm_weight=r(H // 2), gate_norm_bias=r(H // 2), proj_weight=r(S, S), proj_bias=r(S),
                fc2_weight=r(C, H // 2), fc2_bias=r(C))


def call(**overrides):
    args = _op_args()
    kw = {k: overrides.pop(k) for k in list(overrides) if k not in args}
    args.update(overrides)
    return ops.spatial_gating(*args.values(), **kw)


def test_automatic_choice(request, monkeypatch):
    # CPU tensors: the cpu backend has no gMLP kernel, so the reference runs it. CUDA tensors: triton only where
    # the table of measured wins has it (on the H200 it measured 0.40x / 0.044x eager: not chosen), and never
    # for what it lacks (dropout).
    from mixer_fast import wins

    kw = dict(op="spatial_gating", mode="training", dtype="bfloat16")
    assert "spatial_gating" in dispatch.load("reference").features
    assert dispatch.choose("torch", "cpu", needs=("spatial_gating", "float32"), **kw).name == "reference"
    use_backend(request, "triton")
    assert "spatial_gating" in dispatch.load("triton").features
    monkeypatch.setattr(dispatch.loaded("triton"), "device_class", lambda index=None: "sm_90")
    assert not wins.is_win("torch", "triton", "sm_90", "spatial_gating", "training", "bf16")
    assert dispatch.choose("torch", "cuda", needs=("spatial_gating", "bfloat16"), **kw).name == "reference"
    monkeypatch.setattr(wins, "_chosen", lambda: {("torch", "triton", "sm_90", "spatial_gating", "training", "bf16")})
    assert dispatch.choose("torch", "cuda", needs=("spatial_gating", "bfloat16"), **kw).name == "triton"
    assert dispatch.choose("torch", "cuda", needs=("spatial_gating", "dropout", "bfloat16"), **kw).name == "reference"
    args = _op_args()
    want = ref.spatial_gating(*args.values())
    assert torch.equal(ops.spatial_gating(*args.values()), want)
    assert torch.equal(ops.spatial_gating(*args.values(), backend="reference"), want)


@pytest.mark.parametrize("backend", ["cpu"])
def test_explicit_backend_without_the_op_raises(request, monkeypatch, backend):
    use_backend(request, backend)
    msg = f"backend '{backend}' does not support spatial_gating; use backend='reference'"
    with pytest.raises(NotImplementedError, match=msg):
        call(backend=backend)
    block = SpatialGatingBlock(12, 8, mlp_ratio=2, backend=backend)
    with pytest.raises(NotImplementedError, match=msg):
        block(torch.randn(2, 8, 12))
    monkeypatch.setenv(dispatch.ENV_VAR, backend)
    with pytest.raises(NotImplementedError, match=msg):
        call()


B, S, C, H = 2, 8, 12, 20
CASES = [
    (dict(x=torch.randn(S, C)), ValueError, r"x: expected a 3-D tensor \(B, S, C\), got shape \(8, 12\)"),
    (dict(fc1_weight=torch.randn(H - 1, C)), ValueError,
     r"fc1_weight: expected an even number of rows H \(split into the halves u and v\), got shape \(19, 12\)"),
    (dict(x=torch.randn(B, S, C + 1)), ValueError, r"norm_weight: expected shape \(C,\) = \(13,\), got \(12,\)"),
    (dict(fc1_weight=torch.randn(H, C + 1)), ValueError,
     r"fc1_weight: expected shape \(H, C\) with C from x = \(20, 12\), got \(20, 13\)"),
    (dict(fc1_weight=torch.randn(H, C, 1)), ValueError, r"fc1_weight: expected a 2-D weight \(out, in\)"),
    (dict(fc1_bias=torch.randn(H + 2)), ValueError, r"fc1_bias: expected shape \(H,\) = \(20,\), got \(22,\)"),
    (dict(gate_norm_weight=torch.randn(H)), ValueError,
     r"gate_norm_weight: expected shape \(H/2,\) = \(10,\), got \(20,\)"),
    (dict(gate_norm_bias=torch.randn(1, H // 2)), ValueError,
     r"gate_norm_bias: expected shape \(H/2,\) = \(10,\), got \(1, 10\)"),
    (dict(x=torch.randn(B, S + 1, C)), ValueError,
     r"proj_weight: expected shape \(S, S\) with S from x = \(9, 9\), got \(8, 8\)"),
    (dict(proj_bias=torch.randn(S + 1)), ValueError, r"proj_bias: expected shape \(S,\) = \(8,\), got \(9,\)"),
    (dict(fc2_weight=torch.randn(C, H)), ValueError,
     r"fc2_weight: expected shape \(C, H/2\) = \(12, 10\), got \(12, 20\)"),
    (dict(fc2_bias=torch.randn(H // 2)), ValueError, r"fc2_bias: expected shape \(C,\) = \(12,\), got \(10,\)"),
    (dict(sample_scale=torch.ones(B + 1)), ValueError, r"sample_scale: expected shape \(B,\) = \(2,\), got \(3,\)"),
    (dict(proj_weight=None), TypeError, r"proj_weight: expected a torch.Tensor, got NoneType"),
    (dict(fc2_weight=None), TypeError, r"fc2_weight: expected a torch.Tensor, got NoneType"),
    (dict(x=torch.ones(B, S, C, dtype=torch.int32)), TypeError, r"x: expected a floating dtype .*got torch.int32"),
    (dict(proj_weight=torch.randn(S, S, dtype=torch.float64)), TypeError,
     r"proj_weight: expected dtype torch.float32 \(the dtype of x\), got torch.float64"),
    (dict(gate_norm_bias=torch.randn(H // 2, device="meta")), ValueError,
     r"gate_norm_bias: expected a tensor on cpu \(the device of x\), got one on meta"),
    (dict(eps=float("nan")), ValueError, r"eps: expected a finite number in \(0.0, inf\), got nan"),
    (dict(gate_eps=0.0), ValueError, r"gate_eps: expected a finite number in \(0.0, inf\), got 0.0"),
    (dict(gate_eps="1e-5"), TypeError, r"gate_eps: expected a number, got str"),
    (dict(approximate="exact"), ValueError, r"approximate: expected one of \['none', 'tanh'\], got 'exact'"),
    (dict(dropout=1.5), ValueError, r"dropout: expected a finite number in \[0.0, 1.0\), got 1.5"),
    (dict(backend="cuda"), ValueError, r"backend: expected one of \['triton', 'cpu', 'reference'\]"),
]


@pytest.mark.parametrize("overrides, exc, match", CASES, ids=[str(i) for i in range(len(CASES))])
def test_bad_argument(overrides, exc, match):
    with pytest.raises(exc, match=match):
        call(**overrides)


def test_optional_parameters_may_be_none():
    args = _op_args()
    for name in ("norm_weight", "norm_bias", "fc1_bias", "gate_norm_weight", "gate_norm_bias", "proj_bias", "fc2_bias"):
        args[name] = None
    out = ops.spatial_gating(*args.values())
    assert torch.equal(out, ref.spatial_gating(*args.values()))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(dim=5, seq_len=4, mlp_ratio=1), ValueError, r"mlp_ratio \* dim: expected an even hidden width .* got 5"),
    (dict(dim=8, seq_len=0), ValueError, r"seq_len: expected a positive int, got 0"),
    (dict(dim=8, seq_len=4, act_layer=nn.SiLU), ValueError, r"act_layer: expected nn.GELU"),
    (dict(dim=8, seq_len=4, norm_layer=nn.BatchNorm1d), ValueError, r"norm_layer: expected nn.LayerNorm"),
    (dict(dim=8, seq_len=4, eps=1e-5, norm_layer=partial(nn.LayerNorm, eps=1e-6)), ValueError,
     r"eps: expected 1e-06 to agree with norm_layer, got 1e-05"),
    (dict(dim=8, seq_len=4, backend="cuda"), ValueError, r"backend: expected one of"),
    (dict(dim=8, seq_len=4, init_values=1.0), TypeError, r"SpatialGatingBlock: unexpected keyword argument"),
])
def test_block_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SpatialGatingBlock(**kwargs)


def test_block_input_and_from_module_errors(timm):
    block = SpatialGatingBlock(8, 4)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, seq_len=4, dim=8\), got \(2, 8, 4\)"):
        block(torch.randn(2, 8, 4))
    with pytest.raises(TypeError, match=r"x: expected a torch.Tensor"):
        block([1.0])
    with pytest.raises(ValueError, match=r"expected a SpatialGatingBlock-like module with 'norm'"):
        SpatialGatingBlock.from_module(ref.MixerBlock(8, 4))
    broken = ref.SpatialGatingBlock(8, 4)
    broken.mlp_channels.gate = nn.Identity()
    with pytest.raises(ValueError, match=r"mlp_channels.gate: expected a SpatialGatingUnit .*got Identity"):
        SpatialGatingBlock.from_module(broken)
    fused = SpatialGatingBlock.from_module(ref.SpatialGatingBlock(8, 4, drop=0.1, drop_path=0.2).train())
    assert fused.training and fused.drop_path.drop_prob == 0.2


# ---------------------------------------------------------------------------------------------------------
# The triton backend's kernels (kernels/triton/spatial_gating.py) against the reference and float64.

NAMES = tuple(name for name, _ in ARGS)


def _gating_args(B, S, C, H, seed=0):
    """float64 arguments at the scales of a trained block (norm weights near 1, small biases, the gate's
    bias near 1 as timm initialises it)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std + mean

    h = H // 2
    return dict(x=r(B, S, C), norm_weight=r(C, std=0.2, mean=1.0), norm_bias=r(C, std=0.2),
                fc1_weight=r(H, C, std=C ** -0.5), fc1_bias=r(H, std=0.2), gate_norm_weight=r(h, std=0.2, mean=1.0),
                gate_norm_bias=r(h, std=0.2), proj_weight=r(S, S, std=S ** -0.5), proj_bias=r(S, std=0.2, mean=1.0),
                fc2_weight=r(C, h, std=h ** -0.5), fc2_bias=r(C, std=0.2))


def _gating_run(args, dtype, backend, dout, *, device="cpu", sample_scale=None, **kw):
    leaves = {n: None if t is None else t.detach().to(device=device, dtype=dtype).requires_grad_()
              for n, t in args.items()}
    ss = None if sample_scale is None else sample_scale.to(device=device, dtype=dtype)
    out = ops.spatial_gating(*(leaves[n] for n in NAMES), sample_scale=ss, backend=backend, **kw)
    out.backward(dout.to(device=device, dtype=dtype))
    return out.detach(), {n: t.grad for n, t in leaves.items() if t is not None}


def _check_triton(args, dtype, *, sample_scale=None, **kw):
    B, S, C = args["x"].shape
    dout = torch.randn(B, S, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ss64 = None if sample_scale is None else sample_scale.double()
    out64, g64 = _gating_run(args, torch.float64, "reference", dout, sample_scale=ss64, **kw)
    eager, g_eager = _gating_run(args, dtype, "reference", dout, sample_scale=sample_scale, **kw)
    fused, g_fused = _gating_run(args, dtype, "triton", dout, device=DEVICE, sample_scale=sample_scale, **kw)
    assert fused.dtype == dtype
    assert_numerics(fused.cpu(), eager, out64, "spatial_gating output")
    assert g_fused.keys() == g64.keys()
    for name in g64:
        assert g_fused[name].dtype == dtype, name
        assert_numerics(g_fused[name].cpu(), g_eager[name], g64[name], f"spatial_gating grad {name}")


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, S, C, H): ViT-like S = 49 with odd C; a narrow gate (H/2 = 1: LayerNorm over one value, where the
# backward must see exactly the forward's v); C wider than the interpreter's 32-wide tiles; B = 1.
GATING_SHAPES = [(3, 49, 20, 12), (2, 16, 8, 2), (2, 5, 64, 40), (1, 10, 12, 6)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GATING_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_against_reference(triton_backend, dtype, shape):
    B, S, C, H = shape
    approximate = "tanh" if (S + C) % 2 else "none"  # both GELUs over the shape list
    ss = torch.tensor([0.0, 1.25, 2.5][:B]) if B > 1 else None  # drop path, one sample dropped
    _check_triton(_gating_args(*shape, seed=B + S), dtype, sample_scale=ss, approximate=approximate)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_triton_both_gelus_and_epsilons(triton_backend, approximate):
    _check_triton(_gating_args(2, 9, 16, 8, seed=3), torch.float32, approximate=approximate, eps=1e-3, gate_eps=1e-2)


def test_triton_optional_parameters_none(triton_backend):
    args = _gating_args(2, 7, 10, 6, seed=2)
    for name in ("norm_weight", "norm_bias", "fc1_bias", "gate_norm_weight", "gate_norm_bias", "proj_bias",
                 "fc2_bias"):
        args[name] = None
    _check_triton(args, torch.float32)


def test_triton_strided_empty_and_no_grad(triton_backend):
    args = {n: t.float().to(DEVICE) for n, t in _gating_args(3, 8, 12, 10, seed=4).items()}
    params = [args[n] for n in NAMES[1:]]
    xt = torch.randn(3, 12, 8, device=DEVICE).transpose(1, 2)  # stride 1 along S
    got = ops.spatial_gating(xt, *params, backend="triton")
    assert max_err(got, ops.spatial_gating(xt.contiguous(), *params, backend="reference")) < 1e-5
    with torch.no_grad():  # inference keeps nothing for the backward, and gives the same values
        assert torch.equal(ops.spatial_gating(xt, *params, backend="triton"), got)
    # B = 0: an empty output, and zero parameter gradients.
    leaves = [p.clone().requires_grad_() for p in params]
    x0 = torch.randn(0, 8, 12, device=DEVICE, requires_grad=True)
    out = ops.spatial_gating(x0, *leaves, backend="triton")
    assert out.shape == (0, 8, 12)
    out.sum().backward()
    assert x0.grad.shape == (0, 8, 12)
    assert all(p.grad is not None and not p.grad.any() for p in leaves)


@pytest.mark.parametrize("engine,seed", [("fused", 5), ("cublas", 14)])
def test_triton_autocast(triton_backend, monkeypatch, engine, seed):
    # both engines (MIXER_FAST_GEMM): the cuBLAS one's channel GEMMs under autocast too
    monkeypatch.setenv("MIXER_FAST_GEMM", engine)
    args = _gating_args(2, 10, 16, 12, seed=seed)
    dout = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out64, g64 = _gating_run(args, torch.float64, "reference", dout)
    results = {}
    for backend, device in (("reference", "cpu"), ("triton", DEVICE)):
        with torch.autocast(device, dtype=torch.bfloat16):
            results[backend] = _gating_run(args, torch.float32, backend, dout, device=device)
    (eager, g_eager), (fused, g_fused) = results["reference"], results["triton"]
    assert fused.dtype == eager.dtype == torch.float32
    # fp32 results whose matmuls ran in bf16: the rule at bf16's floor, eager under autocast as "eager"
    assert_numerics(fused.cpu().bfloat16(), eager, out64, "autocast output")
    for name in g64:
        assert g_fused[name].dtype == torch.float32, name
        assert_numerics(g_fused[name].cpu().bfloat16(), g_eager[name], g64[name], f"autocast grad {name}")


def test_triton_block_matches_timm_and_is_deterministic(timm, triton_backend):

    from timm.layers import GatedMlp

    ours, theirs = _fused_pair(mlp_layer=GatedMlp)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours = SpatialGatingBlock.from_module(ours, backend="triton").to(DEVICE)
    x, dout = torch.randn(3, 10, 24), torch.randn(3, 10, 24)
    out_t, g_t = _timm_fwd_bwd(theirs, x, dout)
    runs = [_timm_fwd_bwd(ours, x.to(DEVICE), dout.to(DEVICE)) for _ in range(2)]
    out_o, g_o = runs[0]
    assert_rel_close(out_o.cpu(), out_t, rtol=1e-5, what="triton block output")
    assert g_o.keys() == g_t.keys()
    for name in g_t:
        assert_rel_close(g_o[name].cpu(), g_t[name], rtol=1e-5, what=f"triton block grad {name}")
    # the triton backend's "deterministic" feature: bitwise equal run to run
    assert torch.equal(runs[1][0], out_o) and all(torch.equal(runs[1][1][n], g_o[n]) for n in g_o)


def test_triton_double_backward_raises(triton_backend):
    # compiled Triton needs CUDA tensors (the interpreter CPU ones): DEVICE is the one triton runs on here
    args = {n: t.float().to(DEVICE).requires_grad_() for n, t in _gating_args(2, 5, 8, 4).items()}
    out = ops.spatial_gating(*(args[n] for n in NAMES), backend="triton")
    (gx,) = torch.autograd.grad(out.square().sum(), args["x"], create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward: the triton backend's backward"):
        gx.sum().backward()


def test_triton_compiles_without_graph_breaks(triton_backend):


    block = perturb_(SpatialGatingBlock(16, 8, mlp_ratio=2, backend="triton")).to(DEVICE)
    x = torch.randn(2, 8, 16, device=DEVICE, requires_grad=True)
    eager_out = block(x)
    eager_out.sum().backward()
    eager_grads = {"x": x.grad.clone(), **grads(block)}
    x.grad = None
    block.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    out = torch.compile(block, fullgraph=True)(x)
    out.sum().backward()
    assert torch.equal(out, eager_out)
    assert all(torch.equal(g, eager_grads[n]) for n, g in {"x": x.grad, **grads(block)}.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_ln_folded(triton_backend, monkeypatch, dtype):
    # fc1's LayerNorm folded into its weight and epilogue (MIXER_FAST_LN=fold), as channel mixing's
    from conftest import spy_ln_gelu_prologues
    from mixer_fast.kernels.triton import spatial_gating
    from mixer_fast.kernels.triton.matmul import A_LAYERNORM_FOLDED

    seen = spy_ln_gelu_prologues(monkeypatch, spatial_gating)
    monkeypatch.setenv("MIXER_FAST_LN", "fold")
    _check_triton(_gating_args(3, 49, 20, 12, seed=8), dtype, sample_scale=torch.tensor([1.0, 0.0, 2.0]))
    assert A_LAYERNORM_FOLDED in seen


# The channel GEMMs in torch (cuBLAS on a GPU) with the Triton passes around them (MIXER_FAST_GEMM=cublas):
# only the gate's token GEMMs stay fused.
@pytest.fixture
def cublas_gate_sites(monkeypatch):
    """MIXER_FAST_GEMM=cublas; returns the fused GEMM sites launched (spied on): the gate's only."""
    from mixer_fast.kernels.triton import spatial_gating

    seen = []
    real = spatial_gating.fused_matmul

    def spy(*args, variant, **kwargs):
        seen.append(variant)
        return real(*args, variant=variant, **kwargs)

    monkeypatch.setenv("MIXER_FAST_GEMM", "cublas")
    monkeypatch.setattr(spatial_gating, "fused_matmul", spy)
    return seen


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GATING_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_cublas_against_reference(triton_backend, cublas_gate_sites, dtype, shape):
    B, S, C, H = shape
    approximate = "tanh" if (S + C) % 2 else "none"
    ss = torch.tensor([0.0, 1.25, 2.5][:B]) if B > 1 else None  # drop path: the residual in its own pass
    _check_triton(_gating_args(*shape, seed=B + S + 1), dtype, sample_scale=ss, approximate=approximate)
    # forward: the gate (W_p · LN_g(v), u ⊙ in its epilogue); backward: dW_p and g_v = W_pᵀ · dP
    assert cublas_gate_sites == ["gate_proj", "gate_b", "plain"]


def test_triton_cublas_optional_parameters_none_strided_no_grad_and_empty(triton_backend, cublas_gate_sites):
    args = _gating_args(2, 7, 10, 6, seed=12)
    for name in ("norm_weight", "norm_bias", "fc1_bias", "gate_norm_weight", "gate_norm_bias", "proj_bias",
                 "fc2_bias"):
        args[name] = None
    _check_triton(args, torch.float32)  # no fc2 bias: fc2's GEMM accumulates into x itself
    args = {n: t.float().to(DEVICE) for n, t in _gating_args(3, 8, 12, 10, seed=13).items()}
    params = [args[n] for n in NAMES[1:]]
    xt = torch.randn(3, 12, 8, device=DEVICE).transpose(1, 2)
    got = ops.spatial_gating(xt, *params, backend="triton")
    assert max_err(got, ops.spatial_gating(xt.contiguous(), *params, backend="reference")) < 1e-5
    with torch.no_grad():  # GELU in place, nothing kept: the same values
        assert torch.equal(ops.spatial_gating(xt, *params, backend="triton"), got)
    x0 = torch.randn(0, 8, 12, device=DEVICE, requires_grad=True)
    out = ops.spatial_gating(x0, *params, backend="triton")
    out.sum().backward()
    assert out.shape == (0, 8, 12) and x0.grad.shape == (0, 8, 12)


def test_engines_share_saved_tensors(triton_backend, monkeypatch):
    # Either engine's backward follows either engine's forward (Z, P, Q and the statistics mean the same).
    args = _gating_args(2, 9, 16, 8, seed=15)
    dout = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, want = _gating_run(args, torch.float64, "reference", dout)
    for fwd, bwd in (("fused", "cublas"), ("cublas", "fused")):
        leaves = {n: t.detach().to(DEVICE, torch.float32).requires_grad_() for n, t in args.items()}
        monkeypatch.setenv("MIXER_FAST_GEMM", fwd)
        out = ops.spatial_gating(*(leaves[n] for n in NAMES), backend="triton")
        monkeypatch.setenv("MIXER_FAST_GEMM", bwd)
        out.backward(dout.to(DEVICE, torch.float32))
        for name in want:
            assert max_err(leaves[name].grad.cpu(), want[name]) < 1e-4, (fwd, bwd, name)
