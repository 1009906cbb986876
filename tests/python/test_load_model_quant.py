"""moetune.load_model with quantized experts (weight_format / group_size as engine options).

The streaming loader quantizes each expert as it is read (MoEExperts.empty +
load_expert); the result must be bit-identical to from_pretrained + patch
with the same format (which quantizes all experts at once), and differ from
the bf16 load (the option really reaches the engine).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from ckpt_util import state_dict_of, to_layout, write_checkpoint  # noqa: E402
from test_hf_exactness import batch, build, ctx  # noqa: E402

import moetune  # noqa: E402
import moetune.hf  # noqa: E402
from moetune.hf.patching import experts_state  # noqa: E402


@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 32)], ids=["int8", "int4g32"])
def test_load_model_quantized_equals_patch(fmt, group, tmp_path):
    ref = build("qwen3_moe")
    folder = write_checkpoint(
        tmp_path / "ckpt", to_layout(state_dict_of(ref), "per_expert", "qwen3_moe"), ref.config, shards=2
    )
    ids = batch()
    kw = {"weight_format": fmt} if group is None else {"weight_format": fmt, "group_size": group}
    ours = moetune.load_model(folder, dtype=torch.float32, ctx=ctx(), progress=False, **kw)
    engines = [experts_state(m).engine for m in ours.modules() if experts_state(m) is not None]
    assert engines and all(e.weight_format == fmt for e in engines)
    with torch.no_grad():
        got = ours(input_ids=ids).logits
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        moetune.hf.patch(hf, ctx=ctx(), keep_original=False, **kw)
        assert torch.equal(got, hf(input_ids=ids).logits), "load_model and from_pretrained+patch differ"
        bf = moetune.load_model(folder, dtype=torch.float32, ctx=ctx(), progress=False)
        assert not torch.equal(got, bf(input_ids=ids).logits), "the weight format did not reach the engine"
    bf_bytes = [experts_state(m).engine.packed_bytes for m in bf.modules() if experts_state(m) is not None]
    assert all(e.packed_bytes < b * (0.55 if fmt == "int8" else 0.35) for e, b in zip(engines, bf_bytes))
