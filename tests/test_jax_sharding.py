"""JAX sharding with the ``pallas`` backend (interpret mode on CPU): both Flax blocks (MixerBlock,
ResMLPBlock) give the unsharded result, forward and gradients (parameters and input), when the batch is
sharded over two host devices

- under ``jax.jit``: right values, but XLA cannot split a Pallas call, so it gathers the batch and every
  device computes all of it (README "Guarantees"; use shard_map for data parallelism);
- inside ``jax.shard_map`` with ``check_vma=False`` (each device runs the kernels on its half of the
  batch; parameter gradients are the psum over "batch" of the per-shard gradients). With JAX's default
  ``check_vma=True`` the backend raises a NotImplementedError that says to pass check_vma=False: Pallas
  kernels cannot track varying mesh axes in this JAX.

"Equal" is checked at two levels. A shard_map shard runs the very program an unsharded call on its half
of the batch runs, so against that (and against the sum of the two halves' gradients, which is what the
psum of two shards computes) results must be bitwise equal. Against one unsharded call on the whole
batch only the association of float32 sums may differ (see ``ULPS``).

The host device count is fixed when JAX initialises, so the cases run in subprocesses (one per block,
side by side) started with ``--xla_force_host_platform_device_count=2``, which print their measurements
as JSON for the tests here to judge.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import require

require("jax")
require("flax.linen")
require("jax.experimental.pallas")

BLOCKS = ("mixer", "resmlp")

# Against one unsharded call on the whole batch, in units of float32 eps times the compared leaf's
# magnitude (max |output|; for a parameter gradient max(|g_half0| + |g_half1|), since a sum's rounding
# scales with its parts, which may cancel). Why it is not bitwise: XLA:CPU's dot accumulates in an order
# that depends on the rows in the call (here jnp.dot(a, w)[:32] and jnp.dot(a[:32], w) differ for a
# (64, 32) @ (32, 24) dot), so kernels launched on half the batch round differently; and the per-parameter
# sums over the batch (the Pallas backward's dW accumulators, XLA's bias and norm reductions) are formed
# per shard and then added. Both only reassociate float32 sums: a few eps of their magnitude. Observed at
# most 3.5 (seeds 0-6, both blocks); 8 leaves room for another CPU's dot kernels. A wrong term is far
# beyond it: one sample's share of a gradient is ~2^23 / B eps of its magnitude.
ULPS = 8

_SCRIPT = textwrap.dedent(r"""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import mixer_fast.flax as mff

    seed = int(sys.argv[1])
    assert len(jax.devices()) == 2, jax.devices()
    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:
        from jax.experimental.shard_map import shard_map
    mesh = Mesh(jax.devices(), ("batch",))
    batch = NamedSharding(mesh, P("batch"))
    # B=4: two samples per device, so per-shard sums over the batch are exercised too. C=24 and the
    # hidden widths are below 128, so the kernels take them whole (Mosaic's tile rules allow that).
    B, S, C = 4, 16, 24
    rng = np.random.default_rng(seed)  # numpy: no per-shape compilations for the random inputs
    x = jnp.asarray(rng.standard_normal((B, S, C), np.float32))
    w = jnp.asarray(rng.standard_normal((B, S, C), np.float32))  # loss = sum(out * w): a sum over samples

    def make(name, backend):
        return (mff.MixerBlock(8, 32, backend=backend) if name == "mixer"
                else mff.ResMLPBlock(32, backend=backend))

    def parameters(block):
        # The block's tree from its shapes (an eager init would run every op uncompiled), filled with values
        # away from init: kernels at lecun scale, norm scales / alphas near 1, biases / betas and the
        # layer scales (init 1e-4) at 0.1, so a dropped or misplaced term shows.
        shapes = jax.eval_shape(block.init, jax.random.PRNGKey(0), x)

        def fill(path, leaf):
            name = jax.tree_util.keystr(path[-1:])
            if len(leaf.shape) == 2:
                return (rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0])).astype(np.float32)
            base = 1.0 if ("scale" in name or "alpha" in name) else 0.0
            return (base + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)

        return jax.tree_util.tree_map(jnp.asarray, jax.tree_util.tree_map_with_path(fill, shapes))

    def leaves(tree):
        return [(jax.tree_util.keystr(k), np.asarray(v)) for k, v in jax.tree_util.tree_leaves_with_path(tree)]

    def diffs(got, want, magnitude=None):
        # {leaf: [max |got - want|, max of the leaf's magnitude (|want| unless given)]}
        out = {}
        mags = [m for _, m in leaves(magnitude)] if magnitude is not None else None
        for i, ((k, a), (_, b)) in enumerate(zip(leaves(got), leaves(want))):
            assert a.shape == b.shape and a.dtype == b.dtype, (k, a.shape, b.shape, a.dtype, b.dtype)
            out[k] = [float(np.max(np.abs(a - b))), float(np.max(np.abs(b) if mags is None else mags[i]))]
        return out

    def run_block(name):
        block = make(name, "pallas")
        params = parameters(block)
        loss = lambda p, x, w: jnp.sum(block.apply(p, x) * w)
        fwd, grad = jax.jit(block.apply), jax.jit(jax.grad(loss, argnums=(0, 1)))
        xs, ws = jax.device_put(x, batch), jax.device_put(w, batch)
        r = {}

        full_out, full_grad = fwd(params, x), grad(params, x, w)
        halves_out = jnp.concatenate([fwd(params, x[:2]), fwd(params, x[2:])])
        g0, g1 = grad(params, x[:2], w[:2]), grad(params, x[2:], w[2:])
        halves_grad = (jax.tree_util.tree_map(jnp.add, g0[0], g1[0]), jnp.concatenate([g0[1], g1[1]]))
        grad_mag = (jax.tree_util.tree_map(lambda a, b: jnp.abs(a) + jnp.abs(b), g0[0], g1[0]),
                    jnp.abs(halves_grad[1]))
        r["halves_vs_full_grad"] = diffs(halves_grad, full_grad, grad_mag)

        out = fwd(params, xs)
        r["jit"] = dict(
            fwd=diffs(out, full_out), grad=diffs(grad(params, xs, ws), full_grad, grad_mag))

        def body(p, x, w):
            gp, gx = jax.grad(loss, argnums=(0, 1))(p, x, w)
            return jax.lax.psum(gp, "batch"), gx

        def sharded(check_vma):
            kw = dict(mesh=mesh, check_vma=check_vma)
            apply = shard_map(block.apply, in_specs=(P(), P("batch")), out_specs=P("batch"), **kw)
            out = jax.jit(apply)(params, xs)
            res = {"fwd": diffs(out, halves_out), "fwd_vs_full": diffs(out, full_out)}
            if check_vma:
                # With varying-axis tracking JAX itself psums the cotangent of the replicated params
                # (the transpose of their implicit broadcast); take the gradient of the whole shard_map.
                sm_grad = jax.jit(jax.grad(lambda p, x, w: jnp.sum(apply(p, x) * w), argnums=(0, 1)))
            else:
                sm_grad = jax.jit(shard_map(body, in_specs=(P(), P("batch"), P("batch")),
                                            out_specs=(P(), P("batch")), **kw))
            g = sm_grad(params, xs, ws)
            res["grad"] = diffs(g, halves_grad)
            res["grad_vs_full"] = diffs(g, full_grad, grad_mag)
            return res

        for check_vma in (False, True):
            try:
                r[f"shard_map_check_vma_{check_vma}"] = sharded(check_vma)
            except Exception as e:  # reported by its own test, with the error
                r[f"shard_map_check_vma_{check_vma}"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        return r

    results = {name: run_block(name) for name in sys.argv[2:]}
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def results():
    # One process per block, run side by side: each is mostly single-threaded XLA compilation.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    seed = os.environ.get("MIXER_FAST_SHARDING_SEED", "0")  # to check other draws by hand
    procs = {b: subprocess.Popen([sys.executable, "-c", _SCRIPT, seed, b], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env) for b in BLOCKS}
    out = {}
    try:
        for b, p in procs.items():
            stdout, stderr = p.communicate(timeout=300)
            assert p.returncode == 0, f"{b}: {stderr[-5000:]}"
            out.update(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def _bitwise(measured: dict, what: str) -> None:
    off = {k: d for k, (d, _) in measured.items() if d != 0.0}
    assert not off, f"{what}: not bitwise equal, max |difference| per leaf {off}"


def _close(measured: dict, what: str) -> None:
    eps = 2.0 ** -23
    off = {k: (d, mag) for k, (d, mag) in measured.items() if d > ULPS * eps * mag}
    assert not off, f"{what}: beyond {ULPS} eps x magnitude, (max |difference|, magnitude) per leaf {off}"


@pytest.mark.parametrize("block", BLOCKS)
def test_jit_over_sharded_batch_equals_unsharded(results, block):
    # Not held to bitwise: XLA splits its own reductions over the batch (norm and bias gradients) per
    # device, and once the Pallas part is partitioned too its kernels run on half batches.
    r = results[block]["jit"]
    _close(r["fwd"], "jit forward")
    _close(r["grad"], "jit gradients")


@pytest.mark.parametrize("block", BLOCKS)
def test_shard_map_equals_unsharded(results, block):
    r = results[block]["shard_map_check_vma_False"]
    assert "error" not in r, r.get("error")
    # Each shard runs what an unsharded call on its half runs; the psum of two shards is one addition.
    _bitwise(r["fwd"], "shard_map forward against unsharded halves")
    _bitwise(r["grad"], "shard_map gradients against the sum of unsharded halves")
    _close(r["fwd_vs_full"], "shard_map forward against the whole batch")
    _close(r["grad_vs_full"], "shard_map gradients against the whole batch")


@pytest.mark.parametrize("block", BLOCKS)
def test_shard_map_with_check_vma_says_what_to_do(results, block):
    assert results[block]["shard_map_check_vma_True"] == {
        "error": "NotImplementedError: jax.shard_map: the pallas backend runs inside shard_map with check_vma=False "
                 "only (Pallas calls cannot track varying mesh axes in this JAX); pass check_vma=False to "
                 "jax.shard_map, or use backend='xla'"}


@pytest.mark.parametrize("block", BLOCKS)
def test_unsharded_halves_against_whole_batch(results, block):
    # The control: the whole-batch difference is there without any sharding (two unsharded calls on
    # the halves), so the tolerance describes the library's batch-size dependence, not the sharding.
    _close(results[block]["halves_vs_full_grad"], "unsharded halves against the whole batch")
