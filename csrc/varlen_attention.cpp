// Native CPU varlen attention: input checks, the per-capability kernel choice and the
// torch.ops.omni_native.varlen_attention_{fwd,bwd} registration. The Python wrapper
// (omni_core/ops/native_attention.py) adds autograd and the reference fallback rules.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "varlen_attention.h"

namespace omni::attention {
namespace {

std::string capability() {
  const std::string cap = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
  if (cap == "AVX512" || cap == "AVX2") return cap;
  return "DEFAULT";
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool cross) {
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), "varlen_attention (native): q, k, v must be CPU tensors, got ", t->device());
    TORCH_CHECK(t->dim() == 3, "varlen_attention (native): q, k, v must be [T, H, Dh], got ", t->sizes());
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "varlen_attention (native): q must be float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "varlen_attention (native): q, k, v dtypes disagree: ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(v.sizes() == k.sizes() && k.size(2) == q.size(2) && (cross || k.size(0) == q.size(0)),
              "varlen_attention (native): q, k, v shapes disagree: ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "varlen_attention (native): the key/value heads Hk=",
              k.size(1), " must divide the query heads H=", q.size(1));
}

// cu must be a CPU int32 [B+1] running from 0 to T, non-decreasing.
void check_cu(const at::Tensor& cu, int64_t T, const char* name) {
  TORCH_CHECK(cu.device().is_cpu() && cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() >= 1,
              "varlen_attention (native): ", name, " must be a CPU int32 [B+1] tensor, got ", cu.sizes(), " ",
              cu.scalar_type());
  const at::Tensor c = cu.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  const int64_t B = c.numel() - 1;
  TORCH_CHECK(p[0] == 0 && p[B] == T, "varlen_attention (native): ", name, " must run from 0 to T=", T, ", got ",
              p[0], " .. ", p[B]);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(p[b + 1] >= p[b], "varlen_attention (native): ", name, " must be non-decreasing (index ", b, ")");
}

Args make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
               const std::optional<at::Tensor>& cu_seqlens_k, bool causal, double scale,
               const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& lut,
               const std::optional<at::Tensor>& modality, const std::optional<at::Tensor>& position) {
  const bool cross = cu_seqlens_k.has_value();
  check_qkv(q, k, v, cross);
  const int64_t T = q.size(0), H = q.size(1);
  check_cu(cu_seqlens, T, "cu_seqlens");
  Args a;
  a.q = q.contiguous();
  a.k = k.contiguous();
  a.v = v.contiguous();
  a.cu_seqlens = cu_seqlens.contiguous();
  a.cu_seqlens_k = a.cu_seqlens;
  if (cross) {
    TORCH_CHECK(cu_seqlens_k->numel() == cu_seqlens.numel(), "varlen_attention (native): cu_seqlens_k must have the ",
                cu_seqlens.numel(), " entries of cu_seqlens (one key sequence per query sequence)");
    check_cu(*cu_seqlens_k, k.size(0), "cu_seqlens_k");
    a.cu_seqlens_k = cu_seqlens_k->contiguous();
  }
  a.causal = causal;
  a.scale = scale;
  const int given = table.has_value() + lut.has_value() + modality.has_value() + position.has_value();
  TORCH_CHECK(given == 0 || given == 4,
              "varlen_attention (native): the bias needs bias_table, bias_lut, modality and position together");
  TORCH_CHECK(given == 0 || !cross, "varlen_attention (native): the relative-position bias is a self-attention "
              "feature: it cannot be combined with cu_seqlens_k");
  if (given == 4) {
    TORCH_CHECK(table->dim() == 2 && table->size(1) == H, "varlen_attention (native): bias_table must be [NB, H=", H,
                "], got ", table->sizes());
    TORCH_CHECK(table->scalar_type() == q.scalar_type(), "varlen_attention (native): bias_table dtype ",
                table->scalar_type(), " differs from q's ", q.scalar_type());
    const bool dense = lut->dim() == 3 && lut->size(1) == lut->size(2);
    const bool compact = lut->dim() == 2 && (lut->size(1) % 2 == 1 || lut->size(1) >= 4);
    TORCH_CHECK(lut->scalar_type() == at::kInt && (dense || compact), "varlen_attention (native): bias_lut must be ",
                "int32 [M, P, P], the relative [M, 2P-1] (odd width) or the CLS-aware [M, 2P+2] (even width), got ",
                lut->sizes(), " ", lut->scalar_type());
    if (dense) {
      a.lut_form = LutForm::kDense;
      a.lut_positions = lut->size(1);
    } else if (lut->size(1) % 2 == 1) {
      a.lut_form = LutForm::kRelative;
      a.lut_positions = (lut->size(1) + 1) / 2;
    } else {
      a.lut_form = LutForm::kClsRelative;
      a.lut_positions = (lut->size(1) - 2) / 2;
    }
    TORCH_CHECK(modality->dim() == 1 && modality->size(0) == T && !at::isFloatingType(modality->scalar_type()),
                "varlen_attention (native): modality must be an integer [T=", T, "] tensor");
    TORCH_CHECK(position->scalar_type() == at::kInt && position->dim() == 1 && position->size(0) == T,
                "varlen_attention (native): position must be int32 [T=", T, "]");
    for (const auto* t : {&*table, &*lut, &*modality, &*position})
      TORCH_CHECK(t->device().is_cpu(), "varlen_attention (native): bias tensors must be on the CPU");
    a.table = table->contiguous();
    a.lut = lut->contiguous();
    a.modality = modality->to(at::kInt).contiguous();
    a.position = position->contiguous();
    // Out-of-range ids would read outside the LUT: checked here, before any work (O(T)). The
    // LUT's entries are checked by the kernel where it reads them (an error after the run).
    const int64_t M = a.lut.size(0), P = a.lut_positions;
    if (T > 0) {
      TORCH_CHECK(a.modality.min().item<int>() >= 0 && a.modality.max().item<int>() < M,
                  "varlen_attention (native): modality ids must lie in [0, ", M, ")");
      TORCH_CHECK(a.position.min().item<int>() >= 0 && a.position.max().item<int>() < P,
                  "varlen_attention (native): positions must lie in [0, ", P, ")");
    }
  }
  return a;
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens, double scale,
    const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& lut,
    const std::optional<at::Tensor>& modality, const std::optional<at::Tensor>& position,
    const std::optional<at::Tensor>& cu_seqlens_k, bool causal, const std::optional<at::Tensor>& out_buf,
    const std::optional<at::Tensor>& lse_buf) {
  const Args a = make_args(q, k, v, cu_seqlens, cu_seqlens_k, causal, scale, table, lut, modality, position);
  // out_buf / lse_buf let a test hand in NaN-poisoned buffers, so an unwritten element shows.
  at::Tensor out = out_buf.has_value() ? *out_buf : at::empty_like(a.q);
  at::Tensor lse = lse_buf.has_value() ? *lse_buf : at::empty({a.q.size(0), a.q.size(1)}, a.q.options());
  TORCH_CHECK(out.sizes() == a.q.sizes() && out.scalar_type() == a.q.scalar_type() && out.is_contiguous() &&
                  lse.dim() == 2 && lse.size(0) == a.q.size(0) && lse.size(1) == a.q.size(1) &&
                  lse.scalar_type() == a.q.scalar_type() && lse.is_contiguous(),
              "varlen_attention (native): out must be a contiguous [T, H, Dh] and lse a contiguous [T, H] tensor "
              "in q's dtype");
  const std::string cap = capability();
  if (cap == "AVX512") {
    AVX512::forward(a, out, lse);
  } else if (cap == "AVX2") {
    AVX2::forward(a, out, lse);
  } else {
    DEFAULT::forward(a, out, lse);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens, double scale, const std::optional<at::Tensor>& table,
    const std::optional<at::Tensor>& lut, const std::optional<at::Tensor>& modality,
    const std::optional<at::Tensor>& position, bool table_grad, const std::optional<at::Tensor>& cu_seqlens_k,
    bool causal, const std::optional<at::Tensor>& dlse) {
  const Args a = make_args(q, k, v, cu_seqlens, cu_seqlens_k, causal, scale, table, lut, modality, position);
  for (const auto* t : {&dout, &out})
    TORCH_CHECK(t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type() && t->device().is_cpu(),
                "varlen_attention (native): out and its gradient must match q (", q.sizes(), " ", q.scalar_type(),
                ")");
  for (const at::Tensor* t : {&lse, dlse.has_value() ? &*dlse : &lse})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == q.size(0) && t->size(1) == q.size(1) &&
                    t->scalar_type() == q.scalar_type() && t->device().is_cpu(),
                "varlen_attention (native): lse and its gradient must be [T, H] in q's dtype");
  Grads g{at::zeros_like(a.q), at::zeros_like(a.k), at::zeros_like(a.v), at::Tensor()};
  if (table_grad && a.table.defined()) g.dtable = at::zeros_like(a.table);
  const at::Tensor o = out.contiguous(), l = lse.contiguous(), d = dout.contiguous();
  const at::Tensor dl = dlse.has_value() ? dlse->contiguous() : at::Tensor();
  const std::string cap = capability();
  if (cap == "AVX512") {
    AVX512::backward(a, o, l, d, dl, g);
  } else if (cap == "AVX2") {
    AVX2::backward(a, o, l, d, dl, g);
  } else {
    DEFAULT::backward(a, o, l, d, dl, g);
  }
  // An empty dtable means "no gradient" (a schema cannot return an optional tensor).
  return {g.dq, g.dk, g.dv, g.dtable.defined() ? g.dtable : at::empty({0}, a.q.options())};
}

}  // namespace
}  // namespace omni::attention

// Schemas here; the kernels under the CPU key (not as composite ops), so the shape-only
// versions that omni_core/ops/native_attention.py registers let torch.compile trace them.
TORCH_LIBRARY(omni_native, m) {
  m.def("varlen_attention_capability() -> str", [] { return omni::attention::capability(); });
  m.def(
      "varlen_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, float scale, Tensor? bias_table, "
      "Tensor? bias_lut, Tensor? modality, Tensor? position, Tensor? cu_seqlens_k=None, bool causal=False, "
      "Tensor? out_buf=None, Tensor? lse_buf=None) "
      "-> (Tensor, Tensor)");
  m.def(
      "varlen_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens, "
      "float scale, Tensor? bias_table, Tensor? bias_lut, Tensor? modality, Tensor? position, bool table_grad, "
      "Tensor? cu_seqlens_k=None, bool causal=False, Tensor? dlse=None) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(omni_native, CPU, m) {
  m.impl("varlen_attention_fwd", &omni::attention::varlen_attention_fwd);
  m.impl("varlen_attention_bwd", &omni::attention::varlen_attention_bwd);
}
