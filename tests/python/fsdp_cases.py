"""Worker of test_parallel_fsdp.py: ep_cases.train_worker's run (tiny Qwen3-MoE, 5 experts over 2
gloo ranks, gradient accumulation 2, non-reentrant gradient checkpointing, 3 AdamW steps with
global-norm clipping) with the non-expert part sharded by FSDP2 (moetune.parallel.fsdp) instead of
DDP; results to files the test compares with ep_cases.reference_run."""

from __future__ import annotations

import os

import ep_cases as C
import torch
import torch.distributed as dist


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def fsdp_train_worker(rank: int, world: int, store: str, out: str, backend: str = "gloo") -> None:
    from torch.distributed.tensor import DTensor

    import moetune.hf
    from moetune.parallel import ExpertParallel, adapter, fsdp, grads
    from moetune.parallel.cpus import rank_context
    from moetune.parallel.expert_lora import expert_lora_tensors

    dev = C.init(rank, world, store, backend=backend)
    ep = ExpertParallel.from_group(dist.new_group(list(range(world))))
    pm = C.lora_model()
    moetune.hf.patch(pm, ctx=rank_context(rank, world), expert_parallel=ep)
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm.train()
    tensors = expert_lora_tensors(pm)
    fsdp.shard(pm, device=dev)  # from host RAM, over the default group, as moetune train
    from moetune.hf._placeholder import EngineHeldTensor

    expert_ids = {id(p) for p in fsdp.expert_params(pm)}
    rec = {
        "expert_names": [t.name for t in tensors],
        # what FSDP2 holds: every non-expert parameter a DTensor (this rank's chunk), every expert one
        # (engine placeholders, expert LoRA) a plain tensor
        "layout": {
            n: (isinstance(p, DTensor), id(p) in expert_ids, tuple(p.shape), tuple(_local(p).shape))
            for n, p in pm.named_parameters()
        },
        # where everything but the engine-held placeholders lives now: this rank's device
        "devices": {str(p.device) for p in pm.parameters() if not isinstance(p, EngineHeldTensor)},
        "device": str(dev),
        "loss": [],
        "gnorm": [],
        "logits0": None,
        "grads0": None,
    }
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=C.LR, **fsdp.optimizer_options(params))  # as moetune train (NCCL: no foreach)
    for step in range(C.STEPS):
        for m in range(C.ACCUM):
            b = C.batch(step, m, rank).to(dev)
            pm.set_requires_gradient_sync(m == C.ACCUM - 1)  # reduce-scatter after the last micro-batch
            o = pm(input_ids=b, labels=b)
            (o.loss / C.ACCUM).backward()
            rec["loss"].append(o.loss.item())
            if step == 0 and m == 0:
                rec["logits0"] = o.logits.detach()
        grads.scale_expert_grads(tensors, world)
        if step == 0:  # the full gradient: FSDP2 chunks gathered, expert entries summed from their owners
            g0 = {}
            for n, p in pm.named_parameters():
                if p.requires_grad:
                    g = _full(p.grad).clone()
                    if n in rec["expert_names"]:
                        dist.all_reduce(g)
                    g0[n] = g
            rec["grads0"] = g0
        rec["gnorm"].append(float(grads.clip_grad_norm_(params, 1.0, tensors)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    rec["owned"] = {t.name: (t.owned_mask(), t.param.detach().clone()) for t in tensors}
    adapter.sync(pm, tensors)
    adapter.sync_optimizer(opt, tensors)
    rec["eval"] = C.eval_loss(pm, dev)
    # what a checkpoint holds: full tensors (a collective), saved by rank 0 as one standard adapter
    state, opt_state = fsdp.full_trainable_state(pm), fsdp.full_optimizer_state(opt)
    if rank == 0:
        fsdp.FullStateSaver(pm, state).save_pretrained(os.path.join(out, "adapter_fsdp"))
    rec["opt_state"] = opt_state
    rec["names"] = [n for n, p in pm.named_parameters() if p.requires_grad]
    # and back: the full state loaded into the sharded model / optimizer gives this rank's shards again
    saved_state = {n: v.clone() for n, v in state.items()}  # the plain (expert) entries alias the parameters
    before = {n: _local(p).clone() for n, p in pm.named_parameters() if p.requires_grad}
    before_opt = {i: {k: _local(v).clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()}
    with torch.no_grad():
        for p in params:
            _local(p).zero_()
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    set_peft_model_state_dict(pm, get_peft_model_state_dict(pm, state_dict=saved_state))
    fsdp.ShardingOptimizer(opt).load_state_dict(opt_state)
    rec["reload_equal"] = all(torch.equal(_local(p), before[n]) for n, p in pm.named_parameters() if p.requires_grad)
    rec["reload_bad"] = [
        n for n, p in pm.named_parameters() if p.requires_grad and not torch.equal(_local(p), before[n])
    ]
    rec["reload_opt_equal"] = all(
        torch.equal(_local(v), before_opt[i][k]) for i, s in opt.state_dict()["state"].items() for k, v in s.items()
    )
    rec["reload_opt_dtensor"] = [
        isinstance(opt.state[p]["exp_avg"], DTensor) for p in params if isinstance(p, DTensor) and p in opt.state
    ]
    torch.save(C._cpu(rec), os.path.join(out, f"fsdp{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def optimizer_worker(rank: int, world: int, store: str, out: str) -> None:
    """A Linear pair under fully_shard, the second one ignored (as the expert LoRA): AdamW with foreach
    over the DTensor / plain mix, and with fsdp.optimizer_options; results to a file."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    from moetune.parallel import fsdp

    C.init(rank, world, store)
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    fully_shard(m, mesh=DeviceMesh.from_group(dist.group.WORLD, "cpu"), ignored_params=set(m[1].parameters()))
    params = list(m.parameters())
    rec = {"options": fsdp.optimizer_options(params), "all_sharded": fsdp.optimizer_options(params[:2])}
    m(torch.randn(2, 4)).sum().backward()
    before = [_local(p).detach().clone() for p in params]
    try:  # what torch picks by default on CUDA
        torch.optim.AdamW(params, lr=0.1, foreach=True).step()
        rec["foreach_error"] = None
    except RuntimeError as e:
        rec["foreach_error"] = str(e)
    opt = torch.optim.AdamW(params, lr=0.1, **rec["options"])
    opt.step()
    rec["stepped"] = all(not torch.equal(_local(p), b) for p, b in zip(params, before))
    rec["foreach_default"] = opt.defaults["foreach"]
    torch.save(rec, os.path.join(out, f"opt{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
