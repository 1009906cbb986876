// moetune bindings: the nanobind extension. Argument checks (device, dtype,
// shape, contiguity — each error names the tensor and what was expected) and
// conversion to the engine's views; nothing else. Arrays arrive through
// DLPack (torch tensors, numpy arrays) and are never copied here; the Job a
// forward or backward returns holds references to every array the queued call
// reads or writes until it has run and been waited on (CallJob), so a caller
// that drops its arrays early cannot free memory under a running job.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>

#include "engine/context.h"
#include "engine/moe_experts.h"
#include "kernels/cpu.h"
#include "kernels/isa.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace moetune {
namespace {

using Array = nb::ndarray<nb::ro>;
using OutArray = nb::ndarray<>;

// Shapes as text, built with std::to_string only: std::ostringstream was
// seen to crash inside this module on one machine (Ubuntu 24.04, g++ 13.3,
// torch 2.11 in the process), when building an error message.
template <typename A>
std::string shape_of(const A& a) {
  std::string s = "[";
  for (size_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + "]";
}
std::string shape_str(std::initializer_list<int64_t> dims) {
  std::string s = "[";
  size_t i = 0;
  for (int64_t v : dims) s += (i++ ? ", " : "") + std::to_string(v);
  return s + "]";
}

template <typename A>
DType dtype_of(const A& a, const std::string& name) {
  const nb::dlpack::dtype d = a.dtype();
  if (d.lanes == 1) {
    if (d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && d.bits == 16)
      return DType::kBf16;
    if (d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) && d.bits == 32)
      return DType::kF32;
    if (d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Int) && d.bits == 32)
      return DType::kI32;
    if (d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Int) && d.bits == 64)
      return DType::kI64;
    if (d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::UInt) && d.bits == 8)
      return DType::kU8;
  }
  throw std::invalid_argument((name + ": unsupported dtype (code " + std::to_string(d.code) + ", " +
                               std::to_string(d.bits) + " bits)")
                                  .c_str());
}

// Checks device, contiguity, shape and dtype set; returns the dtype.
template <typename A>
DType check(const A& a, const std::string& name, std::initializer_list<int64_t> shape,
            std::initializer_list<DType> dtypes) {
  if (a.device_type() != nb::device::cpu::value) {
    throw std::invalid_argument((name + " must be a CPU array (the Python layer moves tensors)"));
  }
  bool shape_ok = a.ndim() == shape.size();
  size_t i = 0;
  for (int64_t s : shape) {
    if (shape_ok && static_cast<int64_t>(a.shape(i)) != s) shape_ok = false;
    ++i;
  }
  if (!shape_ok) {
    throw std::invalid_argument(
        (name + " has shape " + shape_of(a) + ", expected " + shape_str(shape)));
  }
  // Row-major contiguity (an empty array has no layout to get wrong).
  int64_t expect = 1;
  for (int64_t d = static_cast<int64_t>(a.ndim()) - 1; d >= 0 && a.size() != 0; --d) {
    if (a.shape(d) != 1 && a.stride(d) != expect) {
      throw std::invalid_argument((name + " must be contiguous (row-major)"));
    }
    expect *= a.shape(d);
  }
  const DType dt = dtype_of(a, name);
  for (DType ok : dtypes)
    if (ok == dt) return dt;
  std::string allowed;
  for (DType ok : dtypes) allowed += std::string(allowed.empty() ? "" : " or ") + dtype_name(ok);
  throw std::invalid_argument((name + " has dtype " + dtype_name(dt) + ", expected " + allowed));
}

const std::initializer_list<DType> kFloat = {DType::kBf16, DType::kF32};

// The LoRA tensors of one call, as moetune.LoraWeights holds them: per
// projection None or (A [E, r, in], B [E, out, r]), and the scaling.
struct LoraArrays {
  std::optional<std::pair<Array, Array>> proj[3];
  float scaling = 1.0f;
};

// The LoRA gradients a backward call should write (fp32, the shapes of A and
// B): per projection None or (dA or None, dB or None).
struct LoraGradArrays {
  std::optional<std::pair<std::optional<OutArray>, std::optional<OutArray>>> proj[3];
};

bool python_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing();
#else
  return _Py_IsFinalizing();
#endif
}

// A queued engine call as Python holds it: the engine Job plus references to
// the arrays the call reads and writes (nb::ndarray copies keep their owners
// alive). They are dropped only with the GIL held, on the Python thread: after
// wait() (the job has run, or raised: either way it no longer touches them) or
// at destruction. Destroying it while the job is still queued or running waits
// for the job first, with the GIL released (jobs never need the GIL, so this
// cannot deadlock); at interpreter shutdown it leaks the references instead.
// Move-only (a copy would double the wait on destruction).
struct CallJob {
  Job job;
  std::vector<Array> reads;
  std::vector<OutArray> writes;
  std::optional<LoraArrays> lora;
  std::optional<LoraGradArrays> grads;

  CallJob(Job j, std::vector<Array> r, std::vector<OutArray> w, std::optional<LoraArrays> l,
          std::optional<LoraGradArrays> g)
      : job(std::move(j)),
        reads(std::move(r)),
        writes(std::move(w)),
        lora(std::move(l)),
        grads(std::move(g)) {}
  CallJob(CallJob&& o) noexcept
      : job(std::move(o.job)),
        reads(std::move(o.reads)),
        writes(std::move(o.writes)),
        lora(std::move(o.lora)),
        grads(std::move(o.grads)) {
    o.drop();
  }
  CallJob(const CallJob&) = delete;
  CallJob& operator=(const CallJob&) = delete;
  CallJob& operator=(CallJob&&) = delete;

  bool holds() const { return !reads.empty() || !writes.empty() || lora || grads; }
  void drop() {
    reads.clear();
    writes.clear();
    lora.reset();
    grads.reset();
  }
  void wait() {
    try {
      nb::gil_scoped_release release;
      job.wait();
    } catch (...) {
      drop();  // the job raised (or can never run: a forked child); it reads nothing now
      throw;
    }
    drop();
  }
  ~CallJob() {
    if (!holds() || !job.valid() || job.ready()) return;  // members drop normally
    if (python_finalizing()) {
      // The job may still run while Python tears down: keep the arrays, leaked.
      new CallJob(std::move(*this));
      return;
    }
    try {
      nb::gil_scoped_release release;
      job.wait();
    } catch (...) {  // its error belongs to whoever waits on it; nothing runs any more
    }
  }
};

// [in, out] of projection p (its LoRA: A [E, r, in], B [E, out, r]).
std::pair<int64_t, int64_t> lora_in_out(const MoeExperts& ex, Proj p) {
  const WeightStore::Dims d = ex.weights().dims(p);
  return {d.K, d.N};
}

LoraSet lora_set(const MoeExperts& ex, const LoraArrays& l) {
  LoraSet s;
  s.scaling = l.scaling;
  LoraProj* ps[3] = {&s.gate, &s.up, &s.down};
  const int64_t E = ex.E();
  for (Proj p : kAllProjs) {
    const std::string base = std::string("lora.") + proj_name(p);
    if (!l.proj[idx(p)]) continue;
    const auto [in, out] = lora_in_out(ex, p);
    const Array& A = l.proj[idx(p)]->first;
    const Array& B = l.proj[idx(p)]->second;
    if (A.ndim() != 3) {
      throw std::invalid_argument(base + ".A has shape " + shape_of(A) +
                                  ", expected [E, r, in] = " + shape_str({E, -1, in}));
    }
    const int64_t r = A.shape(1);
    if (r < 1) throw std::invalid_argument(base + ".A: rank r must be >= 1");
    LoraProj& lp = *ps[idx(p)];
    lp.a_dtype = check(A, base + ".A", {E, r, in}, kFloat);
    lp.b_dtype = check(B, base + ".B", {E, out, r}, kFloat);
    lp.A = A.data();
    lp.B = B.data();
    lp.r = static_cast<int>(r);
  }
  return s;
}

LoraGrads lora_grads(const MoeExperts& ex, const LoraSet& lora, const LoraGradArrays& g) {
  LoraGrads out;
  float** dA[3] = {&out.dA_gate, &out.dA_up, &out.dA_down};
  float** dB[3] = {&out.dB_gate, &out.dB_up, &out.dB_down};
  for (Proj p : kAllProjs) {
    if (!g.proj[idx(p)]) continue;
    const std::string base = std::string("grad lora.") + proj_name(p);
    const LoraProj& lp = lora[p];
    const auto [in, out_dim] = lora_in_out(ex, p);
    const auto& [gA, gB] = *g.proj[idx(p)];
    if (gA) {
      if (!lp.enabled()) throw std::invalid_argument(base + ".A requested but that LoRA is off");
      check(*gA, base + ".A", {ex.E(), lp.r, in}, {DType::kF32});
      *dA[idx(p)] = static_cast<float*>(gA->data());
    }
    if (gB) {
      if (!lp.enabled()) throw std::invalid_argument(base + ".B requested but that LoRA is off");
      check(*gB, base + ".B", {ex.E(), out_dim, lp.r}, {DType::kF32});
      *dB[idx(p)] = static_cast<float*>(gB->data());
    }
  }
  return out;
}

// One dict per ISA of the table, in its order (moetune.isas() wraps them).
nb::list isa_records() {
  const kernels::FeatureSet have = kernels::cpu_features();
  nb::list out;
  for (const kernels::IsaInfo& i : kernels::kIsas) {
    nb::dict k;
    k["gemm"] = std::string(i.gemm_name);
    k["transpose"] = std::string(kernels::isa_with_unit(i.transpose_unit).name);
    k["eltwise"] = std::string(kernels::isa_with_unit(i.eltwise_unit).name);
    k["dequant"] = std::string(kernels::isa_with_unit(i.dequant_unit).name);
    nb::dict d;
    d["name"] = std::string(i.name);
    d["runnable"] = kernels::isa_runnable(i.id, have);
    d["required_features"] = kernels::feature_list(i.required);
    d["missing_features"] = kernels::feature_list(i.required.minus(have));
    d["compile_flags"] = kernels::isa_compile_flags(i.id);
    d["kernels"] = k;
    out.append(d);
  }
  return out;
}

// ---- the module, one function per concept ----

void bind_kernels(nb::module_& m) {
  m.def("cpu_summary", &kernels::cpu_summary);
  m.attr("PACKED_LAYOUT_VERSION") = kernels::kPackedLayoutVersion;
  m.def("isas", &isa_records);
  m.def("cpu_features", [] { return kernels::feature_list(kernels::cpu_features()); });
}

void bind_context(nb::module_& m) {
  // Jobs of Experts.forward / backward (CallJob: they hold the call's arrays).
  nb::class_<CallJob>(m, "Job")
      .def("wait", &CallJob::wait)
      .def("ready", [](const CallJob& j) { return j.job.ready(); })
      .def_prop_ro("holds_arrays", &CallJob::holds);

  nb::class_<Context>(m, "Context")
      .def(
          "__init__",
          [](Context* self, int num_threads, std::vector<int> cpus, const std::string& isa,
             CpuSets partitions) {
            ContextOptions o;
            o.num_threads = num_threads;
            o.cpus = std::move(cpus);
            o.isa = kernels::parse_isa(isa);
            o.partitions = std::move(partitions);
            new (self) Context(std::move(o));
          },
          "num_threads"_a, "cpus"_a = std::vector<int>{}, "isa"_a = "auto",
          "partitions"_a = CpuSets{})
      .def_prop_ro("num_threads", &Context::num_threads)
      .def_prop_ro("num_partitions", &Context::num_partitions)
      .def_prop_ro("partition_cpus", &Context::partition_cpus)
      .def("partition_task_counts", &Context::partition_task_counts)
      .def_prop_ro("isa",
                   [](const Context& c) { return std::string(kernels::isa_name(c.kernels().isa)); })
      .def_prop_ro("kernel", [](const Context& c) { return std::string(c.kernels().name); })
      .def("info", &Context::info)
      .def("phase_profile", &Context::phase_profile)
      .def("reset_phase_profile", &Context::reset_phase_profile);
}

// A nanobind enum whose value names are the engine's option names.
template <typename Enum, size_t N>
void bind_enum(nb::module_& m, const char* name, const Enum (&all)[N]) {
  nb::enum_<Enum> e(m, name);
  for (Enum v : all) e.value(option_name(v), v);
}

void bind_options(nb::module_& m) {
  bind_enum(m, "BackwardWeights", kAllBackwardWeights);
  bind_enum(m, "ActivationPolicy", kAllActivationPolicies);
  bind_enum(m, "Activation", kAllActivations);
  bind_enum(m, "WeightFormat", kAllWeightFormats);
  bind_enum(m, "DequantPath", kAllDequantPaths);
  // Defaults come from the C++ struct (the one place they are written);
  // moetune.ExpertsOptions (Python) reads them from a default-constructed one.
  nb::class_<ExpertsOptions>(m, "ExpertsOptions")
      .def(nb::init<>())
      .def_rw("backward_weights", &ExpertsOptions::backward_weights)
      .def_rw("activations", &ExpertsOptions::activations)
      .def_rw("activation", &ExpertsOptions::activation)
      .def_rw("swiglu_alpha", &ExpertsOptions::swiglu_alpha)
      .def_rw("swiglu_limit", &ExpertsOptions::swiglu_limit)
      .def_rw("weight_format", &ExpertsOptions::weight_format)
      .def_rw("group_size", &ExpertsOptions::group_size)
      .def_rw("row_group", &ExpertsOptions::row_group)
      .def_rw("dequant_path", &ExpertsOptions::dequant_path)
      .def_rw("dequant_cols", &ExpertsOptions::dequant_cols)
      .def("validate", &ExpertsOptions::validate)
      .def("__eq__", [](const ExpertsOptions& a, const ExpertsOptions& b) { return a == b; });
  m.def("default_group_size", &default_group_size, "weight_format"_a);
  // The weight format table (kernels/weight_format.h), row by row: (name,
  // code bits, scale type "none" | "f32" | "e8m0", scale bytes, group_k
  // (0: whole K, -1: the group_size option), group_n, published by).
  m.def("weight_formats", [] {
    std::vector<std::tuple<std::string, int, std::string, int, int, int, std::string>> out;
    for (const kernels::WeightFormatInfo& w : kernels::kWeightFormats) {
      const char* st = w.scale_type == kernels::ScaleType::kNone
                           ? "none"
                           : (w.scale_type == kernels::ScaleType::kF32 ? "f32" : "e8m0");
      out.emplace_back(w.name, w.code_bits, st, w.scale_bytes, w.group_k, w.group_n, w.published);
    }
    return out;
  });
  m.def("experts_host_bytes", &MoeExperts::host_bytes, "num_experts"_a, "hidden_size"_a,
        "intermediate_size"_a, "options"_a);
  m.def("experts_bias_bytes", &WeightStore::bias_bytes_for, "num_experts"_a, "hidden_size"_a,
        "intermediate_size"_a);
}

void bind_lora(nb::module_& m) {
  nb::class_<LoraArrays>(m, "Lora").def(
      "__init__",
      [](LoraArrays* self, std::optional<std::pair<Array, Array>> gate,
         std::optional<std::pair<Array, Array>> up, std::optional<std::pair<Array, Array>> down,
         float scaling) {
        new (self) LoraArrays{{std::move(gate), std::move(up), std::move(down)}, scaling};
      },
      nb::kw_only(), "gate"_a.none() = nb::none(), "up"_a.none() = nb::none(),
      "down"_a.none() = nb::none(), "scaling"_a = 1.0f);
  using GradPair = std::pair<std::optional<OutArray>, std::optional<OutArray>>;
  nb::class_<LoraGradArrays>(m, "LoraGrads")
      .def(
          "__init__",
          [](LoraGradArrays* self, std::optional<GradPair> gate, std::optional<GradPair> up,
             std::optional<GradPair> down) {
            new (self) LoraGradArrays{{std::move(gate), std::move(up), std::move(down)}};
          },
          nb::kw_only(), "gate"_a.none() = nb::none(), "up"_a.none() = nb::none(),
          "down"_a.none() = nb::none());
}

// Checks gate/up [.., I, H] and down [.., H, I] (lead = {E} or {}) and one dtype.
DType check_expert_weights(const MoeExperts& ex, const Array& gate, const Array& up,
                           const Array& down, bool stacked, const std::string& at) {
  const int64_t E = ex.E(), H = ex.H(), I = ex.I();
  const DType dt = stacked ? check(gate, "gate_proj" + at, {E, I, H}, kFloat)
                           : check(gate, "gate_proj" + at, {I, H}, kFloat);
  const DType du = stacked ? check(up, "up_proj" + at, {E, I, H}, kFloat)
                           : check(up, "up_proj" + at, {I, H}, kFloat);
  const DType dd = stacked ? check(down, "down_proj" + at, {E, H, I}, kFloat)
                           : check(down, "down_proj" + at, {H, I}, kFloat);
  if (du != dt || dd != dt)
    throw std::invalid_argument("gate_proj, up_proj and down_proj must share one dtype" + at);
  return dt;
}

void check_expert_id(const MoeExperts& ex, int e) {
  if (e < 0 || e >= ex.E()) {
    throw std::invalid_argument("expert id " + std::to_string(e) + " outside [0, " +
                                std::to_string(ex.E()) + ")");
  }
}

ForwardArgs forward_args(const MoeExperts& ex, const Array& x, const Array& ids, const Array& w,
                         const std::optional<Array>& mask, const LoraArrays& lora, OutArray& out) {
  const int64_t H = ex.H(), E = ex.E();
  if (x.ndim() != 2) throw std::invalid_argument("x must be 2-D [T, H], got shape " + shape_of(x));
  if (ids.ndim() != 2)
    throw std::invalid_argument("topk_ids must be 2-D [T, k], got shape " + shape_of(ids));
  const int64_t T = x.shape(0), k = ids.shape(1);
  ForwardArgs a;
  a.T = T;
  a.k = static_cast<int>(k);
  if (k < 1 || k > E) {
    throw std::invalid_argument("topk_ids has shape " + shape_of(ids) +
                                ": k = " + std::to_string(k) +
                                " experts per token must be in [1, E=" + std::to_string(E) + "]");
  }
  a.x_dtype = check(x, "x", {T, H}, kFloat);
  a.ids_dtype = check(ids, "topk_ids", {T, k}, {DType::kI32, DType::kI64});
  a.w_dtype = check(w, "topk_weights", {T, k}, kFloat);
  if (mask) {
    const nb::dlpack::dtype d = mask->dtype();
    if (!(d.bits == 8 && (d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bool) ||
                          d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::UInt)))) {
      throw std::invalid_argument("expert_mask must be a bool tensor of shape [E]");
    }
    if (mask->ndim() != 1 || static_cast<int64_t>(mask->shape(0)) != E) {
      throw std::invalid_argument("expert_mask has shape " + shape_of(*mask) + ", expected [" +
                                  std::to_string(E) + "]");
    }
    a.expert_mask = static_cast<const uint8_t*>(mask->data());
  }
  a.x = x.data();
  a.topk_ids = ids.data();
  a.topk_weights = w.data();
  a.lora = lora_set(ex, lora);
  a.out_dtype = check(out, "out", {T, H}, kFloat);
  a.out = out.data();
  return a;
}

BackwardArgs backward_args(const MoeExperts& ex, const Saved& saved, const Array& dout,
                           const LoraArrays& lora, std::optional<OutArray>& dx,
                           std::optional<OutArray>& dw, const LoraGradArrays& grads) {
  const int64_t T = saved.T, k = saved.k, H = ex.H();
  BackwardArgs a;
  a.dout_dtype = check(dout, "grad_out", {T, H}, kFloat);
  a.dout = dout.data();
  a.lora = lora_set(ex, lora);
  if (dx) {
    a.dx_dtype = check(*dx, "grad_x", {T, H}, kFloat);
    a.dx = dx->data();
  }
  if (dw) {
    a.dw_dtype = check(*dw, "grad_topk_weights", {T, k}, kFloat);
    a.dtopk_weights = dw->data();
  }
  a.grads = lora_grads(ex, a.lora, grads);
  return a;
}

void bind_experts(nb::module_& m) {
  nb::class_<Saved>(m, "Saved").def_prop_ro("nbytes", &Saved::bytes);

  nb::class_<MoeExperts>(m, "Experts")
      .def(nb::init<std::shared_ptr<Context>, int, int, int, ExpertsOptions>(), "ctx"_a,
           "num_experts"_a, "hidden_size"_a, "intermediate_size"_a, "options"_a)
      .def_prop_ro("num_experts", &MoeExperts::E)
      .def_prop_ro("hidden_size", &MoeExperts::H)
      .def_prop_ro("intermediate_size", &MoeExperts::I)
      .def_prop_ro("options", [](const MoeExperts& ex) { return ex.options(); })
      .def_prop_ro("packed_bytes", &MoeExperts::packed_bytes)
      .def("packed_buffers",
           [](MoeExperts& ex) {
             // Writable uint8 views of the engine's packed weights; each keeps
             // the Experts object alive (moetune.cache reads files into them).
             nb::handle owner = nb::find(&ex);
             std::vector<std::pair<std::string, nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>>> out;
             for (const auto& b : ex.weights().buffers()) {
               const size_t shape[1] = {b.bytes};
               out.emplace_back(b.name, nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>(
                                            static_cast<uint8_t*>(b.data), 1, shape, owner));
             }
             return out;
           })
      // What each packed buffer holds, in packed_buffers() order: (name,
      // projection, kind, K, N of the packed operand per expert,
      // per-expert bytes, total bytes); layouts in kernels/gemm.h, kernels/quant.h.
      .def(
          "packed_layout",
          [](MoeExperts& ex) {
            std::vector<
                std::tuple<std::string, std::string, std::string, int64_t, int64_t, size_t, size_t>>
                out;
            for (const auto& b : ex.weights().buffers())
              out.emplace_back(b.name, proj_name(b.proj), WeightStore::kind_name(b.kind), b.K, b.N,
                               b.per_expert_bytes, b.bytes);
            return out;
          })
      .def(
          "load",
          [](MoeExperts& ex, const Array& gate, const Array& up, const Array& down) {
            const DType dt = check_expert_weights(ex, gate, up, down, /*stacked=*/true, "");
            nb::gil_scoped_release release;
            ex.load(gate.data(), up.data(), down.data(), dt);
          },
          "gate_proj"_a, "up_proj"_a, "down_proj"_a)
      // One expert at a time (streaming loaders); distinct experts may be
      // loaded from several threads at once (the GIL is released).
      .def(
          "load_expert",
          [](MoeExperts& ex, int e, const Array& gate, const Array& up, const Array& down) {
            check_expert_id(ex, e);
            const DType dt = check_expert_weights(ex, gate, up, down, /*stacked=*/false,
                                                  " (expert " + std::to_string(e) + ")");
            nb::gil_scoped_release release;
            ex.load_expert(e, gate.data(), up.data(), down.data(), dt);
          },
          "expert"_a, "gate_proj"_a, "up_proj"_a, "down_proj"_a)
      // One expert from a checkpoint's own quantized codes and scales, kept as
      // published (kernels/quant_published.h: shapes and layouts per format).
      .def(
          "load_expert_published",
          [](MoeExperts& ex, int e, const Array& gate_codes, const Array& gate_scales,
             const Array& up_codes, const Array& up_scales, const Array& down_codes,
             const Array& down_scales) {
            check_expert_id(ex, e);
            const kernels::QuantSpec spec = ex.options().quant_spec();
            const bool e8m0 =
                kernels::weight_format_info(spec.format).scale_type == kernels::ScaleType::kE8m0;
            const Array* arrays[3][2] = {
                {&gate_codes, &gate_scales}, {&up_codes, &up_scales}, {&down_codes, &down_scales}};
            WeightStore::PublishedWeight w[3];
            for (Proj p : kAllProjs) {
              const auto d = ex.weights().dims(p);
              const std::string tag = std::string(" (") + proj_name(p) + "_proj of expert " +
                                      std::to_string(e) + ", weight format " +
                                      kernels::weight_format_name(spec.format) + ")";
              const int64_t row = kernels::published_code_row_bytes(spec, d.K);
              check(*arrays[idx(p)][0], std::string("codes") + tag, {d.N, row}, {DType::kU8});
              const kernels::PublishedScaleShape ss =
                  kernels::published_scale_shape(spec, d.K, d.N);
              const DType sdt =
                  check(*arrays[idx(p)][1], std::string("scales") + tag, {ss.rows, ss.cols},
                        e8m0 ? std::initializer_list<DType>{DType::kU8} : kFloat);
              w[idx(p)] = WeightStore::PublishedWeight{
                  static_cast<const uint8_t*>(arrays[idx(p)][0]->data()), row,
                  arrays[idx(p)][1]->data(),
                  e8m0 ? kernels::ScaleSrc::kE8m0
                       : (sdt == DType::kF32 ? kernels::ScaleSrc::kF32 : kernels::ScaleSrc::kBf16),
                  ss.cols};
            }
            nb::gil_scoped_release release;
            ex.weights().load_expert_published(e, w);
          },
          "expert"_a, "gate_codes"_a, "gate_scales"_a, "up_codes"_a, "up_scales"_a, "down_codes"_a,
          "down_scales"_a)
      // The bf16 values the GEMMs use for expert e (dq(q(W)) for int8 / int4),
      // written into gate, up [I, H] and down [H, I] bf16 arrays.
      .def(
          "unpack_expert",
          [](const MoeExperts& ex, int e, OutArray gate, OutArray up, OutArray down) {
            check_expert_id(ex, e);
            const int64_t H = ex.H(), I = ex.I();
            check(gate, "gate", {I, H}, {DType::kBf16});
            check(up, "up", {I, H}, {DType::kBf16});
            check(down, "down", {H, I}, {DType::kBf16});
            nb::gil_scoped_release release;
            ex.weights().unpack_expert(e, static_cast<kernels::bf16*>(gate.data()),
                                       static_cast<kernels::bf16*>(up.data()),
                                       static_cast<kernels::bf16*>(down.data()));
          },
          "expert"_a, "gate"_a, "up"_a, "down"_a)
      .def(
          "load_biases",
          [](MoeExperts& ex, std::optional<Array> gate, std::optional<Array> up,
             std::optional<Array> down) {
            const std::optional<Array>* b[3] = {&gate, &up, &down};
            std::optional<DType> dt;
            const void* ptr[3] = {nullptr, nullptr, nullptr};
            for (Proj p : kAllProjs) {
              const std::optional<Array>& bias = *b[idx(p)];
              if (!bias) continue;
              // [E, out]: gate, up [E, I], down [E, H].
              const DType d = check(*bias, std::string(proj_name(p)) + "_bias",
                                    {ex.E(), ex.weights().dims(p).N}, kFloat);
              if (dt && *dt != d)
                throw std::invalid_argument(
                    "gate_bias, up_bias and down_bias must share one dtype");
              dt = d;
              ptr[idx(p)] = bias->data();
            }
            ex.load_biases(ptr[0], ptr[1], ptr[2], dt.value_or(DType::kF32));
          },
          "gate_bias"_a.none(), "up_bias"_a.none(), "down_bias"_a.none())
      // After filling every packed buffer byte for byte (a disk cache): the
      // experts count as loaded (forward refuses experts never loaded).
      .def("mark_loaded", [](MoeExperts& ex) { ex.weights().mark_all_loaded(); })
      .def(
          "loaded",
          [](const MoeExperts& ex, int e) {
            check_expert_id(ex, e);
            return ex.weights().loaded(e);
          },
          "expert"_a)
      .def_prop_ro("has_biases",
                   [](const MoeExperts& ex) {
                     return std::make_tuple(ex.has_bias(Proj::kGate), ex.has_bias(Proj::kUp),
                                            ex.has_bias(Proj::kDown));
                   })
      .def(
          "forward",
          [](MoeExperts& ex, const Array& x, const Array& ids, const Array& w,
             std::optional<Array> mask, const LoraArrays& lora, OutArray out) {
            std::shared_ptr<Saved> saved;
            Job job = ex.forward_async(forward_args(ex, x, ids, w, mask, lora, out), &saved);
            std::vector<Array> reads = {x, ids, w};
            if (mask) reads.push_back(*mask);
            return std::make_pair(
                saved, CallJob(std::move(job), std::move(reads), {out}, lora, std::nullopt));
          },
          "x"_a, "topk_ids"_a, "topk_weights"_a, "expert_mask"_a.none(), "lora"_a, "out"_a)
      .def(
          "backward",
          [](MoeExperts& ex, std::shared_ptr<Saved> saved, const Array& dout,
             const LoraArrays& lora, std::optional<OutArray> dx, std::optional<OutArray> dw,
             const LoraGradArrays& grads) {
            if (!saved) throw std::invalid_argument("backward needs the handle from forward");
            Job job =
                ex.backward_async(saved, backward_args(ex, *saved, dout, lora, dx, dw, grads));
            std::vector<OutArray> writes;
            if (dx) writes.push_back(*dx);
            if (dw) writes.push_back(*dw);
            return CallJob(std::move(job), {dout}, std::move(writes), lora, grads);
          },
          "saved"_a, "grad_out"_a, "lora"_a, "grad_x"_a.none(), "grad_topk_weights"_a.none(),
          "grads"_a);
}

}  // namespace
}  // namespace moetune

NB_MODULE(_moetune_ext, m) {
  using namespace moetune;
  m.doc() = "moetune engine bindings (internal; use the moetune package)";
  // Engine objects held by module globals (or by torch's autograd graph) may
  // outlive this module at interpreter teardown; that is not a leak of the
  // running program (tests check handles are freed with their graphs).
  nb::set_leak_warnings(false);
  bind_kernels(m);
  bind_context(m);
  bind_options(m);
  bind_lora(m);
  bind_experts(m);
}
