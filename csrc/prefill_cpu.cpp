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
constexpr int64_t kPackedAttentionMaxLen = 512;  // scores [S, S] per thread stay small
// Rows a thread takes through every layer at a time (whole prompts, at least one) on the packed
// path: a chunk's activations ([rows, I] for the MLP: 1 MB at 256 rows and I = 1024) stay in
// cache between the passes of a layer; the weights are read once per chunk. Hidden 256 / MLP
// 1024, 4 layers, 128-token prompts, 2 threads, medians of 15-31 interleaved calls, ms for
// unchunked / 512 rows / 256 rows / 128 rows: batch 32 134 / 111-124 / 109-112 / 114,
// batch 16 59 / 57-60 / 57-58 / 59, batch 8 33 / 31-32 / 29-30 / 30.
constexpr int64_t kPrefillChunkRows = 256;

// Causal attention of left-padded prompts through the packed GEMM, one (prompt, query head)
// per task: scores = Q K^T and P V, both skipping the keys past each row block's diagonal,
// with the causal softmax between them.
// q [B*S, Hq, D], k / v [B*S, Hkv, D] (rotary applied), pad [B] -> [B*S, Hq * D].
// last_only: q [B, Hq, D] holds each prompt's last query only -> [B, Hq * D], the same values
// as that query's row of the full pass (the packed kernel's rows do not depend on their block).
torch::Tensor prompt_attention_packed(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                      int64_t B, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, const int64_t* pad,
                                      float scale, bool last_only) {
  const int64_t first = last_only ? S - 1 : 0;  // the query rows [first, S) of each prompt
  torch::Tensor out = torch::empty({B * (S - first), Hq * D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t G = Hq / Hkv;
  at::parallel_for(0, B * Hq, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qc(S * D), kc(S * D), vt(D * S), pk(packed_weight_floats(S, D)), pv(packed_weight_floats(D, S));
    std::vector<float> sc(S * S), o(S * D);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t b = item / Hq, h = item % Hq, hk = h / G;
      for (int64_t i = 0; i < S; ++i) {
        const int64_t t = b * S + i;
        if (!last_only) std::memcpy(&qc[i * D], qp + (t * Hq + h) * D, sizeof(float) * D);
        std::memcpy(&kc[i * D], kp + (t * Hkv + hk) * D, sizeof(float) * D);
        for (int64_t d = 0; d < D; ++d) vt[d * S + i] = vp[(t * Hkv + hk) * D + d];
      }
      if (last_only) std::memcpy(&qc[(S - 1) * D], qp + (b * Hq + h) * D, sizeof(float) * D);
      pack_weight_f32(kc.data(), S, D, pk.data());
      pack_weight_f32(vt.data(), D, S, pv.data());
      // rows [r0, r1) need keys [0, r1) only (blocks of 16; last_only: the one row S - 1)
      for (int64_t r0 = first; r0 < S; r0 += 16) {
        const int64_t r1 = std::min(S, r0 + 16);
        gemm_packed_f32(&qc[r0 * D], r1 - r0, D, pk.data(), r1, &sc[r0 * S], S);
      }
      causal_softmax_rows_f32(sc.data(), S, S, pad ? pad[b] : 0, scale, first);
      for (int64_t r0 = first; r0 < S; r0 += 16) {  // P V for rows [r0, r1): their keys [0, r1) only
        const int64_t r1 = std::min(S, r0 + 16);
        gemm_packed_f32(&sc[r0 * S], r1 - r0, r1, pv.data(), D, &o[r0 * D], D, S, S);
      }
      for (int64_t i = first; i < S; ++i) {
        std::memcpy(op + ((b * (S - first) + i - first) * Hq + h) * D, &o[i * D], sizeof(float) * D);
      }
    }
  });
  return out;
}

torch::Tensor prefill_layers_cpu(const torch::Tensor& hidden, const torch::Tensor& cos, const torch::Tensor& sin,
                                 const c10::optional<torch::Tensor>& pad_counts,
                                 const std::vector<torch::Tensor>& weights, const torch::Tensor& final_norm,
                                 const std::vector<torch::Tensor>& k_caches,
                                 const std::vector<torch::Tensor>& v_caches, const torch::Tensor& slot_mapping,
                                 int64_t num_heads, int64_t num_kv_heads, double eps, double scale,
                                 bool last_only, int64_t chunk_rows) {
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
  const int64_t* pad = nullptr;
  if (pad_counts.has_value()) {
    TORCH_CHECK(pad_counts->scalar_type() == torch::kInt64 && pad_counts->dim() == 1 && pad_counts->size(0) == B &&
                    pad_counts->is_contiguous(),
                "prefill_layers_cpu: pad_counts must be a contiguous int64 [", B, "] tensor, got ",
                pad_counts->scalar_type(), " ", pad_counts->sizes());
    pad = pad_counts->data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(pad[b] >= 0 && pad[b] < S, "prefill_layers_cpu: pad_counts[", b, "] = ", pad[b],
                  " must be in [0, ", S, ") (each prompt keeps >= 1 token)");
    }
  }

  py::gil_scoped_release no_gil;
  c10::InferenceMode inference;
  const torch::Tensor hid = hidden.contiguous();
  const float epsf = st.eps;
  const int64_t grain = 256;  // tokens per task of the cache write
  // Enough rows to repay packing the weights (one copy of them): the packed kernel, each
  // thread on its own blocks of rows, runs above the BLAS's rate on these narrow matrices.
  if (N >= kPackedPrefillRows) pack_stack(st);
  const bool packed = !st.packed.empty();
  const bool packed_attention = packed && S <= kPackedAttentionMaxLen;
  // last_only: only each prompt's last hidden state is returned, so the last layer computes
  // K/V for every token (the cache needs them) but its queries, attention output, o_proj and
  // MLP for the last token only (about 20% of a 4-layer prefill). Only with the packed kernels,
  // whose rows are independent of the batch: the values equal the full pass's last rows.
  const bool trim_last = last_only && packed_attention;
  c10::optional<torch::Tensor> attn_mask;  // ATen's attention, padded prompts: causal & real keys, or itself
  if (!packed_attention && pad != nullptr) {
    torch::Tensor pos = torch::arange(S);
    torch::Tensor real = pos.unsqueeze(0) >= pad_counts->unsqueeze(1);  // [B, S] keys
    torch::Tensor causal = pos.unsqueeze(1) >= pos.unsqueeze(0);        // [S, S]
    attn_mask = ((causal.unsqueeze(0) & real.unsqueeze(1)) | torch::eye(S, torch::kBool).unsqueeze(0)).unsqueeze(1);
  }
  torch::Tensor y = torch::empty({B, last_only ? 1 : S, H}, hid.options());
  // Every layer for prompts [b0, b1) into y[b0:b1] (prompts never interact: a prompt's rows
  // read and write only their own cache slots).
  auto run_prompts = [&](int64_t b0, int64_t b1) {
    const int64_t Bg = b1 - b0, Ng = Bg * S;
    torch::Tensor h = hid.narrow(0, b0, Bg).clone().view({Ng, H});
    torch::Tensor x = torch::empty_like(h);
    const float* c = cos.data_ptr<float>() + b0 * S * D;
    const float* s = sin.data_ptr<float>() + b0 * S * D;
    const int64_t* sl = slots + b0 * S;
    const int64_t* pd = pad ? pad + b0 : nullptr;
    // rows b * S + S - 1 of t [Ng, w] -> [Bg, w]
    auto last_rows = [&](const torch::Tensor& t) { return t.view({Bg, S, t.size(1)}).select(1, S - 1).contiguous(); };
    for (int64_t l = 0; l < st.layers; ++l) {
      const torch::Tensor* w = &st.weights[kWeightsPerLayer * l];
      auto proj = [&](const torch::Tensor& in, int i) {
        if (!packed) return torch::mm(in, w[i].t());
        const int64_t Nout = w[i].size(0), K = in.size(1), M = in.size(0);
        torch::Tensor a = in.contiguous(), out = torch::empty({M, Nout}, in.options());
        const float* P = st.packed_weight(l, i).data_ptr<float>();
        at::parallel_for(0, M, 48, [&](int64_t r0, int64_t r1) {  // each thread its own rows
          gemm_packed_f32(a.data_ptr<float>() + r0 * K, r1 - r0, K, P, Nout, out.data_ptr<float>() + r0 * Nout);
        });
        return out;
      };
      const bool trim = trim_last && l == st.layers - 1;
      rms_norm_rows_f32(h.data_ptr<float>(), w[0].data_ptr<float>(), x.data_ptr<float>(), Ng, H, epsf);
      torch::Tensor q = proj(trim ? last_rows(x) : x, 1);
      torch::Tensor k = proj(x, 2);
      torch::Tensor v = proj(x, 3);
      float* kc = st.k[l].data_ptr<float>();
      float* vc = st.v[l].data_ptr<float>();
      if (trim) {  // query b is token b * S + S - 1: its rotary angles
        for (int64_t b = 0; b < Bg; ++b) {
          const int64_t t = b * S + S - 1;
          rotary_rows_f32(q.data_ptr<float>() + b * Hq * D, c + t * D, s + t * D, 1, Hq, D);
        }
      } else {
        rotary_rows_f32(q.data_ptr<float>(), c, s, Ng, Hq, D);
      }
      rotary_rows_f32(k.data_ptr<float>(), c, s, Ng, Hkv, D);
      at::parallel_for(0, Ng, grain, [&](int64_t a, int64_t b) {
        for (int64_t i = a; i < b; ++i) {
          if (sl[i] < 0) continue;
          const int64_t row = sl[i] / L, pos = sl[i] % L;
          for (int64_t hh = 0; hh < Hkv; ++hh) {
            const int64_t dst = ((row * Hkv + hh) * L + pos) * D;
            std::memcpy(kc + dst, k.data_ptr<float>() + (i * Hkv + hh) * D, sizeof(float) * D);
            std::memcpy(vc + dst, v.data_ptr<float>() + (i * Hkv + hh) * D, sizeof(float) * D);
          }
        }
      });
      torch::Tensor o;
      if (packed_attention) {
        o = prompt_attention_packed(q, k, v, Bg, S, Hq, Hkv, D, pd, st.scale, trim);
      } else {
        // [B, heads, S, D] views, as op_dispatch.prompt_attention passes them
        torch::Tensor qt = q.view({Bg, S, Hq, D}).transpose(1, 2);
        torch::Tensor kt = k.view({Bg, S, Hkv, D}).transpose(1, 2);
        torch::Tensor vt = v.view({Bg, S, Hkv, D}).transpose(1, 2);
        o = (attn_mask.has_value()
                 ? at::scaled_dot_product_attention(qt, kt, vt, attn_mask->narrow(0, b0, Bg), 0.0, false, st.scale,
                                                    Hq != Hkv)
                 : at::scaled_dot_product_attention(qt, kt, vt, {}, 0.0, true, st.scale, Hq != Hkv))
                .transpose(1, 2)
                .reshape({Ng, Hq * D});
      }
      if (trim) {  // from here on, the residual stream of the last tokens only
        h = last_rows(h);
        x = torch::empty_like(h);
      }
      const int64_t n = h.size(0);
      h.add_(proj(o, 4));
      rms_norm_rows_f32(h.data_ptr<float>(), w[5].data_ptr<float>(), x.data_ptr<float>(), n, H, epsf);
      torch::Tensor g = proj(x, 6);
      torch::Tensor u = proj(x, 7);
      silu_mul_f32(g.data_ptr<float>(), u.data_ptr<float>(), g.numel());
      h.add_(proj(g, 8));
    }
    if (last_only && !trim_last) h = last_rows(h);
    rms_norm_rows_f32(h.data_ptr<float>(), st.final_norm.data_ptr<float>(),
                      y.data_ptr<float>() + b0 * y.size(1) * H, h.size(0), H, epsf);
  };
  // Packed kernels (every value independent of which rows run together): one group of
  // prompts per thread, each taking its prompts through every layer with no barrier in
  // between -- a per-op fork / join is ~30 barriers per layer, and one descheduled thread
  // (a busy or shared machine) stalls them all. Otherwise one pass with per-op parallelism.
  // On that path a group's prompts also go through the layers in chunks of <= chunk_rows rows
  // (kPrefillChunkRows; whole prompts; <= 0: one chunk), the same values in fewer cache misses.
  const int64_t per_chunk = packed_attention && chunk_rows > 0 ? std::max<int64_t>(1, chunk_rows / S) : B;
  auto run_chunks = [&](int64_t b0, int64_t b1) {
    for (int64_t c = b0; c < b1; c += per_chunk) run_prompts(c, std::min(b1, c + per_chunk));
  };
  const int64_t G = packed_attention ? std::min<int64_t>(at::get_num_threads(), B) : 1;
  if (G > 1 && !at::in_parallel_region()) {
    at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
      c10::InferenceMode worker_inference;  // thread-local: workers do not inherit the caller's
      for (int64_t g = g0; g < g1; ++g) run_chunks(g * B / G, (g + 1) * B / G);
    });
  } else {
    run_chunks(0, B);
  }
  return y;
}

}  // namespace

void register_prefill_ops(py::module_& m) {
  m.def("prefill_layers_cpu", &prefill_layers_cpu, py::arg("hidden"), py::arg("cos"), py::arg("sin"),
        py::arg("pad_counts"), py::arg("weights"), py::arg("final_norm"), py::arg("k_caches"), py::arg("v_caches"),
        py::arg("slot_mapping"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("eps"), py::arg("scale"),
        py::arg("last_only") = false, py::arg("chunk_rows") = kPrefillChunkRows,
        "Prompt pass of every Llama layer plus the final norm in float32 on CPU: hidden [B, S, H] -> [B, S, H]. "
        "pad_counts: None (nothing padded) or int64 [B] left-padding tokens per prompt (a padding query "
        "attends to itself only); each token's K/V are written to the "
        "head-major caches [rows, Hkv, L, D] at slot_mapping [B, S] (row * L + position; -1 = skip). "
        "last_only: return [B, 1, H], each prompt's last hidden state only (the values of the full pass). "
        "chunk_rows: on the packed path each thread runs its prompts through the layers in chunks of at most "
        "this many rows (whole prompts; <= 0: all at once); the values do not depend on it.");
}

}  // namespace pgen
