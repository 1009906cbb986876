"""The raw binding's Job holds the arrays its call reads and writes (issue 13).

`_ext.Experts.forward` / `.backward` return a Job that keeps every input, output and LoRA array
of the queued call alive until the job is waited on (or, if dropped first, until the job has
run), so a caller dropping its arrays early can never free memory under a running job.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

import moetune
from moetune import _moetune_ext as _ext
from moetune.engine import _ext_lora, _ext_lora_grads

E, H, I, T, K, R = 6, 64, 48, 300, 2, 4


@pytest.fixture(scope="module")
def experts():
    g = torch.Generator().manual_seed(13)
    w = [torch.randn(s, generator=g).bfloat16() * 0.1 for s in ((E, I, H), (E, I, H), (E, H, I))]
    return moetune.MoEExperts(moetune.Context(2), *w)


def _inputs(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, H), dtype=np.float32)
    ids = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int64)
    w = rng.random((T, K), dtype=np.float32)
    lora = [
        rng.standard_normal(s, dtype=np.float32) * 0.1
        for s in ((E, R, H), (E, I, R), (E, R, H), (E, I, R), (E, R, I), (E, H, R))
    ]
    return x, ids, w, lora


def _forward(ex, x, ids, w, lora, out):
    return ex._ex.forward(x, ids, w, None, _ext_lora(lora, 0.5), out)


def test_forward_job_keeps_dropped_inputs_alive_until_waited(experts):
    x, ids, w, lora = _inputs(1)
    ref = np.empty((T, H), np.float32)
    _, job = _forward(experts, x.copy(), ids.copy(), w.copy(), [a.copy() for a in lora], ref)
    job.wait()

    out = np.full((T, H), np.nan, np.float32)
    saved, job = _forward(experts, x, ids, w, lora, out)
    refs = [weakref.ref(a) for a in (x, ids, w, *lora)]
    del x, ids, w, lora
    gc.collect()
    # The caller holds none of them now: only the job does.
    assert job.holds_arrays and all(r() is not None for r in refs), "the job must keep its inputs alive"
    junk = [np.full((T, H), 7.0, np.float32) for _ in range(8)]  # would reuse freed memory
    job.wait()
    assert not job.holds_arrays
    del junk
    gc.collect()
    assert all(r() is None for r in refs), "the job must release its inputs once waited on"
    np.testing.assert_array_equal(out, ref)


def test_backward_job_keeps_dropped_arrays_alive_until_waited(experts):
    x, ids, w, lora = _inputs(2)
    dout = np.random.default_rng(3).standard_normal((T, H), dtype=np.float32)

    def run():
        saved, job = _forward(experts, x, ids, w, lora, np.empty((T, H), np.float32))
        job.wait()
        dx = np.empty((T, H), np.float32)
        grads = [np.empty(a.shape, np.float32) for a in lora]
        d = dout.copy()
        la = [a.copy() for a in lora]
        job = experts._ex.backward(saved, d, _ext_lora(la, 0.5), dx, None, _ext_lora_grads(grads))
        refs = [weakref.ref(a) for a in (d, *la)]
        del d, la
        gc.collect()
        alive = all(r() is not None for r in refs)
        job.wait()
        return alive, dx, grads

    alive, dx, grads = run()
    assert alive, "the backward job must keep grad_out and the LoRA arrays alive"
    _, dx2, grads2 = run()
    np.testing.assert_array_equal(dx, dx2)
    for a, b in zip(grads, grads2):
        np.testing.assert_array_equal(a, b)


def test_dropping_an_unwaited_job_waits_for_it_and_torch_inputs_survive(experts):
    x, ids, w = (torch.from_numpy(a) for a in _inputs(4)[:3])
    ref = torch.empty(T, H)
    _forward(experts, x.clone(), ids.clone(), w.clone(), [None] * 6, ref)[1].wait()
    out = torch.full((T, H), float("nan"))
    saved, job = _forward(experts, x, ids, w, [None] * 6, out)
    del x, ids, w, job  # the job waits for itself before letting the arrays go
    gc.collect()
    torch.full((T, H), 7.0)  # would reuse freed memory
    assert torch.equal(out, ref)


def test_job_type_is_the_bindings():
    assert _ext.Job.__name__ == "Job" and hasattr(_ext.Job, "holds_arrays")
