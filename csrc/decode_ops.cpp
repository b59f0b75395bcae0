// Torch glue of the float32 CPU decode step (csrc/decode_cpu.*): validates the inputs once,
// then runs every layer of one cached decode step in C++ — projections through torch::mm
// (MKL / oneDNN), everything between them in the plain kernels — with the GIL released.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "decode_cpu.h"
#include "decode_stack.h"
#include "gemm_cpu.h"

namespace py = pybind11;

namespace pgen {
namespace {

// name: "<op>: <tensor>", as the error messages say it
void check_f32(const torch::Tensor& t, const std::string& name, std::vector<int64_t> shape) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32,
              name, " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.sizes() == c10::IntArrayRef(shape), name, " has shape ", t.sizes(), ", expected ",
              c10::IntArrayRef(shape));
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_i32_rows(const torch::Tensor& t, const char* op, const char* name, int64_t B) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kInt32 && t.dim() == 1 &&
                  t.size(0) == B && t.is_contiguous(),
              op, ": ", name, " must be a contiguous int32 CPU tensor of shape [", B,
              "], got ", t.scalar_type(), " ", t.sizes());
}

}  // namespace

DecodeStack check_stack(const char* fn, const std::vector<torch::Tensor>& weights,
                        const torch::Tensor& final_norm, const std::vector<torch::Tensor>& k_caches,
                        const std::vector<torch::Tensor>& v_caches, int64_t num_heads,
                        int64_t num_kv_heads, double eps, double scale) {
  TORCH_CHECK(final_norm.dim() == 1, fn, ": final norm weight must be [H], got ", final_norm.sizes());
  DecodeStack st;
  st.H = final_norm.size(0);  // H from the model, not the input
  st.layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(st.layers >= 1 && static_cast<int64_t>(v_caches.size()) == st.layers &&
                  static_cast<int64_t>(weights.size()) == kWeightsPerLayer * st.layers,
              fn, ": expected ", kWeightsPerLayer, " weights per layer and one K and V cache per "
              "layer, got ", weights.size(), " weights, ", k_caches.size(), " K and ", v_caches.size(),
              " V caches");
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0,
              fn, ": num_heads (", num_heads, ") must be a multiple of num_kv_heads (", num_kv_heads, ")");
  const torch::Tensor& k0 = k_caches[0];
  TORCH_CHECK(k0.dim() == 4, fn, ": caches must be head-major [rows, Hkv, L, D], got ", k0.sizes());
  st.rows = k0.size(0);
  st.L = k0.size(2);
  st.D = k0.size(3);
  TORCH_CHECK(k0.size(1) == num_kv_heads, fn, ": cache has ", k0.size(1), " KV heads, config says ",
              num_kv_heads);
  TORCH_CHECK(st.D % 2 == 0 && st.D <= 1024, fn, ": head_dim must be even and <= 1024, got ", st.D);
  st.Hq = num_heads;
  st.Hkv = num_kv_heads;
  TORCH_CHECK(weights[6].dim() == 2, fn, ": layer 0 gate_proj.weight must be 2-D, got ", weights[6].sizes());
  st.I = weights[6].size(0);
  const int64_t H = st.H, Hq = st.Hq, Hkv = st.Hkv, D = st.D, I = st.I;
  const std::string f = fn;
  check_f32(final_norm, f + ": final norm weight", {H});
  for (int64_t l = 0; l < st.layers; ++l) {
    const std::string p = f + ": layer " + std::to_string(l) + " ";
    const torch::Tensor* w = &weights[kWeightsPerLayer * l];
    check_f32(w[0], p + "input_layernorm.weight", {H});
    check_f32(w[1], p + "q_proj.weight", {Hq * D, H});
    check_f32(w[2], p + "k_proj.weight", {Hkv * D, H});
    check_f32(w[3], p + "v_proj.weight", {Hkv * D, H});
    check_f32(w[4], p + "o_proj.weight", {H, Hq * D});
    check_f32(w[5], p + "post_attention_layernorm.weight", {H});
    check_f32(w[6], p + "gate_proj.weight", {I, H});
    check_f32(w[7], p + "up_proj.weight", {I, H});
    check_f32(w[8], p + "down_proj.weight", {H, I});
    check_f32(k_caches[l], p + "K cache", {st.rows, Hkv, st.L, D});
    check_f32(v_caches[l], p + "V cache", {st.rows, Hkv, st.L, D});
  }
  st.weights = weights;
  st.final_norm = final_norm;
  st.k = k_caches;
  st.v = v_caches;
  st.eps = static_cast<float>(eps);
  st.scale = static_cast<float>(scale);
  return st;
}

torch::Tensor pack_weight(const torch::Tensor& w) {
  const int64_t N = w.size(0), K = w.size(1);
  torch::Tensor p = torch::empty({packed_weight_floats(N, K)}, w.options());
  pack_weight_f32(w.data_ptr<float>(), N, K, p.data_ptr<float>());
  return p;
}

int64_t pack_limit_bytes() {
  const char* env = std::getenv("PGEN_CPU_PACK_MAX_MB");
  int64_t mb = 1024;
  if (env != nullptr && *env != 0) {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    TORCH_CHECK(end != env && *end == 0 && v >= 0, "PGEN_CPU_PACK_MAX_MB must be an integer >= 0, got '", env, "'");
    mb = v;
  }
  return mb << 20;
}

void pack_stack(DecodeStack& st) {
  if (!packed_gemm_available()) return;
  st.packed.clear();
  int64_t bytes = 0;  // the packed copy lives next to the weights while the call runs
  for (int64_t l = 0; l < st.layers; ++l) {
    for (int i : kProjections) {
      const torch::Tensor& w = st.weights[kWeightsPerLayer * l + i];
      bytes += packed_weight_floats(w.size(0), w.size(1)) * static_cast<int64_t>(sizeof(float));
    }
  }
  if (bytes > pack_limit_bytes()) return;
  std::vector<const torch::Tensor*> ws;
  for (int64_t l = 0; l < st.layers; ++l) {
    for (int i : kProjections) ws.push_back(&st.weights[kWeightsPerLayer * l + i]);
  }
  st.pack_lease = PackLease::acquire(bytes / static_cast<int64_t>(sizeof(float)));
  int64_t off = 0;
  for (const torch::Tensor* w : ws) {
    const int64_t n = packed_weight_floats(w->size(0), w->size(1));
    st.packed.push_back(st.pack_lease->buffer.narrow(0, off, n));
    off += n;
  }
  // weights are packed independently: in parallel, unless already inside a parallel region
  at::parallel_for(0, static_cast<int64_t>(ws.size()), 1, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      pack_weight_f32(ws[i]->data_ptr<float>(), ws[i]->size(0), ws[i]->size(1), st.packed[i].data_ptr<float>());
    }
  });
}

namespace {
// The process's buffer for packed weight stacks: reused by the next call once the stack holding
// it is gone (a call from another thread meanwhile packs into memory of its own).
std::mutex& arena_mutex() {
  static std::mutex mu;
  return mu;
}
torch::Tensor& arena_buffer() {
  static torch::Tensor buf;
  return buf;
}
bool& arena_busy() {
  static bool busy = false;
  return busy;
}
}  // namespace

std::shared_ptr<PackLease> PackLease::acquire(int64_t floats) {
  auto lease = std::make_shared<PackLease>();
  {
    std::lock_guard<std::mutex> lock(arena_mutex());
    if (!arena_busy()) {
      torch::Tensor& buf = arena_buffer();
      if (!buf.defined() || buf.numel() < floats) {
        buf = torch::Tensor();  // free the smaller one before allocating
        buf = torch::empty({floats}, torch::TensorOptions().dtype(torch::kFloat32));
      }
      arena_busy() = true;
      lease->from_arena_ = true;
      lease->buffer = buf;
    }
  }
  if (!lease->from_arena_) lease->buffer = torch::empty({floats}, torch::TensorOptions().dtype(torch::kFloat32));
  return lease;
}

PackLease::~PackLease() {
  if (!from_arena_) return;
  std::lock_guard<std::mutex> lock(arena_mutex());
  arena_busy() = false;
}

int64_t release_pack_arena() {
  std::lock_guard<std::mutex> lock(arena_mutex());
  torch::Tensor& buf = arena_buffer();
  const int64_t bytes = buf.defined() ? buf.numel() * static_cast<int64_t>(sizeof(float)) : 0;
  buf = torch::Tensor();  // a stack still packed in it keeps the memory until it is done
  return bytes;
}

void StackWorkspace::reserve(const DecodeStack& st, int64_t rows) {
  if (rows <= capacity) return;
  auto f = torch::TensorOptions().dtype(torch::kFloat32);
  x = torch::empty({rows, st.H}, f);
  tmp = torch::empty({rows, st.H}, f);
  q = torch::empty({rows, st.Hq * st.D}, f);
  attn = torch::empty({rows, st.Hq * st.D}, f);
  k = torch::empty({rows, st.Hkv * st.D}, f);
  v = torch::empty({rows, st.Hkv * st.D}, f);
  g = torch::empty({rows, st.I}, f);
  u = torch::empty({rows, st.I}, f);
  capacity = rows;
}

void attach_prefix(DecodeStack& st, const char* fn, const std::vector<torch::Tensor>& prefix_k,
                   const std::vector<torch::Tensor>& prefix_v) {
  if (prefix_k.empty() && prefix_v.empty()) return;
  TORCH_CHECK(static_cast<int64_t>(prefix_k.size()) == st.layers &&
                  static_cast<int64_t>(prefix_v.size()) == st.layers,
              fn, ": expected one prefix K and V cache per layer (", st.layers, "), got ", prefix_k.size(),
              " and ", prefix_v.size());
  TORCH_CHECK(prefix_k[0].dim() == 4, fn, ": prefix caches must be head-major [rows, Hkv, Lp, D], got ",
              prefix_k[0].sizes());
  st.prows = prefix_k[0].size(0);
  st.Lp = prefix_k[0].size(2);
  const std::string f = fn;
  for (int64_t l = 0; l < st.layers; ++l) {
    check_f32(prefix_k[l], f + ": layer " + std::to_string(l) + " prefix K cache", {st.prows, st.Hkv, st.Lp, st.D});
    check_f32(prefix_v[l], f + ": layer " + std::to_string(l) + " prefix V cache", {st.prows, st.Hkv, st.Lp, st.D});
  }
  st.pk = prefix_k;
  st.pv = prefix_v;
}

void check_prefix_rows(const DecodeStack& st, const char* fn, const int32_t* prow, const int32_t* plen, int64_t n) {
  TORCH_CHECK(!st.pk.empty(), fn, ": prefix_row needs the prefix caches (prefix_k / prefix_v)");
  for (int64_t b = 0; b < n; ++b) {
    TORCH_CHECK(prow[b] >= 0 && prow[b] < st.prows && plen[b] >= 0 && plen[b] <= st.Lp, fn, ": prefix of row ", b,
                " (pool row ", prow[b], ", length ", plen[b], ") is outside the prefix pool (", st.prows,
                " rows x ", st.Lp, " positions)");
  }
}

void run_stack(const DecodeStack& st, torch::Tensor h, float* y, const float* cos, const float* sin,
               const int64_t* slot, const int32_t* seqlen, const int64_t* own_rows,
               const int32_t* prefix_row, const int32_t* prefix_len, StackWorkspace* ws) {
  // grad / inference mode are thread-local and workers do not inherit the caller's; in-place
  // updates of the caller's (possibly inference) tensors are allowed inside InferenceMode
  c10::InferenceMode inference;
  SingleThreadedBlas blas;
  const int64_t n = h.size(0);
  StackWorkspace local;
  if (ws == nullptr) ws = &local;
  ws->reserve(st, n);
  // a team of one: every row and every column on this thread, no barriers
  run_stack_team(st, h.data_ptr<float>(), n, y, cos, sin, slot, seqlen, own_rows, prefix_row, prefix_len, 0, n, *ws,
                 Team{});
}

void run_stack_team(const DecodeStack& st, float* h, int64_t M, float* y, const float* cos, const float* sin,
                    const int64_t* slot, const int32_t* seqlen, const int64_t* own_rows, const int32_t* prefix_row,
                    const int32_t* prefix_len, int64_t r0, int64_t n, StackWorkspace& ws, const Team& team) {
  const int64_t H = st.H, Hq = st.Hq, Hkv = st.Hkv, D = st.D, I = st.I;
  const bool packed = !st.packed.empty();
  TORCH_CHECK(packed || team.size == 1, "run_stack_team: a team of ", team.size, " threads needs packed weights");
  float* x = ws.x.data_ptr<float>();
  float* q = ws.q.data_ptr<float>();
  float* k = ws.k.data_ptr<float>();
  float* v = ws.v.data_ptr<float>();
  float* attn = ws.attn.data_ptr<float>();
  float* tmp = ws.tmp.data_ptr<float>();
  float* g = ws.g.data_ptr<float>();
  float* u = ws.u.data_ptr<float>();
  // h[:, own columns] += tmp[:, own columns]: the elementwise sums run_stack's add makes
  auto add_residual = [&]() {
    int64_t c0 = 0, c1 = 0;
    team.columns(H, &c0, &c1);
    if (c1 > c0) {
      for (int64_t r = 0; r < M; ++r) add_inplace_f32(h + r * H + c0, tmp + r * H + c0, c1 - c0);
    }
  };
  for (int64_t l = 0; l < st.layers; ++l) {
    const torch::Tensor* w = &st.weights[kWeightsPerLayer * l];
    // out [M, N] = in [M, K] . W_i^T for weight i of this layer (1-4 attention, 6-8 MLP): this
    // thread's columns of the packed GEMM, or (unpacked, a team of one) all of them via the BLAS
    auto proj = [&](const float* in, int64_t K, int i, int64_t N, float* out) {
      if (packed) {
        team.gemm(in, M, K, st.packed_weight(l, i).data_ptr<float>(), N, out);
      } else {
        auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
        torch::Tensor o = torch::from_blob(out, {M, N}, f32);
        at::mm_out(o, torch::from_blob(const_cast<float*>(in), {M, K}, f32), w[i].t());
      }
    };
    float* kc = st.k[l].data_ptr<float>();
    float* vc = st.v[l].data_ptr<float>();
    if (n > 0) rms_norm_rows_f32(h + r0 * H, w[0].data_ptr<float>(), x + r0 * H, n, H, st.eps);
    team.sync();
    proj(x, H, 1, Hq * D, q);
    proj(x, H, 2, Hkv * D, k);
    proj(x, H, 3, Hkv * D, v);
    team.sync();
    if (n > 0) {
      rotary_kv_write_f32(q + r0 * Hq * D, k + r0 * Hkv * D, v + r0 * Hkv * D, cos + r0 * D, sin + r0 * D, n, Hq,
                          Hkv, D, kc, vc, st.rows, st.L, slot + r0);
      const float* pkc = st.pk.empty() ? nullptr : st.pk[l].data_ptr<float>();
      const float* pvc = st.pv.empty() ? nullptr : st.pv[l].data_ptr<float>();
      cached_attention_f32(q + r0 * Hq * D, kc, vc, n, Hq, Hkv, D, st.rows, st.L, seqlen + r0, pkc, pvc, st.Lp,
                           prefix_row ? prefix_row + r0 : nullptr, prefix_len ? prefix_len + r0 : nullptr, st.scale,
                           attn + r0 * Hq * D, own_rows + r0);
    }
    team.sync();
    proj(attn, Hq * D, 4, H, tmp);
    add_residual();
    team.sync();
    if (n > 0) rms_norm_rows_f32(h + r0 * H, w[5].data_ptr<float>(), x + r0 * H, n, H, st.eps);
    team.sync();
    proj(x, H, 6, I, g);
    proj(x, H, 7, I, u);
    team.sync();
    if (n > 0) silu_mul_f32(g + r0 * I, u + r0 * I, n * I);
    team.sync();
    proj(g, I, 8, H, tmp);
    add_residual();
    team.sync();
  }
  if (n > 0) rms_norm_rows_f32(h + r0 * H, st.final_norm.data_ptr<float>(), y + r0 * H, n, H, st.eps);
  team.sync();
}

namespace {

torch::Tensor decode_layers_cpu(const torch::Tensor& hidden, const torch::Tensor& cos,
                                const torch::Tensor& sin, const std::vector<torch::Tensor>& weights,
                                const torch::Tensor& final_norm,
                                const std::vector<torch::Tensor>& k_caches,
                                const std::vector<torch::Tensor>& v_caches,
                                const torch::Tensor& slot_mapping, const torch::Tensor& seqlens,
                                const std::vector<torch::Tensor>& prefix_k,
                                const std::vector<torch::Tensor>& prefix_v,
                                const c10::optional<torch::Tensor>& prefix_row,
                                const c10::optional<torch::Tensor>& prefix_len, int64_t num_heads,
                                int64_t num_kv_heads, double eps, double scale) {
  TORCH_CHECK(hidden.dim() == 2, "decode_layers_cpu: hidden must be [B, H], got ", hidden.sizes());
  DecodeStack st = check_stack("decode_layers_cpu", weights, final_norm, k_caches, v_caches,
                               num_heads, num_kv_heads, eps, scale);
  attach_prefix(st, "decode_layers_cpu", prefix_k, prefix_v);
  const int64_t B = hidden.size(0), H = st.H, D = st.D, rows = st.rows, L = st.L;
  TORCH_CHECK(rows >= B, "decode_layers_cpu: cache has ", rows, " rows for a batch of ", B);
  check_f32(hidden, "decode_layers_cpu: hidden", {B, H});
  check_f32(cos, "decode_layers_cpu: cos", {B, D});
  check_f32(sin, "decode_layers_cpu: sin", {B, D});
  TORCH_CHECK(slot_mapping.device().is_cpu() && slot_mapping.scalar_type() == torch::kInt64 &&
                  slot_mapping.dim() == 1 && slot_mapping.size(0) == B && slot_mapping.is_contiguous(),
              "decode_layers_cpu: slot_mapping must be a contiguous int64 CPU tensor of shape [", B,
              "], got ", slot_mapping.scalar_type(), " ", slot_mapping.sizes());
  check_i32_rows(seqlens, "decode_layers_cpu", "cache_seqlens", B);
  TORCH_CHECK(prefix_row.has_value() == prefix_len.has_value(),
              "decode_layers_cpu: prefix_row and prefix_len go together");
  const int32_t* prow = nullptr;
  const int32_t* plen = nullptr;
  if (prefix_row.has_value()) {
    check_i32_rows(*prefix_row, "decode_layers_cpu", "prefix_row", B);
    check_i32_rows(*prefix_len, "decode_layers_cpu", "prefix_len", B);
    prow = prefix_row->data_ptr<int32_t>();
    plen = prefix_len->data_ptr<int32_t>();
    check_prefix_rows(st, "decode_layers_cpu", prow, plen, B);
  }
  // Bounds are checked here, once, so the kernels can index without checks.
  {
    const int64_t* s = slot_mapping.data_ptr<int64_t>();
    const int32_t* n = seqlens.data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t p = plen ? std::min<int64_t>(plen[b], n[b]) : 0;
      TORCH_CHECK(s[b] >= 0 && s[b] < rows * L, "decode_layers_cpu: slot_mapping[", b, "] = ", s[b],
                  " is outside the cache (", rows, " rows x ", L, " positions)");
      TORCH_CHECK(n[b] >= 0 && n[b] - p <= L, "decode_layers_cpu: cache_seqlens[", b, "] = ", n[b],
                  " leaves ", n[b] - p, " own positions, outside [0, ", L, "]");
    }
  }

  py::gil_scoped_release no_gil;
  torch::Tensor h = hidden.clone();
  torch::Tensor y = torch::empty_like(h);
  std::vector<int64_t> own(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) own[b] = b;
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int32_t* lens = seqlens.data_ptr<int32_t>();
  // Rows never interact within a step (a shared prefix is read-only while decoding), so each
  // thread takes a group of rows through every layer: one fork per step instead of one per
  // op, and the BLAS calls inside run single-threaded on their group.
  auto run_rows = [&](int64_t b0, int64_t b1) {
    run_stack(st, h.narrow(0, b0, b1 - b0), y.data_ptr<float>() + b0 * H, c + b0 * D, s + b0 * D,
              slots + b0, lens + b0, own.data() + b0, prow ? prow + b0 : nullptr,
              plen ? plen + b0 : nullptr);
  };
  const int64_t groups = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B));
  at::parallel_for(0, B, (B + groups - 1) / groups, run_rows);
  return y;
}

torch::Tensor cached_attention_cpu(const torch::Tensor& q, const torch::Tensor& k_cache,
                                   const torch::Tensor& v_cache, const torch::Tensor& seqlens,
                                   const c10::optional<torch::Tensor>& prefix_k,
                                   const c10::optional<torch::Tensor>& prefix_v,
                                   const c10::optional<torch::Tensor>& prefix_row,
                                   const c10::optional<torch::Tensor>& prefix_len, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4,
              "cached_attention_cpu: q must be [B, Hq, D] and the caches [rows, Hkv, L, D], got ",
              q.sizes(), " and ", k_cache.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t rows = k_cache.size(0), Hkv = k_cache.size(1), L = k_cache.size(2);
  TORCH_CHECK(Hq % Hkv == 0, "cached_attention_cpu: ", Hq, " query heads is not a multiple of ", Hkv,
              " KV heads");
  TORCH_CHECK(rows >= B, "cached_attention_cpu: cache has ", rows, " rows for a batch of ", B);
  check_f32(q, "cached_attention_cpu: q", {B, Hq, D});
  check_f32(k_cache, "cached_attention_cpu: k_cache", {rows, Hkv, L, D});
  check_f32(v_cache, "cached_attention_cpu: v_cache", {rows, Hkv, L, D});
  check_i32_rows(seqlens, "cached_attention_cpu", "cache_seqlens", B);
  TORCH_CHECK(prefix_row.has_value() == prefix_len.has_value(),
              "cached_attention_cpu: prefix_row and prefix_len go together");
  const int32_t* n = seqlens.data_ptr<int32_t>();
  const int32_t* prow = nullptr;
  const int32_t* plen = nullptr;
  const float* kp = nullptr;
  const float* vp = nullptr;
  int64_t prows = 0, Lp = 0;
  if (prefix_row.has_value()) {
    TORCH_CHECK(prefix_k.has_value() && prefix_v.has_value() && prefix_k->dim() == 4,
                "cached_attention_cpu: prefix_row needs 4-D prefix_k / prefix_v [prefix rows, Hkv, Lp, D]");
    prows = prefix_k->size(0);
    Lp = prefix_k->size(2);
    check_f32(*prefix_k, "cached_attention_cpu: prefix_k", {prows, Hkv, Lp, D});
    check_f32(*prefix_v, "cached_attention_cpu: prefix_v", {prows, Hkv, Lp, D});
    kp = prefix_k->data_ptr<float>();
    vp = prefix_v->data_ptr<float>();
    check_i32_rows(*prefix_row, "cached_attention_cpu", "prefix_row", B);
    check_i32_rows(*prefix_len, "cached_attention_cpu", "prefix_len", B);
    prow = prefix_row->data_ptr<int32_t>();
    plen = prefix_len->data_ptr<int32_t>();
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t p = prow ? std::min<int64_t>(plen[b], n[b]) : 0;
    TORCH_CHECK(n[b] >= 0 && n[b] - p <= L, "cached_attention_cpu: cache_seqlens[", b, "] = ", n[b],
                " leaves ", n[b] - p, " own positions, outside [0, ", L, "]");
    if (prow) {
      TORCH_CHECK(prow[b] >= 0 && prow[b] < prows && plen[b] >= 0 && plen[b] <= Lp,
                  "cached_attention_cpu: prefix of row ", b, " (pool row ", prow[b], ", length ",
                  plen[b], ") is outside the prefix pool");
    }
  }
  auto out = torch::empty_like(q);
  py::gil_scoped_release no_gil;
  cached_attention_f32(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), B,
                       Hq, Hkv, D, rows, L, n, kp, vp, Lp, prow, plen, static_cast<float>(scale),
                       out.data_ptr<float>());
  return out;
}

}  // namespace

void register_decode_ops(py::module_& m) {
  m.def("release_pack_arena", &release_pack_arena,
        "Free the buffer the CPU decode / prefill reuse for packed weights (held between calls, at most "
        "PGEN_CPU_PACK_MAX_MB); returns the bytes it held.");
  m.def("packed_gemm_available", &packed_gemm_available,
        "True when the packed small-row float32 GEMM (AVX-512) runs on this CPU.");
  m.def(
      "packed_mm_cpu",
      [](const torch::Tensor& x, const torch::Tensor& w, int64_t k) {
        TORCH_CHECK(packed_gemm_available(), "packed_mm_cpu: this CPU / build has no AVX-512 packed GEMM");
        TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.scalar_type() == torch::kFloat32 &&
                        w.scalar_type() == torch::kFloat32 && x.device().is_cpu() && w.device().is_cpu(),
                    "packed_mm_cpu: need float32 CPU x [M, K] and w [N, K], got ", x.sizes(), " and ", w.sizes());
        const int64_t K = w.size(1), N = w.size(0);
        TORCH_CHECK(k <= K, "packed_mm_cpu: k = ", k, " exceeds K = ", K);
        torch::Tensor xc = x.contiguous(), P = pack_weight(w.contiguous());
        torch::Tensor y = torch::empty({x.size(0), N}, x.options());
        // the first k terms: x rows read K apart, panels packed with K columns
        gemm_packed_f32(xc.data_ptr<float>(), x.size(0), k < 0 ? K : k, P.data_ptr<float>(), N, y.data_ptr<float>(),
                        N, K, K);
        return y;
      },
      py::arg("x"), py::arg("w"), py::arg("k") = -1,
      "x [M, K] . w^T through the decode loop's packed GEMM (packs w first; for tests); k >= 0 sums "
      "only the first k terms (x[:, :k] . w[:, :k]^T, reading the full-width x and packed w).");
  m.def("decode_layers_cpu", &decode_layers_cpu, py::arg("hidden"), py::arg("cos"), py::arg("sin"),
        py::arg("weights"), py::arg("final_norm"), py::arg("k_caches"), py::arg("v_caches"),
        py::arg("slot_mapping"), py::arg("cache_seqlens"), py::arg("prefix_k"), py::arg("prefix_v"),
        py::arg("prefix_row"), py::arg("prefix_len"), py::arg("num_heads"), py::arg("num_kv_heads"),
        py::arg("eps"), py::arg("scale"),
        "One float32 cached decode step through every Llama layer and the final norm: hidden "
        "[B, H] -> [B, H]. weights: 9 per layer (ln1, q, k, v, o, ln2, gate, up, down); caches "
        "head-major [rows, Hkv, L, D] holding each row's own positions, written at slot_mapping "
        "(row * L + own index); prefix_k / prefix_v (per layer [prefix rows, Hkv, Lp, D], or []) "
        "hold shared prefixes, row b reading [0, prefix_len[b]) of pool row prefix_row[b].");
  m.def("cached_attention_cpu", &cached_attention_cpu, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("cache_seqlens"), py::arg("prefix_k"), py::arg("prefix_v"),
        py::arg("prefix_row"), py::arg("prefix_len"), py::arg("scale"),
        "One-query float32 attention over a head-major cache [rows, Hkv, L, D] of own positions, "
        "with optional shared prefixes in a pool [prefix rows, Hkv, Lp, D]: q [B, Hq, D] -> [B, Hq, D].");
}

}  // namespace pgen
