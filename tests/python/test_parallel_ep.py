"""Expert parallelism (moetune.parallel): ownership, and one layer over 2 gloo ranks against
the fp32 reference with the op's tolerance table (op_cases.TOL_C, the bar the one-process
engine meets), for uneven ownership (E = 5 over 2 ranks), experts without tokens and a rank
that receives no token at all; training (EP + DDP) against one process. Each exchange case runs on
gloo (CPU tensors) and on NCCL (each rank's tensors on its own GPU; the same code but the backend
and the device), the NCCL ones only with >= 2 CUDA devices (else skipped, e.g. here; issue 17's
multi-GPU run)."""

from __future__ import annotations

import ep_cases as C
import pytest
import reference as R
import torch
from op_cases import TOL_C, U, check_close, dw_scale

from moetune import topology
from moetune.parallel import by_index, by_load, load_per_rank
from moetune.parallel.ownership import LayerOwnership


def test_by_index_uneven_contiguous():
    own = by_index(5, 2)
    assert own.owner == (0, 0, 1, 1, 1)
    assert own.owned(0) == (0, 1) and own.owned(1) == (2, 3, 4)
    assert own.local_id_tensor().tolist() == [0, 1, 0, 1, 2]
    assert [len(by_index(10, 4).owned(r)) for r in range(4)] == [2, 3, 2, 3]


def test_by_load_greedy_largest_first():
    counts = [100, 90, 1, 1, 80, 2]
    own = by_load(counts, 2)
    # 100 -> r0, 90 -> r1, 80 -> r1 (90 < 100), then 2, 1, 1 -> r0 (102, 103, 104 < 170)
    assert own.owner == (0, 1, 0, 0, 1, 0)
    assert load_per_rank(own, counts) == [104.0, 170.0]
    assert max(load_per_rank(by_index(6, 2), counts)) == 191.0  # by index: worse on this profile
    assert by_load(torch.tensor(counts), 2) == own
    # zero counts: every rank gets experts (round robin), deterministic
    assert by_load([0] * 5, 2).owner == (0, 1, 0, 1, 0)


def test_ownership_rejects_bad_ranks():
    with pytest.raises(ValueError, match="expert 1 owned by rank 2"):
        LayerOwnership((0, 2), 2)


BACKENDS = [
    "gloo",
    pytest.param("nccl", marks=pytest.mark.skipif(not C.nccl_ready(2), reason="NCCL needs >= 2 CUDA devices")),
]


def _reference(case):
    W, lora = C.layer_weights()
    refs = []
    for rank in range(2):
        x, ids, w, dout = C.layer_inputs(rank, case)
        refs.append(R.reference_forward_backward(x, ids, w, *W, lora, 0.5, dout))
    return refs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["random", "skewed"])
def test_layer_matches_reference(tmp_path, case, backend):
    C.spawn(C.layer_worker, 2, tmp_path, case, str(tmp_path), backend)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    refs = _reference(case)
    assert sorted(res[0]["owned"].tolist() + res[1]["owned"].tolist()) == list(range(C.E))
    for r in range(2):
        x, ids, w, dout = C.layer_inputs(r, case)
        check_close(f"out r{r}", res[r]["y"], refs[r]["out"], TOL_C["out"], bf16_out=True)
        check_close(f"dx r{r}", res[r]["dx"], refs[r]["dx"], TOL_C["dx"], bf16_out=True)
        check_close(
            f"dw r{r}", res[r]["dw"], refs[r]["dtopk_weights"], TOL_C["dtopk_weights"], scale=dw_scale(refs[r], dout)
        )
        assert res[r]["cpus"] == len(topology.rank_cpus(r, 2).cpus)  # its own share of the cores
    for kind, c in (("dA", TOL_C["dA"]), ("dB", TOL_C["dB"])):
        for p in ("gate", "up", "down"):
            # expert rows: non-zero on the owner only; their sum over ranks is the gradient of
            # every rank's tokens, the reference's sum (its error bound: the sum of the ranks')
            for r in range(2):
                if res[r][kind][p] is None:  # no row computed on this rank: LoRA unused, as in PyTorch
                    assert res[r]["rows"] == 0
                    res[r][kind][p] = torch.zeros_like(refs[r][kind][p])
                g = res[r][kind][p]
                others = [e for e in range(C.E) if e not in res[r]["owned"].tolist()]
                assert torch.count_nonzero(g[others]) == 0, f"{kind}.{p}: rank {r} has gradient on others' experts"
            total = res[0][kind][p] + res[1][kind][p]
            ref = refs[0][kind][p] + refs[1][kind][p]
            scale = sum(rf[kind][p].abs().max().item() for rf in refs)
            check_close(f"{kind}.{p}", total, ref, c, scale=scale)
    if case == "skewed":
        assert res[1]["tokens_in"] == 0 and res[1]["rows"] == 0
        assert res[0]["rows"] == sum(C.layer_inputs(r, case)[1].numel() for r in range(2))
    else:
        assert res[0]["rows"] + res[1]["rows"] == sum(C.layer_inputs(r, case)[1].numel() for r in range(2))
    assert U > 0


def _fro_close(name, g, ref, c):
    err, scale = (g - ref).norm().item(), ref.norm().item()
    assert err <= c * U * scale, f"{name}: ||d||_F = {err:.4g} > {c}*u*{scale:.4g} (ratio {err / (U * scale):.2f})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_matches_one_process(tmp_path, backend):
    """2 ranks (EP for the experts, DDP for attention LoRA), 5 experts (uneven), gradient
    accumulation 2, gradient checkpointing, 3 AdamW steps with global-norm clipping, against one
    process on every rank's batches. Tolerances: test_hf_exactness's (logits 8u max|ref|, loss
    8u, gradients 14u Frobenius, losses over AdamW steps 16u)."""
    from safetensors.torch import load_file

    ref = C.reference_run(str(tmp_path / "adapter_ref"))
    C.spawn(C.train_worker, 2, tmp_path, str(tmp_path), str(tmp_path / "adapter_ref"), backend)
    res = [torch.load(tmp_path / f"train{r}.pt") for r in range(2)]
    W = 2
    for r in range(2):
        lg, rl = res[r]["logits0"], ref["logits0"][r]
        assert (lg - rl).abs().max().item() <= 8 * U * rl.abs().max().item(), f"logits rank {r}"
        for step in range(C.STEPS):
            for m in range(C.ACCUM):
                a, b = res[r]["loss"][step * C.ACCUM + m], ref["loss"][(step * C.ACCUM + m) * W + r]
                c = 8 if step == 0 else 16
                assert abs(a - b) <= c * U * abs(b), f"loss step {step} micro {m} rank {r}: {a} vs {b}"
    names = res[0]["expert_names"]
    assert len(names) == 2 * 2 * 2  # 2 layers x (gate_up, down) x (A, B)
    for n, g in ref["grads0"].items():
        for r in range(2):
            _fro_close(f"grad {n} rank {r}", res[r]["grads0"][n], g, 14)
    for s in range(C.STEPS):
        assert abs(res[0]["gnorm"][s] - ref["gnorm"][s]) <= 14 * U * ref["gnorm"][s]
        assert res[0]["gnorm"][s] == res[1]["gnorm"][s]  # one global norm, the same clip on every rank
    # the adapter: every expert's factors, equal to their owner's trained values, bit for bit
    saved = load_file(tmp_path / "adapter_ep" / "adapter_model.safetensors")
    checked = 0
    for n in names:
        key = next(k for k in saved if n.replace(".default", "").endswith(k.replace("base_model.model.", "")))
        covered = torch.zeros_like(saved[key], dtype=torch.bool)
        for r in range(2):
            mask, val = res[r]["owned"][n]
            assert torch.equal(saved[key][mask], val[mask]), f"{key}: rank {r}'s experts differ"
            covered |= mask
            checked += 1
        assert covered.all(), f"{key}: entries without an owner"
    assert checked == 2 * len(names)
    # same model as one process: eval losses (2 -> 1: the EP adapter in one process; 1 -> 2)
    one = C.lora_model(str(tmp_path / "adapter_ep"))
    import moetune.hf

    moetune.hf.patch(one, ctx=moetune.Context(num_threads=1))
    ev_2to1 = C.eval_loss(one)
    for r in range(2):
        assert abs(res[r]["eval"] - ev_2to1) <= 8 * U * abs(ev_2to1)
        assert abs(res[r]["eval"] - ref["eval"]) <= 16 * U * abs(ref["eval"])
        assert abs(res[r]["eval_1to2"] - ref["eval"]) <= 8 * U * abs(ref["eval"])


def test_load_model_loads_only_owned_experts(tmp_path):
    """load_model(expert_parallel=): each rank packs only its experts (host RAM: its share), the
    model's logits are the one-process load's."""
    import moetune

    path = tmp_path / "model"
    C.tiny_model().save_pretrained(path)
    C.spawn(C.load_worker, 2, tmp_path, str(path), str(tmp_path))
    res = [torch.load(tmp_path / f"load{r}.pt") for r in range(2)]
    one = moetune.load_model(str(path), num_threads=1, progress=False)
    with torch.no_grad():
        ref = one(input_ids=C.EVAL).logits
    assert [r["num_experts"] for r in res] == [[2, 2], [3, 3]]
    assert [r["owned"] for r in res] == [[[0, 1]] * 2, [[2, 3, 4]] * 2]
    assert res[0]["packed"] + res[1]["packed"] == one.moetune_handle.packed_bytes
    for r in range(2):
        assert (res[r]["logits"] - ref).abs().max().item() <= 8 * U * ref.abs().max().item()
