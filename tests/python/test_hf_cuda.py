"""moetune.hf with the rest of the model on a GPU: the experts stay in the CPU
engine (their placeholders never move), everything else runs on CUDA, and the
results match plain transformers + PEFT in fp32 on the CPU within the same
bf16-derived tolerances as test_hf_exactness.py. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from moetune.hf import EngineHeldTensor  # noqa: E402
from test_hf_exactness import U, batch, lora_grads, pair, rel_fro, rel_max  # noqa: E402


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU test machine)")
@pytest.mark.parametrize("patch_first", [True, False], ids=["patch_then_peft", "peft_then_patch"])
def test_rest_of_model_on_cuda(patch_first):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref, ours, handle = pair("qwen3_moe", patch_first=patch_first)
    ours.to("cuda")
    held = [p for n, p in ours.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))]
    assert held and all(isinstance(p, EngineHeldTensor) and p.device.type == "cpu" for p in held)
    assert all(p.device.type == "cuda" for n, p in ours.named_parameters() if "lora_" in n)
    ids = batch()
    out_ref = ref(input_ids=ids, labels=ids)
    out = ours(input_ids=ids.cuda(), labels=ids.cuda())
    assert out.logits.device.type == "cuda"
    err = rel_max(out.logits.cpu(), out_ref.logits)
    print(f"cuda patch_first={patch_first}: logits {err / U:.3f} u")
    assert err <= 8 * U
    out_ref.loss.backward()
    out.loss.backward()
    g_ref, g = lora_grads(ref), lora_grads(ours)
    for n in g_ref:
        assert g[n].device.type == "cuda"
        assert rel_fro(g[n].cpu(), g_ref[n]) <= 14 * U, n
    handle.undo()
    assert all(p.device.type == "cpu" for n, p in ours.named_parameters() if n.endswith(("gate_up_proj", "down_proj")))
