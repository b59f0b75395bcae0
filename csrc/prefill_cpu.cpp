// The prompt pass (prefill) of the Llama layer stack in float32 on CPU, in C++: projections
// through the packed GEMM of gemm_cpu.h (or torch::mm), attention through ATen's
// scaled_dot_product_attention (the call the Python path makes), and everything between them
// (RMSNorm, rotary, the KV-cache write, SwiGLU, residual adds) in single passes over the rows.
//
// Why: a prompt batch is thousands of rows, and the Python layer spends about a third of its
// time in ~25 elementwise ops per layer that each sweep [rows, H] through memory; these
// passes do the same math in two sweeps per layer.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "decode_cpu.h"
#include "decode_stack.h"
#include "gemm_cpu.h"

namespace py = pybind11;

namespace pgen {
namespace {

constexpr int64_t kPackedPrefillRows = 512;

torch::Tensor prefill_layers_cpu(const torch::Tensor& hidden, const torch::Tensor& cos, const torch::Tensor& sin,
                                 const c10::optional<torch::Tensor>& attn_mask,
                                 const std::vector<torch::Tensor>& weights, const torch::Tensor& final_norm,
                                 const std::vector<torch::Tensor>& k_caches,
                                 const std::vector<torch::Tensor>& v_caches, const torch::Tensor& slot_mapping,
                                 int64_t num_heads, int64_t num_kv_heads, double eps, double scale) {
  DecodeStack st = check_stack("prefill_layers_cpu", weights, final_norm, k_caches, v_caches, num_heads,
                                     num_kv_heads, eps, scale);
  TORCH_CHECK(hidden.dim() == 3 && hidden.scalar_type() == torch::kFloat32 && hidden.device().is_cpu(),
              "prefill_layers_cpu: hidden must be a float32 CPU [B, S, H] tensor, got ", hidden.scalar_type(), " ",
              hidden.sizes());
  const int64_t B = hidden.size(0), S = hidden.size(1), H = st.H, Hq = st.Hq, Hkv = st.Hkv, D = st.D;
  const int64_t N = B * S, L = st.L;
  TORCH_CHECK(hidden.size(2) == H, "prefill_layers_cpu: hidden width ", hidden.size(2), " != hidden size ", H);
  for (const auto* t : {&cos, &sin}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->sizes() == c10::IntArrayRef({B, S, D}) &&
                    t->is_contiguous(),
                "prefill_layers_cpu: cos/sin must be contiguous float32 [", B, ", ", S, ", ", D, "], got ",
                t->scalar_type(), " ", t->sizes());
  }
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.sizes() == c10::IntArrayRef({B, S}) &&
                  slot_mapping.is_contiguous(),
              "prefill_layers_cpu: slot_mapping must be a contiguous int64 [", B, ", ", S, "] tensor, got ",
              slot_mapping.scalar_type(), " ", slot_mapping.sizes());
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(slots[i] >= -1 && slots[i] < st.rows * L, "prefill_layers_cpu: slot_mapping[", i / S, ", ", i % S,
                "] = ", slots[i], " is outside the cache (", st.rows, " rows x ", L, " positions; -1 = skip)");
  }
  if (attn_mask.has_value()) {
    TORCH_CHECK(attn_mask->scalar_type() == torch::kBool && attn_mask->dim() == 4 && attn_mask->size(0) == B &&
                    attn_mask->size(2) == S && attn_mask->size(3) == S,
                "prefill_layers_cpu: attn_mask must be bool [", B, ", 1, ", S, ", ", S, "], got ",
                attn_mask->scalar_type(), " ", attn_mask->sizes());
  }

  py::gil_scoped_release no_gil;
  c10::InferenceMode inference;
  torch::Tensor h = hidden.contiguous().clone().view({N, H});
  torch::Tensor x = torch::empty_like(h);
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  const float epsf = st.eps;
  const int64_t grain = 256;  // tokens per task of the cache write
  // Enough rows to repay packing the weights (one copy of them): the packed kernel, each
  // thread on its own blocks of rows, runs above the BLAS's rate on these narrow matrices.
  if (N >= kPackedPrefillRows) pack_stack(st);
  const bool packed = !st.packed.empty();
  for (int64_t l = 0; l < st.layers; ++l) {
    const torch::Tensor* w = &st.weights[kWeightsPerLayer * l];
    auto proj = [&](const torch::Tensor& in, int i) {
      static constexpr int kSlot[kWeightsPerLayer] = {-1, 0, 1, 2, 3, -1, 4, 5, 6};
      if (!packed) return torch::mm(in, w[i].t());
      const int64_t Nout = w[i].size(0), K = in.size(1);
      torch::Tensor a = in.contiguous(), y = torch::empty({N, Nout}, in.options());
      const float* P = st.packed[7 * l + kSlot[i]].data_ptr<float>();
      at::parallel_for(0, (N + 5) / 6, 8, [&](int64_t b0, int64_t b1) {  // blocks of 6 rows (the kernel's)
        const int64_t r0 = b0 * 6, r1 = std::min(N, b1 * 6);
        gemm_packed_f32(a.data_ptr<float>() + r0 * K, r1 - r0, K, P, Nout, y.data_ptr<float>() + r0 * Nout);
      });
      return y;
    };
    rms_norm_rows_f32(h.data_ptr<float>(), w[0].data_ptr<float>(), x.data_ptr<float>(), N, H, epsf);
    torch::Tensor q = proj(x, 1);
    torch::Tensor k = proj(x, 2);
    torch::Tensor v = proj(x, 3);
    float* kc = st.k[l].data_ptr<float>();
    float* vc = st.v[l].data_ptr<float>();
    rotary_rows_f32(q.data_ptr<float>(), c, s, N, Hq, D);
    rotary_rows_f32(k.data_ptr<float>(), c, s, N, Hkv, D);
    at::parallel_for(0, N, grain, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) {
        if (slots[i] < 0) continue;
        const int64_t row = slots[i] / L, pos = slots[i] % L;
        for (int64_t hh = 0; hh < Hkv; ++hh) {
          const int64_t dst = ((row * Hkv + hh) * L + pos) * D;
          std::memcpy(kc + dst, k.data_ptr<float>() + (i * Hkv + hh) * D, sizeof(float) * D);
          std::memcpy(vc + dst, v.data_ptr<float>() + (i * Hkv + hh) * D, sizeof(float) * D);
        }
      }
    });
    // [B, heads, S, D] views, as op_dispatch.prompt_attention passes them
    torch::Tensor qt = q.view({B, S, Hq, D}).transpose(1, 2);
    torch::Tensor kt = k.view({B, S, Hkv, D}).transpose(1, 2);
    torch::Tensor vt = v.view({B, S, Hkv, D}).transpose(1, 2);
    torch::Tensor o = attn_mask.has_value()
                          ? at::scaled_dot_product_attention(qt, kt, vt, *attn_mask, 0.0, false, st.scale, Hq != Hkv)
                          : at::scaled_dot_product_attention(qt, kt, vt, {}, 0.0, true, st.scale, Hq != Hkv);
    h.add_(proj(o.transpose(1, 2).reshape({N, Hq * D}), 4));
    rms_norm_rows_f32(h.data_ptr<float>(), w[5].data_ptr<float>(), x.data_ptr<float>(), N, H, epsf);
    torch::Tensor g = proj(x, 6);
    torch::Tensor u = proj(x, 7);
    silu_mul_f32(g.data_ptr<float>(), u.data_ptr<float>(), g.numel());
    h.add_(proj(g, 8));
  }
  torch::Tensor y = torch::empty_like(h);
  rms_norm_rows_f32(h.data_ptr<float>(), st.final_norm.data_ptr<float>(), y.data_ptr<float>(), N, H, epsf);
  return y.view({B, S, H});
}

}  // namespace

void register_prefill_ops(py::module_& m) {
  m.def("prefill_layers_cpu", &prefill_layers_cpu, py::arg("hidden"), py::arg("cos"), py::arg("sin"),
        py::arg("attn_mask"), py::arg("weights"), py::arg("final_norm"), py::arg("k_caches"), py::arg("v_caches"),
        py::arg("slot_mapping"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("eps"), py::arg("scale"),
        "Prompt pass of every Llama layer plus the final norm in float32 on CPU: hidden [B, S, H] -> [B, S, H]. "
        "attn_mask: None (causal, nothing padded) or bool [B, 1, S, S]; each token's K/V are written to the "
        "head-major caches [rows, Hkv, L, D] at slot_mapping [B, S] (row * L + position; -1 = skip).");
}

}  // namespace pgen
