"""The GPU path: inputs on a CUDA device, results and gradients come back on
it, identical to the same call with CPU tensors (the engine is the same; only
the transfers differ). CI has no GPU, so these run on the GPU test machine
(benchmarks/device_run.sh) and are skipped elsewhere."""

import pytest
import torch

import moetune

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU test machine)")


def _case(device, seed=0, E=8, H=64, I=48, T=33, k=2, r=4, lora_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = [
        (torch.randn(E, I, H, generator=g) / H**0.5).bfloat16(),
        (torch.randn(E, I, H, generator=g) / H**0.5).bfloat16(),
        (torch.randn(E, H, I, generator=g) / I**0.5).bfloat16(),
    ]
    x = torch.randn(T, H, generator=g).bfloat16()
    w, ids = torch.softmax(torch.randn(T, E, generator=g), -1).topk(k, -1)
    lora = {
        p: (
            torch.randn(E, r, H if p != "down" else I, generator=g) * 0.1,
            torch.randn(E, I if p != "down" else H, r, generator=g) * 0.1,
        )
        for p in ("gate", "up", "down")
    }
    dout = torch.randn(T, H, generator=g).bfloat16()
    mv = lambda t: t.to(device).requires_grad_() if t.is_floating_point() else t.to(device)
    return (
        W,
        mv(x),
        mv(ids),
        mv(w),
        {p: (mv(a.to(lora_dtype)), mv(b.to(lora_dtype))) for p, (a, b) in lora.items()},
        dout.to(device),
    )


def _run(ctx, W, x, ids, w, lora, dout):
    ex = moetune.MoEExperts(ctx, *W)
    out = moetune.moe_experts(ex, x, ids, w, moetune.LoraWeights(**lora, scaling=2.0))
    out.backward(dout)
    return out, [x.grad, w.grad] + [t.grad for pair in lora.values() for t in pair]


@cuda
@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16])
def test_cuda_inputs_match_cpu_bitwise(lora_dtype):
    ctx = moetune.Context(4)
    out_c, grads_c = _run(ctx, *_case("cuda", lora_dtype=lora_dtype))
    out_h, grads_h = _run(ctx, *_case("cpu", lora_dtype=lora_dtype))
    assert out_c.device.type == "cuda" and out_c.dtype == torch.bfloat16
    assert torch.equal(out_c.cpu(), out_h)
    for gc, gh in zip(grads_c, grads_h):
        assert gc.device.type == "cuda" and gc.dtype == gh.dtype
        assert torch.equal(gc.cpu(), gh)


@cuda
def test_no_expert_weight_reaches_gpu_memory():
    E, H, I = 64, 512, 256
    ctx = moetune.Context(4)
    W = [torch.randn(E, I, H).bfloat16(), torch.randn(E, I, H).bfloat16(), torch.randn(E, H, I).bfloat16()]
    expert_bytes = sum(t.numel() * t.element_size() for t in W)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ex = moetune.MoEExperts(ctx, *W)
    x = torch.randn(128, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w, ids = torch.softmax(torch.randn(128, E, device="cuda"), -1).topk(4, -1)
    moetune.moe_experts(ex, x, ids, w).float().sum().backward()
    peak = torch.cuda.max_memory_allocated() - base
    # Activations only (x, out, grads: a few x-sized tensors); the experts are 16x larger.
    assert peak < expert_bytes / 8, (peak, expert_bytes)
