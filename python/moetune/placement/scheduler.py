"""The per-step scheduler: routing counts of one layer call -> a LayerPlan (where each expert runs).

`Scheduler.plan(layer_key, counts, resident_mask)` puts every expert with pairs on the CPU engine,
on the GPU from its resident copy, or on the GPU from a streamed copy, so that the layer finishes
soonest under the cost model (cost.py): CPU and GPU work run at the same time and should end
together. Experts with 0 pairs cost nothing and are left on the CPU.

Objective: a plan made for a forward call is also what its backward uses (the CPU engine's saved
handle covers the experts it computed), so the objective is the sum of the predicted makespans of
the phases the call goes through (`phases`, default forward + backward; a checkpoint recompute
plans again, with the same counts, and gets the same plan when the coefficients did not move).

Search (vectorised with numpy over experts, phases and candidates; about 1.1-1.5 ms for E = 128
to 384 on the 2-core CI VM, where one trivial numpy operation costs ~1.8 us, a few times that
of a server core: benchmarks/bench_scheduler.py):
1. Candidate orders of the active experts: residents first then by count, by count alone, and by
   the CPU-time / GPU-time ratio. For each order every prefix (the first j experts on the GPU,
   the rest on the CPU) is evaluated at once from cumulative sums; the best prefix of the three
   orders is kept. Prefix 0 is the all-CPU plan, the full prefix the all-GPU plan, the residents
   prefix of the first order the residents-only plan.
2. Local improvement: the best single move (one expert CPU <-> GPU, all evaluated at once) is
   applied while it shortens the plan by at least 0.01%; when no single move does, the best
   exchange (one expert each way) among the 12 most promising of each side.
3. Under a binding streaming cap, the capped all-GPU plan is compared too; so the predicted time
   is never worse than the all-CPU, all-GPU and residents-only plans. Against exhaustive search
   (E <= 10, random machines): within 3%, on average within 0.2% (tests).
A cap on the streamed experts per call (`max_streamed`, the staging memory) is a hard constraint;
the all-GPU plan then streams the `max_streamed` busiest non-resident experts.
More pairs on a GPU expert keep it on the GPU with the reference machine's coefficients (tested);
this is not a law of the objective: for some random machines even the exhaustive optimum moves
a busier expert to the CPU (~1% of such cases), a knapsack effect of balancing two sides.

Modes: "auto" (the above), "cpu" (every expert on the CPU), "gpu" (every expert with pairs on the
GPU; streamed beyond `max_streamed` stay on the CPU).

Per step instead of per call (`steady` / `refresh_steady`): a layer whose experts are all
resident, and whose plan for its last observed forward routing put every expert on the GPU, is
"steady" until the next refresh_steady (ModelPlacement.end_step, PlacementOptions.plan_per_step):
its calls skip plan() and the routing-count host sync (op.py's sync-free path), at the price of
a plan made from the previous step's routing rather than this call's.
`forget(layer_key)` drops a layer's cost-model choice, last routing and steady flag when its
experts are replaced (ModelPlacement.replace_engine): planned per call until the next refresh.

`observe(layer_key, plan, timings)` feeds the measured times to the online correction
(calibrate.OnlineCorrection), to the metrics aggregator and (forward calls) to the residency
policy, when those are attached.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch

from moetune.placement.cost import CostModel, _as_numpy, cost_phase, makespan_parts
from moetune.placement.plan import LayerPlan, Where

MODES = ("auto", "cpu", "gpu")
#: A local move must shorten the predicted time by this fraction: smaller gains are noise next to
#: the model's accuracy and would only cost search rounds.
_MIN_GAIN = 1e-4


class _Problem:
    """One plan() call's numbers, vectorised over phases (rows) and candidate placements
    (columns): the active experts, their per-phase costs, the per-phase constants."""

    def __init__(self, n_all, res_all, cols: dict[str, np.ndarray], weights: np.ndarray, staging: int, cap: int | None):
        """cols: CostModel.term_columns of the charged phases ([P, 1] each); weights [P, 1]."""
        self.ids = np.flatnonzero(n_all > 0)
        self.n = n_all[self.ids]
        self.res = res_all[self.ids]
        self.A = self.ids.size
        self.staging, self.cap = staging, cap
        self.w = weights
        self.cc, self.copy, self.slow, self.gc = cols["cpu_call"], cols["copy"], cols["slowdown"], cols["gpu_call"]
        n = self.n[None, :]
        res = self.res[None, :]
        # [P, A]: CPU seconds of each active expert; GPU compute seconds of each (resident or
        # streamed according to where its weights are), split by kind.
        self.cpu = cols["cpu_expert"] + cols["cpu_token"] * n
        gpu = cols["gpu_expert"] + cols["gpu_token"] * n
        self.gpu_res = np.where(res, gpu + cols["resident_extra"], 0.0)
        self.gpu_str = np.where(res, 0.0, gpu + cols["stream_extra"])
        self.str_f = (~self.res).astype(np.float64)
        self.cpu_total = self.cpu.sum(axis=1, keepdims=True)
        self.refs: dict[str, float] = {}

    def evaluate(self, n_cpu, X, R, G, m):
        """Objective of K candidate placements from their totals: n_cpu, m [K]; X, R, G [P, K].
        Returns (objective [K], (X_eff, Y, C) each [P, K])."""
        Xe, Y, C = makespan_parts(
            X + self.cc * (n_cpu > 0),
            R,
            G,
            m,
            n_cpu < self.A,
            copy=self.copy,
            slowdown=self.slow,
            gpu_call=self.gc,
            staging_buffers=self.staging,
        )
        obj = (self.w * np.maximum(Xe, Y)).sum(axis=0)
        if self.cap is not None:
            obj = np.where(m > self.cap, np.inf, obj)
        return obj, (Xe, Y, C)

    def totals(self, on_gpu):
        """Totals of K placements (bool [K, A], True = GPU): n_cpu, X, R, G, m."""
        g = on_gpu.astype(np.float64).T  # [A, K]
        return (
            self.A - g.sum(axis=0),
            self.cpu_total - self.cpu @ g,
            self.gpu_res @ g,
            self.gpu_str @ g,
            self.str_f @ g,
        )

    def objectives(self, on_gpu):
        return self.evaluate(*self.totals(on_gpu))[0]

    def best_prefix(self, orders):
        """Best placement among 'the first j experts of one of `orders` on the GPU' (j = 0..A, all
        orders at once, from cumulative sums). Records the all-CPU / all-GPU objectives."""
        idx = np.stack(orders)  # [O, A]
        O, A = idx.shape
        P = self.cpu.shape[0]

        def cum(a):  # [..., A] -> [..., A + 1] prefix sums starting at 0
            out = np.zeros(a.shape[:-1] + (A + 1,))
            np.cumsum(a, axis=-1, out=out[..., 1:])
            return out

        X = (self.cpu_total[:, :, None] - cum(self.cpu[:, idx])).reshape(P, -1)
        R = cum(self.gpu_res[:, idx]).reshape(P, -1)
        G = cum(self.gpu_str[:, idx]).reshape(P, -1)
        m = cum(self.str_f[idx]).reshape(-1)
        n_cpu = np.broadcast_to(A - np.arange(A + 1, dtype=np.float64), (O, A + 1)).reshape(-1)
        obj, _ = self.evaluate(n_cpu, X, R, G, m)
        k = int(np.argmin(obj))
        o, j = divmod(k, A + 1)
        on_gpu = np.zeros(A, dtype=bool)
        on_gpu[idx[o, :j]] = True
        self.refs["all_cpu"] = float(obj[0])
        if np.isfinite(obj[A]):  # the full prefix is the all-GPU plan unless the cap forbids it
            self.refs["all_gpu"] = float(obj[A])
        return on_gpu, float(obj[k])

    def improve(self, on_gpu, obj: float, max_rounds: int, swap_candidates: int):
        """Descent over two neighbourhoods: the best single move (one expert CPU <-> GPU, all A
        at once); when none improves, the best exchange (one GPU expert to the CPU and one CPU
        expert to the GPU) among the `swap_candidates` most promising of each side (those whose
        single move hurts least), which escapes the cap- and balance-bound local minima."""
        for _ in range(max_rounds):
            n_cpu0, X0, R0, G0, m0 = self.totals(on_gpu[None, :])
            sign = np.where(on_gpu, -1.0, 1.0)  # toggling expert i moves it onto (+) / off (-) the GPU
            cand, _ = self.evaluate(
                n_cpu0 - sign,
                X0 - sign * self.cpu,
                R0 + sign * self.gpu_res,
                G0 + sign * self.gpu_str,
                m0 + sign * self.str_f,
            )
            i = int(np.argmin(cand))
            if cand[i] < obj * (1.0 - _MIN_GAIN):
                on_gpu = on_gpu.copy()
                on_gpu[i] = not on_gpu[i]
                obj = float(cand[i])
                continue
            gi, ci = np.flatnonzero(on_gpu), np.flatnonzero(~on_gpu)
            if gi.size == 0 or ci.size == 0 or swap_candidates < 1:
                break
            # Most promising halves first (inf, a single move the cap forbids, sorts last but is
            # still a fine half of an exchange).
            gi = gi[np.argsort(cand[gi], kind="stable")[:swap_candidates]]
            ci = ci[np.argsort(cand[ci], kind="stable")[:swap_candidates]]

            def pair(a, gi=gi, ci=ci):  # a[:, i] - a[:, j] for each (i on the GPU, j on the CPU), flattened [P, Ki*Kj]
                return (a[:, gi, None] - a[:, None, ci]).reshape(a.shape[0], -1)

            d_str = (self.str_f[gi, None] - self.str_f[None, ci]).reshape(-1)
            pc, _ = self.evaluate(
                np.broadcast_to(n_cpu0, d_str.shape),
                X0 + pair(self.cpu),
                R0 - pair(self.gpu_res),
                G0 - pair(self.gpu_str),
                m0 - d_str,
            )
            k = int(np.argmin(pc))
            if not pc[k] < obj * (1.0 - _MIN_GAIN):
                break
            on_gpu = on_gpu.copy()
            on_gpu[gi[k // ci.size]] = False
            on_gpu[ci[k % ci.size]] = True
            obj = float(pc[k])
        return on_gpu, obj

    def all_gpu(self):
        """Every active expert on the GPU; beyond the streaming cap, the least busy non-resident
        experts stay on the CPU."""
        on_gpu = np.ones(self.A, dtype=bool)
        if self.cap is not None:
            streamed = np.flatnonzero(~self.res)
            if streamed.size > self.cap:
                by_count = streamed[np.argsort(-self.n[streamed], kind="stable")]
                on_gpu[by_count[self.cap :]] = False
        return on_gpu


class Scheduler:
    """Plans each layer call from its routing counts with a cost model per layer.

    cost_model: the CostModel of every layer (one shape), or a callable layer_key -> CostModel
    (models may be shared between layers of one shape: their online correction is then shared).
    `set_cost_model(layer_key, model)` overrides one layer.
    mode: "auto" | "cpu" | "gpu" (module docstring).
    phases: the call phases a plan is charged for, with weights (default forward + backward).
    backward_copies: whether a backward copies its streamed experts again (False when the GPU path
    keeps a streamed layer's weights from its forward/recompute to its backward).
    max_streamed: at most this many GPU_STREAMED experts in one plan (None: no cap), the staging
    memory's limit.
    correction: an OnlineCorrection factory (model -> corrector), None for the default
    (calibrate.OnlineCorrection with its defaults), False to disable the online correction.
    metrics: a metrics.PlacementMetrics to record observed calls into; residency: a
    residency.ResidencyPolicy fed with the counts of forward calls.
    Not thread-safe: calls may come from different threads (autograd's device threads run
    backward) but never at the same time.
    """

    def __init__(
        self,
        cost_model: CostModel | Callable[[Hashable], CostModel],
        *,
        mode: str = "auto",
        phases: Sequence[str] | Mapping[str, float] = ("forward", "backward"),
        backward_copies: bool = True,
        max_streamed: int | None = None,
        correction=None,
        metrics=None,
        residency=None,
        improve_rounds: int = 32,
        swap_candidates: int = 12,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if max_streamed is not None and int(max_streamed) < 0:
            raise ValueError(f"max_streamed must be >= 0 or None, got {max_streamed}")
        self.mode = mode
        self._default = cost_model
        self._models: dict[Hashable, CostModel] = {}
        self.phases = self._phase_weights(phases)
        self.backward_copies = bool(backward_copies)
        self.max_streamed = None if max_streamed is None else int(max_streamed)
        self.metrics = metrics
        self.residency = residency
        self.improve_rounds = int(improve_rounds)
        self.swap_candidates = int(swap_candidates)
        if correction is False:
            self._make_correction = None
        elif correction is None:
            from moetune.placement.calibrate import OnlineCorrection

            self._make_correction = OnlineCorrection
        else:
            self._make_correction = correction
        self._corrections: dict[int, object] = {}
        self._weight_cols: dict[tuple, tuple] = {}
        self._last_counts: dict[Hashable, torch.Tensor] = {}  # each layer's last forward routing
        self._steady: dict[Hashable, bool] = {}

    @staticmethod
    def _phase_weights(phases) -> dict[str, float]:
        items = phases.items() if isinstance(phases, Mapping) else ((p, 1.0) for p in phases)
        out = {}
        for p, w in items:
            cost_phase(p)  # validates the name
            if not (isinstance(w, (int, float)) and w > 0 and math.isfinite(w)):
                raise ValueError(f"phase weight of {p!r} must be a positive number, got {w!r}")
            out[p] = float(w)
        if not out:
            raise ValueError("phases must name at least one phase")
        return out

    # cost models --------------------------------------------------------------------------
    def cost_model(self, layer_key: Hashable) -> CostModel:
        m = self._models.get(layer_key)
        if m is None:
            m = self._default if isinstance(self._default, CostModel) else self._default(layer_key)
            if not isinstance(m, CostModel):
                raise TypeError(f"cost model for layer {layer_key!r} is a {type(m).__name__}, expected CostModel")
            self._models[layer_key] = m
        return m

    def set_cost_model(self, layer_key: Hashable, model: CostModel) -> None:
        if not isinstance(model, CostModel):
            raise TypeError(f"expected a CostModel, got {type(model).__name__}")
        self._models[layer_key] = model

    def copies(self, phase: str) -> bool:
        """Whether a call in `phase` copies its streamed experts."""
        return cost_phase(phase) == "forward" or self.backward_copies

    def correction(self, model: CostModel):
        if self._make_correction is None:
            return None
        c = self._corrections.get(id(model))
        if c is None:
            c = self._corrections[id(model)] = self._make_correction(model)
        return c

    # planning -----------------------------------------------------------------------------
    def plan(
        self,
        layer_key: Hashable,
        counts: torch.Tensor,
        resident_mask: torch.Tensor | None = None,
        *,
        phases: None | Sequence[str] | Mapping[str, float] = None,
    ) -> LayerPlan:
        """The placement of one call. counts: int CPU tensor [E] (pairs per expert); resident_mask:
        bool [E] (experts whose weights the GPU holds now; None: none). phases: override the
        phases this plan is charged for (e.g. ("backward",))."""
        n, res, prob = self._problem(layer_key, counts, resident_mask, phases)
        if prob.A == 0:
            on_gpu = np.zeros(0, dtype=bool)
        elif self.mode == "cpu":
            on_gpu = np.zeros(prob.A, dtype=bool)
        elif self.mode == "gpu":
            on_gpu = prob.all_gpu()
        else:
            on_gpu = self._search(prob)
        where = np.zeros(n.size, dtype=np.int8)
        ids = prob.ids[on_gpu]
        where[ids] = np.where(res[ids], int(Where.GPU_RESIDENT), int(Where.GPU_STREAMED))
        predicted = self._predicted(prob, on_gpu)
        return LayerPlan(torch.from_numpy(where), torch.from_numpy(n.astype(np.int64)), predicted)

    def best_makespan(self, layer_key: Hashable, counts, resident_mask=None) -> float:
        """The predicted seconds of the "auto" plan for these counts (may be fractional, e.g.
        expected counts) and residents, whatever the mode: what the residency policy weighs."""
        _, _, prob = self._problem(layer_key, counts, resident_mask, None)
        if prob.A == 0:
            return 0.0
        on_gpu = self._search(prob)
        return float(prob.objectives(on_gpu[None, :])[0])

    def _problem(self, layer_key, counts, resident_mask, phases):
        model = self.cost_model(layer_key)
        E = model.shape.num_experts
        n = _as_numpy(counts, np.float64, "counts")
        if n.shape != (E,):
            raise ValueError(f"layer {layer_key!r}: counts has shape {list(n.shape)}, expected [{E}]")
        bad = ~np.isfinite(n) | (n < 0)
        if bad.any():
            e = int(np.flatnonzero(bad)[0])
            raise ValueError(f"layer {layer_key!r}: counts must be finite and >= 0 (expert {e} is {n[e]})")
        if resident_mask is None:
            res = np.zeros(E, dtype=bool)
        else:
            res = _as_numpy(resident_mask, np.bool_, "resident_mask")
            if res.shape != (E,):
                raise ValueError(f"layer {layer_key!r}: resident_mask has shape {list(res.shape)}, expected [{E}]")
        weights = self.phases if phases is None else self._phase_weights(phases)
        key = tuple(weights.items())
        w = self._weight_cols.get(key)
        if w is None:
            w = self._weight_cols[key] = (
                tuple((p, self.copies(p)) for p in weights),
                np.array([[v] for v in weights.values()]),
            )
        return n, res, _Problem(n, res, model.term_columns(w[0]), w[1], model.staging_buffers, self.max_streamed)

    def _search(self, prob: _Problem) -> np.ndarray:
        n, res = prob.n, prob.res
        # Stable sorts on -count keep the expert id as the tie-break (deterministic plans).
        by_count = np.argsort(-n, kind="stable")
        res_first = np.concatenate([by_count[res[by_count]], by_count[~res[by_count]]])
        cpu_t = (prob.w * prob.cpu).sum(axis=0)
        gpu_t = (prob.w * (prob.gpu_res + prob.gpu_str + prob.copy * prob.str_f)).sum(axis=0)
        by_ratio = np.argsort(-(cpu_t / np.maximum(gpu_t, 1e-30)), kind="stable")
        best, best_obj = prob.best_prefix([res_first, by_count, by_ratio])
        best, best_obj = prob.improve(best, best_obj, self.improve_rounds, self.swap_candidates)
        # The guarantee: never worse than the plain plans. All-CPU, residents-only and (without a
        # binding cap) all-GPU are prefixes already; this covers all-GPU under the cap.
        if "all_gpu" not in prob.refs:
            cand = prob.all_gpu()
            obj = float(prob.objectives(cand[None, :])[0])
            prob.refs["all_gpu"] = obj
            if obj < best_obj:
                best, best_obj = cand, obj
        return best

    def _predicted(self, prob: _Problem, on_gpu) -> dict[str, float]:
        """Predicted seconds summed over the charged phases (weights applied): "cpu" (engine, with
        the copy slowdown), "gpu" (GPU side finish), "copy", "makespan", and the all-CPU /
        all-GPU plans' makespans for comparison."""
        if prob.A == 0:
            return {"cpu": 0.0, "gpu": 0.0, "copy": 0.0, "makespan": 0.0, "all_cpu": 0.0, "all_gpu": 0.0}
        # The plan itself, plus the reference plans the search did not evaluate (modes cpu / gpu).
        refs = [k for k in ("all_cpu", "all_gpu") if k not in prob.refs]
        make = {"all_cpu": lambda: np.zeros(prob.A, dtype=bool), "all_gpu": prob.all_gpu}
        obj, (Xe, Y, C) = prob.evaluate(*prob.totals(np.stack([on_gpu] + [make[k]() for k in refs])))
        w = prob.w[:, 0]
        out = {
            "cpu": float(w @ Xe[:, 0]),
            "gpu": float(w @ Y[:, 0]),
            "copy": float(w @ C[:, 0]),
            "makespan": float(obj[0]),
        }
        out.update(prob.refs)
        out.update({k: float(v) for k, v in zip(refs, obj[1:])})
        return out

    def predict(self, layer_key: Hashable, plan: LayerPlan, phase: str):
        """cost.Prediction of one phase of `plan` under the layer's current model."""
        return self.cost_model(layer_key).predict(plan.counts, plan.where, phase, copies=self.copies(phase))

    # feedback -----------------------------------------------------------------------------
    def observe(self, layer_key: Hashable, plan: LayerPlan, timings: Mapping[str, object]) -> None:
        """Measured seconds of one call of `plan`: timings "cpu" (CPU engine job wall time), "gpu"
        (GPU compute-stream busy time), "copy" (copy-stream busy time), "wall" (the layer call),
        "phase" ("forward" | "backward" | "recompute"); missing resources are not updated."""
        phase = str(timings.get("phase", "forward"))
        cost_phase(phase)
        model = self.cost_model(layer_key)
        pred = model.predict(plan.counts, plan.where, phase, copies=self.copies(phase))
        corr = self.correction(model)
        if corr is not None:
            corr.observe(plan.counts, plan.where, phase, timings, copies=self.copies(phase))
        if self.metrics is not None:
            self.metrics.record(layer_key, plan, timings, pred)
        if phase == "forward":
            self._last_counts[layer_key] = plan.counts
            if self.residency is not None:
                self.residency.record(layer_key, plan.counts)

    def forget(self, layer_key: Hashable) -> None:
        """Drops what the scheduler keeps of layer `layer_key`: its cost model (set or looked up),
        its last forward routing and its steady flag. Its experts were replaced (an expert index
        now means another expert, their number may differ): the next call looks its cost model up
        again and is planned per call until refresh_steady decides from its new routing."""
        self._models.pop(layer_key, None)
        self._last_counts.pop(layer_key, None)
        self._steady.pop(layer_key, None)

    # per step instead of per call ---------------------------------------------------------
    def steady(self, layer_key: Hashable) -> bool:
        """Whether the layer's calls may skip plan() until the next refresh_steady (module doc)."""
        return self._steady.get(layer_key, False)

    def refresh_steady(self, resident_masks: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, bool]:
        """Decides `steady` for each layer (resident_masks: layer_key -> bool [E], its experts held
        on the GPU now) from its last observed forward routing: steady when every expert is
        resident and the plan for those counts puts every expert with pairs on the GPU (mode
        "gpu": always, once every expert is resident; "cpu": never; no routing seen yet: not
        steady). Returns the decisions."""
        out = {}
        for key, resident in resident_masks.items():
            counts = self._last_counts.get(key)
            ok = self.mode != "cpu" and counts is not None and bool(torch.as_tensor(resident).all())
            if ok and self.mode == "auto":
                where = self.plan(key, counts, resident).where
                ok = not bool(((where == int(Where.CPU)) & (counts > 0)).any())
            out[key] = ok
        self._steady = out
        return dict(out)
