"""resize_token_mixing (fine-tuning at a new resolution, MLP-Mixer paper Supplementary C), torch and Flax.

What is proved:
- shapes of every expanded weight, and the block-diagonal structure (diagonal blocks equal to the trained
  weights bit for bit, off-diagonal blocks exactly zero, biases tiled), read back through an independent
  un-permutation of the spatial windows;
- the construction's exact consequence for every block kind (timm MixerBlock / ResBlock, reference blocks,
  mixer_fast blocks on the reference and cpu backends, Flax blocks on xla): a block resized to k·S tokens
  fed k stacked token tables returns the k stacked outputs of the original block;
- for whole models (timm mixer and resmlp, reference MlpMixer / ResMLP, fused blocks on cpu, a
  vision_transformer-style Flax MlpMixer): an image made of K_h × K_w tiles gives, in each spatial window,
  exactly the original model's token features of that tile, and logits equal to the mean of the tiles'
  logits; the stem accepts the new image size; the resized timm state dict loads into timm's own
  constructor at the new size;
- argument errors name the argument and say what was expected and given.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

import mixer_fast
from mixer_fast import reference as ref
from mixer_fast.torch.resize import resize_token_mixing
from conftest import perturb_, require, use_backend

DIM, S, D_S = 16, 12, 8            # block tests: S = 12 is not a square (3×4 grid)
TOL = {torch.float64: dict(rtol=1e-11, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


# ---------------------------------------------------------------------------------------------------------
# Blocks

def _block(request, case: str) -> nn.Module:
    """A block with S=12 tokens, DIM channels (token hidden D_S=8 for the Mixers), perturbed, in eval mode."""
    if case.startswith("timm"):
        mm = request.getfixturevalue("timm").models.mlp_mixer
        block = mm.MixerBlock(DIM, S) if case == "timm_mixer" else mm.ResBlock(DIM, S, init_values=0.5)
    elif case == "ref_mixer":
        block = ref.MixerBlock(DIM, S)
    elif case == "ref_resmlp":
        block = ref.ResMLPBlock(DIM, S, init_values=0.5)
    else:
        kind, backend = case.split("-")
        use_backend(request, backend)
        block = (mixer_fast.MixerBlock(DIM, S, backend=backend) if kind == "fused_mixer"
                 else mixer_fast.ResMLPBlock(DIM, S, init_values=0.5, backend=backend))
    dtype = torch.float32 if case.endswith("cpu") else torch.float64
    return perturb_(block.to(dtype), std=0.2).eval()


BLOCK_CASES = ["timm_mixer", "timm_resmlp", "ref_mixer", "ref_resmlp", "fused_mixer-reference",
               "fused_resmlp-reference", "fused_mixer-cpu", "fused_resmlp-cpu"]


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_block_fed_stacked_tables_returns_stacked_outputs(request, case):
    block = _block(request, case)
    dtype = next(block.parameters()).dtype
    before = {n: p.clone() for n, p in block.state_dict().items()}
    k = 3
    big = resize_token_mixing(block, k * S)
    assert big is not block and type(big) is type(block)
    # The original is untouched.
    assert all(torch.equal(before[n], p) for n, p in block.state_dict().items())
    assert list(big.state_dict()) == list(block.state_dict())
    if hasattr(block, "seq_len"):
        assert (block.seq_len, big.seq_len) == (S, k * S)

    gen = torch.Generator().manual_seed(1)
    tables = [torch.randn(2, S, DIM, generator=gen, dtype=dtype) for _ in range(k)]
    with torch.no_grad():   # no_grad: the cpu backend runs its fused kernels only for inference
        # k different tables side by side...
        got = big(torch.cat(tables, dim=1))
        want = torch.cat([block(t) for t in tables], dim=1)
        torch.testing.assert_close(got, want, **TOL[dtype])
        # ...and the literal statement: k stacked copies of one table.
        got = big(tables[0].repeat(1, k, 1))
        torch.testing.assert_close(got, block(tables[0]).repeat(1, k, 1), **TOL[dtype])


def _windows_to_blocks(t: torch.Tensor, dim: int, old, new) -> torch.Tensor:
    """Reorders axis ``dim`` of t, a row-major (Hn, Wn) grid of tokens, into k windows of H×W tokens each in
    its own row-major order (window index row-major over the K_h × K_w windows): an independent statement of
    the paper's "splitting the input into K×K equal parts spatially"."""
    (H, W), (Hn, Wn) = old, new
    t = t.movedim(dim, 0)
    rest = t.shape[1:]
    t = t.reshape(Hn // H, H, Wn // W, W, *rest).transpose(1, 2).reshape(Hn * Wn, *rest)
    return t.movedim(0, dim)


@pytest.mark.parametrize("new", [(6, 8), (3, 12), (9, 4), 4 * S], ids=["2x2", "1x3", "3x1", "int"])
def test_mixer_weights_are_block_diagonal_copies(new):
    block = perturb_(ref.MixerBlock(DIM, S, mlp_ratio=(D_S / DIM, 4.0)))
    old = (3, 4)
    big = resize_token_mixing(block, new, old_size=old if not isinstance(new, int) else None)
    new_grid = new if not isinstance(new, int) else (S * 4, 1)     # int on a bare block: consecutive runs
    old_grid = old if not isinstance(new, int) else (S, 1)
    k = (new_grid[0] // old_grid[0]) * (new_grid[1] // old_grid[1])
    fc1, fc2 = block.mlp_tokens.fc1, block.mlp_tokens.fc2
    nfc1, nfc2 = big.mlp_tokens.fc1, big.mlp_tokens.fc2
    assert nfc1.weight.shape == (k * D_S, k * S) and nfc1.bias.shape == (k * D_S,)
    assert nfc2.weight.shape == (k * S, k * D_S) and nfc2.bias.shape == (k * S,)
    features = (nfc1.in_features, nfc1.out_features, nfc2.in_features, nfc2.out_features)
    assert features == (k * S, k * D_S, k * D_S, k * S)
    w1 = _windows_to_blocks(nfc1.weight, 1, old_grid, new_grid).reshape(k, D_S, k, S)
    w2 = _windows_to_blocks(nfc2.weight, 0, old_grid, new_grid).reshape(k, S, k, D_S)
    b2 = _windows_to_blocks(nfc2.bias, 0, old_grid, new_grid).reshape(k, S)
    for a in range(k):
        for b in range(k):
            if a == b:
                assert torch.equal(w1[a, :, a], fc1.weight) and torch.equal(w2[a, :, a], fc2.weight)
            else:
                assert not w1[a, :, b].any() and not w2[a, :, b].any()
        assert torch.equal(nfc1.bias[a * D_S:(a + 1) * D_S], fc1.bias) and torch.equal(b2[a], fc2.bias)


@pytest.mark.parametrize("new", [(6, 8), (3, 12)], ids=["2x2", "1x3"])
def test_resmlp_linear_tokens_is_block_diagonal(new):
    block = perturb_(ref.ResMLPBlock(DIM, S))
    old = (3, 4)
    big = resize_token_mixing(block, new, old_size=old)
    k = (new[0] // 3) * (new[1] // 4)
    w, nw = block.linear_tokens.weight, big.linear_tokens.weight
    assert nw.shape == (k * S, k * S) and big.linear_tokens.bias.shape == (k * S,)
    blocks = _windows_to_blocks(_windows_to_blocks(nw, 0, old, new), 1, old, new).reshape(k, S, k, S)
    bias = _windows_to_blocks(big.linear_tokens.bias, 0, old, new).reshape(k, S)
    for a in range(k):
        assert torch.equal(bias[a], block.linear_tokens.bias)
        for b in range(k):
            assert torch.equal(blocks[a, :, b], w) if a == b else not blocks[a, :, b].any()


def test_inplace_and_training_state_kept():
    block = perturb_(ref.MixerBlock(DIM, S)).train()
    block.mlp_tokens.fc1.bias.requires_grad_(False)
    same = resize_token_mixing(block, 2 * S, inplace=True)
    assert same is block and block.mlp_tokens.fc1.weight.shape == (2 * D_S, 2 * S)
    assert block.training and not block.mlp_tokens.fc1.bias.requires_grad
    assert block.mlp_tokens.fc1.weight.requires_grad
    out = block(torch.randn(2, 2 * S, DIM))
    out.sum().backward()  # trainable after the resize
    assert block.mlp_tokens.fc1.weight.grad.shape == (2 * D_S, 2 * S)


# ---------------------------------------------------------------------------------------------------------
# Whole models: the image made of tiles

IMG, PATCH, EMBED = 32, 8, 32      # 4×4 patch grid, S = 16


def _timm_model(timm, case: str, **kw) -> nn.Module:
    """timm's MlpMixer as its mixer_* / resmlp_* entry points build it (those fix patch size and depth)."""
    mm = timm.models.mlp_mixer
    if case == "timm_mixer":
        return mm.MlpMixer(**kw)
    return mm.MlpMixer(block_layer=partial(mm.ResBlock, init_values=0.5), norm_layer=mm.Affine,
                       **{"mlp_ratio": 4, **kw})


def _model(request, case: str) -> nn.Module:
    common = dict(img_size=IMG, patch_size=PATCH, embed_dim=EMBED, num_blocks=2, num_classes=5)
    if case in ("timm_mixer", "timm_resmlp"):
        model = _timm_model(request.getfixturevalue("timm"), case, **common)
    elif case == "ref_mixer":
        model = ref.MlpMixer(**common)
    elif case == "ref_resmlp":
        model = ref.ResMLP(init_values=0.5, **common)
    else:  # the reference model built from mixer_fast's fused blocks, on the cpu backend
        use_backend(request, "cpu")
        model = ref.MlpMixer(block_layer=partial(mixer_fast.MixerBlock, backend="cpu"), **common)
    dtype = torch.float32 if case == "fused_mixer-cpu" else torch.float64
    return perturb_(model.to(dtype), std=0.1).eval()


def _tiles(rows: int, cols: int, dtype) -> torch.Tensor:
    """(rows, cols, B, 3, IMG, IMG): a different image for every tile."""
    return torch.randn(rows, cols, 2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2), dtype=dtype)


@pytest.mark.parametrize("case, grid", [
    ("timm_mixer", (8, 8)), ("timm_mixer", (8, 12)), ("timm_resmlp", (8, 8)),
    ("ref_mixer", (12, 8)), ("ref_resmlp", (8, 8)), ("fused_mixer-cpu", (8, 8))])
def test_model_on_tiled_image_matches_tiles(request, case, grid):
    model = _model(request, case)
    dtype = next(model.parameters()).dtype
    Kh, Kw = grid[0] // 4, grid[1] // 4
    big = resize_token_mixing(model, grid)
    assert tuple(big.stem.img_size) == (grid[0] * PATCH, grid[1] * PATCH)
    assert tuple(big.stem.grid_size) == grid and big.stem.num_patches == grid[0] * grid[1]
    assert tuple(model.stem.img_size) == (IMG, IMG)   # the original is untouched

    tiles = _tiles(Kh, Kw, dtype)
    image = tiles.permute(2, 3, 0, 4, 1, 5).reshape(2, 3, Kh * IMG, Kw * IMG)   # tile (a, b) at rows a, cols b
    with torch.no_grad():
        feats = big.forward_features(image).reshape(2, Kh, 4, Kw, 4, EMBED)     # row-major grid → windows
        logits = big(image)
        tile_logits = []
        for a in range(Kh):
            for b in range(Kw):
                want = model.forward_features(tiles[a, b]).reshape(2, 4, 4, EMBED)
                torch.testing.assert_close(feats[:, a, :, b], want, **TOL[dtype])
                tile_logits.append(model(tiles[a, b]))
    torch.testing.assert_close(logits, torch.stack(tile_logits).mean(0), **TOL[dtype])


def test_model_int_new_size_scales_the_grid():
    model = perturb_(ref.MlpMixer(img_size=IMG, patch_size=PATCH, embed_dim=EMBED, num_blocks=1, num_classes=3))
    by_len = resize_token_mixing(model, 9 * 16)     # K = 3
    by_grid = resize_token_mixing(model, (12, 12))
    assert by_len.stem.img_size == (96, 96)
    for (n, a), (_, b) in zip(by_len.state_dict().items(), by_grid.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match=r"new_size: expected K²·S = K²·16 .* got 32 = 2·16"):
        resize_token_mixing(model, 32)


@pytest.mark.parametrize("case, mlp_ratio", [("timm_mixer", (0.5 * 4, 4.0)), ("timm_resmlp", 4)])
def test_resized_timm_state_dict_loads_into_timm_at_new_size(timm, case, mlp_ratio):
    """timm rebuilds the resized architecture from the new img_size and mlp_ratio scaled by k (Mixers)."""
    common = dict(patch_size=PATCH, embed_dim=EMBED, num_blocks=2, num_classes=5)
    big = resize_token_mixing(perturb_(_timm_model(timm, case, img_size=IMG, **common)).eval(), (8, 8))
    rebuilt = _timm_model(timm, case, img_size=64, mlp_ratio=mlp_ratio, **common).eval()
    rebuilt.load_state_dict(big.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), big(x))


# ---------------------------------------------------------------------------------------------------------
# Errors

def test_errors_name_the_argument_expected_and_given():
    block = ref.MixerBlock(DIM, S)
    with pytest.raises(ValueError, match=r"new_size: expected a positive multiple of the current sequence length "
                                         r"S=12, got 13"):
        resize_token_mixing(block, 13)
    with pytest.raises(ValueError, match=r"new_size: .*multiple of the current sequence length S=12, got 0"):
        resize_token_mixing(block, 0)
    with pytest.raises(ValueError, match=r"new_size: expected a grid whose rows are a multiple of 3 and cols a "
                                         r"multiple of 4 \(the current grid \(3, 4\)\), got \(6, 10\)"):
        resize_token_mixing(block, (6, 10), old_size=(3, 4))
    with pytest.raises(ValueError, match=r"old_size: expected the block's grid .* S=12"):
        resize_token_mixing(block, (6, 8))     # S = 12 is not a square: the grid must be given
    with pytest.raises(ValueError, match=r"old_size: expected a grid of S=12 tokens .* got \(4, 4\) \(16 tokens\)"):
        resize_token_mixing(block, (8, 8), old_size=(4, 4))
    with pytest.raises(ValueError, match=r"new_size: expected a grid \(rows, cols\) of two positive ints, got"):
        resize_token_mixing(block, (6, 8, 1), old_size=(3, 4))
    with pytest.raises(TypeError, match=r"new_size: expected a sequence length \(int\) or a patch grid"):
        resize_token_mixing(block, 24.0)
    with pytest.raises(TypeError, match=r"module: expected a torch.nn.Module, got dict"):
        resize_token_mixing({}, 24)
    with pytest.raises(ValueError, match=r"module: expected an MLP-Mixer / ResMLP block .* got Linear without any"):
        resize_token_mixing(nn.Linear(4, 4), 8)
    model = ref.MlpMixer(img_size=IMG, patch_size=PATCH, embed_dim=EMBED, num_blocks=1)
    with pytest.raises(ValueError, match=r"old_size: expected the model's patch grid \(4, 4\) \(or None\), "
                                         r"got \(2, 8\)"):
        resize_token_mixing(model, (8, 8), old_size=(2, 8))
    with pytest.raises(ValueError, match=r"new_size: expected a grid whose rows are a multiple of 4 .* got \(6, 8\)"):
        resize_token_mixing(model, (6, 8), inplace=True)
    assert model.stem.img_size == (IMG, IMG) and model.blocks[0].mlp_tokens.fc1.in_features == 16  # nothing changed


# ---------------------------------------------------------------------------------------------------------
# Flax

def _flax():
    jax = require("jax")
    require("flax.linen")
    import mixer_fast.flax as mff
    from mixer_fast.flax.resize import resize_token_mixing as resize

    return jax, mff, resize


def _random_params(jax, module, x, seed=0, std=0.3):
    """The module's parameter tree (from ``init``'s shapes, traced but not compiled), every leaf random
    (numpy arrays: eager jax would compile each op for each shape)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    return jax.tree_util.tree_map(lambda p: (std * rng.standard_normal(p.shape)).astype(p.dtype), shapes)


def _normal(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("kind", ["mixer", "resmlp"])
def test_flax_block_fed_stacked_tables_returns_stacked_outputs(kind):
    jax, mff, resize = _flax()
    k = 3
    make = ((lambda ds: mff.MixerBlock(ds, 2 * DIM, backend="xla")) if kind == "mixer"
            else (lambda ds: mff.ResMLPBlock(2 * DIM, init_values=0.5, backend="xla")))
    tables = [_normal(i, 2, S, DIM) for i in range(k)]
    params = _random_params(jax, make(D_S), tables[0])
    big = resize(params, k * S)
    inner = big["params"]
    if kind == "mixer":
        assert inner["token_mixing"]["Dense_0"]["kernel"].shape == (k * S, k * D_S)
        assert inner["token_mixing"]["Dense_1"]["kernel"].shape == (k * D_S, k * S)
        assert inner["token_mixing"]["Dense_1"]["bias"].shape == (k * S,)
    else:
        assert inner["linear_tokens"]["kernel"].shape == (k * S, k * S)
    assert inner["LayerNorm_1" if kind == "mixer" else "Affine_1"] is params["params"][
        "LayerNorm_1" if kind == "mixer" else "Affine_1"]   # untouched leaves are passed through
    got = jax.jit(make(k * D_S).apply)(big, np.concatenate(tables, axis=1))
    small = jax.jit(make(D_S).apply)
    want = np.concatenate([np.asarray(small(params, t)) for t in tables], axis=1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_flax_tree_structure_block_diagonal_and_frozen_dict():
    jax, mff, resize = _flax()
    from flax.core import FrozenDict

    x = np.ones((1, S, DIM), np.float32)
    params = _random_params(jax, mff.MixerBlock(D_S, 2 * DIM, backend="xla"), x)["params"]
    old, new = (3, 4), (6, 8)
    big = resize(FrozenDict(params), new, old_size=old)
    assert isinstance(big, FrozenDict)
    tm, ntm = params["token_mixing"], big["token_mixing"]
    t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731  (reuse the torch un-permutation)
    k1 = _windows_to_blocks(t(ntm["Dense_0"]["kernel"]), 0, old, new).reshape(4, S, 4, D_S)
    k2 = _windows_to_blocks(t(ntm["Dense_1"]["kernel"]), 1, old, new).reshape(4, D_S, 4, S)
    b2 = _windows_to_blocks(t(ntm["Dense_1"]["bias"]), 0, old, new).reshape(4, S)
    for a in range(4):
        assert torch.equal(b2[a], t(tm["Dense_1"]["bias"]))
        assert torch.equal(t(ntm["Dense_0"]["bias"])[a * D_S:(a + 1) * D_S], t(tm["Dense_0"]["bias"]))
        for b in range(4):
            if a == b:
                assert torch.equal(k1[a, :, a], t(tm["Dense_0"]["kernel"]))
                assert torch.equal(k2[a, :, a], t(tm["Dense_1"]["kernel"]))
            else:
                assert not k1[a, :, b].any() and not k2[a, :, b].any()


def test_flax_model_on_tiled_image_matches_tiles():
    jax, mff, resize = _flax()
    jnp = jax.numpy
    import flax.linen as fnn

    class TinyMixer(fnn.Module):
        """google-research/vision_transformer's MlpMixer (names stem, MixerBlock_i, pre_head_layer_norm, head),
        returning the pre-pooling token features too."""

        tokens_mlp_dim: int

        @fnn.compact
        def __call__(self, x):
            x = fnn.Conv(EMBED, (4, 4), strides=(4, 4), name="stem")(x)
            n, h, w, c = x.shape
            x = x.reshape(n, h * w, c)
            x = mff.MixerBlock(self.tokens_mlp_dim, 2 * EMBED, backend="xla", name="MixerBlock_0")(x)
            x = fnn.LayerNorm(name="pre_head_layer_norm")(x)
            return x, fnn.Dense(5, name="head")(jnp.mean(x, axis=1))

    th, tw = 12, 16                                      # tile: a 3×4 patch grid, S = 12
    tiles = _normal(3, 2, 2, 2, th, tw, 3)               # (Kh, Kw, B, H, W, C)
    params = _random_params(jax, TinyMixer(D_S), tiles[0, 0], std=0.2)
    with pytest.raises(ValueError, match=r"old_size: expected the grid .* S=12 \(S is not a square"):
        resize(params, 4 * S)                            # a model is on a grid; 12 tokens is not a square one
    big = resize(params, (6, 8), old_size=(3, 4))
    image = tiles.transpose(2, 0, 3, 1, 4, 5).reshape(2, 2 * th, 2 * tw, 3)
    feats, logits = jax.jit(TinyMixer(4 * D_S).apply)(big, image)
    small = jax.jit(TinyMixer(D_S).apply)
    feats = feats.reshape(2, 2, 3, 2, 4, EMBED)
    tile_logits = []
    for a in range(2):
        for b in range(2):
            want, lg = small(params, tiles[a, b])
            np.testing.assert_allclose(np.asarray(feats[:, a, :, b]), np.asarray(want.reshape(2, 3, 4, EMBED)),
                                       rtol=1e-5, atol=1e-5)
            tile_logits.append(lg)
    np.testing.assert_allclose(np.asarray(logits), np.mean(np.stack(tile_logits), 0),
                               rtol=1e-5, atol=1e-5)
    assert big["params"]["stem"]["kernel"] is params["params"]["stem"]["kernel"]   # passed through


def test_flax_errors():
    jax, mff, resize = _flax()
    params = _random_params(jax, mff.ResMLPBlock(DIM, backend="xla"), np.ones((1, S, DIM), np.float32))
    with pytest.raises(ValueError, match=r"new_size: expected a positive multiple of the current sequence length "
                                         r"S=12, got 18"):
        resize(params, 18)
    with pytest.raises(ValueError, match=r"new_size: expected a grid whose rows are a multiple of 3 .* got \(6, 6\)"):
        resize(params, (6, 6), old_size=(3, 4))
    with pytest.raises(ValueError, match=r"params: expected the tree of a Mixer / ResMLP block"):
        resize({"params": {"head": {"kernel": np.zeros((2, 2))}}}, 4)
    with pytest.raises(TypeError, match=r"params: expected a Flax parameter tree \(a mapping\), got list"):
        resize([], 4)
