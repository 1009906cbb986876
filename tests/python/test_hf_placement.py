"""Expert placement wired into moetune.hf.patch / load_model / moetune train / HF Trainer.

The GPU path runs here on its CPU stand-in (PlacementOptions(device="cpu")): the same code, CPU
tensors. Plans: "gpu" (the Scheduler in mode "gpu": every routed expert on the GPU side, resident
where the residency policy made it so, else streamed) and "mixed" (every third expert on the CPU
engine, the others on the GPU, resident where held: a fixed planner standing in for the
scheduler's decisions, with the scheduler still observing, so metrics and residency run as in
training). Residency: a GPU budget of 6 experts (of 16), warm-up 1 step, refresh every step.

Tolerances (u = 2^-8). A model whose experts run (partly) on the GPU path is held to the fp32
reference with the GPU path's table (tests/python/placement_cases.TOL_C_GPU, derived from
gpu_math.py's count of bf16 roundings: 4 more than the CPU engine's for out, dA and dx), so the
test_hf_exactness tolerances grow by 4 u: logits and loss 8 -> 12 u, LoRA gradients 14 -> 18 u,
20 AdamW steps 16 -> 20 u. Against the CPU-only path (itself within the CPU table of the
reference) the difference is within the sum of the two: logits 20 u, gradients 32 u.
The "cpu" placement is moetune's CPU path: bit-identical.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from test_hf_exactness import (  # noqa: E402
    CHECKPOINTING,
    LORA,
    U,
    batch,
    build,
    check_one_step,
    check_trajectory,
    ctx,
    lora_grads,
    lora_init_,
    peft_pair,
    rel_fro,
    rel_max,
)
from test_hf_gptoss import build as build_gptoss  # noqa: E402

import moetune  # noqa: E402
import moetune.hf  # noqa: E402
import moetune.hf.placement as hf_placement  # noqa: E402
from moetune.hf.patching import experts_state  # noqa: E402
from moetune.placement import FixedPlanner, Where  # noqa: E402

GPU_LOGITS, GPU_GRAD, GPU_TRAJ = 12 * U, 18 * U, 20 * U
VS_CPU_LOGITS, VS_CPU_GRAD = (8 + 12) * U, (14 + 18) * U
EXPERT_BYTES = 3 * 64 * 32 * 2  # one decoded expert of the tiny models (H = 64, I = 32, bf16)
BUDGET_GIB = 6 * EXPERT_BYTES / 2**30
FAMILIES = ["qwen3_moe", "gpt_oss"]
PLANS = ["gpu", "mixed"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """On the stand-in the GPU side's torch ops run on the CPU while the engine's job runs: with
    torch's OpenMP pool over the same (2, CI) cores, its spinning barriers stall behind the
    engine (50x slower steps here). One torch thread: the two sides share the cores cleanly."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def stand_in(mode="gpu", **kw) -> moetune.PlacementOptions:
    """The GPU path on its CPU stand-in, default coefficients, residency from the first step."""
    kw = {"gpu_budget_gib": BUDGET_GIB, "warmup_steps": 1, "refresh_every": 1, "calibrate": False, **kw}
    return moetune.PlacementOptions(mode=mode, device="cpu", **kw)


def base_model(family, seed=0):
    return build_gptoss(seed) if family == "gpt_oss" else build(family, seed)


class MixedPlanner:
    """Every third expert on the CPU engine, the others on the GPU (resident where held, else
    streamed); observations go to the placement's scheduler (metrics, residency, correction)."""

    def __init__(self, scheduler):
        self.fixed = FixedPlanner(self.where)
        self.scheduler = scheduler

    @staticmethod
    def where(_key, counts, resident):
        return torch.tensor(
            [
                int(Where.CPU)
                if e % 3 == 0
                else int(Where.GPU_RESIDENT)
                if bool(resident[e])
                else int(Where.GPU_STREAMED)
                for e in range(counts.numel())
            ],
            dtype=torch.int8,
        )

    def plan(self, key, counts, resident):
        return self.fixed.plan(key, counts, resident)

    def observe(self, key, plan, timings):
        self.scheduler.observe(key, plan, timings)


def use_plan(handle, plan: str, resident=(1, 2, 4)) -> None:
    """Starts the placement on the stand-in, makes `resident` experts of every layer resident,
    and installs the plan's planner."""
    pl = handle.placement
    assert pl.start("cpu") == "gpu"
    for layer in pl.layers:
        mask = torch.zeros(layer.engine.num_experts, dtype=torch.bool)
        mask[list(resident)] = True
        layer.gpu.set_resident(mask)
    if plan == "mixed":
        pl.planner = MixedPlanner(pl.scheduler)


def placed_pair(family, plan, *, patch_first=True, **patch_kw):
    ref, ours, handle = peft_pair(base_model(family), patch_first=patch_first, placement=stand_in(), **patch_kw)
    use_plan(handle, plan)
    return ref, ours, handle


def step_numbers(handle):
    return handle.placement.end_step()


# ---------------------------------------------------------------------------- options


def test_placement_options_defaults_validation_and_resolution():
    from moetune.placement.experts import GpuOptions
    from moetune.placement.residency import ResidencyPolicy

    o = moetune.PlacementOptions()
    assert (o.mode, o.gpu_budget_gib, o.device, o.trace) == ("auto", None, None, None)
    assert o.staging_buffers == GpuOptions().stream_buffers
    pol = ResidencyPolicy(object(), budget=1.0)
    assert (o.refresh_every, o.warmup_steps, o.max_tokens) == (pol.refresh_every, pol.warmup_steps, pol.max_tokens)
    assert moetune.PlacementOptions.resolve("gpu").mode == "gpu"
    assert moetune.PlacementOptions.resolve({"mode": "cpu", "gpu_budget_gib": 2}).gpu_budget_gib == 2.0
    assert moetune.PlacementOptions.resolve(None) == o
    assert moetune.PlacementOptions.resolve(o, mode="cpu").mode == "cpu"
    assert moetune.PlacementOptions(device=torch.device("cpu")).device == "cpu"
    for bad, match in [
        (dict(mode="tpu"), "mode must be one of auto, cpu, gpu"),
        (dict(gpu_budget_gib=-1), "gpu_budget_gib must be a number >= 0"),
        (dict(gpu_budget_gib=float("nan")), "gpu_budget_gib"),
        (dict(device="meta"), "device must be"),
        (dict(device="nonsense"), "device must be"),
        (dict(staging_buffers=0), "staging_buffers must be an integer >= 1"),
        (dict(refresh_every=0), "refresh_every"),
        (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
        (dict(max_tokens=1.5), "max_tokens"),
        (dict(calibrate="yes"), "calibrate must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            moetune.PlacementOptions(**bad)
    with pytest.raises(TypeError, match="unknown placement option"):
        moetune.PlacementOptions.resolve({"budget": 1})
    with pytest.raises(TypeError, match="placement must be"):
        moetune.PlacementOptions.resolve(3)
    # The one place "auto" meets the environment.
    assert moetune.PlacementOptions(mode="cpu", device="cpu").resolve_mode("cpu") == ("cpu", None)
    assert moetune.PlacementOptions().resolve_mode("cpu") == ("cpu", None)
    assert moetune.PlacementOptions(device="cpu").resolve_mode("cpu") == ("auto", torch.device("cpu"))
    assert moetune.PlacementOptions(mode="gpu", device="cpu").resolve_mode("cuda") == ("gpu", torch.device("cpu"))
    with pytest.raises(ValueError, match="mode 'gpu' needs the model on a CUDA device"):
        moetune.PlacementOptions(mode="gpu").resolve_mode("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
            moetune.PlacementOptions().resolve_mode("cuda")


def test_bad_placement_is_refused_before_patching():
    model = build("qwen3_moe")
    with pytest.raises(ValueError, match="placement mode must be"):
        moetune.hf.patch(model, ctx=ctx(), placement="everywhere")
    assert not any(experts_state(m) for m in model.modules())


# ---------------------------------------------------------------------------- the CPU path


@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_placement_is_the_cpu_path_bit_for_bit(family, monkeypatch):
    """placement "cpu" (and "auto" without CUDA) runs moetune.moe_experts exactly as a model
    without any placement: identical logits and LoRA gradients, the placed op never called."""

    def no_placed(*a, **k):
        raise AssertionError("the placed op ran for a CPU placement")

    monkeypatch.setattr(hf_placement, "placed_moe_experts", no_placed)
    modes = ["cpu"] + ([] if torch.cuda.is_available() else ["auto"])
    runs = {}
    for mode in [None] + modes:
        ref, ours, handle = peft_pair(base_model(family), patch_first=True, placement=mode or "cpu")
        if mode is None:  # today's path: no placement object at all
            for m in handle._modules:
                experts_state(m).placement = None
        ids = batch()
        out = ours(input_ids=ids, labels=ids)
        out.loss.backward()
        runs[mode] = (out.logits.detach(), lora_grads(ours))
        if mode is not None:
            assert handle.placement.mode == "cpu" and not handle.placement.active
            assert handle.placement.end_step() == {}
            assert handle.placement.adopt_lora(ours) == 0
        handle.undo()
    for mode in modes:
        assert torch.equal(runs[mode][0], runs[None][0]), mode
        assert runs[mode][1].keys() == runs[None][1].keys()
        for n, g in runs[None][1].items():
            assert torch.equal(runs[mode][1][n], g), (mode, n)


# ---------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("patch_first", [True, False], ids=["patch_then_peft", "peft_then_patch"])
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_matches_reference_and_cpu_path(family, plan, patch_first):
    ref, ours, handle = placed_pair(family, plan, patch_first=patch_first)
    got = check_one_step(ref, ours, f"{family} {plan}", tol_logits=GPU_LOGITS, tol_grad=GPU_GRAD)
    n = step_numbers(handle)
    assert n["placement_tokens_resident"] > 0 and n["placement_tokens_streamed"] > 0
    assert (n["placement_tokens_cpu"] > 0) == (plan == "mixed")
    ref2, cpu, h2 = peft_pair(base_model(family), patch_first=patch_first, placement="cpu")
    want = check_one_step(ref2, cpu, f"{family} cpu")
    assert rel_max(got["logits"], want["logits"]) <= VS_CPU_LOGITS
    for name, g in want["grads"].items():
        assert rel_fro(got["grads"][name], g) <= VS_CPU_GRAD, name
    handle.undo()
    h2.undo()


TRAJECTORIES = [(f, p) for f in FAMILIES for p in PLANS]


@pytest.mark.parametrize(**CHECKPOINTING)
@pytest.mark.parametrize("family,plan", TRAJECTORIES, ids=[f"{f}-{p}" for f, p in TRAJECTORIES])
def test_training_trajectory(family, plan, checkpointing, monkeypatch):
    """20 AdamW steps with the placement's end_step after each (residency refreshed every step:
    experts move between resident and streamed while training), checkpointing off / on."""
    ref, ours, handle = placed_pair(family, plan)
    steps = []
    check_trajectory(
        ref,
        ours,
        checkpointing,
        monkeypatch,
        f"{family} {plan}",
        counted=(hf_placement, "placed_moe_experts"),
        tol=GPU_TRAJ,
        after_step=lambda: steps.append(handle.placement.end_step()),
    )
    assert len(steps) == 20
    total = {k: sum(s[k] for s in steps) for k in steps[0] if k.startswith("placement_tokens")}
    assert total["placement_tokens_resident"] > 0 and total["placement_tokens_streamed"] > 0
    assert (total["placement_tokens_cpu"] > 0) == (plan == "mixed")
    assert max(s["placement_resident_held_bytes"] for s in steps) <= BUDGET_GIB * 2**30
    handle.undo()


def test_grad_accumulation(monkeypatch):
    """Two micro-batches accumulated before one step: every LoRA gradient as the reference's."""
    ref, ours, handle = placed_pair("qwen3_moe", "mixed")
    for m in (ref, ours):
        m.train()
        for seed in (11, 12):
            ids = batch(seed=seed)
            (m(input_ids=ids, labels=ids).loss / 2).backward()
    g_ref, g = lora_grads(ref), lora_grads(ours)
    assert g.keys() == g_ref.keys()
    for n in g_ref:
        assert rel_fro(g[n], g_ref[n]) <= GPU_GRAD, n
    n = step_numbers(handle)
    assert n["placement_calls"] == 2 * 2 * 2  # 2 layers x 2 micro-batches x (forward + backward)
    handle.undo()


@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 32)])
def test_quantized_experts_match_the_cpu_engine(fmt, group):
    """int8 / int4 experts on the GPU path (decoded from the engine's own packed bytes) compute
    what the CPU engine computes from the same dq(q(W)), within the two tables."""
    got, want = {}, {}
    for name, placement in (("placed", stand_in()), ("cpu", "cpu")):
        _, ours, handle = peft_pair(
            base_model("qwen3_moe"), patch_first=True, placement=placement, weight_format=fmt, group_size=group
        )
        if name == "placed":
            use_plan(handle, "mixed")
        lora_init_(ours)
        ids = batch()
        out = ours(input_ids=ids, labels=ids)
        out.loss.backward()
        (got if name == "placed" else want).update(logits=out.logits.detach(), grads=lora_grads(ours))
        handle.undo()
    assert rel_max(got["logits"], want["logits"]) <= VS_CPU_LOGITS
    for n, g in want["grads"].items():
        assert rel_fro(got["grads"][n], g) <= VS_CPU_GRAD, n


# ---------------------------------------------------------------------------- load_model, undo, LoRA


def test_load_model_with_placement(tmp_path):
    from ckpt_util import state_dict_of, to_layout, write_checkpoint

    ref = build("qwen3_moe")
    folder = write_checkpoint(tmp_path / "c", to_layout(state_dict_of(ref), "per_expert", "qwen3_moe"), ref.config)
    runs = {}
    for name, placement in (("placed", stand_in()), ("cpu", "cpu")):
        model = moetune.load_model(folder, dtype=torch.float32, ctx=ctx(), progress=False, placement=placement)
        handle = model.moetune_handle
        assert handle.placement.options == moetune.PlacementOptions.resolve(placement)
        assert [l.key for l in handle.placement.layers] == [0, 1]
        pm = peft.get_peft_model(model, peft.LoraConfig(**LORA))
        lora_init_(pm)
        if name == "placed":
            use_plan(handle, "mixed")
            assert handle.placement.adopt_lora(pm) == 0  # the stand-in's device is where the LoRA is
        pm.train()
        ids = batch()
        out = pm(input_ids=ids, labels=ids)
        out.loss.backward()
        runs[name] = (out.logits.detach(), lora_grads(pm), handle.placement.end_step())
    (lp, gp, n), (lc, gc, nc) = runs["placed"], runs["cpu"]
    assert nc == {} and n["placement_tokens_cpu"] > 0 and n["placement_tokens_streamed"] > 0
    assert rel_max(lp, lc) <= VS_CPU_LOGITS
    for k, g in gc.items():
        assert rel_fro(gp[k], g) <= VS_CPU_GRAD, k


def test_undo_drops_the_placement():
    ref, ours, handle = placed_pair("qwen3_moe", "gpu")
    ids = batch()
    ours(input_ids=ids)
    mods = list(handle._modules)
    handle.undo()
    assert handle.placement is None and all(experts_state(m) is None for m in mods)
    with torch.no_grad():
        assert rel_max(ours(input_ids=ids).logits, ref(input_ids=ids).logits) <= 1e-6  # the original weights


def test_end_step_metrics_trace_and_residency(tmp_path):
    """end_step's numbers (per placement, busy times, residency within the budget), the progress
    text, and a trace of the last `trace_steps` steps with the CPU engine and the GPU lanes."""
    path = tmp_path / "trace.json"
    ref, ours, handle = peft_pair(
        base_model("qwen3_moe"), patch_first=True, placement=stand_in(trace=str(path), trace_steps=2)
    )
    use_plan(handle, "mixed")
    ours.train()
    rows = []
    for step in range(4):
        ids = batch(seed=20 + step)
        ours(input_ids=ids, labels=ids).loss.backward()
        rows.append(handle.placement.end_step())
    for n in rows:
        assert n["placement_calls"] == 4 and n["placement_experts_cpu"] > 0
        assert n["placement_cpu_s"] > 0 and n["placement_gpu_s"] > 0 and n["placement_wall_s"] > 0
        assert n["placement_resident_held_bytes"] <= n["placement_resident_budget"] == int(BUDGET_GIB * 2**30)
        assert 0 < n["placement_gpu_token_share"] < 1
        # bf16: an expert's stored bytes are its decoded bytes
        assert n["placement_bytes_copied"] > 0 and n["placement_bytes_copied"] % EXPERT_BYTES == 0
    assert rows[-1]["placement_resident_experts"] > 0  # the policy picked residents (refresh every step)
    assert handle.placement.last_progress.startswith("gpu ")
    assert handle.placement.write_trace() == str(path)
    events = json.loads(path.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    lanes = {(e["pid"], e["tid"]) for e in spans}
    assert {(1, 1), (1, 2), (2, 1), (2, 2)} <= lanes  # python, CPU engine, GPU compute, GPU copy
    python_spans = [e for e in spans if (e["pid"], e["tid"]) == (1, 1)]
    assert len(python_spans) == 2 * 4  # the last 2 steps: 2 layers x (forward + backward)
    assert all(e["dur"] >= 0 for e in spans)
    handle.undo()


def test_scheduler_auto_mode_trains_on_the_stand_in():
    """mode "auto" with the scheduler's own decisions (default coefficients): trains, and every
    call's plan is the scheduler's (no fixed planner)."""
    ref, ours, handle = peft_pair(base_model("qwen3_moe"), patch_first=True, placement=stand_in(mode="auto"))
    ours.train()
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    ids = batch(seed=100)
    for _ in range(5):
        opt.zero_grad()
        loss = ours(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
        n = handle.placement.end_step()
        assert n["placement_calls"] >= 2 and n["placement_predicted_s"] > 0  # all-CPU plans: forward only
    assert handle.placement.planner is handle.placement.scheduler
    assert losses[-1] < losses[0]
    handle.undo()


def test_calibration_is_measured_then_cached(tmp_path):
    """calibrate=True measures the CPU engine and the (stand-in) GPU path at start-up; a second
    model of the same shape on this machine reads the calibration cache instead."""
    got = []
    for _ in range(2):
        _, ours, handle = peft_pair(
            base_model("qwen3_moe"),
            patch_first=True,
            placement=stand_in(calibrate=True, calibration_cache_dir=str(tmp_path)),
        )
        handle.placement.start("cpu")
        got.append((list(handle.placement.calibration.values()), dict(handle.placement.cost_models)))
        handle.undo()
    assert got[0][0] == ["measured"] and got[1][0] == ["cached"]
    ((shape, model),) = got[0][1].items()
    assert got[1][1][shape].coefficients == model.coefficients
    c = model.coefficients
    assert c.forward.cpu_token > 0 and c.backward.cpu_token > 0
    assert c != moetune.placement.cost.CostCoefficients.defaults(shape)  # measured, not the defaults
    assert len(list(tmp_path.glob("calibration-*.json"))) == 1


# ---------------------------------------------------------------------------- moetune train, Trainer


def _train_cfg(tmp_path, **kw):
    from moetune.demo import DEMO_DEFAULTS
    from moetune.train.config import make_config
    from moetune.train.demo_model import demo_data_path

    lines = open(demo_data_path()).read().splitlines()[:32]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    settings = dict(
        max_steps=3,
        micro_batch_size=4,
        grad_accum=2,
        lora_rank=4,
        lora_alpha=8.0,
        lr=3e-3,
        shuffle=False,
        eval_fraction=0.0,
        save_every=0,
        eval_every=0,
        progress=False,
        tensorboard=False,
        plot=False,
        sample_prompts=[],
        engine_threads=1,
        max_length=48,
        dtype="float32",
    )
    return make_config(None, {**settings, "data": str(data), **kw}, base=DEMO_DEFAULTS)


@pytest.fixture()
def stand_in_train(monkeypatch):
    """moetune train's placement on the CPU stand-in (the test-only hook: the run's
    PlacementOptions with device="cpu", default coefficients)."""
    from moetune.train import model as model_mod

    real = model_mod.placement_options
    monkeypatch.setattr(model_mod, "placement_options", lambda cfg: real(cfg).replace(device="cpu", calibrate=False))


def test_moetune_train_with_gpu_placement(tmp_path, stand_in_train):
    pytest.importorskip("datasets")
    from moetune.train.loop import train

    trace = tmp_path / "trace.json"
    said = []
    s = train(
        _train_cfg(tmp_path, output_dir=str(tmp_path / "gpu"), expert_placement="gpu", placement_trace=str(trace)),
        say=said.append,
    )
    cpu = train(_train_cfg(tmp_path, output_dir=str(tmp_path / "cpu"), expert_placement="cpu"), say=lambda *a: None)
    assert any(x.startswith("experts: placement gpu between the CPU engine and cpu") for x in said), said
    recs = [json.loads(l) for l in open(tmp_path / "gpu" / "metrics.jsonl")]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert len(train_recs) == 3
    for r in train_recs:
        assert r["placement_tokens_streamed"] > 0 and r["placement_tokens_cpu"] == 0
        assert r["placement_calls"] == 2 * 2 * 2 and r["placement_gpu_s"] > 0
    assert s["placement"]["mode"] == "gpu" and s["placement"]["gpu_token_share"] == 1.0
    assert s["placement_trace"] == str(trace)
    events = json.loads(trace.read_text())["traceEvents"]
    assert {(e["pid"], e["tid"]) for e in events if e["ph"] == "X"} >= {(1, 1), (2, 1), (2, 2)}
    assert cpu["placement"] is None
    assert not any(k.startswith("placement_") for r in open(tmp_path / "cpu" / "metrics.jsonl") for k in json.loads(r))
    # The first step's loss (before any update) within the GPU path's logits tolerance of the CPU run's.
    assert abs(s["losses"][0] - cpu["losses"][0]) <= VS_CPU_LOGITS * abs(cpu["losses"][0])
    assert s["losses"][-1] < s["losses"][0] and os.path.isdir(tmp_path / "gpu" / "adapter")


def test_hf_trainer_with_placement_callback(tmp_path, stand_in_train):
    """HF Trainer + moetune.hf.PlacementCallback on the stand-in GPU placement: the same losses as
    `moetune train` with that placement (same arithmetic in the same order), one end_step per
    optimizer step (after gradient accumulation), the numbers in the callback's history / file."""
    pytest.importorskip("datasets")
    import datasets
    from test_train_trainers import args_kw, recording, step_losses

    from moetune.train import data
    from moetune.train.loop import train
    from moetune.train.model import apply_lora, load_base, load_tokenizer

    cfg = _train_cfg(tmp_path, output_dir=str(tmp_path / "moetune"), expert_placement="gpu", dtype="bfloat16")
    want = train(cfg, say=lambda *a: None)["losses"]
    tok = load_tokenizer(cfg)
    model, handle = load_base(cfg, torch.device("cpu"), len(tok))
    pm = apply_lora(model, cfg, handle)
    train_s, _, _, _ = data.prepare(cfg, tok, cfg.data)
    ds = datasets.Dataset.from_dict(train_s)

    def collator(feats):
        return data.collate([[(f["input_ids"], f["labels"])] for f in feats], tok.pad_token_id, packing=False)

    cb = moetune.hf.PlacementCallback(handle, metrics_path=str(tmp_path / "placement.jsonl"))
    Rec = recording(transformers.Trainer)
    Rec.micro = []
    t = Rec(
        model=pm,
        args=transformers.TrainingArguments(**args_kw(cfg, tmp_path / "hf"), remove_unused_columns=False),
        train_dataset=ds,
        data_collator=collator,
        callbacks=[cb],
    )
    t.train()
    got = step_losses(Rec.micro, cfg.grad_accum)
    assert handle.placement.mode == "gpu"
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-6 * abs(b), (got, want)
    assert [r["step"] for r in cb.history] == [1, 2, 3]
    assert all(r["placement_calls"] == 2 * 2 * 2 and r["placement_tokens_streamed"] > 0 for r in cb.history)
    assert len(open(tmp_path / "placement.jsonl").read().splitlines()) == 3
    logged = [h for h in t.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(h["placement_gpu_token_share"] == 1.0 for h in logged)


# ---------------------------------------------------------------------------- CUDA (the GPU machine)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU test machine)")


def _no_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@cuda
@pytest.mark.parametrize("mode", ["auto", "gpu"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_one_step_matches_reference(family, mode):
    """The model on CUDA, "auto" (calibrated on this machine) and "gpu": the expert LoRA moves to
    the GPU with adopt_lora; logits, loss and every LoRA grad (on CUDA) within the GPU tolerances."""
    from test_hf_exactness import check_on_cuda

    _no_tf32()
    ref, ours, handle = peft_pair(
        base_model(family), patch_first=True, placement=moetune.PlacementOptions(mode=mode, gpu_budget_gib=BUDGET_GIB)
    )
    ours.to("cuda")
    # Module.to already moved every parameter, the expert LoRA included: adopt_lora starts the
    # placement on the model's device and has nothing left to move.
    assert handle.placement.adopt_lora(ours) == 0
    assert handle.placement.device.is_cuda and handle.placement.mode == mode
    assert all(p.device.type == "cuda" for n, p in ours.named_parameters() if "lora_" in n)
    check_on_cuda(ref, ours, f"{family} {mode} on cuda", tol_logits=GPU_LOGITS, tol_grad=GPU_GRAD)
    n = handle.placement.end_step()
    # 2 layers: forward + backward each; an all-CPU plan reports its forward only (moe_experts).
    assert handle.placement.device.is_cuda and n["placement_calls"] >= 2
    if mode == "gpu":
        assert n["placement_tokens_cpu"] == 0 and n["placement_calls"] == 4
    assert n["placement_gpu_peak_bytes"] > 0
    handle.undo()


@cuda
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_cuda_trajectory_with_checkpointing(use_reentrant):
    """20 AdamW steps on CUDA (mixed plan, residency refreshed every step, checkpointing: the
    recompute's streamed experts kept for the backward) against the fp32 CPU reference."""
    _no_tf32()
    ref, ours, handle = peft_pair(
        base_model("qwen3_moe"),
        patch_first=True,
        placement=moetune.PlacementOptions(
            mode="gpu", gpu_budget_gib=BUDGET_GIB, warmup_steps=1, refresh_every=1, calibrate=False
        ),
    )
    ours.to("cuda")
    for m in (ref, ours):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    handle.placement.adopt_lora(ours)
    handle.placement.planner = MixedPlanner(handle.placement.scheduler)
    assert handle.placement.scheduler.backward_copies is False  # checkpointing + keep slot
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ref, ours)]
    ids = batch(seed=100)
    losses = ([], [])
    for _ in range(20):
        for m, opt, rec, x in zip((ref, ours), opts, losses, (ids, ids.cuda())):
            opt.zero_grad()
            loss = m(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            rec.append(loss.item())
        handle.placement.end_step()
    lr, lo = torch.tensor(losses[0]), torch.tensor(losses[1])
    assert lr[-1] < lr[0] - 0.05
    assert ((lo - lr).abs() / lr.abs()).max().item() <= GPU_TRAJ
    handle.undo()


@cuda
def test_cuda_moetune_train_auto_placement(tmp_path):
    """moetune train on CUDA with the default placement (auto: calibrated, budget measured): the
    loss falls, metrics.jsonl has the placement numbers, the trace has the GPU lanes, the summary
    reports the GPU peak from the placement's probe."""
    pytest.importorskip("datasets")
    from moetune.train.loop import train

    trace = tmp_path / "trace.json"
    s = train(
        _train_cfg(
            tmp_path,
            output_dir=str(tmp_path / "run"),
            device="cuda",
            max_steps=30,
            dtype="bfloat16",
            placement_trace=str(trace),
            expert_cache_dir=None,
        ),
        say=lambda *a: None,
    )
    L = s["losses"]
    assert sum(L[-5:]) / 5 < sum(L[:3]) / 3
    assert s["placement"]["mode"] == "auto" and s["placement"]["device"].startswith("cuda")
    assert s["peak_gpu_bytes"] > 0
    recs = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl") if '"train"' in l]
    assert all("placement_gpu_token_share" in r for r in recs)
    events = json.loads(trace.read_text())["traceEvents"]
    lanes = {e["pid"] for e in events if e["ph"] == "X"}
    # The host lane always; the GPU lanes exactly when the scheduler put work there (on the tiny
    # test model a calibrated "auto" may well keep every expert on the CPU).
    assert 1 in lanes
    assert (2 in lanes) == any(r["placement_gpu_token_share"] > 0 for r in recs)


@cuda
def test_cuda_load_model_gpu_placement(tmp_path):
    from ckpt_util import state_dict_of, to_layout, write_checkpoint

    _no_tf32()
    ref = build("qwen3_moe")
    folder = write_checkpoint(tmp_path / "c", to_layout(state_dict_of(ref), "per_expert", "qwen3_moe"), ref.config)
    model = moetune.load_model(
        folder,
        device="cuda",
        dtype=torch.float32,
        ctx=ctx(),
        progress=False,
        placement=moetune.PlacementOptions(mode="gpu", calibrate=False),
    )
    pm = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    lora_init_(pm)
    assert model.moetune_handle.placement.adopt_lora(pm) > 0
    cpu = peft.get_peft_model(
        moetune.load_model(folder, dtype=torch.float32, ctx=ctx(), progress=False, placement="cpu"),
        peft.LoraConfig(**LORA),
    )
    cpu.load_state_dict({k: v.cpu() for k, v in pm.state_dict().items() if "lora_" in k}, strict=False)
    ids = batch()
    a = pm(input_ids=ids.cuda(), labels=ids.cuda())
    b = cpu(input_ids=ids, labels=ids)
    assert rel_max(a.logits.detach().cpu(), b.logits.detach()) <= VS_CPU_LOGITS
    a.loss.backward()
    b.loss.backward()
    ga, gb = lora_grads(pm), lora_grads(cpu)
    for n, g in gb.items():
        assert rel_fro(ga[n].cpu(), g) <= VS_CPU_GRAD, n
    assert model.moetune_handle.placement.end_step()["placement_tokens_cpu"] == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_device_map_with_placement(tmp_path):
    """Layers split over two GPUs: the experts of every layer compute on the first call's GPU."""
    from ckpt_util import state_dict_of, to_layout, write_checkpoint

    _no_tf32()
    ref = build("qwen3_moe")
    folder = write_checkpoint(tmp_path / "c", to_layout(state_dict_of(ref), "per_expert", "qwen3_moe"), ref.config)
    dm = {"": 0, "model.layers.1": 1, "model.norm": 1, "lm_head": 1}
    model = moetune.load_model(
        folder,
        device=dm,
        dtype=torch.float32,
        ctx=ctx(),
        progress=False,
        placement=moetune.PlacementOptions(mode="gpu", calibrate=False),
    )
    ids = batch()
    with torch.no_grad():
        got = model(input_ids=ids.cuda(0)).logits.cpu()
        want = ref(input_ids=ids).logits
    assert model.moetune_handle.placement.device.torch == torch.device("cuda", 0)
    assert rel_max(got, want) <= GPU_LOGITS


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_moetune_train_refuses_gpu_placement_without_cuda(tmp_path):
    from moetune.train.config import ConfigError
    from moetune.train.loop import train

    with pytest.raises(ConfigError, match="expert_placement='gpu': .*needs the model on a CUDA device"):
        train(
            _train_cfg(tmp_path, output_dir=str(tmp_path / "r"), expert_placement="gpu", device="cpu"),
            say=lambda *a: None,
        )


@pytest.mark.parametrize(**CHECKPOINTING)
def test_plan_per_step_trains_as_planned_per_call(checkpointing, monkeypatch):
    """PlacementOptions.plan_per_step: once every expert of a layer is resident and its last plan
    was all-GPU, end_step marks it planned per step and its calls take the sync-free path (no
    plan() per call). 6 AdamW steps: losses and every LoRA parameter bit-identical to the same
    run planned per call (the GEMMs per expert are the same)."""
    runs = {}
    for per_step in (True, False):
        _, ours, handle = peft_pair(
            base_model("qwen3_moe"), patch_first=True, placement=stand_in(gpu_budget_gib=1.0, plan_per_step=per_step)
        )
        use_plan(handle, "gpu", resident=range(8))
        pl = handle.placement
        plans = []
        real = pl.scheduler.plan
        monkeypatch.setattr(pl.scheduler, "plan", lambda *a, **k: plans.append(1) or real(*a, **k))
        ours.train()
        if checkpointing:
            ours.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
            )
        opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
        losses, numbers, in_step = [], [], []
        for step in range(6):
            ids = batch(seed=200 + step)
            n0 = len(plans)
            opt.zero_grad()
            loss = ours(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
            in_step.append(len(plans) - n0)
            numbers.append(pl.end_step())
        runs[per_step] = (losses, {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_" in n})
        if per_step:
            assert numbers[0]["placement_layers_planned_per_step"] == 2, numbers[0]
            assert all(n["placement_layers_planned_per_step"] == 2 for n in numbers)
            assert all(n["placement_tokens_resident"] > 0 and n["placement_tokens_streamed"] == 0 for n in numbers)
            # Step 1 planned its calls (nothing was steady yet), later steps none (mode "gpu": end_step
            # needs no plan either; mode "auto" plans once per layer there: test_placement_sync_free.py).
            assert in_step[0] == 2 and in_step[1:] == [0] * 5 and len(plans) == 2, in_step
        else:
            assert in_step == [2] * 6, in_step  # one plan per forward (the recompute and backward reuse it)
            assert "placement_layers_planned_per_step" not in numbers[0]
        handle.undo()
    (l1, p1), (l0, p0) = runs[True], runs[False]
    assert l1 == l0
    assert p1.keys() == p0.keys() and all(torch.equal(p1[n], p0[n]) for n in p0)
