"""Workers of test_parallel_rebalance.py (moving experts between ranks): functions run in each of
2 spawned gloo processes (ep_cases.spawn), writing their results to files the test compares."""

from __future__ import annotations

import os
import weakref
from contextlib import nullcontext

import ep_cases as C
import torch
import torch.distributed as dist

# ---- one layer's engine and LoRA moved between ranks ----

# by_index(5, 2) = (0, 0, 1, 1, 1); the new owners move experts both ways and keep some in place
NEW_OWNER = (1, 0, 0, 1, 0)


def engine_options():
    """(name, ExpertsOptions fields, biases) of the engines moved byte for byte."""
    return [
        ("bf16", {}, False),
        ("int8", {"weight_format": "int8"}, True),
        ("int4", {"weight_format": "int4", "group_size": 32}, False),
        ("int8_tcopy", {"weight_format": "int8", "backward_weights": "transposed_copy"}, False),
    ]


def biases(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(C.E, C.I, generator=g), torch.randn(C.E, C.I, generator=g), torch.randn(C.E, C.H, generator=g))


def _engine_bytes(engine, e: int) -> dict[str, torch.Tensor]:
    return {
        b.name: torch.from_numpy(b.array)[e * b.per_expert_bytes : (e + 1) * b.per_expert_bytes].clone()
        for b in engine.packed_buffers()
    }


def move_worker(rank: int, world: int, store: str, out: str, backend: str = "gloo") -> None:
    """Each format: this rank's experts by index packed, moved to NEW_OWNER; per expert now owned,
    its packed bytes, biases and a forward (x through that expert alone) next to the one-process
    engine's; then one layer's PEFT-layout LoRA tensors and AdamW-like state moved (host tensors:
    on NCCL they travel through this rank's GPU)."""
    import moetune
    from moetune.parallel import ExpertParallel, LayerOwnership, by_index
    from moetune.parallel.cpus import rank_context
    from moetune.parallel.expert_lora import ExpertLoraTensor
    from moetune.parallel.layer import EPLayer
    from moetune.parallel.rebalance import move_engine, move_lora

    C.init(rank, world, store, backend=backend)
    ep = ExpertParallel.from_group()
    ctx = rank_context(rank, world)
    old, new = by_index(C.E, world), LayerOwnership(NEW_OWNER, world)
    W, _ = C.layer_weights()
    res = {}
    x = torch.randn(4, C.H, generator=torch.Generator().manual_seed(5)).bfloat16()
    for name, opts, with_bias in engine_options():
        bias = biases() if with_bias else (None, None, None)
        full = moetune.MoEExperts(ctx, *W, opts, gate_bias=bias[0], up_bias=bias[1], down_bias=bias[2])
        mine = torch.tensor(old.owned(rank))
        kw = {} if not with_bias else dict(zip(("gate_bias", "up_bias", "down_bias"), (b[mine] for b in bias)))
        engine = moetune.MoEExperts(ctx, *(w[mine] for w in W), opts, **kw)
        moved = move_engine(engine, old, new, ep)
        del engine
        got = {"num_experts": moved.num_experts, "packed_bytes": moved.packed_bytes, "experts": {}}
        for j, e in enumerate(new.owned(rank)):
            ids, w = torch.full((4, 1), j), torch.ones(4, 1)
            ids_full = torch.full((4, 1), e)
            got["experts"][e] = {
                "bytes": _engine_bytes(moved, j),
                "ref_bytes": _engine_bytes(full, e),
                "biases": [None if b is None else b[j] for b in moved.biases],
                "ref_biases": [None if b is None else b[e] for b in full.biases],
                "y": moetune.moe_experts(moved, x, ids, w),
                "ref_y": moetune.moe_experts(full, x, ids_full, w),
            }
        res[name] = got
    # LoRA: PEFT layouts A [E * r, in], B [out, r * E]; every rank's copy starts different (only
    # the owner's rows are true), the optimizer state too
    g = torch.Generator().manual_seed(50 + rank)
    layer = EPLayer(ep, old)
    A = torch.nn.Parameter(torch.randn(C.E * C.R, C.H, generator=g))
    B = torch.nn.Parameter(torch.randn(C.I, C.R * C.E, generator=g).bfloat16())
    tensors = [ExpertLoraTensor("A", A, "A", C.E, layer), ExpertLoraTensor("B", B, "B", C.E, layer)]
    opt = torch.optim.AdamW([A, B])
    opt.state[A] = {"step": torch.tensor(3.0), "exp_avg": torch.randn_like(A), "exp_avg_sq": torch.rand_like(A)}
    opt.state[B] = {"step": torch.tensor(3.0), "exp_avg": torch.randn_like(B), "exp_avg_sq": torch.rand_like(B)}
    before = {
        n: [v.detach().clone() for v in (t.param, opt.state[t.param]["exp_avg"], opt.state[t.param]["exp_avg_sq"])]
        for n, t in zip("AB", tensors)
    }
    move_lora(tensors, opt, old, new, ep)
    after = {
        n: [v.detach().clone() for v in (t.param, opt.state[t.param]["exp_avg"], opt.state[t.param]["exp_avg_sq"])]
        for n, t in zip("AB", tensors)
    }
    res["lora"] = {"before": before, "after": after, "step": [float(opt.state[t.param]["step"]) for t in tensors]}
    torch.save(res, os.path.join(out, f"move{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


# ---- a tiny Qwen3-MoE trained with EP + DDP, rebalancing every step, against not moving ----

# Router skew: every router's input gets SKEW x a unit vector along the sum of the router rows of
# experts 0 and 1 (rank 0's by index; a forward pre-hook on the router only, the experts see the
# hidden states unchanged): on the test batches rank 0 computes about 2/3 of the slots by index,
# by_load splits experts 0 and 1 over the ranks (measured: 267 / 117 slots -> 185 / 199, layer 0).
SKEW = 1.0


def skewed_model(adapter_dir: str | None = None):
    """C.lora_model's PEFT model (its LoRA init, or the adapter at adapter_dir) on the skewed base."""
    import peft

    base = C.tiny_model()
    for name, m in base.named_modules():
        if name.endswith("mlp.gate"):
            u = (m.weight[0] + m.weight[1]).detach()
            m.register_forward_pre_hook(lambda _m, args, u=SKEW * u / u.norm(): (args[0] + u, *args[1:]))
    if adapter_dir is not None:
        return peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    pm = peft.get_peft_model(base, peft.LoraConfig(**C.LORA))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).bfloat16().float())
    return pm


def _build(ctx, ep, adapter_dir: str | None = None, data_parallel: str = "ddp", placement=None):
    """The skewed model patched for expert parallelism under DDP, or with the non-expert part
    sharded by FSDP2 over the default group as moetune train does (data_parallel "fsdp2")
    (checkpointing on, training mode; `placement`: patch's, None its default): (model, expert LoRA
    tensors, the module a step calls (DDP's or the sharded model itself), trainable params, AdamW)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import moetune.hf
    from moetune.parallel import fsdp, grads
    from moetune.parallel.expert_lora import expert_lora_tensors

    pm = skewed_model(adapter_dir)
    handle = moetune.hf.patch(pm, ctx=ctx, expert_parallel=ep, placement=placement)
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if placement is not None:  # started now: a rank that computes no slot in the first step has it too
        handle.placement.start()
    pm.train()
    tensors = expert_lora_tensors(pm)
    if data_parallel == "fsdp2":
        call = fsdp.shard(pm, device="cpu")
    else:
        grads.ddp_ignore(pm, tensors)
        call = DDP(pm, device_ids=None)
    params = [p for p in pm.parameters() if p.requires_grad]
    return pm, tensors, call, params, torch.optim.AdamW(params, lr=C.LR, **fsdp.optimizer_options(params))


def _sync_unless(call, last: bool):
    """Around one micro-batch: gradients reduced over the ranks only after the last (DDP's no_sync,
    FSDP2's set_requires_gradient_sync)."""
    if hasattr(call, "set_requires_gradient_sync"):
        call.set_requires_gradient_sync(last)
        return nullcontext()
    return nullcontext() if last else call.no_sync()


def _full(t: torch.Tensor) -> torch.Tensor:
    """An FSDP2 DTensor gathered (a collective); any other tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _sharded(pm) -> list[str]:
    """The parameters FSDP2 shards (DTensors): none under DDP."""
    from torch.distributed.tensor import DTensor

    return [n for n, p in pm.named_parameters() if isinstance(p, DTensor)]


def _save_adapter(pm, path: str, rank: int) -> None:
    """What moetune train's checkpoint writes (after adapter.sync): rank 0 saves one standard adapter,
    under FSDP2 from the full state every rank gathers (a collective)."""
    from moetune.parallel import fsdp

    if _sharded(pm):
        saver = fsdp.FullStateSaver(pm, fsdp.full_trainable_state(pm))
    else:
        saver = pm
    if rank == 0:
        saver.save_pretrained(path)


def _snapshot(tensors, opt) -> dict[str, list[torch.Tensor]]:
    """Every expert LoRA tensor and its exp_avg / exp_avg_sq as the owners hold them (each entry from its owner)."""
    from moetune.parallel.adapter import _owned_sum_

    out = {}
    for t in tensors:
        vals = [t.param.detach()]
        st = opt.state.get(t.param) or {}
        vals += [st[k] for k in ("exp_avg", "exp_avg_sq") if k in st]
        snap = []
        for v in vals:
            c = v.detach().clone()
            _owned_sum_(c, t.owned_mask(), t.layer.ep)
            snap.append(c)
        out[t.name] = snap
    return out


def rebalance_train_worker(rank: int, world: int, store: str, out: str, every: int, data_parallel: str = "ddp") -> None:
    """C.train_worker's run (grad_accum 2, gradient checkpointing, clipping, AdamW) on the skewed
    model (the non-expert part under DDP or FSDP2: `data_parallel`), rebalancing every `every` steps
    (0: never, min_gain 0): per step the losses, every LoRA gradient (FSDP2's chunks gathered, expert
    entries summed from their owners), the ownership; around each move the owners' values of every
    expert LoRA tensor and its optimizer state; at the end the gathered adapter and optimizer state;
    then a checkpoint-style save and a resume in a fresh model."""
    from moetune.parallel import ExpertParallel
    from moetune.parallel.cpus import rank_context

    C.init(rank, world, store)
    ep = ExpertParallel.from_group(dist.new_group(list(range(world))))
    _rebalance_train(rank, world, ep, rank_context(rank, world), out, every, data_parallel=data_parallel)
    dist.barrier()
    dist.destroy_process_group()


PLACED_STEPS = C.STEPS + 1


def placed_rebalance_train_worker(rank: int, world: int, store: str, out: str, placement: dict) -> None:
    """rebalance_train_worker's runs without moving and with a rebalance after every step, one
    after the other in one process group, with a GPU placement (PlacementOptions fields
    `placement`, on the GPU path's CPU stand-in) active on every rank and its end_step() after
    each optimizer step, one step more than test_parallel_rebalance's (a layer moved at the second
    step's end is held again at the third's and computes from its residents in the fourth);
    results tagged "placed"."""
    from moetune.parallel import ExpertParallel
    from moetune.parallel.cpus import rank_context

    C.init(rank, world, store)
    ep = ExpertParallel.from_group(dist.new_group(list(range(world))))
    ctx = rank_context(rank, world)
    for every in (0, 1):
        _rebalance_train(rank, world, ep, ctx, out, every, placement=placement, tag="placed", steps=PLACED_STEPS)
        dist.barrier()
    dist.destroy_process_group()


def _placement_record(states) -> dict:
    """What the model's placement holds per layer (after its end_step): the experts its GPU side
    was built for (the same object as the layer's engine?), their number, resident experts,
    steady flags, and whether any old GPU side is left (closed but still the layer's)."""
    pl = states[0].placement
    return {
        "built_for_engine": [pl.layers[st.layer_key].gpu.experts is st.engine for st in states],
        "gpu_experts": [pl.layers[st.layer_key].gpu.fmt.num_experts for st in states],
        "resident": [int(pl.layers[st.layer_key].gpu.resident_mask().sum()) for st in states],
        "steady": [bool(pl.scheduler.steady(st.layer_key)) for st in states],
        "closed": [pl.layers[st.layer_key].gpu.closed for st in states],
        "held_bytes": pl.runtime.store.used_bytes,
    }


def _rebalance_train(
    rank: int,
    world: int,
    ep,
    ctx,
    out: str,
    every: int,
    placement=None,
    tag: str = "",
    steps: int = C.STEPS,
    data_parallel: str = "ddp",
) -> None:
    """rebalance_train_worker's run (`steps` optimizer steps) in an initialised process group (see there); with a
    `placement` (PlacementOptions fields) its end_step() after each optimizer step, its numbers
    and per-layer state recorded ("placed", "placement" after end_step, "placement_moved" after
    each move)."""
    from moetune.hf import patching
    from moetune.parallel import adapter, grads
    from moetune.parallel.rebalance import Rebalancer
    from moetune.parallel.rebalance_options import RebalanceOptions

    pm, tensors, ddp, params, opt = _build(ctx, ep, data_parallel=data_parallel, placement=placement)
    states = [patching.experts_state(f.module) for f in patching.find_experts(pm)]
    rb = Rebalancer(pm, RebalanceOptions(every, 0.0)) if every else None
    rec = {"loss": [], "grads": [], "owners": [], "moves": [], "expert_names": [t.name for t in tensors]}
    rec["sharded"] = _sharded(pm)
    rec["owners"].append([st.ep.own.owner for st in states])

    def one_step(step, ddp, pm, tensors, params, opt):
        for m in range(C.ACCUM):
            b = C.batch(step, m, rank)
            with _sync_unless(ddp, m == C.ACCUM - 1):
                o = ddp(input_ids=b, labels=b)
                (o.loss / C.ACCUM).backward()
            rec["loss"].append(o.loss.item())
        grads.scale_expert_grads(tensors, world)
        g = {}
        for t in tensors:  # the full gradient: expert entries summed from their owners
            full = t.param.grad.clone()
            dist.all_reduce(full)
            g[t.name] = full
        for n, p in pm.named_parameters():
            if p.requires_grad and n not in g:
                g[n] = _full(p.grad).clone()
        rec["grads"].append(g)
        grads.clip_grad_norm_(params, 1.0, tensors)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if placement is not None:
            rec.setdefault("placed", []).append(states[0].placement.end_step())
            rec.setdefault("placement", []).append(_placement_record(states))

    for step in range(steps):
        one_step(step, ddp, pm, tensors, params, opt)
        if rb is not None and rb.due(step + 1):
            snap = _snapshot(tensors, opt)
            owned_before = {t.name: t.owned_mask() for t in tensors}
            engines = [weakref.ref(st.engine) for st in states]
            numbers = rb.rebalance(opt)
            # a moved layer's old engine is gone at once (no second copy of its experts kept)
            replaced = [r for r, st in zip(engines, states) if r() is not st.engine]
            freed = all(r() is None for r in replaced)
            # each rank's owned entries now hold the owners' values of before the move, bit for bit
            exact = all(
                torch.equal(v[t.owned_mask()], s[t.owned_mask()])
                for t in tensors
                for v, s in zip(
                    [t.param.detach()] + [opt.state[t.param][k] for k in ("exp_avg", "exp_avg_sq")], snap[t.name]
                )
            )
            gained = sum(
                int((t.owned_mask() & ~owned_before[t.name]).sum()) for t in tensors
            )  # entries this rank now owns that it did not
            rec["moves"].append(
                {
                    "numbers": numbers,
                    "exact": exact,
                    "gained_entries": gained,
                    "replaced": len(replaced),
                    "freed": freed,
                }
            )
            if placement is not None:
                rec.setdefault("placement_moved", []).append(_placement_record(states))
        rec["owners"].append([st.ep.own.owner for st in states])
        rec.setdefault("engine_experts", []).append([st.engine.num_experts for st in states])
    adapter.sync(pm, tensors)
    adapter.sync_optimizer(opt, tensors)
    rec["final"] = {t.name: t.param.detach().clone() for t in tensors}
    rec["final_opt"] = {
        t.name: [opt.state[t.param][k].clone() for k in ("exp_avg", "exp_avg_sq")] + [float(opt.state[t.param]["step"])]
        for t in tensors
    }
    rec["eval"] = C.eval_loss(pm)
    _save_adapter(pm, os.path.join(out, f"adapter{tag}_{every}"), rank)
    if rb is not None and placement is not None:  # mid-step: refused on every rank before any collective
        b = C.batch(0, 0, rank)
        pending = pm(input_ids=b, labels=b).loss  # its backward is still to come
        try:
            rb.rebalance(opt)
            rec["refused_mid_step"] = None
        except RuntimeError as e:
            rec["refused_mid_step"] = str(e)
        del pending
    torch.save(C._cpu(rec), os.path.join(out, f"rb{tag}{every}_{rank}.pt"))


def resume_worker(rank: int, world: int, store: str, out: str, data_parallel: str = "ddp") -> None:
    """Resume after a move: the run of rebalance_train_worker(every=1) stopped after step 2 (its
    gathered adapter and optimizer state saved as moetune train's checkpoint does: under FSDP2 as
    full tensors), then a fresh model (ownership by index again) loads them (FSDP2: cut to this rank's
    shards) and takes step 3 (rebalancing again): losses and the final adapter recorded for the
    comparison with the uninterrupted run."""

    from moetune.parallel import ExpertParallel, adapter, fsdp, grads
    from moetune.parallel.cpus import rank_context
    from moetune.parallel.rebalance import Rebalancer
    from moetune.parallel.rebalance_options import RebalanceOptions

    C.init(rank, world, store)
    ep = ExpertParallel.from_group(dist.new_group(list(range(world))))
    ctx = rank_context(rank, world)
    ckpt = os.path.join(out, "ckpt")

    losses = []

    def step_(step, ddp, tensors, params, opt):
        for m in range(C.ACCUM):
            b = C.batch(step, m, rank)
            with _sync_unless(ddp, m == C.ACCUM - 1):
                o = ddp(input_ids=b, labels=b)
                (o.loss / C.ACCUM).backward()
            losses.append(o.loss.item())
        grads.scale_expert_grads(tensors, world)
        grads.clip_grad_norm_(params, 1.0, tensors)
        opt.step()
        opt.zero_grad(set_to_none=True)

    fsdp2 = data_parallel == "fsdp2"
    pm, tensors, ddp, params, opt = _build(ctx, ep, data_parallel=data_parallel)
    rb = Rebalancer(pm, RebalanceOptions(1, 0.0))
    moved = 0
    for step in range(2):
        step_(step, ddp, tensors, params, opt)
        moved += rb.maybe(step + 1, opt)["moved_experts"]
    adapter.sync(pm, tensors)  # what moetune train's checkpoint does (Distributed.sync)
    adapter.sync_optimizer(opt, tensors)
    opt_state = fsdp.full_optimizer_state(opt) if fsdp2 else opt.state_dict()
    _save_adapter(pm, ckpt, rank)
    if rank == 0:
        torch.save(opt_state, os.path.join(out, "opt.pt"))
    dist.barrier()
    del pm, tensors, ddp, params, opt, rb, opt_state
    pm, tensors, ddp, params, opt = _build(ctx, ep, ckpt, data_parallel)
    (fsdp.ShardingOptimizer(opt) if fsdp2 else opt).load_state_dict(torch.load(os.path.join(out, "opt.pt")))
    rb = Rebalancer(pm, RebalanceOptions(1, 0.0))
    step_(2, ddp, tensors, params, opt)
    moved_after = rb.maybe(3, opt)["moved_experts"]
    adapter.sync(pm, tensors)
    final = {t.name: t.param.detach().clone() for t in tensors}
    torch.save(
        {"loss": losses, "final": final, "moved": moved, "moved_after": moved_after},
        os.path.join(out, f"resume{rank}.pt"),
    )
    dist.barrier()
    dist.destroy_process_group()
