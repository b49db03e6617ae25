"""ResMLP inference folding (mixer_fast.torch.fold): folded vs unfolded outputs, passes, parameters, errors.

Parameters are drawn off their init (Affine α ≠ 1, β ≠ 0, layer scales of order 1, non-zero biases) so a
missing or misplaced term shows. float64 checks the algebra: the folded branch sums agree with the unfolded
ones to 1e-12 of their size. fp32 follows the DESIGN.md rule (tests/tolerances.py) against a float64 run of
the unfolded block: the folded block may be at most twice as far from it as the unfolded fp32 block.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import mixer_fast
from mixer_fast import reference as ref
from mixer_fast.torch.fold import FoldedResMLPBlock, fold_for_inference
from conftest import use_backend
from tolerances import assert_numerics

REL64 = 1e-12


def randomise_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter redrawn: matrices ~ N(0, 1/fan_in), vectors ~ N(0, 1) (α, β, ls, biases)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if p.ndim == 2:
                r /= p.shape[1] ** 0.5
            elif p.ndim == 4:  # the patch stem
                r /= p[0].numel() ** 0.5
            p.copy_(r.to(p.dtype))
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def timm_resblock(timm, dim=24, seq_len=16, **kw):
    return timm.models.mlp_mixer.ResBlock(dim, seq_len, **kw)


def small_timm_resmlp(timm, **kw):
    mm = timm.models.mlp_mixer
    return mm.MlpMixer(num_classes=10, img_size=32, patch_size=8, embed_dim=32, num_blocks=2,
                       block_layer=mm.ResBlock, norm_layer=mm.Affine, mlp_ratio=4, **kw)


# ---------------------------------------------------------------------------------------------------------
# The algebra, in float64.

@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_timm_resblock_float64(timm, approximate):
    block = randomise_(timm_resblock(timm, act_layer=lambda: nn.GELU(approximate=approximate),
                                     dtype=torch.float64)).eval()
    folded = fold_for_inference(block)
    assert isinstance(folded, FoldedResMLPBlock) and folded.approximate == approximate
    x = torch.randn(3, 16, 24, dtype=torch.float64)
    want = block(x)
    assert folded(x).dtype == torch.float64
    # Relative to the branches (the residual x would hide an error in them).
    assert rel_err(folded(x) - x, want - x) < REL64


@pytest.mark.parametrize("cls", [ref.ResMLPBlock, mixer_fast.ResMLPBlock], ids=["reference", "mixer_fast"])
def test_blocks_float64_with_dropout_and_drop_path_in_eval(cls):
    block = randomise_(cls(20, 9, drop=0.3, drop_path=0.2, dtype=torch.float64)).eval()
    x = torch.randn(2, 9, 20, dtype=torch.float64)
    assert rel_err(fold_for_inference(block)(x) - x, block(x) - x) < REL64


def test_token_and_channel_branches_separately_float64():
    """Each half of the folded forward equals its unfolded half (a compensating error would not pass)."""
    block = randomise_(ref.ResMLPBlock(16, 12, dtype=torch.float64)).eval()
    f = fold_for_inference(block)
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    tok = x + block.ls1 * block.linear_tokens(block.norm1(x).transpose(1, 2)).transpose(1, 2)
    tok_folded = torch.addcmul(f.token_bias_folded, torch.matmul(f.token_weight, x), f.token_scale_folded) + x
    assert rel_err(tok_folded - x, tok - x) < REL64
    ch = block.ls2 * block.mlp_channels(block.norm2(tok))
    ch_folded = mixer_fast.ops.channel_mixing(tok, None, None, f.fc1_weight, f.fc1_bias, f.fc2_weight, f.fc2_bias,
                                              norm="affine", backend="reference") - tok
    assert rel_err(ch_folded, ch) < REL64


def test_whole_timm_resmlp_float64(timm):
    model = randomise_(small_timm_resmlp(timm)).double().eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want = model(images)
    folded = fold_for_inference(model)
    assert rel_err(folded(images), want) < REL64
    assert [type(b) for b in folded.blocks] == [FoldedResMLPBlock] * 2
    # The original is untouched (inplace=False), and everything but the blocks was copied.
    assert all(isinstance(b, timm.models.mlp_mixer.ResBlock) for b in model.blocks)
    assert torch.equal(model(images), want)
    assert folded.stem is not model.stem and torch.equal(folded.stem.proj.weight, model.stem.proj.weight)
    assert folded.head.weight.data_ptr() != model.head.weight.data_ptr()


def test_whole_reference_resmlp_inplace_float64():
    model = randomise_(ref.ResMLP(num_classes=7, img_size=32, patch_size=8, embed_dim=24, num_blocks=3,
                                  dtype=torch.float64)).eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want = model(images)
    stem = model.stem
    out = fold_for_inference(model, inplace=True, backend="reference")
    assert out is model and model.stem is stem
    assert all(isinstance(b, FoldedResMLPBlock) and b.backend == "reference" for b in model.blocks)
    assert rel_err(model(images), want) < REL64
    # Folding again changes nothing but the backend of the folded blocks, when one is given.
    again = fold_for_inference(model, backend=None)
    assert [b.backend for b in again.blocks] == ["reference"] * 3
    assert rel_err(again(images), want) < REL64


# ---------------------------------------------------------------------------------------------------------
# fp32 on the backends.

@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("shape", [(1, 16, 24), (4, 49, 64)], ids=lambda s: "x".join(map(str, s)))
def test_fp32_backends(request, backend, shape):
    backend = use_backend(request, backend)
    B, S, C = shape
    block = randomise_(mixer_fast.ResMLPBlock(C, S, backend=backend)).eval()
    block64 = randomise_(ref.ResMLPBlock(C, S, dtype=torch.float64)).eval()
    folded = fold_for_inference(block, backend=backend)
    assert folded.backend == backend and folded.token_weight.dtype == torch.float32
    x = torch.randn(B, S, C, dtype=torch.float64)
    want = block64(x)
    x32 = x.float()
    with torch.no_grad():
        assert_numerics(folded(x32), block(x32), want)


def test_bf16_cpu(request):
    use_backend(request, "cpu")
    block = randomise_(mixer_fast.ResMLPBlock(32, 16, dtype=torch.bfloat16, backend="cpu")).eval()
    block64 = randomise_(ref.ResMLPBlock(32, 16, dtype=torch.float64)).eval()
    folded = fold_for_inference(block)
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    with torch.no_grad():
        out = folded(x.bfloat16())
        assert out.dtype == torch.bfloat16
        assert_numerics(out, block(x.bfloat16()), block64(x))


def test_fp32_whole_model_logits(timm):
    model = randomise_(small_timm_resmlp(timm)).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want64 = model.double()(images.double())
        model.float()
        folded = fold_for_inference(model)
        assert_numerics(folded(images), model(images), want64, "logits")


# ---------------------------------------------------------------------------------------------------------
# Fewer passes and tensors.

class _Kernels(TorchDispatchMode):
    """Counts the ATen calls that do work (views excluded) and the GEMMs among them."""

    VIEWS = {"aten.view.default", "aten._unsafe_view.default", "aten.t.default", "aten.transpose.int",
             "aten.expand.default", "aten.reshape.default"}
    GEMMS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default"}

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) not in self.VIEWS and not func.is_view:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))

    def counts(self):
        gemms = sum(c in self.GEMMS for c in self.calls)
        return gemms, len(self.calls) - gemms


def test_fewer_passes_on_the_reference_backend():
    block = randomise_(mixer_fast.ResMLPBlock(32, 16, backend="reference")).eval()
    folded = fold_for_inference(block)
    assert folded.backend == "reference"  # kept from the block
    x = torch.randn(2, 16, 32)
    with torch.no_grad(), _Kernels() as before:
        block(x)
    with torch.no_grad(), _Kernels() as after:
        folded(x)
    (g0, e0), (g1, e1) = before.counts(), after.counts()
    assert g1 == g0 == 3, (before.calls, after.calls)
    # Unfolded: affine ×2, transpose copy, token bias, scale ×2, residual ×2, GELU. Folded: addcmul,
    # residual, GELU, residual.
    assert e1 <= 4 and e0 - e1 >= 6, (before.calls, after.calls)
    assert "aten.bmm.default" in after.calls  # the folded token branch: W_t @ x, no transpose copy


def test_fused_backend_keeps_the_fused_token_op(request, monkeypatch):
    use_backend(request, "cpu")
    block = randomise_(mixer_fast.ResMLPBlock(32, 16, backend="cpu")).eval()
    folded = fold_for_inference(block)
    calls = []
    from mixer_fast.torch import ops as torch_ops

    token_mixing = torch_ops.token_mixing
    monkeypatch.setattr(torch_ops, "token_mixing", lambda *a, **k: calls.append(k) or token_mixing(*a, **k))
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        out = folded(x)
        assert [(k["norm"], k["backend"]) for k in calls] == [("affine", "cpu")]
        assert torch.allclose(out, block(x), rtol=1e-5, atol=1e-5)


def test_folded_parameters_and_state_dict():
    block = randomise_(mixer_fast.ResMLPBlock(24, 16)).eval()
    folded = fold_for_inference(block)
    shapes = {n: tuple(p.shape) for n, p in folded.named_parameters()}
    assert shapes == {"token_norm_weight": (24,), "token_norm_bias": (24,), "token_weight": (16, 16),
                      "token_bias": (16,), "token_scale": (24,), "fc1_weight": (96, 24), "fc1_bias": (96,),
                      "fc2_weight": (24, 96), "fc2_bias": (24,)}
    assert {n: tuple(b.shape) for n, b in folded.named_buffers()} == {"token_scale_folded": (24,),
                                                                       "token_bias_folded": (16, 24)}
    assert len(list(block.parameters())) == 12 and not any(p.requires_grad for p in folded.parameters())
    # The folded block holds new tensors: the original's parameters are not modified or shared.
    ptrs = {p.data_ptr() for p in block.parameters()}
    assert not ptrs & {p.data_ptr() for p in folded.parameters()}
    # A folded state dict loads into an empty folded block.
    empty = FoldedResMLPBlock(24, 16, 96, backend="reference")
    empty.load_state_dict(folded.state_dict(), strict=True)
    x = torch.randn(2, 16, 24)
    assert torch.equal(empty(x), fold_for_inference(block, backend="reference")(x))


def test_mixer_blocks_left_alone(timm):
    model = timm.models.mlp_mixer.MlpMixer(num_classes=5, img_size=32, patch_size=8, embed_dim=32,
                                           num_blocks=1).eval()
    with pytest.warns(UserWarning, match="no ResMLP block"):
        out = fold_for_inference(model)
    assert isinstance(out.blocks[0], timm.models.mlp_mixer.MixerBlock)


# ---------------------------------------------------------------------------------------------------------
# Errors.

def test_refuses_training_mode():
    model = ref.ResMLP(num_classes=3, img_size=16, patch_size=8, embed_dim=8, num_blocks=1)
    with pytest.raises(ValueError, match=r"model: expected eval mode.*model\.eval\(\)"):
        fold_for_inference(model)
    folded = fold_for_inference(model.eval())
    folded.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        folded(torch.randn(1, 3, 16, 16))


def test_bad_arguments():
    block = ref.ResMLPBlock(8, 4).eval()
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        fold_for_inference(block.state_dict())
    with pytest.raises(ValueError, match="backend: expected one of"):
        fold_for_inference(block, backend="cuda")
    with pytest.raises(TypeError, match="inplace: expected a bool"):
        fold_for_inference(block, inplace=1)
    folded = fold_for_inference(block)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, seq_len=4, dim=8\)"):
        folded(torch.randn(2, 8, 4))
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        folded(torch.randn(2, 4, 8, dtype=torch.float64))


def test_unfoldable_blocks_warn_or_raise():
    class OwnForward(ref.ResMLPBlock):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(ref.ResMLPBlock(8, 4), OwnForward(8, 4),
                          ref.ResMLPBlock(8, 4, act_layer=nn.ReLU)).eval()
    with pytest.raises(ValueError, match=r"2 ResMLP block\(s\) left unfolded.*overrides forward.*expected nn.GELU"):
        fold_for_inference(model, strict=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fold_for_inference(model)
    assert len(caught) == 1 and "left unfolded" in str(caught[0].message)
    assert [type(m) for m in out] == [FoldedResMLPBlock, OwnForward, ref.ResMLPBlock]
    with pytest.raises(ValueError, match="block: already folded"):
        FoldedResMLPBlock.from_block(out[0])
