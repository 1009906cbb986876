"""Workers of the expert-parallel tests (test_parallel_*.py): functions run in each of N
spawned processes (torch.multiprocessing, gloo over a file store), writing their results
to files that the test (one process) compares with the single-process runs."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

E, H, I, R = 5, 32, 16, 4  # E not divisible by 2: ownership 2 / 3
K = 2


def init(rank: int, world: int, store: str, timeout_s: float = 60.0, backend: str = "gloo") -> torch.device:
    """The process group of a spawned worker; returns where its tensors live (NCCL: cuda:rank)."""
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")


def nccl_ready(world: int = 2) -> bool:
    """NCCL and at least `world` CUDA devices (the NCCL cases skip otherwise)."""
    return dist.is_nccl_available() and torch.cuda.is_available() and torch.cuda.device_count() >= world


def _cpu(v):
    """Results to the CPU for torch.save (nested dicts / lists / tuples of tensors)."""
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    if isinstance(v, dict):
        return {k: _cpu(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_cpu(x) for x in v)
    return v


def spawn(fn, world: int, tmp_path, *args) -> None:
    """Runs fn(rank, world, store, *args) in `world` processes; raises if any fails."""
    import torch.multiprocessing as mp

    store = str(tmp_path / "store")
    mp.spawn(fn, args=(world, store, *args), nprocs=world, join=True)


# ---- one layer: EPLayer against the engine on every expert ----


def layer_weights(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = [(torch.randn(s, generator=g) * 0.2).bfloat16() for s in ((E, I, H), (E, I, H), (E, H, I))]
    lora = {}
    for p, (i, o) in {"gate": (H, I), "up": (H, I), "down": (I, H)}.items():
        lora[p] = ((torch.randn(E, R, i, generator=g) * 0.2), (torch.randn(E, o, R, generator=g) * 0.2))
    return W, lora


def layer_inputs(rank: int, case: str):
    """x [T, H] bf16, topk_ids [T, k], topk_weights fp32, upstream gradient, for one rank."""
    g = torch.Generator().manual_seed(100 + rank)
    T = 9 if rank == 0 else 6
    x = (torch.randn(T, H, generator=g)).bfloat16()
    if case == "random":
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    elif case == "skewed":
        # every token of every rank on experts 0 and 1 (rank 0's): rank 1 receives no token at
        # all and owns experts (2, 3, 4) that no token uses
        ids = torch.tensor([[0, 1]] * T) if rank == 1 else torch.tensor([[1, 0]] * T)
    else:
        raise KeyError(case)
    w = torch.rand(T, K, generator=g) + 0.1
    dout = torch.randn(T, H, generator=g)
    return x, ids, w, dout


def layer_worker(rank: int, world: int, store: str, case: str, out: str, backend: str = "gloo") -> None:
    import moetune
    from moetune.parallel import ExpertParallel
    from moetune.parallel.cpus import rank_context
    from moetune.parallel.layer import EPLayer

    dev = init(rank, world, store, backend=backend)
    ep = ExpertParallel.from_group()
    own = ep.ownership(0, E)
    W, lora = layer_weights()
    owned = torch.tensor(own.owned(rank))
    ctx = rank_context(rank, world)
    engine = moetune.MoEExperts(ctx, *(w[owned] for w in W))
    layer = EPLayer(ep, own)
    x, ids, w, dout = (t.to(dev) for t in layer_inputs(rank, case))
    x.requires_grad_(True)
    w.requires_grad_(True)
    leaves = {p: (a.to(dev).requires_grad_(True), b.to(dev).requires_grad_(True)) for p, (a, b) in lora.items()}
    lw = moetune.LoraWeights(**leaves, scaling=0.5)

    def compute(xr, lid, wr, ll):
        return moetune.moe_experts(engine, xr, lid, wr, ll)

    y = layer.forward(x, ids, w, lw, compute)
    (y.float() * dout).sum().backward()
    torch.save(
        _cpu(
            {
                "y": y.detach(),
                "dx": x.grad,
                "dw": w.grad,
                "dA": {p: a.grad for p, (a, b) in leaves.items()},
                "dB": {p: b.grad for p, (a, b) in leaves.items()},
                "owned": owned,
                "tokens_in": layer.tokens_in,
                "rows": layer.rows,
                "cpus": ctx.num_threads,
            }
        ),
        os.path.join(out, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


# ---- a tiny Qwen3-MoE trained with EP + DDP against one process ----

LORA = dict(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "v_proj"],
    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    lora_dropout=0.0,
)
STEPS, ACCUM, LR = 3, 2, 1e-2


def tiny_model(seed: int = 0):
    """test_hf_exactness's tiny Qwen3-MoE with 5 experts (uneven over 2 ranks): fp32, weights
    rounded to bf16 values, router logits x20 (top-k margins far above rounding)."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=E,
        head_dim=16,
        norm_topk_prob=True,
        use_cache=False,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(20.0)
            p.copy_(p.bfloat16().float())
    return model


def lora_model(adapter: str | None = None):
    import peft

    base = tiny_model()
    if adapter is not None:
        return peft.PeftModel.from_pretrained(base, adapter, is_trainable=True)
    pm = peft.get_peft_model(base, peft.LoraConfig(**LORA))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).bfloat16().float())
    return pm


def batch(step: int, micro: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randint(0, 128, (2, 8), generator=g)


EVAL = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def eval_loss(model, device="cpu") -> float:
    was = model.training
    model.eval()
    e = EVAL.to(device)
    loss = model(input_ids=e, labels=e).loss.item()
    model.train(was)
    return loss


def reference_run(out: str, world: int = 2) -> dict:
    """One process, every rank's micro-batches, DDP's loss convention; saves its adapter."""
    import moetune
    import moetune.hf

    pm = lora_model()
    moetune.hf.patch(pm, ctx=moetune.Context(num_threads=1))
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    rec = {"loss": [], "gnorm": [], "logits0": [], "grads0": None}
    for step in range(STEPS):
        for m in range(ACCUM):
            for r in range(world):
                b = batch(step, m, r)
                o = pm(input_ids=b, labels=b)
                (o.loss / (ACCUM * world)).backward()
                rec["loss"].append(o.loss.item())
                if step == 0 and m == 0:
                    rec["logits0"].append(o.logits.detach())
        if step == 0:
            rec["grads0"] = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
        rec["gnorm"].append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    rec["eval"] = eval_loss(pm)
    pm.save_pretrained(out)
    return rec


def train_worker(rank: int, world: int, store: str, out: str, ref_adapter: str, backend: str = "gloo") -> None:
    from contextlib import nullcontext

    from torch.nn.parallel import DistributedDataParallel as DDP

    import moetune.hf
    from moetune.parallel import ExpertParallel, adapter, grads
    from moetune.parallel.cpus import rank_context
    from moetune.parallel.expert_lora import expert_lora_tensors

    dev = init(rank, world, store, backend=backend)
    ep = ExpertParallel.from_group(dist.new_group(list(range(world))))
    ctx = rank_context(rank, world)
    pm = lora_model()
    moetune.hf.patch(pm, ctx=ctx, expert_parallel=ep)
    pm.to(dev)  # NCCL: the non-expert part on this rank's GPU (as moetune train does: patch, then .to)
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm.train()
    tensors = expert_lora_tensors(pm)
    grads.ddp_ignore(pm, tensors)
    ddp = DDP(pm, device_ids=[dev.index] if dev.type == "cuda" else None)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    rec = {"loss": [], "gnorm": [], "logits0": None, "grads0": None, "expert_names": [t.name for t in tensors]}
    for step in range(STEPS):
        for m in range(ACCUM):
            b = batch(step, m, rank).to(dev)
            with ddp.no_sync() if m < ACCUM - 1 else nullcontext():
                o = ddp(input_ids=b, labels=b)
                (o.loss / ACCUM).backward()
            rec["loss"].append(o.loss.item())
            if step == 0 and m == 0:
                rec["logits0"] = o.logits.detach()
        grads.scale_expert_grads(tensors, world)
        if step == 0:  # the full gradient: expert entries summed from their owners
            g0 = {}
            for n, p in pm.named_parameters():
                if p.requires_grad:
                    g = p.grad.clone()
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
    rec["eval"] = eval_loss(pm, dev)
    if rank == 0:
        pm.save_pretrained(os.path.join(out, "adapter_ep"))
    # 1 -> 2: the one-process adapter loaded with 2 ranks
    pm2 = lora_model(ref_adapter)
    moetune.hf.patch(pm2, ctx=ctx, expert_parallel=ep)
    pm2.to(dev)
    rec["eval_1to2"] = eval_loss(pm2, dev)
    rec["rows"] = [
        moetune.hf.patching.experts_state(m).ep.rows
        for m in moetune.hf.patching._find_experts(pm)[0]
        for m in [m.module]
    ]
    torch.save(_cpu(rec), os.path.join(out, f"train{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def load_worker(rank: int, world: int, store: str, path: str, out: str) -> None:
    """load_model with expert_parallel: this rank's experts only; logits of EVAL."""
    import moetune
    from moetune.hf import patching
    from moetune.parallel import ExpertParallel
    from moetune.parallel.cpus import rank_context

    init(rank, world, store)
    ep = ExpertParallel.from_group()
    model = moetune.load_model(path, ctx=rank_context(rank, world), expert_parallel=ep, progress=False)
    with torch.no_grad():
        logits = model(input_ids=EVAL).logits
    states = [patching.experts_state(f.module) for f in patching._find_experts(model)[0]]
    torch.save(
        {
            "logits": logits,
            "num_experts": [st.engine.num_experts for st in states],
            "packed": model.moetune_handle.packed_bytes,
            "owned": [st.ep.owned.tolist() for st in states],
        },
        os.path.join(out, f"load{rank}.pt"),
    )
    dist.destroy_process_group()
