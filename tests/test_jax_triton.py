"""The ``triton`` JAX backend: mixer_fast's Triton kernels called from JAX in jax-triton's convention.

Without a GPU the launches run in Triton's interpreter (through jax.pure_callback) with NaN-poisoned
outputs, against the XLA reference, forward and gradients. The GPU launch path (autotuned GEMMs, the
dW kernel split in two launches, jax-triton's argument order) is run here too, through a stand-in for
``jax_triton.triton_call`` that checks each call against the kernel's signature before
interpreting it. On a lent GPU the same tests run the compiled kernels through jax-triton.
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import types

import pytest

from conftest import env_without_mixer_fast, require

jax = require("jax")
jnp = require("jax.numpy")
require("triton")

import mixer_fast.flax as mff  # noqa: E402
from mixer_fast import dispatch  # noqa: E402
from mixer_fast import jax as mfj  # noqa: E402
from jax_cases import args_for, check_against_xla, check_scale_grads  # noqa: E402

ON_GPU = jax.default_backend() == "gpu"


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    dispatch.load("triton", "jax")
    from mixer_fast.kernels.triton import _launch

    monkeypatch.setattr(_launch, "POISON", True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(2, 49, 64, 24, 96), (1, 13, 40, 20, 72), (2, 70, 24, 36, 48)],
                         ids=["49x64", "13x40", "70x24"])
@pytest.mark.parametrize("variant", ["mixer", "resmlp"])
@pytest.mark.parametrize("op", ["token", "channel"])
def test_triton_against_reference(op, variant, shape, dtype):
    B, S, C, DS, DC = shape
    args, kw = args_for(op, B, S, C, DS if op == "token" else DC, dtype, variant)
    check_against_xla("triton", op, args, kw, dtype, "tanh" if variant == "mixer" else "none")


@pytest.mark.parametrize("op", ["token", "channel"])
def test_layernorm_with_single_token_linear_and_layer_scale(op):
    # The combination no named model uses: ResMLP's single linear (token op) or scales under LayerNorm.
    args, kw = args_for(op, 3, 16, 40, 32, jnp.float32, "resmlp", seed=3)
    kw["norm"] = "layernorm"
    check_against_xla("triton", op, args, kw, jnp.float32, "none")


@pytest.mark.parametrize("variant", ["mixer", "resmlp"])
def test_channel_mixing_ln_folded(monkeypatch, variant):
    # fc1's LayerNorm (or affine) folded into its kernel and the epilogue (MIXER_FAST_LN=fold), as torch's;
    # a shape no other test traces, so that the placement is read while tracing here
    from conftest import spy_ln_gelu_prologues
    from mixer_fast.kernels.triton import jax_launch
    from mixer_fast.kernels.triton.matmul import A_LAYERNORM_FOLDED, A_NONE

    seen = spy_ln_gelu_prologues(monkeypatch, jax_launch)
    monkeypatch.setenv("MIXER_FAST_LN", "fold")
    args, kw = args_for("channel", 2, 11, 56, 88, jnp.bfloat16, variant, seed=4)
    check_against_xla("triton", "channel", args, kw, jnp.bfloat16, "none")
    assert seen and set(seen) == {A_NONE if variant == "resmlp" else A_LAYERNORM_FOLDED}


def test_mixed_dtypes_promote_like_the_reference():
    args, _ = args_for("channel", 2, 9, 24, 40, jnp.float32, "mixer", seed=4)
    x = args[0].astype(jnp.bfloat16)
    got = mfj.channel_mixing(x, *args[1:], backend="triton")
    eager = mfj.channel_mixing(x, *args[1:], backend="xla")
    exact = mfj.channel_mixing(x.astype(jnp.float32), *args[1:], backend="xla")
    assert got.dtype == eager.dtype == jnp.float32
    # The reference rounds LN(x) to x's dtype; the kernels keep it in the promoted fp32: DESIGN's rule.
    assert float(jnp.max(jnp.abs(got - exact))) <= 2 * float(jnp.max(jnp.abs(eager - exact))) + 1e-5
    grads = jax.grad(lambda x, k: jnp.sum(mfj.channel_mixing(x, *args[1:3], k, *args[4:], backend="triton")),
                     argnums=(0, 1))(x, args[3])
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.float32


def test_gradients_of_scale_and_sample_scale():
    for op in ("token", "channel"):
        args, kw = args_for(op, 3, 16, 40, 32, jnp.float32, "resmlp", seed=7)
        check_scale_grads("triton", op, args, kw)


def test_empty_batch():
    for op in ("token", "channel"):
        args, _ = args_for(op, 1, 13, 24, 20, jnp.float32, "mixer")
        x = jnp.zeros((0, 13, 24))
        fn = mfj.token_mixing if op == "token" else mfj.channel_mixing
        assert fn(x, *args[1:], backend="triton").shape == (0, 13, 24)
        g = jax.grad(lambda k: jnp.sum(fn(x, *args[1:3], k, *args[4:], backend="triton")))(args[3])
        assert g.shape == args[3].shape and float(jnp.max(jnp.abs(g))) == 0.0


def test_float64_is_refused():
    with jax.enable_x64(True):
        args, _ = args_for("channel", 1, 4, 8, 16, jnp.float64, "mixer")
        with pytest.raises(TypeError, match="x: the triton backend computes in float16, bfloat16 or float32"):
            mfj.channel_mixing(*args, backend="triton")


def test_flax_block_jit_grad_vmap():
    block, ref = mff.MixerBlock(24, 96, backend="triton"), mff.MixerBlock(24, 96, backend="xla")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 13, 40))
    params = block.init(jax.random.PRNGKey(1), x[0])
    got = jax.jit(jax.vmap(block.apply, in_axes=(None, 0)))(params, x)
    want = jax.vmap(ref.apply, in_axes=(None, 0))(params, x)
    assert float(jnp.max(jnp.abs(got - want))) < 1e-5

    def loss(b):
        return lambda p: jnp.sum(jnp.sin(b.apply(p, x[0])))

    g_got = jax.jit(jax.grad(loss(block)))(params)
    g_want = jax.grad(loss(ref))(params)
    errs = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), g_got, g_want)
    assert max(jax.tree_util.tree_leaves(errs)) < 1e-4


def test_kernel_modules_import_without_torch():
    # A JAX user on a GPU needs triton and jax-triton, not torch: the kernels and JAX launchers load without it.
    code = ("import sys; import mixer_fast.kernels.triton.jax_launch; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------
# The GPU launch path, off GPU


@pytest.fixture
def gpu_path(monkeypatch):
    """The launchers' GPU branch (GPU block sizes, autotuned GEMMs, dW in two launches) with a stand-in for
    jax_triton.triton_call that checks the call, then runs the kernel in the interpreter. fp32 only:
    the compiled-mode kernels skip the interpreter's bf16 workarounds."""
    if ON_GPU:
        pytest.skip("a real GPU runs the real jax-triton (the other tests)")
    from mixer_fast.kernels.triton import _launch, jax_launch

    calls = []

    def triton_call(*args, kernel, out_shape, grid, num_warps, num_stages, **meta):
        import triton

        tuned = isinstance(kernel, triton.runtime.Autotuner)
        fn = kernel.fn if tuned else kernel
        if tuned:
            assert set(kernel.keys) <= set(fn.arg_names)
            meta = {**meta, **kernel.configs[0].kwargs}
        params = inspect.signature(fn.fn).parameters.values()  # the Python function (interpreted or not)
        runtime = [p.name for p in params if "constexpr" not in str(p.annotation)]
        constexprs = {p.name for p in params if "constexpr" in str(p.annotation)}
        # jax-triton's convention: the arguments, then one pointer per output, then constexprs by name.
        assert len(args) + len(out_shape) == len(runtime), (fn.__name__, len(args), len(out_shape), runtime)
        assert all(runtime[len(args) + i].endswith("_ptr") for i in range(len(out_shape)))
        assert set(meta) == constexprs, (fn.__name__, set(meta) ^ constexprs)
        for name, a in zip(runtime, args):
            if name.endswith("_ptr"):
                assert hasattr(a, "dtype") and a.dtype in jax_launch.DTYPES, name
            else:  # jax-triton maps Python ints to i32/i64 and np.float32 to fp32 (a Python float would be fp64)
                assert type(a) is int or type(a).__name__ == "float32", (name, type(a))
        calls.append((fn.__name__, tuned))
        args = [float(a) if type(a).__name__ == "float32" else a for a in args]
        return jax_launch._interpreted(fn, grid, args, out_shape, num_warps, meta)

    monkeypatch.setitem(sys.modules, "jax_triton", types.SimpleNamespace(triton_call=triton_call))
    monkeypatch.setattr(_launch, "INTERPRET", False)
    monkeypatch.setattr(jax_launch, "_tuned", {})
    # The token MLP's shared-memory sizing (triton_backend._flash_fits) as on an H100: every launch fits
    # (the ``sizes`` fixture varies that); the real compile is test_shared_memory_sizing_compiles_as_the_gpu_would's.
    from mixer_fast.jax import triton_backend
    from mixer_fast.kernels.triton import aot

    monkeypatch.setattr(aot, "launch_shared_bytes", lambda *args, **kwargs: 0)
    monkeypatch.setattr(jax_launch, "max_shared_memory", lambda capability: 232448)
    monkeypatch.setattr(triton_backend, "_capability", lambda device: 90)
    triton_backend._flash_fits.cache_clear()
    yield calls
    triton_backend._flash_fits.cache_clear()


@pytest.mark.parametrize("variant", ["mixer", "resmlp"])
@pytest.mark.parametrize("op", ["token", "channel"])
def test_gpu_launch_path(gpu_path, op, variant):
    # S = 70: the forward and dx on token pieces 64 + 16, the dW kernel on one 128-wide piece in two
    # launches (dW1/db1, then dW2), as on a GPU.
    args, kw = args_for(op, 2, 70, 24, 36 if op == "token" else 48, jnp.float32, variant, seed=11)
    check_against_xla("triton", op, args, kw, jnp.float32, "tanh" if variant == "mixer" else "none")
    names = {name for name, _ in gpu_path}
    if op == "channel" or variant == "resmlp":
        assert ("fused_matmul_kernel", True) in gpu_path
    else:
        assert {"token_mlp_fwd_kernel", "token_mlp_dx_kernel", "token_mlp_dw_kernel"} <= names
        assert sum(name == "token_mlp_dw_kernel" for name, _ in gpu_path) == 2


@pytest.mark.parametrize("variant", ["mixer", "resmlp"])
def test_gpu_launch_path_ln_folded(gpu_path, monkeypatch, variant):
    # The folded LayerNorm's weight pass and GEMM through jax-triton's convention (a shape of its own, so
    # that the placement is read while tracing here).
    monkeypatch.setenv("MIXER_FAST_LN", "fold")
    args, kw = args_for("channel", 2, 9, 40, 56, jnp.float32, variant, seed=12)
    check_against_xla("triton", "channel", args, kw, jnp.float32, "none")
    assert ("fold_weight_kernel", False) in gpu_path


@pytest.fixture
def sizes(gpu_path, monkeypatch):
    """Shared-memory sizing with a stand-in compile: ``sizes.need`` bytes for every sized launch, an H100's
    227 KB to fit in (gpu_path's); the sized kernels' names land in ``sizes.sized``."""
    from mixer_fast.kernels.triton import aot

    state = types.SimpleNamespace(need=0, sized=[])

    def measure(fn, operands, constexprs, *, capability, num_warps, num_stages):
        runtime = [p for p in inspect.signature(fn.fn).parameters.values() if "constexpr" not in str(p.annotation)]
        assert len(operands) == len(runtime) and capability == 90, fn.__name__
        state.sized.append(fn.__name__)
        return state.need

    monkeypatch.setattr(aot, "launch_shared_bytes", measure)
    return state


@pytest.mark.parametrize("need", [232448, 232449], ids=["fits", "too_big"])
def test_token_mlp_past_shared_memory_runs_on_xla(gpu_path, sizes, need):
    # jax-triton would compile a token kernel that needs more shared memory than the GPU has and fail only
    # when the program runs (large S: 344 KB at S = 1025 in bf16 on sm_90a). The sizes are compiled first,
    # once per shape, and such a token MLP runs as XLA's, forward and backward.
    sizes.need = need
    args, kw = args_for("token", 2, 70, 24, 36, jnp.float32, "mixer", seed=13)
    check_against_xla("triton", "token", args, kw, jnp.float32, "tanh")
    assert set(sizes.sized) == {"token_mlp_fwd_kernel", "token_mlp_dx_kernel", "token_mlp_dw_kernel"}
    assert len(sizes.sized) == 4  # once per shape (dW in two launches): the op ran four times here
    ran = {name for name, _ in gpu_path}
    token_kernels = {"token_mlp_fwd_kernel", "token_mlp_dx_kernel", "token_mlp_dw_kernel"}
    assert ran >= token_kernels if need == 232448 else not ran & token_kernels


def test_token_mlp_that_cannot_be_sized_warns_and_runs_on_xla(gpu_path, sizes, monkeypatch):
    # The sizing guards speed, never correctness: a compile that fails there (a toolchain problem) warns
    # and leaves the shape to XLA instead of failing the op.
    from mixer_fast.kernels.triton import aot

    def broken(*args, **kwargs):
        raise RuntimeError("Could not create or locate cache dir")

    monkeypatch.setattr(aot, "launch_shared_bytes", broken)
    args, kw = args_for("token", 2, 70, 24, 36, jnp.float32, "mixer", seed=15)
    with pytest.warns(RuntimeWarning, match="could not be sized .*cache dir.* runs as XLA's"):
        check_against_xla("triton", "token", args, kw, jnp.float32, "tanh")
    assert not {name for name, _ in gpu_path} & {"token_mlp_fwd_kernel", "token_mlp_dx_kernel", "token_mlp_dw_kernel"}


@pytest.mark.parametrize("setting", [None, "flash"], ids=["default", "flash_forced"])
def test_token_mlp_past_flash_max_tokens_runs_on_xla(gpu_path, sizes, monkeypatch, setting):
    # As on the torch backend: past token_mixing.FLASH_MAX_TOKENS (S = 260) the token MLP runs as XLA's,
    # with nothing compiled to size it; MIXER_FAST_TOKEN=flash runs the flash kernels there (sized first).
    from mixer_fast.kernels.triton import token_mixing as tm

    if setting is None:
        monkeypatch.delenv(tm.TOKEN_ENV, raising=False)
    else:
        monkeypatch.setenv(tm.TOKEN_ENV, setting)
    sizes.need = 1024
    args, kw = args_for("token", 2, 260, 24, 20, jnp.float32, "mixer", seed=14)
    check_against_xla("triton", "token", args, kw, jnp.float32, "tanh")
    ran = {name for name, _ in gpu_path} & {"token_mlp_fwd_kernel", "token_mlp_dx_kernel", "token_mlp_dw_kernel"}
    assert (len(ran), bool(sizes.sized)) == ((3, True) if setting == "flash" else (0, False))


def test_shared_memory_sizing_compiles_as_the_gpu_would():
    # The sizing compiled for real (sm_90a, no GPU needed): the edge the torch backend's fallback names.
    # TRITON_CACHE_DIR="" as jax-triton 0.3.1 leaves it once imported (Triton then has no cache directory
    # unless the sizing gives it one); a failed sizing would warn, which is an error here.
    code = """
import warnings; warnings.simplefilter("error", RuntimeWarning)
import jax, jax.numpy as jnp
from mixer_fast.jax import triton_backend as tb
from mixer_fast.kernels.triton import jax_launch
tb._capability = lambda device: 90
jax_launch.max_shared_memory = lambda capability: 232448
for S in (1024, 1025):
    k = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((2, S, 64), (64,), (64,), (S, 512), (512,), (512, S), (S,))]
    print(S, tb._flash_fits("token_mixing", 1e-6, "tanh", "layernorm", "bfloat16", tuple(k) + (None, None)))
"""
    env = dict(os.environ, TRITON_INTERPRET="0", JAX_PLATFORMS="cpu", TRITON_CACHE_DIR="")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["1024", "True", "1025", "False"], r.stdout


def test_max_shared_memory_without_the_driver(monkeypatch):
    # Where Triton's driver module cannot answer, the opt-in maximum comes from the table; a capability it
    # does not know gets the least of its values (a token MLP then runs as XLA's rather than fail).
    from mixer_fast.kernels.triton import _launch, jax_launch

    monkeypatch.setitem(sys.modules, "triton.backends.nvidia.driver", None)  # importing it raises ImportError
    assert jax_launch.max_shared_memory(90) == 232448
    assert jax_launch.max_shared_memory(80) == 166912
    assert jax_launch.max_shared_memory(60) == min(_launch.SHARED_MEMORY_PER_BLOCK.values()) == 65536


def test_untimed_gemm_configs_fit_a_99_kb_gpu():
    """MIXER_FAST_AUTOTUNE=none on a GPU with 99 KB of shared memory a block (sm_86 / sm_89 / sm_120): each
    fused-GEMM site takes its first config that fits, compiled as jax-triton compiles it (the first, sized
    for Hopper, needs 115 KB at fc1); on Hopper the first, with nothing compiled to choose it. Channel
    mixing's forward at Mixer-B/16 traced (launch_shared_memory: nothing launches), in compiled mode."""
    code = """
import json
import jax, jax.numpy as jnp
from mixer_fast.kernels.triton import aot, jax_launch, matmul
chosen, compiled = [], []
tuned = jax_launch._tuned_launch
def record(variant, *args, **kwargs):
    kernel, grid, launch = tuned(variant, *args, **kwargs)
    chosen.append([variant, [launch[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")]])
    return kernel, grid, launch
jax_launch._tuned_launch = record
measure = aot.launch_shared_bytes
aot.launch_shared_bytes = lambda *a, **k: compiled.append(measure(*a, **k)) or compiled[-1]
x = jnp.zeros((2, 196, 768), jnp.bfloat16)
w = lambda *shape: jnp.zeros(shape, jnp.bfloat16)
for capability in (86, 90):
    jax_launch.device_capability = lambda device, c=capability: c
    jax_launch.max_shared_memory = lambda c: matmul._launch.shared_memory_per_block(c)
    before = len(compiled)
    jax_launch.launch_shared_memory(lambda: jax_launch.channel_mixing_forward(
        x, w(768), w(768), w(768, 3072), w(3072), w(3072, 768), w(768), eps=1e-6, approximate="none",
        norm="layernorm", scale=None, ss=None, store_branch=False, precision="ieee"), [], capability)
    print(json.dumps({"capability": capability, "chosen": chosen, "compiled": compiled[before:]}))
    chosen.clear()
"""
    env = dict(env_without_mixer_fast(), TRITON_INTERPRET="0",
               JAX_PLATFORMS="cpu", MIXER_FAST_AUTOTUNE="none")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    from mixer_fast.kernels.triton import matmul

    at86, at90 = (json.loads(line) for line in r.stdout.splitlines()[-2:])
    first = {variant: list(matmul.site_configs(variant, False)[0]) for variant, _ in at90["chosen"]}
    assert at90["compiled"] == [] and all(cfg == first[v] for v, cfg in at90["chosen"]), at90
    assert at86["compiled"] and max(at86["compiled"]) > 101376, "the first config needs more than 99 KB"
    assert any(cfg != first[v] for v, cfg in at86["chosen"]), at86
    assert at86["compiled"][-1] <= 101376  # the last compiled: the chosen one of the last site


def test_importing_jax_triton_keeps_tritons_cache_directory(tmp_path, monkeypatch):
    # jax-triton 0.3.1 sets TRITON_CACHE_DIR to "" on import, which leaves every later Triton compile in the
    # process (torch's launches too) without a cache directory; the backend's import puts it back. A
    # stand-in module does what jax-triton's import does.
    from mixer_fast.jax import triton_backend

    (tmp_path / "jax_triton.py").write_text('import os\nos.environ["TRITON_CACHE_DIR"] = ""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "jax_triton", None)  # restored (absent, or as it was) afterwards
    for before in ("/somewhere/triton-cache", None):
        del sys.modules["jax_triton"]
        if before is None:
            monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TRITON_CACHE_DIR", before)
        assert triton_backend._import_jax_triton().__file__ == str(tmp_path / "jax_triton.py")
        assert os.environ.get("TRITON_CACHE_DIR") == before


def test_autotuned_gemm_launches_are_cached_by_jax_triton(gpu_path):
    # jax-triton caches its launch primitive on its parameters, the grid and the kernel among them: the
    # fused GEMM's grid compares by value (a closure per call made every un-jitted call lower and compile
    # again), and its cached autotuner keeps no early_config_prune, which jax-triton 0.3.1 wraps in one
    # more closure at every lowering (~940 lowerings overflowed the stack in a reviewer's emulation).
    from mixer_fast.kernels.triton import jax_launch, matmul

    flags = dict(a_pro=matmul.A_NONE, b_pro=matmul.B_NONE, has_bias=False, bias_on_m=False, epi_gelu=False,
                 epi_gelu_grad=False, store_branch=False, has_scale=False, has_ss=False, ss_on_n=False,
                 has_res=False, approximate="none", precision="ieee", idx64=False)
    axes = [(matmul.flat(96, 64), matmul.flat(64, 1)), (matmul.flat(64, 80), matmul.flat(80, 1)),
            (matmul.flat(96, 80), matmul.flat(80, 1))]
    grids = [matmul.plan(96, 80, 64, *axes, None, None, **flags).grid for _ in range(2)]
    assert grids[0] == grids[1] and hash(grids[0]) == hash(grids[1]) and grids[0] is not grids[1]
    assert grids[0]({"BLOCK_M": 64, "BLOCK_N": 32}) == (2 * 3, 1)
    tuner = matmul.autotuned(matmul.fused_matmul_kernel, "plain", jax_launch._tuned)
    assert tuner is matmul.autotuned(matmul.fused_matmul_kernel, "plain", jax_launch._tuned)
    for _ in range(2000):  # what each jax-triton 0.3.1 lowering does to the autotuner it is given
        previous = tuner.early_config_prune
        tuner.early_config_prune = lambda configs, named_args, _p=previous, **kw: _p(configs, named_args) if _p else configs
    assert tuner.early_config_prune is None
    tuner.nargs = {}
    assert len(tuner.prune_configs({})) == len(matmul.site_configs("plain", False))


@pytest.mark.parametrize("op,variant", [("token", "mixer"), ("channel", "mixer"), ("token", "resmlp")])
def test_shard_map_gradients_with_and_without_check_vma(op, variant):
    # Inside jax.shard_map with its default check_vma every result must carry the mesh axes its operands
    # vary over, and a replicated argument's gradient is the psum of the per-device ones (jax_launch.
    # varying_like, triton_backend._summed_like); JAX refused the gradient before. Both settings give the
    # unsharded gradient (a one-device mesh: the typing is what is checked; the sums are psum's).
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:
        from jax.experimental.shard_map import shard_map
    mesh = Mesh(jax.devices()[:1], ("batch",))
    args, kw = args_for(op, 2, 49, 24, 20, jnp.float32, variant, seed=3)
    fn = mfj.token_mixing if op == "token" else mfj.channel_mixing
    ss = kw.pop("sample_scale", None)  # per image: sharded with x
    argnums = tuple(i for i, a in enumerate(args) if a is not None)

    def loss(*a):
        *a, ss = a
        return jnp.sum(fn(*a, **kw, sample_scale=ss, backend="triton") ** 2)

    full = (*args, ss)
    specs = tuple(P("batch") if i in (0, len(args)) else P() for i in range(len(full)))
    placed = [None if a is None else jax.device_put(a, NamedSharding(mesh, spec)) for a, spec in zip(full, specs)]
    want = jax.grad(loss, argnums=argnums)(*full)
    for check_vma in (True, False):
        sharded = shard_map(lambda *a: jax.lax.psum(loss(*a), "batch"), mesh=mesh, in_specs=specs, out_specs=P(),
                            check_vma=check_vma)
        got = jax.grad(sharded, argnums=argnums)(*placed)
        for g, w in zip(got, want):
            assert float(jnp.max(jnp.abs(g - w))) <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(w)))), check_vma


def test_shard_map_over_two_devices_sums_parameter_gradients():
    # Two host devices, the batch split between them, check_vma on: each device runs the kernels on its
    # image, and the replicated parameters' gradients are psum'd in the backward rule: the gradients of the
    # whole batch, to float32 association.
    code = """
import sys; sys.path.insert(0, "tests")
import triton_interpreter; triton_interpreter.set_up()
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from mixer_fast import dispatch, jax as mfj
from jax_cases import args_for
dispatch.load("triton", "jax")
shard_map = getattr(jax, "shard_map", None) or __import__("jax.experimental.shard_map", fromlist=["x"]).shard_map
assert len(jax.devices()) == 2, jax.devices()
mesh = Mesh(jax.devices(), ("batch",))
for op in ("token", "channel"):
    args, _ = args_for(op, 2, 49, 24, 20, jnp.float32, "mixer", seed=4)
    fn = mfj.token_mixing if op == "token" else mfj.channel_mixing
    loss = lambda *a: jnp.sum(fn(*a, backend="triton") ** 2)
    argnums = tuple(range(len(args)))
    specs = (P("batch"),) + (P(),) * (len(args) - 1)
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    sharded = shard_map(lambda *a: jax.lax.psum(loss(*a), "batch"), mesh=mesh, in_specs=specs, out_specs=P())
    got, want = jax.grad(sharded, argnums=argnums)(*placed), jax.grad(loss, argnums=argnums)(*args)
    print(max(float(jnp.max(jnp.abs(g - w))) / max(1.0, float(jnp.max(jnp.abs(w)))) for g, w in zip(got, want)))
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-3000:]
    errors = [float(v) for v in r.stdout.split()]
    assert len(errors) == 2 and max(errors) <= 1e-5, errors


def test_a_device_without_a_compute_capability_is_refused_by_name():
    # A JAX GPU that is not NVIDIA's reports no compute capability: the backend says so instead of planning
    # for "sm_None".
    from mixer_fast.jax import triton_backend

    with pytest.raises(dispatch.BackendUnavailable, match="'cpu' reports no CUDA compute capability"):
        triton_backend._capability(jax.devices("cpu")[0])
