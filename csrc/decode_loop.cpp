// The decode loop of one generation wave on CPU (float32), whole in C++: for each step, embed
// the previous codes (generation embedding + aligner), run the layer stack (decode_stack.h),
// apply the generation head, then take the argmax of the CFG-mixed logits or draw with the CPU
// sampler, and store the codes (and, optionally, their log-probabilities under the conditional
// branch or under the CFG-guided mix the codes are drawn from).
// A row whose logits are not all finite at a step gets code -1 there (see mark_non_finite).
//
// Why: on CPU a step of a small model is a few hundred microseconds of work, and the Python
// loop around it (about 30 eager ops per step) costs as much again. Here a wave's rows are
// split into one group per thread (a conditional row always with its unconditional partner,
// so a group can mix and sample on its own); each thread runs all the steps of its group with
// no synchronisation at all, because rows never interact while decoding. With few rows per
// thread (team = true, chosen by the caller) the threads instead run every step together as
// one team (decode_team.h): each projection over all groups' rows, split by output columns,
// the rest per group as before; the codes are bitwise those of the per-thread groups.
// Projections go through the packed GEMM (gemm_cpu.h) when it runs here, else through the
// ATen calls the Python loop makes; either way the codes match the Python loop's (sums may
// round apart).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "decode_cpu.h"
#include "decode_stack.h"
#include "gemm_cpu.h"
#include "sampler_cpu.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace pgen {
namespace {

enum class Act { kGelu, kGeluTanh, kSilu, kRelu };

Act parse_act(const std::string& name, const char* what) {
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_pytorch_tanh") return Act::kGeluTanh;
  if (name == "silu" || name == "swish") return Act::kSilu;
  if (name == "relu") return Act::kRelu;
  TORCH_CHECK(false, "decode_loop_cpu: unsupported ", what, " activation '", name,
              "' (supported: gelu, gelu_pytorch_tanh, silu, swish, relu)");
  return Act::kGelu;
}

// The activation in place (ATen's kernels: the values of the Python path's out-of-place calls).
void act_(torch::Tensor& x, Act a) {
  switch (a) {
    case Act::kGelu: at::gelu_(x); break;
    case Act::kGeluTanh: at::gelu_(x, "tanh"); break;
    case Act::kSilu: at::silu_(x); break;
    case Act::kRelu: at::relu_(x); break;
  }
}

// One nn.Linear of the aligner / head: weight, bias (empty = none) and, when the packed
// kernel runs here, the packed weight.
struct Linear {
  torch::Tensor w, b, packed;
};

std::vector<Linear> linears(const std::vector<torch::Tensor>& ws, const std::vector<torch::Tensor>& bs, bool pack) {
  std::vector<Linear> out;
  for (size_t i = 0; i < ws.size(); ++i) {
    out.push_back({ws[i], bs[i], pack ? pack_weight(ws[i].contiguous()) : torch::Tensor()});
  }
  return out;
}

// out (contiguous [rows, N]) = x (contiguous [rows, K]) . W^T + b through the packed kernel.
void linear_into(const torch::Tensor& x, const Linear& l, torch::Tensor& out) {
  const int64_t rows = x.size(0), N = l.w.size(0);
  gemm_packed_f32(x.data_ptr<float>(), rows, x.size(1), l.packed.data_ptr<float>(), N, out.data_ptr<float>());
  if (l.b.numel()) add_bias_rows_f32(out.data_ptr<float>(), l.b.data_ptr<float>(), rows, N);
}

// The unpacked path: as F.linear computes it.
torch::Tensor linear(const torch::Tensor& x, const Linear& l) {
  return l.b.numel() ? at::linear(x, l.w, l.b) : at::linear(x, l.w);
}

// Greedy: code -1 for every row i whose (CFG-mixed) logits hold a NaN or an infinity (a NaN /
// Inf weight or input: a diverged policy, NaN pixels). argmax would return the NaN's index; -1
// is a code no valid step produces, so the caller can tell. Sampling gets the same rule from
// sample_rows_cpu itself (ops/sampling.py: a non-finite row draws -1).
void mark_non_finite(const float* x, int64_t n, int64_t K, int64_t* tok) {
  for (int64_t i = 0; i < n; ++i) {
    const float* c = x + i * K;
    bool ok = true;
    for (int64_t j = 0; j < K && ok; ++j) ok = std::isfinite(c[j]);
    if (!ok) tok[i] = -1;
  }
}

void check_linear(const torch::Tensor& w, const torch::Tensor& b, int64_t in, const std::string& name) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kFloat32 && w.dim() == 2 && w.size(1) == in,
              "decode_loop_cpu: ", name, ".weight must be a float32 CPU [out, ", in, "] tensor, got ",
              w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(b.numel() == 0 || (b.scalar_type() == torch::kFloat32 && b.dim() == 1 && b.size(0) == w.size(0)),
              "decode_loop_cpu: ", name, ".bias must be empty (no bias) or float32 [", w.size(0), "], got ",
              b.scalar_type(), " ", b.sizes());
}

void check_i64(const torch::Tensor& t, const char* name, std::vector<int64_t> shape) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kInt64 && t.is_contiguous() &&
                  t.sizes() == c10::IntArrayRef(shape),
              "decode_loop_cpu: ", name, " must be a contiguous int64 CPU tensor of shape ",
              c10::IntArrayRef(shape), ", got ", t.scalar_type(), " ", t.sizes());
}

// Everything one call of decode_loop_cpu decodes with, validated by the caller; the methods
// are the per-step pieces of a group of rows (conditional rows [c0, c1) and, with CFG, their
// unconditional partners), shared by the two ways a wave runs: one independent group per
// thread (run_group) or all groups as one team (run_team, decode_team.h).
struct Wave {
  torch::Tensor out;
  c10::optional<torch::Tensor> out_lp;
  const DecodeStack* st = nullptr;
  const int64_t* seeds = nullptr;
  const int64_t* bs = nullptr;
  const int64_t* s0 = nullptr;
  const int32_t* prow = nullptr;
  const int32_t* plen = nullptr;
  const float* cos_table = nullptr;
  const float* sin_table = nullptr;
  torch::Tensor embed;
  std::vector<Linear> aligner, head;
  Act a_act = Act::kGelu, h_act = Act::kGelu;
  int64_t R = 0, T = 0, K = 0, E = 0, P = 0, H = 0, D = 0, top_k = 0;
  bool cfg = false, greedy = false, lp_guided = false, pack = false;
  double guidance_scale = 1.0, temperature = 1.0, top_p = 1.0;

  // A group's rows: cache row of each of its m rows (conditional first), its shared prefixes,
  // and its per-thread scratch for the embedding / aligner and the drawn codes.
  struct Rows {
    int64_t c0 = 0, n = 0, m = 0;
    std::vector<int64_t> own, codes;
    std::vector<int32_t> gprow, gplen;
    torch::Tensor e0, tok;
    std::vector<torch::Tensor> abuf;  // aligner layer outputs but the last (that one is h)
  };

  Rows rows(int64_t c0, int64_t c1) const {
    Rows g;
    g.c0 = c0;
    g.n = c1 - c0;
    g.m = cfg ? 2 * g.n : g.n;
    g.own.resize(g.m);
    g.codes.resize(g.n);
    for (int64_t i = 0; i < g.m; ++i) {
      g.own[i] = i < g.n ? c0 + i : R + c0 + (i - g.n);
      if (prow) {
        g.gprow.push_back(prow[g.own[i]]);
        g.gplen.push_back(plen[g.own[i]]);
      }
    }
    auto f = torch::TensorOptions().dtype(torch::kFloat32);
    g.tok = torch::empty({g.n}, torch::kInt64);
    if (pack) {
      g.e0 = torch::empty({g.n, E}, f);
      for (size_t j = 0; j + 1 < aligner.size(); ++j) g.abuf.push_back(torch::empty({g.n, aligner[j].w.size(0)}, f));
    }
    return g;
  }

  // h ([m, H], contiguous) = the aligned embeddings of the codes drawn at step t - 1, the
  // conditional rows' copied to their partners.
  void embed_step(Rows& g, int64_t t, torch::Tensor h) const {
    const int64_t* o = out.data_ptr<int64_t>();
    // a -1 (non-finite logits at the previous step) is embedded as code 0: the row's codes
    // are void anyway, the others must not read outside the embedding table
    for (int64_t i = 0; i < g.n; ++i) g.codes[i] = std::max<int64_t>(o[(g.c0 + i) * T + t - 1], 0);
    torch::Tensor cond = h.narrow(0, 0, g.n);
    if (pack) {
      const float* ew = embed.data_ptr<float>();
      for (int64_t i = 0; i < g.n; ++i) {
        std::memcpy(g.e0.data_ptr<float>() + i * E, ew + g.codes[i] * E, sizeof(float) * E);
      }
      torch::Tensor cur = g.e0;
      for (size_t j = 0; j < aligner.size(); ++j) {
        if (j > 0) act_(cur, a_act);
        torch::Tensor& dst = j + 1 < aligner.size() ? g.abuf[j] : cond;
        linear_into(cur, aligner[j], dst);
        cur = dst;
      }
    } else {
      torch::Tensor e = at::embedding(embed, torch::from_blob(g.codes.data(), {g.n}, torch::kInt64));
      e = linear(e, aligner[0]);
      for (size_t j = 1; j < aligner.size(); ++j) {
        act_(e, a_act);
        e = linear(e, aligner[j]);
      }
      cond.copy_(e);
    }
    if (cfg) std::memcpy(h.data_ptr<float>() + g.n * H, h.data_ptr<float>(), sizeof(float) * g.n * H);
  }

  // Per row of g at step t: rotary rows cos / sin ([m, D]), the cache slot its K/V go to and
  // the number of keys it attends.
  void positions(const Rows& g, int64_t t, float* cos, float* sin, int64_t* slot, int32_t* lens) const {
    for (int64_t i = 0; i < g.m; ++i) {
      const int64_t r = g.own[i], pos = bs[r] + t - 1;
      slot[i] = s0[r] + t - 1;
      lens[i] = static_cast<int32_t>(pos + 1);
      std::copy(cos_table + pos * D, cos_table + (pos + 1) * D, cos + i * D);
      std::copy(sin_table + pos * D, sin_table + (pos + 1) * D, sin + i * D);
    }
  }

  // Draws (or takes the argmax of) step t's codes from logits ([m, K], contiguous) into out,
  // and their log-probabilities into out_lp.
  void pick(Rows& g, int64_t t, const torch::Tensor& logits) const {
    const int64_t n = g.n;
    const torch::Tensor c = logits.narrow(0, 0, n);
    if (greedy) {
      const float s = static_cast<float>(guidance_scale);
      torch::Tensor mixed = cfg ? at::add(logits.narrow(0, n, n), at::mul(at::sub(c, logits.narrow(0, n, n)), s))
                                : c.contiguous();
      g.tok.copy_(mixed.argmax(-1));
      mark_non_finite(mixed.data_ptr<float>(), n, K, g.tok.data_ptr<int64_t>());
    } else {
      sample_rows_cpu(c.data_ptr<float>(), cfg ? logits.data_ptr<float>() + n * K : nullptr, n, K,
                      static_cast<float>(guidance_scale), static_cast<float>(temperature), top_k,
                      static_cast<float>(top_p), seeds + t * R + g.c0, g.tok.data_ptr<int64_t>());
    }
    int64_t* o = out.data_ptr<int64_t>();
    const int64_t* tk = g.tok.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) o[(g.c0 + i) * T + t] = tk[i];
    if (out_lp.has_value()) {
      // the distribution the log-probs are of: the conditional branch c, or (lp_guided, with
      // CFG) the guided mix written as the Python pick and the trainer write it, u + s * (c - u),
      // so rollout and trainer log-probs agree to fp32 rounding
      torch::Tensor x = c;
      if (cfg && lp_guided) {
        const torch::Tensor u = logits.narrow(0, n, n);
        x = at::add(u, at::mul(at::sub(c, u), guidance_scale));
      }
      torch::Tensor lp = at::log_softmax(at::div(x, temperature), -1).gather(1, g.tok.clamp_min(0).unsqueeze(1));
      float* lo = out_lp->data_ptr<float>();
      const float* l = lp.data_ptr<float>();
      for (int64_t i = 0; i < n; ++i) lo[(g.c0 + i) * T + t] = l[i];
    }
  }

  // Conditional rows [c0, c1) and their partners through steps [t_begin, t_end) on this
  // thread alone.
  void run_group(int64_t c0, int64_t c1, int64_t t_begin, int64_t t_end) const {
    if (c1 <= c0) return;
    Rows g = rows(c0, c1);
    const int64_t m = g.m;
    auto f = torch::TensorOptions().dtype(torch::kFloat32);
    torch::Tensor cosb = torch::empty({m, D}, f), sinb = torch::empty({m, D}, f);
    torch::Tensor h = torch::empty({m, H}, f), y = torch::empty({m, H}, f);
    std::vector<int64_t> slot(m);
    std::vector<int32_t> lens(m);
    StackWorkspace ws;
    ws.reserve(*st, m);
    torch::Tensor hid, logit_buf;  // packed path: written every step, never reallocated
    if (pack) {
      hid = torch::empty({m, P}, f);
      logit_buf = torch::empty({m, K}, f);
    }
    for (int64_t t = t_begin; t < t_end; ++t) {
      embed_step(g, t, h);
      positions(g, t, cosb.data_ptr<float>(), sinb.data_ptr<float>(), slot.data(), lens.data());
      run_stack(*st, h, y.data_ptr<float>(), cosb.data_ptr<float>(), sinb.data_ptr<float>(), slot.data(),
                lens.data(), g.own.data(), prow ? g.gprow.data() : nullptr, prow ? g.gplen.data() : nullptr, &ws);
      if (pack) {
        linear_into(y, head[0], hid);
        act_(hid, h_act);
        linear_into(hid, head[1], logit_buf);
        pick(g, t, logit_buf);
      } else {
        torch::Tensor z = linear(y, head[0]);
        act_(z, h_act);
        pick(g, t, linear(z, head[1]).contiguous());
      }
    }
  }

  // Columns of out ([M, N], row stride N) += bias, this thread's share (team.columns).
  static void add_bias_columns(const Team& team, float* out, const torch::Tensor& b, int64_t M, int64_t N) {
    if (!b.numel()) return;
    int64_t c0 = 0, c1 = 0;
    team.columns(N, &c0, &c1);
    for (int64_t r = 0; r < M; ++r) add_inplace_f32(out + r * N + c0, b.data_ptr<float>() + c0, c1 - c0);
  }

  // Every thread of an OpenMP team calls this with its Team: G groups (conditional rows
  // [g R / G, (g + 1) R / G)), group g on thread g, each group's rows in `passes` passes (all
  // steps of one pass, then the next). The projections of each step run over all groups' rows
  // at once, split by columns; the rest as run_group does it, on the same rows: same bits.
  void run_team(const Team& team, int64_t G, int64_t passes, int64_t t_begin, int64_t t_end) const {
    // the largest pass over all groups, for the shared buffers (made by thread 0)
    auto group_rows = [&](int64_t g, int64_t p, int64_t* a, int64_t* b) {
      const int64_t c0 = g * R / G, c1 = (g + 1) * R / G;
      *a = c0 + p * (c1 - c0) / passes;
      *b = c0 + (p + 1) * (c1 - c0) / passes;
    };
    for (int64_t p = 0; p < passes; ++p) {
      int64_t M = 0, r0 = 0, a = 0, b = 0;
      for (int64_t g = 0; g < G; ++g) {
        group_rows(g, p, &a, &b);
        if (g == team.tid) r0 = M;
        M += cfg ? 2 * (b - a) : b - a;
      }
      const bool mine = team.tid < G;
      Rows g;
      if (mine) {
        group_rows(team.tid, p, &a, &b);
        g = rows(a, b);
      }
      shared_.reserve(*this, M, team);
      float* cos = shared_.cos.data_ptr<float>();
      float* sin = shared_.sin.data_ptr<float>();
      for (int64_t i = 0; i < g.m; ++i) {
        shared_.own[r0 + i] = g.own[i];
        if (prow) {
          shared_.prow[r0 + i] = g.gprow[i];
          shared_.plen[r0 + i] = g.gplen[i];
        }
      }
      for (int64_t t = t_begin; t < t_end; ++t) {
        if (g.m > 0) {
          embed_step(g, t, shared_.h.narrow(0, r0, g.m));
          positions(g, t, cos + r0 * D, sin + r0 * D, shared_.slot.data() + r0, shared_.lens.data() + r0);
        }
        run_stack_team(*st, shared_.h.data_ptr<float>(), M, shared_.y.data_ptr<float>(), cos, sin,
                       shared_.slot.data(), shared_.lens.data(), shared_.own.data(),
                       prow ? shared_.prow.data() : nullptr, prow ? shared_.plen.data() : nullptr, r0, g.m,
                       shared_.ws, team);
        float* hid = shared_.hid.data_ptr<float>();
        float* logits = shared_.logits.data_ptr<float>();
        team.gemm(shared_.y.data_ptr<float>(), M, H, head[0].packed.data_ptr<float>(), P, hid);
        add_bias_columns(team, hid, head[0].b, M, P);
        team.sync();
        torch::Tensor hid_rows = shared_.hid.narrow(0, r0, g.m);
        if (g.m > 0) act_(hid_rows, h_act);
        team.sync();
        team.gemm(hid, M, P, head[1].packed.data_ptr<float>(), K, logits);
        add_bias_columns(team, logits, head[1].b, M, K);
        team.sync();
        if (g.m > 0) pick(g, t, shared_.logits.narrow(0, r0, g.m));
      }
      team.sync();  // the next pass reuses the shared rows
    }
  }

  // The team's shared step buffers, sized for the largest pass by thread 0 (the others wait).
  struct Shared {
    int64_t capacity = -1;
    torch::Tensor h, y, hid, logits, cos, sin;
    std::vector<int64_t> slot, own;
    std::vector<int32_t> lens, prow, plen;
    StackWorkspace ws;
    void reserve(const Wave& w, int64_t M, const Team& team) {
      team.sync();
      if (team.tid == 0 && M > capacity) {
        auto f = torch::TensorOptions().dtype(torch::kFloat32);
        h = torch::empty({M, w.H}, f);
        y = torch::empty({M, w.H}, f);
        hid = torch::empty({M, w.P}, f);
        logits = torch::empty({M, w.K}, f);
        cos = torch::empty({M, w.D}, f);
        sin = torch::empty({M, w.D}, f);
        slot.assign(M, 0);
        own.assign(M, 0);
        lens.assign(M, 0);
        prow.assign(M, 0);
        plen.assign(M, 0);
        ws.reserve(*w.st, M);
        capacity = M;
      }
      team.sync();
    }
  };
  mutable Shared shared_;
};

void decode_loop_cpu(torch::Tensor out, c10::optional<torch::Tensor> out_lp, const torch::Tensor& step_seeds,
                     const torch::Tensor& base, const torch::Tensor& slot0, int64_t t_begin, int64_t t_end,
                     const torch::Tensor& embed, const std::vector<torch::Tensor>& aligner_w,
                     const std::vector<torch::Tensor>& aligner_b, const std::string& aligner_act,
                     const torch::Tensor& rope_cos, const torch::Tensor& rope_sin,
                     const std::vector<torch::Tensor>& weights, const torch::Tensor& final_norm,
                     const std::vector<torch::Tensor>& k_caches, const std::vector<torch::Tensor>& v_caches,
                     const std::vector<torch::Tensor>& prefix_k, const std::vector<torch::Tensor>& prefix_v,
                     const c10::optional<torch::Tensor>& prefix_row,
                     const c10::optional<torch::Tensor>& prefix_len, int64_t num_heads, int64_t num_kv_heads,
                     double eps, double scale, const std::vector<torch::Tensor>& head_w,
                     const std::vector<torch::Tensor>& head_b, const std::string& head_act, bool cfg,
                     double guidance_scale, double temperature, int64_t top_k, double top_p, bool greedy,
                     int64_t rows_per_pass, bool lp_guided, bool team) {
  DecodeStack st = check_stack("decode_loop_cpu", weights, final_norm, k_caches, v_caches, num_heads,
                               num_kv_heads, eps, scale);
  attach_prefix(st, "decode_loop_cpu", prefix_k, prefix_v);
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == torch::kInt64 && out.dim() == 2 && out.is_contiguous(),
              "decode_loop_cpu: out must be a contiguous int64 CPU [R, T] tensor, got ", out.scalar_type(), " ",
              out.sizes());
  const int64_t R = out.size(0), T = out.size(1), rows = cfg ? 2 * R : R;
  TORCH_CHECK(R >= 1 && rows <= st.rows, "decode_loop_cpu: ", rows, " rows for a cache of ", st.rows);
  TORCH_CHECK(1 <= t_begin && t_begin <= t_end && t_end <= T, "decode_loop_cpu: steps [", t_begin, ", ", t_end,
              ") must lie in [1, ", T, "]");
  if (out_lp.has_value()) {
    TORCH_CHECK(out_lp->device().is_cpu() && out_lp->scalar_type() == torch::kFloat32 && out_lp->is_contiguous() &&
                    out_lp->sizes() == out.sizes(),
                "decode_loop_cpu: out_lp must be a contiguous float32 CPU tensor shaped like out ", out.sizes(),
                ", got ", out_lp->scalar_type(), " ", out_lp->sizes());
  }
  check_i64(step_seeds, "step_seeds", {T, R});
  check_i64(base, "base", {rows});
  check_i64(slot0, "slot0", {rows});
  TORCH_CHECK(rope_cos.scalar_type() == torch::kFloat32 && rope_sin.scalar_type() == torch::kFloat32 &&
                  rope_cos.dim() == 2 && rope_cos.size(1) == st.D && rope_sin.sizes() == rope_cos.sizes() &&
                  rope_cos.is_contiguous() && rope_sin.is_contiguous(),
              "decode_loop_cpu: rope tables must be contiguous float32 [positions, ", st.D, "], got ",
              rope_cos.sizes(), " and ", rope_sin.sizes());
  // the embedding, aligner and head must chain: codes -> [e] -> ... -> [H] -> ... -> [K]
  TORCH_CHECK(embed.scalar_type() == torch::kFloat32 && embed.dim() == 2 && embed.is_contiguous(),
              "decode_loop_cpu: generation embedding must be a contiguous float32 [K, e] tensor, got ",
              embed.scalar_type(), " ", embed.sizes());
  const int64_t K = embed.size(0);
  TORCH_CHECK(!aligner_w.empty() && aligner_w.size() == aligner_b.size(),
              "decode_loop_cpu: aligner needs >= 1 linear layer and one bias entry per layer");
  int64_t width = embed.size(1);
  for (size_t i = 0; i < aligner_w.size(); ++i) {
    check_linear(aligner_w[i], aligner_b[i], width, "aligner layer " + std::to_string(i));
    width = aligner_w[i].size(0);
  }
  TORCH_CHECK(width == st.H, "decode_loop_cpu: aligner output width ", width, " != hidden size ", st.H);
  TORCH_CHECK(head_w.size() == 2 && head_b.size() == 2, "decode_loop_cpu: head needs 2 linear layers");
  check_linear(head_w[0], head_b[0], st.H, "head proj_out");
  check_linear(head_w[1], head_b[1], head_w[0].size(0), "head vision_head");
  TORCH_CHECK(head_w[1].size(0) == K, "decode_loop_cpu: head predicts ", head_w[1].size(0),
              " codes but the generation embedding holds ", K);
  const Act a_act = parse_act(aligner_act, "aligner");
  const Act h_act = parse_act(head_act, "head");
  TORCH_CHECK(temperature > 0 && top_k >= 0 && top_k < K && top_p > 0 && top_p <= 1,
              "decode_loop_cpu: need temperature > 0, 0 <= top_k < ", K, " (0 = off), top_p in (0, 1]");
  TORCH_CHECK(prefix_row.has_value() == prefix_len.has_value(),
              "decode_loop_cpu: prefix_row and prefix_len go together");
  const int32_t* prow = nullptr;
  const int32_t* plen = nullptr;
  if (prefix_row.has_value()) {
    for (const auto* t : {&*prefix_row, &*prefix_len}) {
      TORCH_CHECK(t->scalar_type() == torch::kInt32 && t->dim() == 1 && t->size(0) >= rows && t->is_contiguous(),
                  "decode_loop_cpu: prefix_row / prefix_len must be contiguous int32 [>= ", rows, "], got ",
                  t->scalar_type(), " ", t->sizes());
    }
    prow = prefix_row->data_ptr<int32_t>();
    plen = prefix_len->data_ptr<int32_t>();
    check_prefix_rows(st, "decode_loop_cpu", prow, plen, rows);
  }
  // every index the loop will form, checked once
  const int64_t* bs = base.data_ptr<int64_t>();
  const int64_t* s0 = slot0.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t last_pos = bs[r] + t_end - 2, last_slot = s0[r] + t_end - 2;
    const int64_t own_last = last_pos - (prow ? plen[r] : 0);  // own positions start at index 0
    TORCH_CHECK(prow == nullptr || plen[r] <= bs[r], "decode_loop_cpu: prefix of row ", r, " (length ", plen[r],
                ") is longer than the row's prompt (", bs[r], ")");
    TORCH_CHECK(bs[r] >= 0 && own_last < st.L && last_pos < rope_cos.size(0),
                "decode_loop_cpu: row ", r, " reaches position ", last_pos, " beyond the cache length ", st.L,
                " or the rope table (", rope_cos.size(0), ")");
    TORCH_CHECK(s0[r] >= 0 && s0[r] / st.L == r && last_slot / st.L == r,
                "decode_loop_cpu: row ", r, " writes slots [", s0[r], ", ", last_slot,
                "] outside its cache row (slots of row r are [r * ", st.L, ", (r + 1) * ", st.L, "))");
  }
  const int64_t* prev = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    const int64_t c = prev[r * T + t_begin - 1];
    TORCH_CHECK(c >= -1 && c < K, "decode_loop_cpu: code ", c, " of row ", r, " at step ", t_begin - 1,
                " is outside [0, ", K, ") (or -1: a step whose logits were not finite)");
  }
  py::gil_scoped_release no_gil;
  pack_stack(st);  // once per call: every step of every row then skips the BLAS's weight packing
  Wave w;
  w.out = out;
  w.out_lp = out_lp;
  w.st = &st;
  w.seeds = step_seeds.data_ptr<int64_t>();
  w.bs = bs;
  w.s0 = s0;
  w.prow = prow;
  w.plen = plen;
  w.cos_table = rope_cos.data_ptr<float>();
  w.sin_table = rope_sin.data_ptr<float>();
  w.embed = embed;
  w.pack = !st.packed.empty();
  w.aligner = linears(aligner_w, aligner_b, w.pack);
  w.head = linears(head_w, head_b, w.pack);
  w.a_act = a_act;
  w.h_act = h_act;
  w.R = R;
  w.T = T;
  w.K = K;
  w.E = embed.size(1);
  w.P = head_w[0].size(0);
  w.H = st.H;
  w.D = st.D;
  w.top_k = top_k;
  w.cfg = cfg;
  w.greedy = greedy;
  w.lp_guided = lp_guided;
  w.guidance_scale = guidance_scale;
  w.temperature = temperature;
  w.top_p = top_p;
  // Passes of each group: its rows in slices of at most rows_per_pass conditional rows (all
  // steps of one slice, then the next), so the K/V all threads read per step stays in the
  // last-level cache.
  auto passes_for = [&](int64_t G) {
    int64_t most = 1;
    for (int64_t g = 0; g < G && rows_per_pass > 0; ++g) {
      const int64_t n = (g + 1) * R / G - g * R / G;
      most = std::max(most, (n + rows_per_pass - 1) / rows_per_pass);
    }
    return most;
  };
#ifdef _OPENMP
  if (team && w.pack && at::get_num_threads() > 1) {
    std::unique_ptr<SpinBarrier> barrier;
    std::exception_ptr error;
    std::mutex error_mu;
#pragma omp parallel
    {
      const int size = omp_get_num_threads();
#pragma omp single
      barrier = std::make_unique<SpinBarrier>(size);
      try {
        c10::InferenceMode inference;
        SingleThreadedBlas blas;
        const Team tm{omp_get_thread_num(), size, barrier.get()};
        const int64_t G = std::min<int64_t>(size, R);
        w.run_team(tm, G, passes_for(G), t_begin, t_end);
      } catch (const TeamAborted&) {  // another thread failed: its exception is the one to raise
      } catch (...) {
        barrier->fail();
        std::lock_guard<std::mutex> lock(error_mu);
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  // One group per thread: conditional rows [c0, c1) and (with CFG) their partners R + [c0, c1),
  // each decoded with no synchronisation at all (rows never interact while decoding).
  const int64_t G = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), R));
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    c10::InferenceMode inference;
    SingleThreadedBlas blas;
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t c0 = g * R / G, c1 = (g + 1) * R / G;
      const int64_t passes = rows_per_pass > 0 ? (c1 - c0 + rows_per_pass - 1) / rows_per_pass : 1;
      for (int64_t p = 0; p < passes; ++p) {
        w.run_group(c0 + p * (c1 - c0) / passes, c0 + (p + 1) * (c1 - c0) / passes, t_begin, t_end);
      }
    }
  });
}

}  // namespace

void register_decode_loop(py::module_& m) {
  m.def("decode_loop_cpu", &decode_loop_cpu, py::arg("out"), py::arg("out_lp"), py::arg("step_seeds"),
        py::arg("base"), py::arg("slot0"), py::arg("t_begin"), py::arg("t_end"), py::arg("embed"),
        py::arg("aligner_w"), py::arg("aligner_b"), py::arg("aligner_act"), py::arg("rope_cos"),
        py::arg("rope_sin"), py::arg("weights"), py::arg("final_norm"), py::arg("k_caches"),
        py::arg("v_caches"), py::arg("prefix_k"), py::arg("prefix_v"), py::arg("prefix_row"),
        py::arg("prefix_len"), py::arg("num_heads"),
        py::arg("num_kv_heads"), py::arg("eps"), py::arg("scale"), py::arg("head_w"), py::arg("head_b"),
        py::arg("head_act"), py::arg("cfg"), py::arg("guidance_scale"), py::arg("temperature"),
        py::arg("top_k"), py::arg("top_p"), py::arg("greedy"), py::arg("rows_per_pass") = 0,
        py::arg("lp_guided") = false, py::arg("team") = true,
        "Decode steps [t_begin, t_end) of a wave in float32 on CPU: out int64 [R, T] holds the codes "
        "(column t_begin - 1 must be filled) and receives columns [t_begin, t_end), code -1 where a row's "
        "logits are not all finite (NaN / Inf); rows [0, R) are "
        "conditional, [R, 2R) their unconditional partners when cfg. step_seeds int64 [T, R]; "
        "base / slot0 int64 [rows]: prompt length and first decode slot of each cache row; rope "
        "tables [positions, D]. out_lp (optional float32 [R, T]) receives log_softmax(cond / "
        "temperature)[code], or with lp_guided and cfg the guided log_softmax((uncond + "
        "guidance_scale * (cond - uncond)) / temperature)[code]. team (with the packed kernel and > 1 "
        "thread): the threads decode every step together, each projection split by output columns "
        "(the same codes as team=False, which runs one independent group of rows per thread).");
}

}  // namespace pgen
