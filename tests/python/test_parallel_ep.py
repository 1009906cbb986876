"""Expert parallelism (moetune.parallel): ownership, and one layer over 2 gloo ranks against
the fp32 reference with the op's tolerance table (op_cases.TOL_C, the bar the one-process
engine meets), for uneven ownership (E = 5 over 2 ranks), experts without tokens and a rank
that receives no token at all."""

from __future__ import annotations

import ep_cases as C
import pytest
import reference as R
import torch
from op_cases import TOL_C, U, check_close, dw_scale

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


def _reference(case):
    W, lora = C.layer_weights()
    refs = []
    for rank in range(2):
        x, ids, w, dout = C.layer_inputs(rank, case)
        refs.append(R.reference_forward_backward(x, ids, w, *W, lora, 0.5, dout))
    return refs


@pytest.mark.parametrize("case", ["random", "skewed"])
def test_layer_matches_reference(tmp_path, case):
    C.spawn(C.layer_worker, 2, tmp_path, case, str(tmp_path))
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    refs = _reference(case)
    assert sorted(res[0]["owned"].tolist() + res[1]["owned"].tolist()) == list(range(C.E))
    for r in range(2):
        x, ids, w, dout = C.layer_inputs(r, case)
        check_close(f"out r{r}", res[r]["y"], refs[r]["out"], TOL_C["out"], bf16_out=True)
        check_close(f"dx r{r}", res[r]["dx"], refs[r]["dx"], TOL_C["dx"], bf16_out=True)
        check_close(f"dw r{r}", res[r]["dw"], refs[r]["dtopk_weights"], TOL_C["dtopk_weights"],
                    scale=dw_scale(refs[r], dout))
        assert res[r]["cpus"] == 1  # its own core of the 2 (topology.rank_cpus)
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
