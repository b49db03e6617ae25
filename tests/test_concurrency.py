"""Concurrency: two threads, and two processes, using the library at once from a cold start get the same
bits as one caller alone, with no error.

Threads share every in-process cache: the backend registry, the Triton kernels (their interpreter here;
compiled kernels and the autotuner on a GPU), the Pallas op cache, the cpu backend's thread pool and
workspace pool. Processes share the on-disk caches: Triton's (TRITON_CACHE_DIR; compiled kernels only,
so on a GPU) and JAX's persistent compilation cache (the Pallas and XLA programs). Each case runs in
fresh processes so that nothing is warm. This file is also the worker:
``python test_concurrency.py threads|process`` (started by the tests).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 400


def _hash(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a, dtype=np.float32)).tobytes())
    return h.hexdigest()[:16]


def _torch_work(backend: str, seed: int) -> str:
    import torch

    from mixer_fast import ops

    g = torch.Generator().manual_seed(seed)
    B, S, C = 2, 8 + seed, 16  # a shape each thread: two kernel specialisations compiled at once
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"  # compiled Triton: CUDA tensors
    r = lambda *s: (0.3 * torch.randn(*s, generator=g)).to(dev).requires_grad_()  # noqa: E731
    x = torch.randn(B, S, C, generator=g).to(dev).requires_grad_()
    tok = [r(C), r(C), r(8, S), r(8), r(S, 8), r(S)]
    ch = [r(C), r(C), r(16, C), r(16), r(C, 16), r(C)]
    out = ops.channel_mixing(ops.token_mixing(x, *tok, backend=backend), *ch, backend=backend)
    out.square().sum().backward()
    with torch.no_grad():  # the cpu backend's fused path (with gradients it runs the reference ops)
        inf = ops.channel_mixing(ops.token_mixing(x, *tok, backend=backend), *ch, backend=backend)
    return _hash([t.detach().cpu().numpy() for t in (out, inf, x.grad, *(p.grad for p in tok + ch))])


_jitted = {}
_jitted_lock = threading.Lock()


def _jax_loss_grad(backend: str):
    # One jitted function per backend, shared by the threads: both trace and compile it at once, cold.
    # (A function made per call would be compiled per call: a minute of CI in Pallas' interpret mode.)
    import jax

    from mixer_fast import jax as mfj

    def loss(x, tok, ch):
        y = mfj.channel_mixing(mfj.token_mixing(x, *tok, backend=backend), *ch, backend=backend)
        return (y ** 2).sum()

    with _jitted_lock:
        return _jitted.setdefault(backend, jax.jit(jax.value_and_grad(loss, (0, 1, 2))))


def _jax_work(backend: str, seed: int) -> str:
    import jax

    B, S, C = 2, 8, 16
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 16))
    r = lambda *s: 0.3 * jax.random.normal(next(keys), s)  # noqa: E731
    x = jax.random.normal(next(keys), (B, S, C))
    tok, ch = (r(C), r(C), r(S, 8), r(8), r(8, S), r(S)), (r(C), r(C), r(C, 16), r(16), r(16, C), r(C))
    value, grads = _jax_loss_grad(backend)(x, tok, ch)
    return _hash([value, *jax.tree_util.tree_leaves(grads)])


WORK = [("torch", "triton"), ("torch", "cpu"), ("torch", "reference"), ("jax", "pallas"), ("jax", "xla")]


def _run(framework: str, backend: str, seed: int) -> str:
    return (_torch_work if framework == "torch" else _jax_work)(backend, seed)


def _threads() -> dict:
    """Two threads released together on a cold process, each running every backend (its own shapes),
    twice; then the same work alone. Returns what differed and what raised."""
    barrier, results, errors = threading.Barrier(2), {}, []

    def thread(seed: int) -> None:
        barrier.wait()
        for rep in range(2):
            for framework, backend in WORK:
                try:
                    results[(framework, backend, seed, rep)] = _run(framework, backend, seed)
                except Exception as e:  # noqa: BLE001 - reported to the test
                    errors.append(f"{framework}/{backend} seed {seed}: {type(e).__name__}: {e}"[:500])

    threads = [threading.Thread(target=thread, args=(seed,)) for seed in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alone = {(f, b, seed): _run(f, b, seed) for f, b in WORK for seed in (0, 1)}
    mismatches = [f"{f}/{b} seed {seed} rep {rep}" for (f, b, seed, rep), h in results.items()
                  if h != alone[(f, b, seed)]]
    return {"errors": errors, "mismatches": mismatches, "runs": len(results)}


def _process() -> dict:
    """One of two processes started together on shared, empty cache directories (Triton's disk cache is
    used by compiled kernels only: on a GPU)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["MF_JAX_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return {f"{f}/{b}": _run(f, b, 0) for f, b in WORK if b in ("triton", "cpu", "pallas")}


def _worker_env(**extra) -> dict:
    import mixer_fast

    path = os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(mixer_fast.__file__)),
                                         os.environ.get("PYTHONPATH")]))
    return dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"), PYTHONPATH=path,
                JAX_PLATFORMS="cpu", **extra)


def _start(mode: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, mode], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(p: subprocess.Popen) -> dict:
    try:
        out, err = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"worker timed out after {TIMEOUT_S} s:\n{err[-3000:]}")
    assert p.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def stacks(triton_backend, cpu_backend):
    from conftest import require

    require("jax")


def test_two_threads_from_a_cold_start(stacks):
    r = _result(_start("threads", _worker_env()))
    assert r["errors"] == [] and r["mismatches"] == [], r
    assert r["runs"] == 2 * 2 * len(WORK)


def test_two_processes_sharing_cold_caches(stacks, tmp_path):
    env = _worker_env(TRITON_CACHE_DIR=str(tmp_path / "triton"), MF_JAX_CACHE=str(tmp_path / "jax"))
    procs = [_start("process", env) for _ in range(2)]
    first, second = (_result(p) for p in procs)
    assert first == second and len(first) == 3
    assert os.listdir(tmp_path / "jax")  # the cache really was written (and so shared)


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) == 2 else ""
    if mode not in ("threads", "process"):
        sys.exit(f"usage: {sys.argv[0]} threads|process (started by the tests, not by hand)")
    import triton_interpreter  # this file's folder is on sys.path when it runs as a script

    triton_interpreter.set_up()
    print(json.dumps(_threads() if mode == "threads" else _process()))
