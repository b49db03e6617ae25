"""Data-parallel training of mixer_fast blocks: 2 processes (gloo, CPU, ``backend="cpu"``) running
DistributedDataParallel and FSDP2 (``fully_shard``) training steps end with the same parameters as one
process training on the full batch.

One pair of worker processes runs both wrappers (a process start with torch costs seconds); each rank
trains on its half of every global batch. This file is also the worker: ``python test_distributed.py
--worker RANK OUT_DIR`` (started by the fixture, never by hand).
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

import mixer_fast
from conftest import IN_CI, perturb_
from tolerances import max_err

WORLD_SIZE = 2
STEPS = 3
GLOBAL_BATCH = 8
SEQ_LEN, DIM, CLASSES = 16, 32, 10
LR, MOMENTUM = 0.05, 0.9
MODES = ("ddp", "fsdp2")
# A hung collective must fail the test, not block CI: gloo's own timeout first, then the process's.
COLLECTIVE_TIMEOUT_S = 60
PROCESS_TIMEOUT_S = 180

# The two runs do the same maths in a different order: each rank's weight gradient sums over 4 samples
# and the two are averaged, where one process sums over 8. In fp32 that moves gradients by a few ulps of
# their size; SGD carries it into the parameters scaled by the learning rate. So a parameter may differ
# from the single-process one by RTOL of how far training moved it (its largest change from init), plus
# a few ulps of its own size for the rounding of the update itself. Observed: at most 1.2e-7, one ulp of
# a parameter of size ~1 (about 1/8 of this bound). A real error (a missing all-reduce, gradients summed
# instead of averaged, a rank training on the wrong samples) moves parameters by the order of the change.
RTOL = 1e-5
ULPS = 8 * torch.finfo(torch.float32).eps


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        mixer_fast.MixerBlock(DIM, SEQ_LEN, backend="cpu"),
        mixer_fast.ResMLPBlock(DIM, SEQ_LEN, backend="cpu"),
        mixer_fast.MixerBlock(DIM, SEQ_LEN, backend="cpu"),
        nn.Flatten(1),
        nn.Linear(SEQ_LEN * DIM, CLASSES),
    )
    # No bias, norm or layer scale may keep its init (zeros, ones, 1e-4): a missing term would hide there.
    return perturb_(model, seed=1, std=0.1)


def _batch(step):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, SEQ_LEN, DIM, generator=gen)
    y = torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=gen)
    return x, y


def _train(model, rank=0, world_size=1):
    """STEPS SGD steps; each rank takes its contiguous share of every global batch. The loss is a mean over
    the rank's samples, so the ranks' averaged gradient is the full batch's mean-loss gradient."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    share = GLOBAL_BATCH // world_size
    losses = []
    for step in range(STEPS):
        x, y = _batch(step)
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _evaluate(model):
    """Logits with no gradient: the fused C++ kernels, fed the parameters as the wrapper holds them for a
    forward (FSDP2: unsharded into its all-gather buffer), where training ran the reference ops."""
    model.eval()
    with torch.no_grad():
        return model(_batch(STEPS)[0])


# ---------------------------------------------------------------------------------------------------------
# The worker (one per rank).

def _run_mode(mode, rank, world_size):
    import torch.distributed as dist

    model = _model()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
        losses = _train(wrapped, rank, world_size)
        params = {n: p.detach().clone() for n, p in wrapped.module.named_parameters()}
        info = {}
    else:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        for block in model[:3]:
            fully_shard(block)
        fully_shard(model)
        losses = _train(model, rank, world_size)
        named = dict(model.named_parameters())
        # Proves the parameters really were sharded (each rank held a strict part), not replicated.
        info = {"dtensor": all(isinstance(p, DTensor) for p in named.values()),
                "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                                   for p in named.values()),
                "full_numel": sum(p.numel() for p in named.values())}
        params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in named.items()}
        info["inner_shard_error"] = _shard_inside_a_block()
    global_loss = torch.tensor(losses, dtype=torch.float64)
    dist.all_reduce(global_loss)
    return {"params": params, "losses": (global_loss / world_size).tolist(), "eval": _evaluate(model), **info}


def _shard_inside_a_block():
    """fully_shard on a block's own Linears leaves them sharded in the block's forward (it reads their
    weights without calling them): the error the fused ops must raise instead of a wrong answer."""
    from torch.distributed.fsdp import fully_shard

    block = mixer_fast.MixerBlock(DIM, SEQ_LEN, backend="cpu")
    for m in block.modules():
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(block)
    try:
        block(torch.randn(2, SEQ_LEN, DIM))
    except TypeError as e:
        return str(e)
    return None


def _worker(rank, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    out_dir = Path(out_dir)
    # A file store: no port to pick, so no race with other programs for a free one.
    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'rendezvous'}", rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        for mode in MODES:
            try:
                result = _run_mode(mode, rank, WORLD_SIZE)
            except BaseException:
                (out_dir / f"{mode}_rank{rank}.err").write_text(traceback.format_exc())
                # The other rank may wait in a collective this one will never join: end without cleanup.
                sys.stderr.flush()
                os._exit(1)
            torch.save(result, out_dir / f"{mode}_rank{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# The tests.

def _require_gloo_and_cpu_backend():
    """Skips without gloo or the built C++ extension, except in CI where both must be there."""
    import torch.distributed as dist
    from mixer_fast import dispatch

    why = None
    if not (dist.is_available() and dist.is_gloo_available()):
        why = f"torch {torch.__version__} has no gloo process group (distributed: {dist.is_available()})"
    else:
        try:
            dispatch.load("cpu")
        except dispatch.BackendUnavailable as e:
            why = f"the cpu backend does not load: {e}"
    if why is None:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    """Starts the two ranks once for both tests; returns (out_dir, what the processes printed)."""
    _require_gloo_and_cpu_backend()
    out_dir = tmp_path_factory.mktemp("distributed")
    # The workers import the very mixer_fast this process tested, installed or not.
    path = os.pathsep.join(filter(None, [str(Path(mixer_fast.__file__).parents[1]), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    logs = [out_dir / f"rank{rank}.log" for rank in range(WORLD_SIZE)]
    procs, timed_out = [], False
    try:
        for rank, log in enumerate(logs):
            with open(log, "w") as f:
                procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(rank), str(out_dir)],
                                              env=env, stdout=f, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            # A rank that failed leaves the other waiting in a collective: no need to wait for gloo's timeout.
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.1)
        else:
            if any(p.poll() is None for p in procs):
                timed_out = True
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    logs = [f"--- rank {rank} (exit {p.returncode}) ---\n{log.read_text()[-4000:]}"
            for rank, (p, log) in enumerate(zip(procs, logs))]
    if timed_out:
        logs.append(f"[killed after {PROCESS_TIMEOUT_S} s]")
    return out_dir, "\n".join(logs)


@pytest.fixture(scope="module")
def reference_run():
    """The single-process run on the full batch, on the same thread count as the workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        losses = _train(model)
        return init, {n: p.detach().clone() for n, p in model.named_parameters()}, losses, _evaluate(model)
    finally:
        torch.set_num_threads(threads)


def _results(out_dir, logs, mode):
    errors = [f"rank {r}:\n{p.read_text()}" for r in range(WORLD_SIZE)
              if (p := out_dir / f"{mode}_rank{r}.err").exists()]
    missing = [r for r in range(WORLD_SIZE) if not (out_dir / f"{mode}_rank{r}.pt").exists()]
    if errors or missing:
        pytest.fail(f"{mode}: no result from rank(s) {missing}\n" + "\n".join(errors) + f"\n{logs}")
    return [torch.load(out_dir / f"{mode}_rank{r}.pt") for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("mode", MODES)
def test_two_process_training_equals_full_batch(distributed_runs, reference_run, mode):
    init, expected, expected_losses, expected_eval = reference_run
    results = _results(*distributed_runs, mode)
    for rank, result in enumerate(results):
        assert result["params"].keys() == expected.keys(), rank
        # DDP keeps the replicas bitwise identical (the same averaged gradient, the same update); FSDP2's
        # gathered parameters are one tensor by construction.
        for name, p in result["params"].items():
            assert torch.equal(p, results[0]["params"][name]), f"rank {rank} and rank 0 differ in {name}"
    if mode == "fsdp2":
        for rank, result in enumerate(results):
            assert result["dtensor"] and result["local_numel"] < result["full_numel"], (rank, result["dtensor"])
            assert (result["inner_shard_error"] or "").startswith(
                "fc1_weight: expected a local tensor, got a DTensor (placements [Shard(dim=0)]): the fused ops read "
                "a block's parameters directly, so fully_shard"), result["inner_shard_error"]
    worst = 0.0
    for name, want in expected.items():
        got = results[0]["params"][name]
        moved = max_err(want, init[name])
        # Not vacuous: every parameter moved by far more than the allowed difference (>= ~1000 times).
        assert moved > 1e-3 * want.abs().max().item(), f"{name} barely moved in training ({moved:.2e})"
        tol = RTOL * moved + ULPS * want.abs().max().item()
        err = max_err(got, want)
        worst = max(worst, err / tol)
        assert err <= tol, f"{mode}: {name} differs from the full-batch run by {err:.3e} > {tol:.3e}"
    # The per-step loss over the whole batch matches too (the ranks' mean of their half-batch means).
    for step, (got, want) in enumerate(zip(results[0]["losses"], expected_losses)):
        assert abs(got - want) <= 1e-5 * abs(want), f"{mode}: step {step} loss {got} != {want}"
    # Parameters within ~1e-7 of each other give logits within a few ulps of their size (up to ~15;
    # observed 3.3e-6, 1/46 of this bound).
    for rank, result in enumerate(results):
        err = max_err(result["eval"], expected_eval)
        assert err <= 1e-5 * expected_eval.abs().max().item(), f"{mode}: rank {rank} eval logits differ by {err:.3e}"
    print(f"{mode}: worst parameter difference {worst:.3f} of the tolerance, eval logits {err:.1e}")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "--worker":
        sys.exit(f"usage: {sys.argv[0]} --worker RANK OUT_DIR (started by the tests, not by hand)")
    _worker(int(sys.argv[2]), sys.argv[3])
