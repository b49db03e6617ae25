"""Checkpoint conversion (mixer_fast.checkpoint): Flax (vision_transformer's .npz) <-> timm <-> deit, for
Mixer and ResMLP. Small models (32x32 images, patch 8, so S = 16; width 32; 2 blocks; 10 classes), their
parameters perturbed off init, checkpoints written into tmp_path: converted models give the same logits,
and every round trip gives back the same bits."""
from __future__ import annotations

import argparse
import functools
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch

from conftest import perturb_, require
from mixer_fast import checkpoint as ckpt

jax = require("jax")
jnp = require("jax.numpy")
nn = require("flax.linen")

import mixer_fast.flax as mff  # noqa: E402

IMG, PATCH, DIM, BLOCKS, CLASSES = 32, 8, 32, 2, 10
SEQ = (IMG // PATCH) ** 2
MODELS = ["mixer", "resmlp"]
# fp32 logits of the same weights from torch and from XLA differ by accumulation order (GEMMs, the stem
# convolution, means) and erf implementations: 2e-7 to 5e-7 of max|logit| measured here. A transposed,
# swapped or misplaced parameter changes them by O(1) of it (checked by breaking the converter on purpose:
# an unswapped square kernel, a stem with H and W swapped, ls1/ls2 exchanged), so 1e-4 separates the two.
RTOL = 1e-4


# ---------------------------------------------------------------------------------------------------------
# Models

def _timm_model(timm, kind: str, dtype=torch.float32) -> torch.nn.Module:
    from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

    kw = dict(num_classes=CLASSES, img_size=IMG, patch_size=PATCH, num_blocks=BLOCKS, embed_dim=DIM)
    if kind == "resmlp":  # what timm's resmlp_*_224 entry points build, at this size
        kw.update(mlp_ratio=4, block_layer=partial(ResBlock, init_values=0.1), norm_layer=Affine)
    torch.manual_seed(0)
    return perturb_(MlpMixer(**kw)).to(dtype).eval()


def _vision_transformer_mixer():
    """google-research/vision_transformer's models_mixer (MlpBlock, MixerBlock, MlpMixer) as published, class
    names included: Flax names auto-numbered submodules after their class."""

    class MlpBlock(nn.Module):
        mlp_dim: int

        @nn.compact
        def __call__(self, x):
            y = nn.Dense(self.mlp_dim)(x)
            y = nn.gelu(y)
            return nn.Dense(x.shape[-1])(y)

    class MixerBlock(nn.Module):
        tokens_mlp_dim: int
        channels_mlp_dim: int

        @nn.compact
        def __call__(self, x):
            y = nn.LayerNorm()(x)
            y = jnp.swapaxes(y, 1, 2)
            y = MlpBlock(self.tokens_mlp_dim, name="token_mixing")(y)
            y = jnp.swapaxes(y, 1, 2)
            x = x + y
            y = nn.LayerNorm()(x)
            return x + MlpBlock(self.channels_mlp_dim, name="channel_mixing")(y)

    class MlpMixer(nn.Module):
        patches: tuple
        num_classes: int
        num_blocks: int
        hidden_dim: int
        tokens_mlp_dim: int
        channels_mlp_dim: int

        @nn.compact
        def __call__(self, inputs):
            x = nn.Conv(self.hidden_dim, self.patches, strides=self.patches, name="stem")(inputs)
            n, h, w, c = x.shape
            x = jnp.reshape(x, (n, h * w, c))
            for _ in range(self.num_blocks):
                x = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim)(x)
            x = nn.LayerNorm(name="pre_head_layer_norm")(x)
            x = jnp.mean(x, axis=1)
            if self.num_classes:
                x = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(x)
            return x

    return MlpMixer((PATCH, PATCH), CLASSES, BLOCKS, DIM, DIM // 2, 4 * DIM)


class FlaxMixer(nn.Module):
    """vision_transformer's MlpMixer built from mixer_fast.flax.MixerBlock, with timm's exact (erf) GELU."""

    @nn.compact
    def __call__(self, x):  # x (B, H, W, 3)
        x = nn.Conv(DIM, (PATCH, PATCH), strides=(PATCH, PATCH), name="stem")(x)
        x = x.reshape(x.shape[0], -1, DIM)
        for _ in range(BLOCKS):
            x = mff.MixerBlock(DIM // 2, 4 * DIM, approximate_gelu=False)(x)
        x = nn.LayerNorm(epsilon=1e-6, name="pre_head_layer_norm")(x)
        return nn.Dense(CLASSES, name="head")(jnp.mean(x, axis=1))


class Affine(nn.Module):
    @nn.compact
    def __call__(self, x):
        alpha = self.param("alpha", nn.initializers.ones_init(), (x.shape[-1],))
        beta = self.param("beta", nn.initializers.zeros_init(), (x.shape[-1],))
        return alpha * x + beta


class FlaxResMLP(nn.Module):
    """The same whole model with mixer_fast.flax.ResMLPBlock and a final affine (the layout the converter
    documents: stem, ResMLPBlock_L, pre_head_affine, head)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(DIM, (PATCH, PATCH), strides=(PATCH, PATCH), name="stem")(x)
        x = x.reshape(x.shape[0], -1, DIM)
        for _ in range(BLOCKS):
            x = mff.ResMLPBlock(4 * DIM, init_values=0.1)(x)
        x = Affine(name="pre_head_affine")(x)
        return nn.Dense(CLASSES, name="head")(jnp.mean(x, axis=1))


FLAX_MODELS = {"mixer": FlaxMixer, "resmlp": FlaxResMLP}


def _images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


@functools.lru_cache(maxsize=None)
def _jitted_apply(kind: str):
    return jax.jit(FLAX_MODELS[kind]().apply)  # one compilation, not one per eager op


def _flax_logits(kind: str, params, images: torch.Tensor) -> np.ndarray:
    x = jnp.asarray(images.permute(0, 2, 3, 1).numpy())  # NCHW -> NHWC
    return np.asarray(_jitted_apply(kind)({"params": params}, x))


def _flax_shapes(model):
    """The model's parameter shapes, from a trace without compiling or running anything."""
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, IMG, IMG, 3)))["params"]


@functools.lru_cache(maxsize=None)
def _flax_params(kind: str):
    """Random parameters of the Flax model, as JAX arrays: kernels lecun-normal-sized, everything else
    off its init (norm scales near 1, layer scales near 0.1, biases near 0) so that no term is hidden."""
    rng = np.random.default_rng(1)

    def leaf(path, s):
        name = path[-1].key
        base = {"scale": 1.0, "alpha": 1.0, "ls1": 0.1, "ls2": 0.1}.get(name, 0.0)
        std = 1 / np.sqrt(np.prod(s.shape[:-1])) if name == "kernel" else 0.05
        return jnp.asarray((base + std * rng.standard_normal(s.shape)).astype(np.float32))

    return jax.tree_util.tree_map_with_path(leaf, _flax_shapes(FLAX_MODELS[kind]()))


def _assert_close(got, want) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= RTOL * np.max(np.abs(want)), np.max(np.abs(got - want))


def _assert_bitwise(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert x.tobytes() == y.tobytes(), k


def _numpy_sd(sd) -> dict:
    return ckpt.flatten_params(sd)  # tensors -> numpy, bit for bit (bfloat16 too)


def _timm_logits(model, images) -> np.ndarray:
    with torch.no_grad():
        return model(images.to(next(model.parameters()).dtype)).float().numpy()


# ---------------------------------------------------------------------------------------------------------
# Layouts

def test_flax_trees_are_the_documented_ones(timm):
    # Mixer: the converter's Flax tree is vision_transformer's MlpMixer's, and so is mixer_fast's.
    shapes = lambda tree: {"/".join(p.key for p in path): leaf.shape  # noqa: E731
                           for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
    vit = _flax_shapes(_vision_transformer_mixer())
    converted = ckpt.timm_to_flax(_timm_model(timm, "mixer").state_dict())
    assert shapes(converted) == shapes(vit) == shapes(_flax_shapes(FlaxMixer()))
    assert "MixerBlock_1/token_mixing/Dense_0/kernel" in shapes(vit)
    # ResMLP: the whole model written with mixer_fast.flax.ResMLPBlock.
    res = _flax_shapes(FlaxResMLP())
    assert shapes(ckpt.timm_to_flax(_timm_model(timm, "resmlp").state_dict())) == shapes(res)
    assert shapes(res)["ResMLPBlock_0/linear_tokens/kernel"] == (SEQ, SEQ)


def test_import_needs_neither_torch_nor_jax():
    code = "import sys, mixer_fast.checkpoint; print(sorted({'torch', 'jax', 'flax'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------
# Same logits after conversion, through files and the command line

@pytest.mark.parametrize("kind", MODELS)
def test_timm_checkpoint_to_flax_same_logits(timm, kind, tmp_path):
    model = _timm_model(timm, kind)
    torch.save(model.state_dict(), tmp_path / "timm.pth")
    # Through the `mixer-fast convert-checkpoint` command itself.
    from mixer_fast import cli

    assert cli.main(["convert-checkpoint", str(tmp_path / "timm.pth"), str(tmp_path / "flax.npz")]) == 0
    with np.load(tmp_path / "flax.npz") as z:  # as vision_transformer's checkpoint.load reads it
        params = ckpt.unflatten_params({k: z[k] for k in z.files})
    images = _images()
    _assert_close(_flax_logits(kind, params, images), _timm_logits(model, images))
    # The function, without files: the same tree.
    _assert_bitwise(ckpt.flatten_params(ckpt.timm_to_flax(model.state_dict())), ckpt.flatten_params(params))


@pytest.mark.parametrize("kind,ext", [("mixer", ".pth"), ("resmlp", ".pth"), ("mixer", ".safetensors")])
def test_flax_checkpoint_to_timm_same_logits(timm, kind, ext, tmp_path):
    if ext == ".safetensors":
        require("safetensors")
    params = _flax_params(kind)
    np.savez(tmp_path / "flax.npz", **ckpt.flatten_params(params))  # vision_transformer's .npz form
    assert ckpt.convert_checkpoint(tmp_path / "flax.npz", tmp_path / f"timm{ext}") == "timm"
    model = _timm_model(timm, kind)
    if ext == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(tmp_path / f"timm{ext}")
    else:
        sd = torch.load(tmp_path / f"timm{ext}", weights_only=True)
    model.load_state_dict(sd, strict=True)
    images = _images()
    _assert_close(_timm_logits(model, images), _flax_logits(kind, params, images))
    # The function on the in-memory tree: nested, wrapped in {'params': ...}, JAX arrays; it returns fresh
    # arrays (writable, C-contiguous: torch.from_numpy takes them as they are).
    out = ckpt.flax_to_timm({"params": params})
    _assert_bitwise(out, _numpy_sd(sd))
    assert all(a.flags.writeable and a.flags.c_contiguous for a in out.values())


# ---------------------------------------------------------------------------------------------------------
# Round trips, bit for bit

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kind", MODELS)
def test_round_trips_are_bitwise(timm, kind, dtype, tmp_path):
    sd = _numpy_sd(_timm_model(timm, kind, dtype).state_dict())
    flax = ckpt.timm_to_flax(sd)
    _assert_bitwise(ckpt.flax_to_timm(flax), sd)                                          # timm -> flax -> timm
    flat = ckpt.flatten_params(flax)
    _assert_bitwise(ckpt.timm_to_flax(ckpt.flax_to_timm(flat), nested=False), flat)      # flax -> timm -> flax
    if kind == "resmlp":
        _assert_bitwise(ckpt.deit_to_timm(ckpt.timm_to_deit(sd)), sd)                    # timm -> deit -> timm
    # Through files: .pth -> .npz -> .pth (bfloat16 cannot go into an .npz: it says so).
    ckpt.save_checkpoint(sd, tmp_path / "a.pth")
    if dtype == torch.bfloat16:
        with pytest.raises(ValueError, match=r"out_path: \.npz cannot hold bfloat16"):
            ckpt.convert_checkpoint(tmp_path / "a.pth", tmp_path / "b.npz")
        return
    ckpt.convert_checkpoint(tmp_path / "a.pth", tmp_path / "b.npz")
    ckpt.convert_checkpoint(tmp_path / "b.npz", tmp_path / "c.pth")
    _assert_bitwise(ckpt.load_checkpoint(tmp_path / "c.pth"), sd)
    _assert_bitwise(ckpt.load_checkpoint(tmp_path / "b.npz"), flat)


def test_bfloat16_through_torch_files(timm, tmp_path):
    sd = _timm_model(timm, "mixer", torch.bfloat16).state_dict()
    ckpt.save_checkpoint(_numpy_sd(sd), tmp_path / "x.pth")
    back = torch.load(tmp_path / "x.pth", weights_only=True)
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], v) for k, v in sd.items())


# ---------------------------------------------------------------------------------------------------------
# deit's ResMLP names

def _deit_resmlp(timm) -> torch.nn.Module:
    """facebookresearch/deit's resmlp_models.py (Affine, layers_scale_mlp_blocks, resmlp_models) at this size,
    as published: its parameter names and (D,)-shaped affines are what its checkpoints hold."""
    from timm.layers import Mlp, PatchEmbed

    class DeitAffine(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.alpha = torch.nn.Parameter(torch.ones(dim))
            self.beta = torch.nn.Parameter(torch.zeros(dim))

        def forward(self, x):
            return self.alpha * x + self.beta

    class Block(torch.nn.Module):
        def __init__(self, dim, num_patches, init_values=0.1):
            super().__init__()
            self.norm1 = DeitAffine(dim)
            self.attn = torch.nn.Linear(num_patches, num_patches)
            self.norm2 = DeitAffine(dim)
            self.mlp = Mlp(in_features=dim, hidden_features=int(4.0 * dim))
            self.gamma_1 = torch.nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = torch.nn.Parameter(init_values * torch.ones(dim))

        def forward(self, x):
            x = x + self.gamma_1 * self.attn(self.norm1(x).transpose(1, 2)).transpose(1, 2)
            return x + self.gamma_2 * self.mlp(self.norm2(x))

    class ResMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = PatchEmbed(img_size=IMG, patch_size=PATCH, in_chans=3, embed_dim=DIM)
            self.blocks = torch.nn.ModuleList([Block(DIM, self.patch_embed.num_patches) for _ in range(BLOCKS)])
            self.norm = DeitAffine(DIM)
            self.head = torch.nn.Linear(DIM, CLASSES)

        def forward(self, x):
            x = self.patch_embed(x)
            for blk in self.blocks:
                x = blk(x)
            return self.head(self.norm(x).mean(dim=1))

    torch.manual_seed(0)
    return perturb_(ResMLP()).eval()


def test_deit_to_timm_to_flax_and_back(timm, tmp_path):
    from timm.models.mlp_mixer import checkpoint_filter_fn

    deit = _deit_resmlp(timm)
    deit_sd = _numpy_sd(deit.state_dict())
    # deit saves training checkpoints as {'model': state_dict, ...}.
    torch.save({"model": deit.state_dict(), "epoch": 3}, tmp_path / "deit.pth")
    images = _images()
    want = _timm_logits(deit, images)

    # deit -> timm: what timm's own filter makes of it, bit for bit, and the same logits in timm's model.
    timm_sd = ckpt.deit_to_timm(deit.state_dict())
    _assert_bitwise(timm_sd, _numpy_sd(checkpoint_filter_fn(deit.state_dict(), None)))
    model = _timm_model(timm, "resmlp")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in timm_sd.items()}, strict=True)
    _assert_close(_timm_logits(model, images), want)

    # deit .pth -> Flax .npz (the CLI): the Flax ResMLP gives the same logits.
    assert ckpt.main([str(tmp_path / "deit.pth"), str(tmp_path / "flax.npz")]) == 0
    flax = ckpt.load_checkpoint(tmp_path / "flax.npz")
    _assert_close(_flax_logits("resmlp", ckpt.unflatten_params(flax), images), want)

    # Flax -> timm equals deit -> timm; Flax -> deit equals the original, bit for bit.
    assert ckpt.main([str(tmp_path / "flax.npz"), str(tmp_path / "timm.pth")]) == 0
    _assert_bitwise(ckpt.load_checkpoint(tmp_path / "timm.pth"), timm_sd)
    assert ckpt.main([str(tmp_path / "flax.npz"), str(tmp_path / "deit2.pth"), "--to", "deit"]) == 0
    _assert_bitwise(ckpt.load_checkpoint(tmp_path / "deit2.pth"), deit_sd)
    assert ckpt.main([str(tmp_path / "timm.pth"), str(tmp_path / "deit3.pth"), "--to", "deit"]) == 0
    _assert_bitwise(ckpt.load_checkpoint(tmp_path / "deit3.pth"), deit_sd)


# ---------------------------------------------------------------------------------------------------------
# Bad input

def test_errors_name_the_argument(timm, tmp_path, capsys):
    sd = _numpy_sd(_timm_model(timm, "mixer").state_dict())
    flax = ckpt.timm_to_flax(sd, nested=False)
    with pytest.raises(ValueError, match=r"state_dict: unexpected keys for a timm mixer checkpoint: "
                                         r"\['blocks\.0\.foo'\]"):
        ckpt.timm_to_flax({**sd, "blocks.0.foo": np.zeros(3)})
    with pytest.raises(ValueError, match=r"state_dict: missing keys for a timm mixer checkpoint with 2 blocks: "
                                         r"\['blocks\.1\.norm2\.bias'\]"):
        ckpt.timm_to_flax({k: v for k, v in sd.items() if k != "blocks.1.norm2.bias"})
    with pytest.raises(ValueError, match=r"state_dict\['blocks\.1\.mlp_tokens\.fc1\.weight'\]: expected shape "
                                         r"\(16, 16\) = \(D_S, S\) with D_S=16, S=16 from the other parameters, "
                                         r"got \(16, 17\)"):
        ckpt.timm_to_flax({**sd, "blocks.1.mlp_tokens.fc1.weight": np.zeros((16, 17), np.float32)})
    with pytest.raises(ValueError, match=r"params\['MixerBlock_0/channel_mixing/Dense_1/kernel'\]: expected "
                                         r"shape \(128, 32\) = \(D_C, D\) .*, got \(32, 128\)"):
        ckpt.flax_to_timm({**flax, "MixerBlock_0/channel_mixing/Dense_1/kernel": np.zeros((32, 128))})
    with pytest.raises(ValueError, match=r"params\['stem/kernel'\]: expected a 4-D array \(P_h, P_w, C_in, D\), "
                                         r"got shape \(8, 8, 96\)"):
        ckpt.flax_to_timm({**flax, "stem/kernel": np.zeros((8, 8, 96))})
    with pytest.raises(ValueError, match=r"params: expected a flax checkpoint, got one in the timm layout"):
        ckpt.flax_to_timm(sd)
    with pytest.raises(ValueError, match=r"params: cannot tell a Mixer from a ResMLP \(neither kinds of keys "
                                         r".*\); pass model='mixer' or model='resmlp'"):
        ckpt.convert_params({"stem/kernel": flax["stem/kernel"], "stem/bias": flax["stem/bias"]}, "timm")
    assert list(ckpt.convert_params({"stem/kernel": flax["stem/kernel"], "stem/bias": flax["stem/bias"],
                                     "pre_head_layer_norm/scale": np.ones(32),
                                     "pre_head_layer_norm/bias": np.zeros(32)}, "timm")) == [
        "stem.proj.weight", "stem.proj.bias", "norm.weight", "norm.bias"]  # 0 blocks, no head: fine
    with pytest.raises(ValueError, match=r"to: deit's layout exists only for ResMLP, got a mixer checkpoint"):
        ckpt.convert_params(sd, "deit")
    with pytest.raises(ValueError, match=r"model: expected one of \['mixer', 'resmlp'\] or None"):
        ckpt.convert_params(sd, "flax", model="gmlp")
    with pytest.raises(TypeError, match=r"params\['stem\.proj\.weight'\]: expected an array, got str"):
        ckpt.convert_params({**sd, "stem.proj.weight": "w"}, "flax")

    ckpt.save_checkpoint(sd, tmp_path / "m.pth")
    with pytest.raises(ValueError, match=r"out_path: expected a file ending in one of \['\.npz', '\.pth', "
                                         r"'\.pt', '\.bin', '\.safetensors'\], got '.*m\.ckpt'"):
        ckpt.convert_checkpoint(tmp_path / "m.pth", tmp_path / "m.ckpt")
    with pytest.raises(ValueError, match=r"out_path: the flax layout is written as '\.npz', got '.*x\.pth'"):
        ckpt.convert_checkpoint(tmp_path / "m.pth", tmp_path / "x.pth", to="flax")
    with pytest.raises(ValueError, match=r"to: '.*m\.pth' is already in the timm layout"):
        ckpt.convert_checkpoint(tmp_path / "m.pth", tmp_path / "x.pth")
    # A pickle with more than tensors (deit's training checkpoints hold 'args'): refused unless trusted.
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "args": argparse.Namespace(lr=1)},
               tmp_path / "train.pth")
    with pytest.raises(ValueError, match=r"in_path: .*train\.pth' holds more than tensors .*trust_pickle=True"):
        ckpt.load_checkpoint(tmp_path / "train.pth")
    _assert_bitwise(ckpt.load_checkpoint(tmp_path / "train.pth", trust_pickle=True), sd)
    # The command line: exit status 1 and the message on stderr.
    assert ckpt.main([str(tmp_path / "m.pth"), str(tmp_path / "x.pth")]) == 1
    assert "mixer-fast convert-checkpoint: error: to: " in capsys.readouterr().err
    assert ckpt.main([str(tmp_path / "train.pth"), str(tmp_path / "x.npz"), "--trust-pickle"]) == 0
    assert "mixer, timm -> flax layout, 2 blocks" in capsys.readouterr().out
