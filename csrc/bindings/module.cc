// moetune bindings: the nanobind extension. Argument checks (device, dtype,
// shape, contiguity — each error names the tensor and what was expected) and
// conversion to the engine's views; nothing else. Arrays arrive through
// DLPack (torch tensors, numpy arrays), are never copied here, and must stay
// alive until the returned Job is waited on (the Python layer holds them).
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
    if (d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && d.bits == 16) return DType::kBf16;
    if (d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) && d.bits == 32) return DType::kF32;
    if (d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Int) && d.bits == 32) return DType::kI32;
    if (d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Int) && d.bits == 64) return DType::kI64;
  }
  throw std::invalid_argument((name + ": unsupported dtype (code " + std::to_string(d.code) + ", " +
                         std::to_string(d.bits) + " bits)").c_str());
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
    throw std::invalid_argument((name + " has shape " + shape_of(a) + ", expected " + shape_str(shape)));
  }
  // Row-major contiguity.
  int64_t expect = 1;
  for (int64_t d = static_cast<int64_t>(a.ndim()) - 1; d >= 0; --d) {
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

struct LoraArrays {
  std::optional<Array> A[3], B[3];
  float scaling = 1.0f;
};

const char* kProj[3] = {"gate", "up", "down"};

LoraSet lora_set(const MoeExperts& ex, const LoraArrays& l) {
  LoraSet s;
  s.scaling = l.scaling;
  LoraProj* p[3] = {&s.gate, &s.up, &s.down};
  const int64_t E = ex.E(), H = ex.H(), I = ex.I();
  const int64_t in[3] = {H, H, I}, out[3] = {I, I, H};
  for (int w = 0; w < 3; ++w) {
    const std::string base = std::string("lora.") + kProj[w];
    if (l.A[w].has_value() != l.B[w].has_value()) {
      throw std::invalid_argument((base + ": A and B must both be given or both be None"));
    }
    if (!l.A[w]) continue;
    const Array& A = *l.A[w];
    const Array& B = *l.B[w];
    if (A.ndim() != 3) {
      throw std::invalid_argument((base + ".A has shape " + shape_of(A) + ", expected [E, r, in] = " +
                             shape_str({E, -1, in[w]})).c_str());
    }
    const int64_t r = A.shape(1);
    if (r < 1) throw std::invalid_argument((base + ".A: rank r must be >= 1"));
    p[w]->a_dtype = check(A, base + ".A", {E, r, in[w]}, kFloat);
    p[w]->b_dtype = check(B, base + ".B", {E, out[w], r}, kFloat);
    p[w]->A = A.data();
    p[w]->B = B.data();
    p[w]->r = static_cast<int>(r);
  }
  return s;
}

LoraArrays make_lora(std::optional<Array> ag, std::optional<Array> bg, std::optional<Array> au,
                     std::optional<Array> bu, std::optional<Array> ad, std::optional<Array> bd,
                     float scaling) {
  LoraArrays l;
  l.A[0] = std::move(ag);
  l.B[0] = std::move(bg);
  l.A[1] = std::move(au);
  l.B[1] = std::move(bu);
  l.A[2] = std::move(ad);
  l.B[2] = std::move(bd);
  l.scaling = scaling;
  return l;
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

}  // namespace
}  // namespace moetune

NB_MODULE(_moetune_ext, m) {
  using namespace moetune;
  m.doc() = "moetune engine bindings (internal; use the moetune package)";
  // Engine objects held by module globals (or by torch's autograd graph) may
  // outlive this module at interpreter teardown; that is not a leak of the
  // running program (tests check handles are freed with their graphs).
  nb::set_leak_warnings(false);
  m.def("cpu_summary", &kernels::cpu_summary);
  m.attr("PACKED_LAYOUT_VERSION") = kernels::kPackedLayoutVersion;
  m.def("isas", &isa_records);
  m.def("cpu_features", [] { return kernels::feature_list(kernels::cpu_features()); });

  nb::class_<Job>(m, "Job")
      .def("wait", [](const Job& j) {
        nb::gil_scoped_release release;
        j.wait();
      })
      .def("ready", &Job::ready);

  nb::class_<Context>(m, "Context")
      .def("__init__",
           [](Context* self, int num_threads, std::vector<int> cpus, const std::string& isa) {
             ContextOptions o;
             o.num_threads = num_threads;
             o.cpus = std::move(cpus);
             o.isa = kernels::parse_isa(isa);
             new (self) Context(std::move(o));
           },
           "num_threads"_a, "cpus"_a = std::vector<int>{}, "isa"_a = "auto")
      .def_prop_ro("num_threads", &Context::num_threads)
      .def_prop_ro("isa", [](const Context& c) { return std::string(kernels::isa_name(c.kernels().isa)); })
      .def_prop_ro("kernel", [](const Context& c) { return std::string(c.kernels().name); })
      .def("info", &Context::info)
      .def("phase_profile", &Context::phase_profile)
      .def("reset_phase_profile", &Context::reset_phase_profile);

  nb::class_<Saved>(m, "Saved").def_prop_ro("nbytes", &Saved::bytes);

  nb::class_<MoeExperts>(m, "Experts")
      .def("__init__",
           [](MoeExperts* self, std::shared_ptr<Context> ctx, int E, int H, int I,
              const std::string& backward_weights, const std::string& activations,
              const std::string& activation, float alpha, float limit,
              const std::string& weight_format, int group_size, int row_group) {
             ExpertsOptions o;
             if (row_group < 0) throw std::invalid_argument("row_group must be >= 0 (0 = auto), got " + std::to_string(row_group));
             o.row_group = row_group;
             if (activation == "swiglu") o.activation = Activation::kSwiGLU;
             else if (activation == "gpt_oss") o.activation = Activation::kClampedSwiGLU;
             else throw std::invalid_argument(("activation must be 'swiglu' or 'gpt_oss', got '" + activation + "'"));
             o.swiglu_alpha = alpha;
             o.swiglu_limit = limit;
             if (weight_format == "bf16") o.weight_format = kernels::WeightFormat::kBf16;
             else if (weight_format == "int8") o.weight_format = kernels::WeightFormat::kInt8;
             else if (weight_format == "int4") o.weight_format = kernels::WeightFormat::kInt4;
             else throw std::invalid_argument(("weight_format must be 'bf16', 'int8' or 'int4', got '" + weight_format + "'"));
             o.group_size = group_size;
             if (backward_weights == "repack") o.backward_weights = BackwardWeights::kRepack;
             else if (backward_weights == "transposed_copy") o.backward_weights = BackwardWeights::kTransposedCopy;
             else throw std::invalid_argument(("backward_weights must be 'repack' or 'transposed_copy', got '" + backward_weights + "'"));
             if (activations == "save") o.activations = ActivationPolicy::kSave;
             else if (activations == "recompute") o.activations = ActivationPolicy::kRecompute;
             else throw std::invalid_argument(("activations must be 'save' or 'recompute', got '" + activations + "'"));
             new (self) MoeExperts(std::move(ctx), E, H, I, o);
           },
           "ctx"_a, "num_experts"_a, "hidden_size"_a, "intermediate_size"_a,
           "backward_weights"_a = "repack", "activations"_a = "save", "activation"_a = "swiglu",
           "alpha"_a = 1.702f, "limit"_a = 7.0f, "weight_format"_a = "bf16", "group_size"_a = 0, "row_group"_a = 0)
      .def_prop_ro("num_experts", &MoeExperts::E)
      .def_prop_ro("hidden_size", &MoeExperts::H)
      .def_prop_ro("intermediate_size", &MoeExperts::I)
      .def_prop_ro("packed_bytes", &MoeExperts::packed_bytes)
      .def_prop_ro("weight_format", [](const MoeExperts& ex) { return std::string(kernels::weight_format_name(ex.quant_spec().format)); })
      .def_prop_ro("group_size", [](const MoeExperts& ex) { return ex.quant_spec().group_size; })
      .def("packed_buffers",
           [](MoeExperts& ex) {
             // Writable uint8 views of the engine's packed weights; each keeps
             // the Experts object alive (moetune.cache reads files into them).
             nb::handle owner = nb::find(&ex);
             std::vector<std::pair<std::string, nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>>> out;
             for (const auto& b : ex.packed_buffers()) {
               const size_t shape[1] = {b.bytes};
               out.emplace_back(b.name, nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>(
                                            static_cast<uint8_t*>(b.data), 1, shape, owner));
             }
             return out;
           })
      .def("load",
           [](MoeExperts& ex, const Array& gate, const Array& up, const Array& down) {
             const int64_t E = ex.E(), H = ex.H(), I = ex.I();
             const DType dt = check(gate, "gate_proj", {E, I, H}, kFloat);
             if (check(up, "up_proj", {E, I, H}, kFloat) != dt ||
                 check(down, "down_proj", {E, H, I}, kFloat) != dt) {
               throw std::invalid_argument("gate_proj, up_proj and down_proj must share one dtype");
             }
             nb::gil_scoped_release release;
             ex.load(gate.data(), up.data(), down.data(), dt);
           },
           "gate_proj"_a, "up_proj"_a, "down_proj"_a)
      // One expert at a time (streaming loaders); distinct experts may be
      // loaded from several threads at once (the GIL is released).
      .def("load_expert",
           [](MoeExperts& ex, int e, const Array& gate, const Array& up, const Array& down) {
             const int64_t H = ex.H(), I = ex.I();
             if (e < 0 || e >= ex.E()) {
               throw std::invalid_argument(("expert id " + std::to_string(e) + " outside [0, " +
                                            std::to_string(ex.E()) + ")"));
             }
             const std::string at = " (expert " + std::to_string(e) + ")";
             const DType dt = check(gate, "gate_proj" + at, {I, H}, kFloat);
             if (check(up, "up_proj" + at, {I, H}, kFloat) != dt ||
                 check(down, "down_proj" + at, {H, I}, kFloat) != dt) {
               throw std::invalid_argument("gate_proj, up_proj and down_proj must share one dtype" + at);
             }
             nb::gil_scoped_release release;
             ex.load_expert(e, gate.data(), up.data(), down.data(), dt);
           },
           "expert"_a, "gate_proj"_a, "up_proj"_a, "down_proj"_a)
      .def("load_biases",
           [](MoeExperts& ex, std::optional<Array> gate, std::optional<Array> up,
              std::optional<Array> down) {
             const int64_t E = ex.E(), H = ex.H(), I = ex.I();
             const std::optional<Array>* b[3] = {&gate, &up, &down};
             const char* names[3] = {"gate_bias", "up_bias", "down_bias"};
             const int64_t n[3] = {I, I, H};
             std::optional<DType> dt;
             const void* ptr[3] = {nullptr, nullptr, nullptr};
             for (int w = 0; w < 3; ++w) {
               if (!b[w]->has_value()) continue;
               const DType d = check(**b[w], names[w], {E, n[w]}, kFloat);
               if (dt && *dt != d) throw std::invalid_argument("gate_bias, up_bias and down_bias must share one dtype");
               dt = d;
               ptr[w] = (*b[w])->data();
             }
             ex.load_biases(ptr[0], ptr[1], ptr[2], dt.value_or(DType::kF32));
           },
           "gate_bias"_a.none(), "up_bias"_a.none(), "down_bias"_a.none())
      .def_prop_ro("has_biases", [](const MoeExperts& ex) {
        return std::make_tuple(ex.has_bias(0), ex.has_bias(1), ex.has_bias(2));
      })
      .def("forward",
           [](MoeExperts& ex, const Array& x, const Array& ids, const Array& w,
              std::optional<Array> mask, std::optional<Array> ag, std::optional<Array> bg,
              std::optional<Array> au, std::optional<Array> bu, std::optional<Array> ad,
              std::optional<Array> bd, float scaling, OutArray out) {
             const int64_t H = ex.H(), E = ex.E();
             if (x.ndim() != 2) throw std::invalid_argument(("x must be 2-D [T, H], got shape " + shape_of(x)));
             if (ids.ndim() != 2) throw std::invalid_argument(("topk_ids must be 2-D [T, k], got shape " + shape_of(ids)));
             const int64_t T = x.shape(0), k = ids.shape(1);
             ForwardArgs a;
             a.T = T;
             a.k = static_cast<int>(k);
             a.x_dtype = check(x, "x", {T, H}, kFloat);
             a.ids_dtype = check(ids, "topk_ids", {T, k}, {DType::kI32, DType::kI64});
             if (k < 1 || k > E) throw std::invalid_argument(("topk_ids: k = " + std::to_string(k) + " must be in [1, E=" + std::to_string(E) + "]"));
             a.w_dtype = check(w, "topk_weights", {T, k}, kFloat);
             if (mask) {
               const nb::dlpack::dtype d = mask->dtype();
               if (!(d.bits == 8 && (d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bool) ||
                                     d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::UInt)))) {
                 throw std::invalid_argument("expert_mask must be a bool tensor of shape [E]");
               }
               if (mask->ndim() != 1 || static_cast<int64_t>(mask->shape(0)) != E) {
                 throw std::invalid_argument(("expert_mask has shape " + shape_of(*mask) + ", expected [" + std::to_string(E) + "]"));
               }
               a.expert_mask = static_cast<const uint8_t*>(mask->data());
             }
             a.x = x.data();
             a.topk_ids = ids.data();
             a.topk_weights = w.data();
             a.lora = lora_set(ex, make_lora(ag, bg, au, bu, ad, bd, scaling));
             a.out_dtype = check(out, "out", {T, H}, kFloat);
             a.out = out.data();
             std::shared_ptr<Saved> saved;
             Job job = ex.forward_async(a, &saved);
             return std::make_pair(saved, job);
           },
           "x"_a, "topk_ids"_a, "topk_weights"_a, "expert_mask"_a.none(), "A_gate"_a.none(),
           "B_gate"_a.none(), "A_up"_a.none(), "B_up"_a.none(), "A_down"_a.none(),
           "B_down"_a.none(), "scaling"_a, "out"_a)
      .def("backward",
           [](MoeExperts& ex, std::shared_ptr<Saved> saved, const Array& dout,
              std::optional<Array> ag, std::optional<Array> bg, std::optional<Array> au,
              std::optional<Array> bu, std::optional<Array> ad, std::optional<Array> bd,
              float scaling, std::optional<OutArray> dx, std::optional<OutArray> dw,
              std::optional<OutArray> dAg, std::optional<OutArray> dBg,
              std::optional<OutArray> dAu, std::optional<OutArray> dBu,
              std::optional<OutArray> dAd, std::optional<OutArray> dBd) {
             if (!saved) throw std::invalid_argument("backward needs the handle from forward");
             const int64_t T = saved->T, k = saved->k, H = ex.H();
             BackwardArgs a;
             a.dout_dtype = check(dout, "grad_out", {T, H}, kFloat);
             a.dout = dout.data();
             a.lora = lora_set(ex, make_lora(ag, bg, au, bu, ad, bd, scaling));
             if (dx) {
               a.dx_dtype = check(*dx, "grad_x", {T, H}, kFloat);
               a.dx = dx->data();
             }
             if (dw) {
               a.dw_dtype = check(*dw, "grad_topk_weights", {T, k}, kFloat);
               a.dtopk_weights = dw->data();
             }
             const LoraProj* p[3] = {&a.lora.gate, &a.lora.up, &a.lora.down};
             std::optional<OutArray>* gA[3] = {&dAg, &dAu, &dAd};
             std::optional<OutArray>* gB[3] = {&dBg, &dBu, &dBd};
             float** oA[3] = {&a.grads.dA_gate, &a.grads.dA_up, &a.grads.dA_down};
             float** oB[3] = {&a.grads.dB_gate, &a.grads.dB_up, &a.grads.dB_down};
             const int64_t in[3] = {H, H, ex.I()}, outd[3] = {ex.I(), ex.I(), H};
             for (int w = 0; w < 3; ++w) {
               const std::string base = std::string("grad lora.") + kProj[w];
               if (gA[w]->has_value()) {
                 if (!p[w]->enabled()) throw std::invalid_argument((base + ".A requested but that LoRA is off"));
                 check(**gA[w], base + ".A", {ex.E(), p[w]->r, in[w]}, {DType::kF32});
                 *oA[w] = static_cast<float*>((*gA[w])->data());
               }
               if (gB[w]->has_value()) {
                 if (!p[w]->enabled()) throw std::invalid_argument((base + ".B requested but that LoRA is off"));
                 check(**gB[w], base + ".B", {ex.E(), outd[w], p[w]->r}, {DType::kF32});
                 *oB[w] = static_cast<float*>((*gB[w])->data());
               }
             }
             return ex.backward_async(saved, a);
           },
           "saved"_a, "grad_out"_a, "A_gate"_a.none(), "B_gate"_a.none(), "A_up"_a.none(),
           "B_up"_a.none(), "A_down"_a.none(), "B_down"_a.none(), "scaling"_a,
           "grad_x"_a.none(), "grad_topk_weights"_a.none(), "grad_A_gate"_a.none(),
           "grad_B_gate"_a.none(), "grad_A_up"_a.none(), "grad_B_up"_a.none(),
           "grad_A_down"_a.none(), "grad_B_down"_a.none());
}
