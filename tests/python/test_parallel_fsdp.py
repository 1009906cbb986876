"""FSDP2 for the non-expert part under expert parallelism (moetune.parallel.fsdp): 2 gloo ranks
(FSDP2 runs on the CPU with gloo in torch 2.13; on NCCL with >= 2 CUDA devices) against one process
on every rank's batches, with test_parallel_ep's tolerances (test_hf_exactness's: logits 8u
max|ref|, losses 8u / 16u over AdamW steps, gradients 14u Frobenius): what FSDP2 shards and what it
leaves alone, losses, logits, every LoRA gradient (attention and expert), the global grad norm,
the gathered adapter and optimizer state, and the full state loaded back into the shards."""

from __future__ import annotations

import os

import ep_cases as C
import fsdp_cases as F
import pytest
import torch
from op_cases import U
from test_parallel_train import COMMON, STEPS, _launch, _records, one_process  # noqa: F401 (a fixture)

from moetune.parallel import fsdp

pytestmark = pytest.mark.skipif(fsdp.unsupported_reason() is not None, reason=str(fsdp.unsupported_reason()))

BACKENDS = [
    "gloo",
    pytest.param("nccl", marks=pytest.mark.skipif(not C.nccl_ready(2), reason="NCCL needs >= 2 CUDA devices")),
]


def _fro_close(name, g, ref, c):
    err, scale = (g - ref).norm().item(), ref.norm().item()
    assert err <= c * U * scale, f"{name}: ||d||_F = {err:.4g} > {c}*u*{scale:.4g} (ratio {err / (U * scale):.2f})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_training_matches_one_process(tmp_path, backend):
    from safetensors.torch import load_file

    ref = C.reference_run(str(tmp_path / "adapter_ref"))
    C.spawn(F.fsdp_train_worker, 2, tmp_path, str(tmp_path), backend)
    res = [torch.load(tmp_path / f"fsdp{r}.pt", weights_only=False) for r in range(2)]
    W = 2
    # FSDP2 shards the non-expert part (attention, norms, router, embeddings, LM head; frozen weights
    # and LoRA): each rank holds its dim-0 chunk; the routed experts (placeholders, expert LoRA) stay
    # plain, whole tensors on every rank
    for r in range(2):
        assert res[r]["devices"] == {res[r]["device"]}, res[r]["devices"]
    layout = res[0]["layout"]
    experts = [n for n, (_, is_expert, _, _) in layout.items() if is_expert]
    assert experts and all(".experts." in n for n in experts)
    assert {n for n in experts if "lora_" in n} == {n for n in res[0]["expert_names"]}
    for n, (is_dt, is_expert, shape, local) in layout.items():
        assert is_dt != is_expert, f"{n}: DTensor {is_dt}, expert {is_expert}"
        if is_dt:
            rows = [res[r]["layout"][n][3][0] for r in range(2)]
            assert sum(rows) == shape[0] and list(rows) == [len(c) for c in torch.arange(shape[0]).chunk(2)], n
        else:
            assert local == shape
    assert any("q_proj.lora_A" in n for n, v in layout.items() if v[0]) and any(
        "mlp.gate.weight" in n for n, v in layout.items() if v[0]
    )
    for r in range(2):
        lg, rl = res[r]["logits0"], ref["logits0"][r]
        assert (lg - rl).abs().max().item() <= 8 * U * rl.abs().max().item(), f"logits rank {r}"
        for step in range(C.STEPS):
            for m in range(C.ACCUM):
                a, b = res[r]["loss"][step * C.ACCUM + m], ref["loss"][(step * C.ACCUM + m) * W + r]
                c = 8 if step == 0 else 16
                assert abs(a - b) <= c * U * abs(b), f"loss step {step} micro {m} rank {r}: {a} vs {b}"
    # every LoRA gradient, attention (FSDP2-reduced) and expert (owner-computed) alike
    assert ref["grads0"].keys() == res[0]["grads0"].keys()
    for n, g in ref["grads0"].items():
        for r in range(2):
            _fro_close(f"grad {n} rank {r}", res[r]["grads0"][n], g, 14)
    for s in range(C.STEPS):
        assert abs(res[0]["gnorm"][s] - ref["gnorm"][s]) <= 14 * U * ref["gnorm"][s]
        assert res[0]["gnorm"][s] == res[1]["gnorm"][s]  # one global norm, the same clip on every rank
    # the adapter gathered on rank 0: standard PEFT keys, the one-process adapter's values
    saved = load_file(tmp_path / "adapter_fsdp" / "adapter_model.safetensors")
    one = load_file(tmp_path / "adapter_ref" / "adapter_model.safetensors")
    assert saved.keys() == one.keys()
    for k in one:
        _fro_close(f"adapter {k}", saved[k], one[k], 16)
    # every expert's factors: their owner's trained values, bit for bit
    names = res[0]["expert_names"]
    for n in names:
        key = next(k for k in saved if n.replace(".default", "").endswith(k.replace("base_model.model.", "")))
        covered = torch.zeros_like(saved[key], dtype=torch.bool)
        for r in range(2):
            mask, val = res[r]["owned"][n]
            assert torch.equal(saved[key][mask], val[mask]), f"{key}: rank {r}'s experts differ"
            covered |= mask
        assert covered.all()
    # the optimizer state gathered into full tensors: one-process layout and values (AdamW's moments
    # of the same gradients), equal on both ranks
    st = [res[r]["opt_state"]["state"] for r in range(2)]
    assert st[0].keys() == st[1].keys() and len(st[0]) == len(res[0]["names"])
    for i, n in enumerate(res[0]["names"]):
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[0][i][k], st[1][i][k]), f"{n}.{k} differs between ranks"
            assert st[0][i][k].shape == ref["grads0"][n].shape
    # the full state loaded back (the load hook, ShardingOptimizer): each rank's own shards, exactly
    for r in range(2):
        assert res[r]["reload_equal"] and res[r]["reload_opt_equal"], res[r]["reload_bad"]
        assert res[r]["reload_opt_dtensor"] and all(res[r]["reload_opt_dtensor"])
    # the same model as one process (2 -> 1: the gathered adapter loaded in one process)
    import moetune
    import moetune.hf

    m1 = C.lora_model(str(tmp_path / "adapter_fsdp"))
    moetune.hf.patch(m1, ctx=moetune.Context(num_threads=1))
    ev = C.eval_loss(m1)
    for r in range(2):
        assert abs(res[r]["eval"] - ev) <= 8 * U * abs(ev)
        assert abs(res[r]["eval"] - ref["eval"]) <= 16 * U * abs(ref["eval"])


def test_fsdp2_optimizer_without_foreach_over_a_dtensor_mix(tmp_path):
    """FSDP2's DTensors and the ignored (expert LoRA) plain tensors in one parameter group: torch's
    foreach kernels, its default on CUDA, refuse the mix; fsdp.optimizer_options turns them off for
    such a mix only, and AdamW then steps every parameter."""
    C.spawn(F.optimizer_worker, 2, tmp_path, str(tmp_path))
    for r in range(2):
        rec = torch.load(tmp_path / f"opt{r}.pt", weights_only=False)
        assert rec["foreach_error"] is not None and "mixed torch.Tensor and DTensor" in rec["foreach_error"]
        assert rec["options"] == {"foreach": False} and rec["all_sharded"] == {}
        assert rec["foreach_default"] is False and rec["stepped"]


def test_fsdp2_option_validated_before_loading(tmp_path):
    from moetune.train.config import ConfigError, TrainConfig, make_config

    assert TrainConfig().data_parallel == fsdp.DEFAULT.value == "ddp"
    assert make_config(None, {"data_parallel": "fsdp2", "output_dir": str(tmp_path / "r")}).data_parallel == "fsdp2"
    with pytest.raises(ConfigError, match="data_parallel must be one of ddp, fsdp2"):
        make_config(None, {"data_parallel": "zero3", "output_dir": str(tmp_path / "r")})
    # moving experts between ranks works under either wrapper (test_parallel_rebalance runs both)
    cfg = make_config(None, {"data_parallel": "fsdp2", "ep_rebalance_every": 2, "output_dir": str(tmp_path / "r")})
    assert (cfg.data_parallel, cfg.ep_rebalance_every) == ("fsdp2", 2)


def test_fsdp2_refused_where_fully_shard_cannot_ignore_experts(tmp_path, monkeypatch):
    """A torch whose fully_shard has no ignored_params (2.6) cannot keep the routed experts out of
    FSDP2: a config error before anything loads, and shard() refuses too."""
    import torch.distributed.fsdp as tfsdp

    from moetune.train.config import ConfigError, make_config

    def old_fully_shard(module, *, mesh=None, reshard_after_forward=True, mp_policy=None, offload_policy=None):
        raise AssertionError("not to be called")

    monkeypatch.setattr(tfsdp, "fully_shard", old_fully_shard)
    assert "ignored_params" in fsdp.unsupported_reason()
    with pytest.raises(ConfigError, match="data_parallel=fsdp2: .*ignored_params"):
        make_config(None, {"data_parallel": "fsdp2", "output_dir": str(tmp_path / "r")})
    make_config(None, {"data_parallel": "ddp", "output_dir": str(tmp_path / "r")})  # DDP does not need it
    with pytest.raises(RuntimeError, match="ignored_params"):
        fsdp.shard(torch.nn.Linear(2, 2))


# ---- moetune train: a checkpoint of one wrapper resumed by the other, and by one process ----


def _adapter(run: str, sub: str = "adapter") -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(run, sub, "adapter_model.safetensors"))


def _check_like_one_process(run: str, ref: str) -> None:
    """test_parallel_train's bounds: losses 16u, grad norms 14u, final eval loss 16u, adapter 16u."""
    ours = [r for r in _records(run) if r["kind"] == "train"]
    want = [r for r in _records(ref) if r["kind"] == "train"]
    assert [r["step"] for r in ours] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for a, b in zip(ours, want):
        assert a["target_tokens"] == b["target_tokens"] and a["tokens"] == b["tokens"]
        assert abs(a["loss"] - b["loss"]) <= 16 * U * abs(b["loss"]), (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 14 * U * b["grad_norm"], a["step"]
    ev, ev_ref = ([r["eval_loss"] for r in _records(x) if r["kind"] == "eval"][-1] for x in (run, ref))
    assert abs(ev - ev_ref) <= 16 * U * abs(ev_ref)
    a, b = _adapter(run), _adapter(ref)
    assert a.keys() == b.keys()
    for k in b:
        assert (a[k] - b[k]).norm().item() <= 16 * U * b[k].norm().item(), k


def test_resume_across_ddp_and_fsdp2(tmp_path, one_process):  # noqa: F811 (the imported fixture)
    """A 2-rank run stopped after step 2 (checkpoint) under DDP, resumed under FSDP2, and the other way
    round: both equal the uninterrupted one-process run. The two step-2 checkpoints hold the same
    full tensors (adapter: standard PEFT keys and shapes, values within 16u; optimizer.pt: the same
    per-parameter state shapes), and one process resumes either (another number of ranks) to the same
    step 3."""
    import shutil

    from moetune.demo import DEMO_DEFAULTS
    from moetune.train.config import make_config
    from moetune.train.loop import train

    runs = {}
    for first in ("ddp", "fsdp2"):
        d = tmp_path / first
        d.mkdir()
        runs[first], _ = _launch(d, "torchrun", {"data_parallel": first, "stop_after_steps": 2})
        assert [r["step"] for r in _records(runs[first]) if r["kind"] == "train"] == [1, 2]
    ck = {k: os.path.join(v, "checkpoints", "step-00000002") for k, v in runs.items()}
    a, b = _adapter(ck["fsdp2"]), _adapter(ck["ddp"])
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in b)
    for k in b:
        assert (a[k] - b[k]).norm().item() <= 16 * U * b[k].norm().item(), k
    opt = {k: torch.load(os.path.join(v, "optimizer.pt"), weights_only=False) for k, v in ck.items()}
    assert opt["fsdp2"]["state"].keys() == opt["ddp"]["state"].keys()
    for i, st in opt["ddp"]["state"].items():
        for k, v in st.items():
            w = opt["fsdp2"]["state"][i][k]
            assert type(w) is torch.Tensor and w.shape == v.shape, (i, k)  # full, plain tensors
    # one process resumes copies of both checkpoints: the same step 3
    single = {}
    for first, run in runs.items():
        copy = str(tmp_path / f"{first}-single")
        shutil.copytree(run, copy)
        overrides = {**COMMON, "grad_accum": 1, "output_dir": copy, "engine_threads": 1, "resume": "latest"}
        summary = train(make_config(None, overrides, base=DEMO_DEFAULTS), say=lambda *a: None)
        assert summary["finished"] and summary["steps"] == STEPS
        single[first] = [r for r in _records(copy) if r["kind"] == "train"][-1]
    assert single["ddp"]["step"] == single["fsdp2"]["step"] == STEPS
    assert abs(single["fsdp2"]["loss"] - single["ddp"]["loss"]) <= 16 * U * abs(single["ddp"]["loss"])
    # and 2 ranks resume each under the other wrapper: the uninterrupted run
    for first, then in (("ddp", "fsdp2"), ("fsdp2", "ddp")):
        run, out = _launch(tmp_path / first, "torchrun", {"data_parallel": then, "resume": "latest"})
        assert "resumed from" in out and "(step 2 of 3)" in out, out[-3000:]
        _check_like_one_process(run, one_process)
