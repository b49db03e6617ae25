"""timm interop: the reference equals timm on every named config; convert() and block_layer swaps."""
from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import nn

import mixer_fast
from mixer_fast import reference as ref
from conftest import grads, perturb_
from tolerances import assert_rel_close, max_err

pytestmark = pytest.mark.timm


def _images(batch=2, seed=1):
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def _small_mixer(**kw):
    """A 2-block timm MlpMixer (timm's named entry points fix num_blocks themselves)."""
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(patch_size=32, num_blocks=2, embed_dim=kw.pop("embed_dim", 128), **kw)


def _fwd_bwd(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    # A loss that weighs every logit differently, so a wrong gradient cannot cancel out.
    w = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * w).sum().backward()
    return out.detach(), grads(model)


def _assert_same_outputs_and_grads(a, b, x, what):
    out_a, g_a = _fwd_bwd(a, x)
    out_b, g_b = _fwd_bwd(b, x)
    assert_rel_close(out_a, out_b, what=f"{what} logits")
    assert g_a.keys() == g_b.keys()
    for name in g_b:
        assert_rel_close(g_a[name], g_b[name], what=f"{what} grad {name}")


# The largest named models are checked forward only: their blocks are the smaller configs' at other widths
# and depths (gradients are compared on those), and forward plus backward of the three took 90 s of the
# suite's time on a 2-core CI machine.
FORWARD_ONLY = {"mixer_l16", "mixer_l32", "resmlp_big_24"}


@pytest.mark.parametrize("name", sorted(ref.CONFIGS))
def test_reference_matches_timm(timm, name):
    cfg = ref.get_config(name)
    theirs = perturb_(timm.create_model(cfg.timm_name, pretrained=False), seed=3).eval()
    # Built without initialising (timm's weights replace every parameter; strict loading checks the names
    # and shapes), and loaded as copies so the two models share no storage.
    ours = ref.create_model(name, device="meta").eval()
    ours.load_state_dict({k: v.clone() for k, v in theirs.state_dict().items()}, strict=True, assign=True)
    assert not any(p.is_meta for p in ours.parameters()) and not any(b.is_meta for b in ours.buffers())
    if name not in FORWARD_ONLY:
        _assert_same_outputs_and_grads(ours, theirs, _images(), name)
        return
    x = _images()
    with torch.no_grad():
        assert_rel_close(ours(x), theirs(x), what=f"{name} logits")


@pytest.mark.parametrize("name", ["mixer_s32_224", "resmlp_12_224"])
def test_convert_timm_model(timm, name):
    theirs = perturb_(timm.create_model(name, pretrained=False), seed=4).eval()
    ours = copy.deepcopy(theirs)
    params_before = {n: p for n, p in ours.named_parameters()}
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1)

    assert mixer_fast.convert(ours) is ours
    fused = mixer_fast.MixerBlock if name.startswith("mixer") else mixer_fast.ResMLPBlock
    assert all(type(b) is fused for b in ours.blocks)
    # Same Parameter objects under the same names: nothing copied.
    params_after = dict(ours.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[n] is params_before[n] for n in params_before)

    x = _images()
    _assert_same_outputs_and_grads(ours, theirs, x, name)
    # The optimizer built before convert() still drives the model: one step on each gives the same weights.
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    opt.step()
    opt_theirs.step()
    for (n, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert not torch.equal(p, before[n]), f"{n} was not updated by the optimizer built before convert()"
        assert_rel_close(p, q, what=f"after one SGD step: {n}")


def test_convert_keeps_optimizer_updating(timm):
    model = perturb_(_small_mixer()).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mixer_fast.convert(model)
    w = model.blocks[0].mlp_tokens.fc1.weight
    before = w.detach().clone()
    model(_images(1)).sum().backward()
    opt.step()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert not torch.equal(w, before)


def test_create_model_with_fused_block_layer_loads_timm_state_dict(timm):
    theirs = perturb_(timm.create_model("mixer_b16_224", pretrained=False), seed=5).eval()
    ours = timm.create_model("mixer_b16_224", pretrained=False, block_layer=mixer_fast.MixerBlock).eval()
    assert all(type(b) is mixer_fast.MixerBlock for b in ours.blocks)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    _assert_same_outputs_and_grads(ours, theirs, _images(1), "mixer_b16 block_layer")


def test_fused_resmlp_block_is_a_timm_block_layer(timm):
    # timm's resmlp_* entry points fix block_layer themselves; MlpMixer takes ours directly.
    from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

    kw = dict(patch_size=32, num_blocks=2, embed_dim=96, mlp_ratio=4, norm_layer=Affine)
    theirs = perturb_(MlpMixer(block_layer=ResBlock, **kw), seed=6).eval()
    ours = MlpMixer(block_layer=mixer_fast.ResMLPBlock, **kw).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    _assert_same_outputs_and_grads(ours, theirs, _images(), "resmlp block_layer")


def test_convert_tanh_gelu_model(timm):
    act = partial(nn.GELU, approximate="tanh")
    theirs = perturb_(_small_mixer(act_layer=act)).eval()
    ours = mixer_fast.convert(copy.deepcopy(theirs), strict=True)
    assert ours.blocks[0].mlp_tokens.act.approximate == "tanh"
    _assert_same_outputs_and_grads(ours, theirs, _images(), "tanh GELU")


@pytest.mark.parametrize("drop_path, drop", [(0.4, 0.0), (0.0, 0.3)])
def test_convert_train_mode_drop_path_and_dropout_match_timm(timm, drop_path, drop):
    # The fused blocks draw drop-path masks and dropout in timm's order, so with the same seed a
    # training step is identical.
    theirs = perturb_(_small_mixer(drop_path_rate=drop_path, proj_drop_rate=drop)).train()
    ours = mixer_fast.convert(copy.deepcopy(theirs), strict=True)
    assert ours.training and ours.blocks[0].training
    x = _images(4)
    torch.manual_seed(7)
    out_theirs, g_theirs = _fwd_bwd(theirs, x)
    torch.manual_seed(7)
    out_ours, g_ours = _fwd_bwd(ours, x)
    assert_rel_close(out_ours, out_theirs, what="train-mode logits")
    for n in g_theirs:
        assert_rel_close(g_ours[n], g_theirs[n], what=f"train-mode grad {n}")


def test_convert_leaves_unconvertible_blocks_and_names_them(timm):
    model = _small_mixer(act_layer=nn.SiLU)
    with pytest.warns(UserWarning, match=r"2 block\(s\) left unconverted: blocks\.0 \(MixerBlock\).*SiLU"):
        mixer_fast.convert(model)
    assert all(type(b).__module__ == "timm.models.mlp_mixer" for b in model.blocks)
    with pytest.raises(ValueError, match=r"blocks\.1 \(MixerBlock\).*expected nn.GELU"):
        mixer_fast.convert(model, strict=True)


def test_convert_skips_subclass_with_own_forward(timm):
    from timm.models.mlp_mixer import MixerBlock

    class Custom(MixerBlock):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MixerBlock(32, 16), Custom(32, 16))
    with pytest.warns(UserWarning, match=r"1 block\(s\) left unconverted: 1 \(Custom\): its class overrides forward"):
        mixer_fast.convert(model)
    assert type(model[0]) is mixer_fast.MixerBlock and type(model[1]) is Custom


def test_convert_root_block_and_backend_argument(timm):
    from timm.models.mlp_mixer import ResBlock

    block = perturb_(ResBlock(32, 16)).eval()
    fused = mixer_fast.convert(block, backend="reference")
    assert type(fused) is mixer_fast.ResMLPBlock and fused.backend == "reference"
    x = torch.randn(2, 16, 32)
    assert_rel_close(fused(x), block(x))
    with pytest.raises(ValueError, match="backend: expected one of"):
        mixer_fast.convert(block, backend="cuda")


def test_convert_to_triton_backend_matches_timm(timm, triton_backend):
    from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

    from conftest import DEVICE

    for theirs in (_small_mixer(embed_dim=64),
                   MlpMixer(patch_size=32, num_blocks=2, embed_dim=64, mlp_ratio=4, block_layer=ResBlock,
                            norm_layer=Affine)):
        theirs = perturb_(theirs, seed=9).eval()
        ours = mixer_fast.convert(copy.deepcopy(theirs), backend="triton", strict=True).to(DEVICE)
        assert all(b.backend == "triton" for b in ours.blocks)
        x = _images()
        out_theirs, g_theirs = _fwd_bwd(theirs, x)
        out_ours, g_ours = _fwd_bwd(ours, x.to(DEVICE))
        assert_rel_close(out_ours.cpu(), out_theirs, what="triton logits")
        for n in g_theirs:
            # The token-MLP fc2 bias adds a per-token constant that the next LayerNorm removes: its gradient
            # is zero up to rounding (~1e-12 in timm), so an absolute floor is needed next to the relative bound.
            err = max_err(g_ours[n].cpu(), g_theirs[n])
            assert err <= 1e-4 * float(g_theirs[n].abs().max()) + 1e-6, (n, err)
