"""Issue 13, the engine through its Python API: no hang, no abort, no silent wrong result.

Object lifetimes in any order (no deadlock with the GIL), thread-creation failure and bad `cpus`
raise, a forked child gets an error instead of a hang, in-place edits between submit and wait are
detected, experts never loaded are refused, a saved handle only works with the experts that made
it, T = 0 works forward and backward, k = 0 says what is wrong. Scenarios that could hang or kill
the process run in a subprocess with a deadline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import moetune
from moetune import _moetune_ext as _ext

# Subprocesses import the moetune this process imported.
PY = os.path.dirname(os.path.dirname(moetune.__file__))
E, H, I = 4, 16, 8


def _experts(ctx=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(E, I, H, generator=g) * 0.1 for _ in range(2))
    down = torch.randn(E, H, I, generator=g) * 0.1
    return moetune.MoEExperts(ctx or moetune.Context(2), gate, up, down)


def _batch(T=6, k=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
    w = torch.rand(T, k, generator=g)
    return x, ids.to(torch.int64), w


def _run(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    code = f"import sys; sys.path.insert(0, {PY!r})\n" + textwrap.dedent(script)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


_PRELUDE = """
import torch, moetune
E, H, I = 4, 16, 8
ctx = moetune.Context(2)
ex = moetune.MoEExperts(ctx, torch.randn(E, I, H) * 0.1, torch.randn(E, I, H) * 0.1, torch.randn(E, H, I) * 0.1)
x, ids, w = torch.randn(6, H), torch.randint(0, E, (6, 1)), torch.rand(6, 1)
"""


def test_dropping_experts_while_a_finished_job_is_alive_does_not_hang():
    # An exception between submit and wait keeps the Job (and its call) alive while the last
    # reference to the experts goes: the destructor used to wait for that job's captures forever,
    # holding the GIL.
    r = _run(
        _PRELUDE
        + textwrap.dedent("""
        def step():
            p = moetune.moe_experts_async(ex, x, ids, w)
            raise ValueError("between submit and wait")
        try:
            step()
        except ValueError as e:
            keep = e  # the traceback keeps the pending call (and its Job) alive
        ex._ex.forward  # noqa
        import time; time.sleep(0.2)  # the job has finished
        del ex
        import gc; gc.collect()
        # The raw binding too: a finished Job outliving its experts.
        ex2 = moetune.MoEExperts(ctx, torch.randn(E, I, H), torch.randn(E, I, H), torch.randn(E, H, I))
        out = torch.empty(6, H)
        saved, job = ex2._ex.forward(x, ids, w, None, moetune.engine._ext_lora([None] * 6, 1.0), out)
        job.wait()
        del ex2
        gc.collect()
        job.wait()
        del saved
        print("ok")
        """),
        timeout=60,
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_any_drop_order_of_context_experts_pending_call():
    import itertools

    for order in itertools.permutations(range(4)):
        ctx = moetune.Context(2)
        ex = _experts(ctx)
        x, ids, w = _batch()
        x.requires_grad_(True)
        p = moetune.moe_experts_async(ex, x, ids, w)
        objs = [ctx, ex, p, x]
        del ctx, ex, p, x
        for i in order:
            objs[i] = None
    # and the engine still works
    ex = _experts()
    x, ids, w = _batch()
    assert torch.isfinite(moetune.moe_experts(ex, x, ids, w)).all()


def test_thread_creation_failure_raises_and_leaves_nothing_started():
    r = _run(
        """
        import resource, moetune
        pages = int(open("/proc/self/statm").read().split()[0])
        cap = pages * resource.getpagesize() + (96 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        try:
            moetune.Context(64)  # 64 thread stacks do not fit in 96 MiB more address space
            print("no error")
        except RuntimeError as e:
            assert "could not start engine worker thread" in str(e), e
            print("raised")
        c = moetune.Context(2)  # nothing half-started: a small one still works
        print(c.num_threads)
        """,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["raised", "2"], r.stdout


@pytest.mark.parametrize("cpus", [[-1], [100000], [0, -5]])
def test_invalid_cpus_are_errors(cpus):
    with pytest.raises(ValueError, match=f"cpus: core {[c for c in cpus if c < 0 or c >= 1024][0]}"):
        moetune.Context(2, cpus=cpus)


def test_valid_cpus_work():
    allowed = sorted(os.sched_getaffinity(0))
    ctx = moetune.Context(2, cpus=allowed[:1])
    x, ids, w = _batch()
    assert torch.isfinite(moetune.moe_experts(_experts(ctx), x, ids, w)).all()


def test_forked_child_gets_a_clear_error_not_a_hang():
    r = _run(
        _PRELUDE
        + textwrap.dedent("""
        import os
        moetune.moe_experts(ex, x, ids, w)  # the pool has run in the parent
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                moetune.moe_experts(ex, x, ids, w)
            except RuntimeError as e:
                code = 0 if "fork" in str(e) else 2
            try:
                fresh = moetune.Context(2)  # a new Context works in the child
                ex2 = moetune.MoEExperts(fresh, torch.randn(E, I, H), torch.randn(E, I, H), torch.randn(E, H, I))
                moetune.moe_experts(ex2, x, ids, w)
            except Exception:
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        moetune.moe_experts(ex, x, ids, w)  # the parent is unaffected
        print("parent ok")
        """),
        timeout=60,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "child 0" in r.stdout and "parent ok" in r.stdout, r.stdout


@pytest.mark.parametrize("what", ["x", "topk_weights", "topk_ids", "lora.gate.A"])
def test_in_place_edit_between_submit_and_wait_is_detected(what):
    ex = _experts()
    x, ids, w = _batch()
    A = torch.randn(E, 2, H) * 0.1
    B = torch.randn(E, I, 2) * 0.1
    lora = moetune.LoraWeights(gate=(A, B), scaling=2.0)
    p = moetune.moe_experts_async(ex, x, ids, w, lora)
    {"x": x, "topk_weights": w, "topk_ids": ids, "lora.gate.A": A}[what].add_(1)
    with pytest.raises(RuntimeError, match=f"{what} modified in place"):
        p.wait()
    # Unedited: the result equals a synchronous call (no false alarm).
    x, ids, w = _batch()
    p = moetune.moe_experts_async(ex, x, ids, w, lora)
    torch.testing.assert_close(p.wait(), moetune.moe_experts(ex, x, ids, w, lora), rtol=0, atol=0)


def test_editing_a_tensor_the_engine_copied_is_fine():
    # A non-contiguous x is copied before the engine reads it: editing the original changes nothing.
    ex = _experts()
    x, ids, w = _batch()
    xt = x.t().contiguous().t()  # same values, column-major
    want = moetune.moe_experts(ex, x, ids, w)
    p = moetune.moe_experts_async(ex, xt, ids, w)
    xt.add_(1)
    torch.testing.assert_close(p.wait(), want, rtol=0, atol=0)


def test_in_place_edit_of_grad_out_during_backward_is_detected():
    from moetune.engine import EngineCall

    ex = _experts()
    x, ids, w = _batch()
    ec = EngineCall(ex, x, ids, w, None, [None] * 6, 1.0)
    ec.wait_forward()
    g = torch.ones(6, H)
    ec.submit_backward(g, True, False, [False] * 6)
    g.mul_(2)  # the engine's host view of grad_out aliases g
    with pytest.raises(RuntimeError, match="grad_out modified in place"):
        ec.wait_backward()


def test_experts_never_loaded_are_refused():
    ex = moetune.MoEExperts.empty(moetune.Context(1), E, H, I)
    x, ids, w = _batch()
    with pytest.raises(ValueError, match="never loaded"):
        moetune.moe_experts(ex, x, ids, w)
    for e in range(E - 1):
        ex.load_expert(e, torch.randn(I, H), torch.randn(I, H), torch.randn(H, I))
    assert [ex._ex.loaded(e) for e in range(E)] == [True] * (E - 1) + [False]
    ids = torch.full((6, 1), E - 1)
    with pytest.raises(ValueError, match=f"expert {E - 1} is routed to but was never loaded"):
        moetune.moe_experts(ex, x, ids, w[:, :1])
    # Masked out, it is not computed: fine.
    mask = torch.tensor([True] * (E - 1) + [False])
    assert (moetune.moe_experts(ex, x, ids, w[:, :1], expert_mask=mask) == 0).all()


def test_saved_handle_only_works_with_its_own_experts():
    a, b = _experts(seed=0), _experts(seed=1)
    x, ids, w = _batch()
    out = torch.empty(6, H)
    none = moetune.engine._ext_lora([None] * 6, 1.0)
    saved, job = a._ex.forward(x, ids, w, None, none, out)
    job.wait()
    dout, dx = torch.ones(6, H), torch.empty(6, H)  # alive until the jobs are waited on
    with pytest.raises(ValueError, match="another experts object"):
        b._ex.backward(saved, dout, none, dx, None, _ext.LoraGrads())
    a._ex.backward(saved, dout, none, dx, None, _ext.LoraGrads()).wait()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_tokens_forward_and_backward(dtype):
    ex = _experts()
    A = (torch.randn(E, 2, H) * 0.1).requires_grad_(True)
    B = (torch.randn(E, I, 2) * 0.1).requires_grad_(True)
    x = torch.zeros(0, H, dtype=dtype, requires_grad=True)
    w = torch.zeros(0, 2, requires_grad=True)
    out = moetune.moe_experts(ex, x, torch.zeros(0, 2, dtype=torch.int64), w, moetune.LoraWeights(gate=(A, B)))
    assert out.shape == (0, H) and out.dtype == dtype
    out.sum().backward()
    assert x.grad.shape == (0, H) and w.grad.shape == (0, 2)
    assert (A.grad == 0).all() and (B.grad == 0).all()


def test_k_zero_says_what_is_wrong():
    ex = _experts()
    x = torch.randn(5, H)
    with pytest.raises(ValueError, match=r"k = 0 experts per token must be in \[1, E=4\]"):
        moetune.moe_experts(ex, x, torch.zeros(5, 0, dtype=torch.int64), torch.zeros(5, 0))
