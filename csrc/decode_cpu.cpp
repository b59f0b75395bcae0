#include "decode_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

// The hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time
// (GCC function multi-versioning), so one build runs fast on whichever CPU imports it.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PGEN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PGEN_CLONES
#endif
// Helpers of a cloned function must be inlined into it to be compiled for its ISA.
#if defined(__GNUC__)
#define PGEN_INLINE inline __attribute__((always_inline))
#else
#define PGEN_INLINE inline
#endif

namespace pgen {
namespace decode_detail {

// exp(x) for x <= 0 as a branch-free polynomial (Cephes-style range reduction, degree-5
// minimax on [-ln2/2, ln2/2]; about 1 ulp), so softmax loops vectorise: libm's expf does not
// without -ffast-math. Inputs below -87 (exp underflows float) give 0.
PGEN_INLINE float exp_nonpos(float x) {
  const float under = x < -87.0f ? 0.0f : 1.0f;
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.44269504088896341f - 0.5f;  // x <= 0: round-to-nearest of x*log2(e)
  const int32_t ni = static_cast<int32_t>(t);       // truncation toward 0 == ceil for t < 0
  const float n = static_cast<float>(ni);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale * under;
}

PGEN_CLONES void rms_norm_row(const float* x, const float* w, float* y, int64_t H, float eps) {
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < H; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
#pragma omp simd
  for (int64_t i = 0; i < H; ++i) y[i] = w[i] * (x[i] * inv);
}

PGEN_CLONES void rotate_heads(float* x, const float* cos, const float* sin, int64_t heads, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* p = x + h * D;
    float tmp[512];  // D <= 1024 checked by the caller; rotate_half needs the original values
    std::memcpy(tmp, p, sizeof(float) * half);
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) p[i] = p[i] * cos[i] + (-p[i + half]) * sin[i];
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) p[i + half] = p[i + half] * cos[i + half] + tmp[i] * sin[i + half];
  }
}

// Scores of query q ([D]) against keys [lo, hi) of one head's cache rows k ([L, D]).
// DD > 0 fixes the head dim at compile time (fully unrolled, registers only); 0 = runtime D.
template <int DD>
PGEN_INLINE void score_keys(const float* q, const float* k, int64_t lo, int64_t hi, int64_t D, float scale,
                       float* scores) {
  if constexpr (DD > 0 && DD % 16 == 0) {
    // 16 lane-wise partial sums, then a halving tree: an in-order reduction (what
    // `omp simd reduction` emits without -ffast-math) is a 16-add chain per key.
    for (int64_t l = lo; l < hi; ++l) {
      const float* kl = k + l * DD;
      float part[16];
#pragma omp simd
      for (int i = 0; i < 16; ++i) part[i] = q[i] * kl[i];
      for (int c = 16; c < DD; c += 16) {
#pragma omp simd
        for (int i = 0; i < 16; ++i) part[i] += q[c + i] * kl[c + i];
      }
#pragma omp simd
      for (int i = 0; i < 8; ++i) part[i] += part[i + 8];
#pragma omp simd
      for (int i = 0; i < 4; ++i) part[i] += part[i + 4];
      scores[l] = ((part[0] + part[2]) + (part[1] + part[3])) * scale;
    }
  } else {
    for (int64_t l = lo; l < hi; ++l) {
      const float* kl = k + l * D;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < D; ++d) acc += q[d] * kl[d];
      scores[l] = acc * scale;
    }
  }
}

// out ([D]) += sum over keys [lo, hi) of p[l] * v[l], accumulated in registers.
template <int DD>
PGEN_INLINE void accumulate_keys(const float* p, const float* v, int64_t lo, int64_t hi, int64_t D, float* out) {
  if constexpr (DD > 0) {
    float acc[DD];
#pragma omp simd
    for (int d = 0; d < DD; ++d) acc[d] = out[d];
    for (int64_t l = lo; l < hi; ++l) {
      const float w = p[l];
      const float* vl = v + l * DD;
#pragma omp simd
      for (int d = 0; d < DD; ++d) acc[d] += w * vl[d];
    }
#pragma omp simd
    for (int d = 0; d < DD; ++d) out[d] = acc[d];
  } else {
    for (int64_t l = lo; l < hi; ++l) {
      const float w = p[l];
      const float* vl = v + l * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) out[d] += w * vl[d];
    }
  }
}

PGEN_INLINE void softmax_row(float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t l = 0; l < n; ++l) m = std::max(m, s[l]);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t l = 0; l < n; ++l) {
    s[l] = exp_nonpos(s[l] - m);
    sum += s[l];
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t l = 0; l < n; ++l) s[l] *= inv;
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PGEN_SCORE16 1
// AVX-512 twin of score_keys<DD> (DD % 16 == 0) with the same rounding: per key, 16 lane-wise
// partial sums over the DD/16 chunks (multiply then add, chunk order), then lanes folded i+8,
// i+4 and (l0 + l2) + (l1 + l3). The folds run for 16 keys at once with shuffles instead of
// one key at a time, which is what the scalar version's time goes to.
template <int DD>
__attribute__((target("avx512f"), always_inline)) inline __m512 partial16(const float* q, const float* kl) {
  __m512 p = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(kl));
  for (int c = 16; c < DD; c += 16) p = _mm512_add_ps(p, _mm512_mul_ps(_mm512_loadu_ps(q + c), _mm512_loadu_ps(kl + c)));
  return p;
}

// a, b: two keys' partials -> [a(b0+b2), a(b1+b3), b(b0+b2), b(b1+b3)] (128-bit blocks b0..b3)
__attribute__((target("avx512f"), always_inline)) inline __m512 fold8(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                       _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
}

template <int DD>
__attribute__((target("avx512f"))) void score_keys_avx512(const float* q, const float* k, int64_t lo, int64_t hi,
                                                          float scale, float* scores) {
  const __m512 sc = _mm512_set1_ps(scale);
  int64_t l = lo;
  for (; l + 16 <= hi; l += 16) {
    const float* kb = k + l * DD;
    __m512 w[4];
    for (int j = 0; j < 4; ++j) {  // w[j] blocks hold keys j, j+4, j+8, j+12, each folded to 4 lanes
      const __m512 v0 = fold8(partial16<DD>(q, kb + j * DD), partial16<DD>(q, kb + (j + 4) * DD));
      const __m512 v1 = fold8(partial16<DD>(q, kb + (j + 8) * DD), partial16<DD>(q, kb + (j + 12) * DD));
      w[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(v0, v1, _MM_SHUFFLE(3, 1, 3, 1)));
    }
    // per block: [w0(l0+l2), w1(l0+l2), w0(l1+l3), w1(l1+l3)], then the two halves added:
    // lane 4b + j = key 4b + j, in order
    const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
    const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
    const __m512 sum = _mm512_add_ps(_mm512_shuffle_ps(t01, t23, _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_ps(t01, t23, _MM_SHUFFLE(3, 2, 3, 2)));
    _mm512_storeu_ps(scores + l, _mm512_mul_ps(sum, sc));
  }
  for (; l < hi; ++l) {  // tail keys: the same folds one key at a time
    alignas(64) float part[16];
    _mm512_store_ps(part, partial16<DD>(q, k + l * DD));
    for (int i = 0; i < 8; ++i) part[i] += part[i + 8];
    for (int i = 0; i < 4; ++i) part[i] += part[i + 4];
    scores[l] = ((part[0] + part[2]) + (part[1] + part[3])) * scale;
  }
}

inline bool have_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}
#endif

// Scores of q against keys [0, plen) of kp and keys [0, n - plen) of ko (positions plen..n-1).
template <int DD>
PGEN_INLINE void score_prefix_and_own(const float* q, const float* kp, const float* ko, int64_t plen, int64_t n,
                                      int64_t D, float scale, float* scores) {
#ifdef PGEN_SCORE16
  if constexpr (DD > 0 && DD % 16 == 0) {
    if (have_avx512()) {
      score_keys_avx512<DD>(q, kp, 0, plen, scale, scores);
      score_keys_avx512<DD>(q, ko, 0, n - plen, scale, scores + plen);
      return;
    }
  }
#endif
  score_keys<DD>(q, kp, 0, plen, D, scale, scores);
  score_keys<DD>(q, ko, 0, n - plen, D, scale, scores + plen);
}

// One (row, KV head) item: G query heads over the shared prefix [0, plen) of (kp, vp) and the
// row's own keys (positions [plen, n), stored from index 0 of (ko, vo)). scores: scratch [n].
template <int DD>
PGEN_INLINE void attend_item(const float* q, const float* kp, const float* vp, const float* ko, const float* vo,
                        int64_t plen, int64_t n, int64_t G, int64_t D, float scale, float* scores, float* out) {
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    float* og = out + g * D;
    score_prefix_and_own<DD>(qg, kp, ko, plen, n, D, scale, scores);
    softmax_row(scores, n);
    std::fill(og, og + D, 0.0f);
    accumulate_keys<DD>(scores, vp, 0, plen, D, og);
    accumulate_keys<DD>(scores + plen, vo, 0, n - plen, D, og);
  }
}

PGEN_CLONES void attend_item_any(const float* q, const float* kp, const float* vp, const float* ko,
                                 const float* vo, int64_t plen, int64_t n, int64_t G, int64_t D, float scale,
                                 float* scores, float* out) {
  switch (D) {  // the common head dims get unrolled register-resident loops
    case 64: attend_item<64>(q, kp, vp, ko, vo, plen, n, G, D, scale, scores, out); break;
    case 128: attend_item<128>(q, kp, vp, ko, vo, plen, n, G, D, scale, scores, out); break;
    default: attend_item<0>(q, kp, vp, ko, vo, plen, n, G, D, scale, scores, out); break;
  }
}

// Scores of q against keys [lo, hi) of k into scores[lo, hi): the AVX-512 twin where it runs.
// A key's score does not depend on which block or range it is computed in.
template <int DD>
PGEN_INLINE void score_range(const float* q, const float* k, int64_t lo, int64_t hi, int64_t D, float scale,
                             float* scores) {
#ifdef PGEN_SCORE16
  if constexpr (DD > 0 && DD % 16 == 0) {
    if (have_avx512()) {
      score_keys_avx512<DD>(q, k, lo, hi, scale, scores);
      return;
    }
  }
#endif
  score_keys<DD>(q, k, lo, hi, D, scale, scores);
}

// m rows that share the prefix [0, plen) of (kp, vp) (a prompt's samples; the unconditional
// rows of one pad prompt), for one KV head: bitwise what attend_item gives each row, but the
// prefix is walked in blocks of kGroupKeys keys, each block scored (then accumulated) for all
// m rows while it sits in L1, instead of re-read per row from L2 or memory. Row i: q[i] /
// out[i] its G query heads, ko[i] / vo[i] its own keys (positions [plen, n[i]), n[i] >= plen),
// scores + i * ld its scratch. Per row the sums run in the same order as attend_item's.
constexpr int64_t kGroupKeys = 32;  // 8 KiB of K (and of V) per block at D = 64

template <int DD>
PGEN_INLINE void attend_group(const float* const* q, const float* kp, const float* vp, const float* const* ko,
                              const float* const* vo, int64_t plen, const int64_t* n, int64_t m, int64_t G,
                              int64_t D, float scale, float* scores, int64_t ld, float* const* out) {
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t j0 = 0; j0 < plen; j0 += kGroupKeys) {
      const int64_t j1 = std::min(plen, j0 + kGroupKeys);
      for (int64_t i = 0; i < m; ++i) score_range<DD>(q[i] + g * D, kp, j0, j1, D, scale, scores + i * ld);
    }
    for (int64_t i = 0; i < m; ++i) {
      float* si = scores + i * ld;
      score_range<DD>(q[i] + g * D, ko[i], 0, n[i] - plen, D, scale, si + plen);
      softmax_row(si, n[i]);
      std::fill(out[i] + g * D, out[i] + (g + 1) * D, 0.0f);
    }
    for (int64_t j0 = 0; j0 < plen; j0 += kGroupKeys) {
      const int64_t j1 = std::min(plen, j0 + kGroupKeys);
      for (int64_t i = 0; i < m; ++i) accumulate_keys<DD>(scores + i * ld, vp, j0, j1, D, out[i] + g * D);
    }
    for (int64_t i = 0; i < m; ++i) {
      accumulate_keys<DD>(scores + i * ld + plen, vo[i], 0, n[i] - plen, D, out[i] + g * D);
    }
  }
}

PGEN_CLONES void attend_group_any(const float* const* q, const float* kp, const float* vp, const float* const* ko,
                                  const float* const* vo, int64_t plen, const int64_t* n, int64_t m, int64_t G,
                                  int64_t D, float scale, float* scores, int64_t ld, float* const* out) {
  switch (D) {
    case 64: attend_group<64>(q, kp, vp, ko, vo, plen, n, m, G, D, scale, scores, ld, out); break;
    case 128: attend_group<128>(q, kp, vp, ko, vo, plen, n, m, G, D, scale, scores, ld, out); break;
    default: attend_group<0>(q, kp, vp, ko, vo, plen, n, m, G, D, scale, scores, ld, out); break;
  }
}

PGEN_CLONES void silu_mul_range(float* g, const float* u, int64_t lo, int64_t hi) {
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) {
    const float x = g[i];
    // silu(x) = x * sigmoid(x); exp of -|x| keeps the polynomial in its x <= 0 domain
    const float e = exp_nonpos(-std::fabs(x));
    const float sig = x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
    g[i] = x * sig * u[i];
  }
}

PGEN_CLONES void add_range(float* a, const float* b, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a[i] += b[i];
}

PGEN_CLONES void causal_softmax_row(float* row, int64_t S, int64_t lo, int64_t hi, float scale) {
#pragma omp simd
  for (int64_t j = lo; j < hi; ++j) row[j] *= scale;
  softmax_row(row + lo, hi - lo);
  std::fill(row, row + lo, 0.0f);
  std::fill(row + hi, row + S, 0.0f);
}

}  // namespace decode_detail

using namespace decode_detail;

namespace {
// Fork only for enough work and never from inside a parallel region (the decode step already
// runs one thread per group of rows; nested teams would oversubscribe the cores).
bool fork_for(int64_t work) {
#ifdef _OPENMP
  return work > 16384 && !omp_in_parallel();
#else
  (void)work;
  return false;
#endif
}
}  // namespace

void rms_norm_rows_f32(const float* x, const float* w, float* y, int64_t B, int64_t H, float eps) {
#pragma omp parallel for schedule(static) if (fork_for(B * H))
  for (int64_t b = 0; b < B; ++b) rms_norm_row(x + b * H, w, y + b * H, H, eps);
}

void rotary_kv_write_f32(float* q, float* k, const float* v, const float* cos, const float* sin,
                         int64_t B, int64_t Hq, int64_t Hkv, int64_t D, float* k_cache,
                         float* v_cache, int64_t cache_rows, int64_t L, const int64_t* slot) {
#pragma omp parallel for schedule(static) if (fork_for(B * Hq * D))
  for (int64_t b = 0; b < B; ++b) {
    rotate_heads(q + b * Hq * D, cos + b * D, sin + b * D, Hq, D);
    rotate_heads(k + b * Hkv * D, cos + b * D, sin + b * D, Hkv, D);
    const int64_t row = slot[b] / L, pos = slot[b] % L;
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t dst = ((row * Hkv + h) * L + pos) * D;
      std::memcpy(k_cache + dst, k + (b * Hkv + h) * D, sizeof(float) * D);
      std::memcpy(v_cache + dst, v + (b * Hkv + h) * D, sizeof(float) * D);
    }
  }
  (void)cache_rows;
}

void rotary_rows_f32(float* x, const float* cos, const float* sin, int64_t B, int64_t heads, int64_t D) {
#pragma omp parallel for schedule(static) if (fork_for(B * heads * D))
  for (int64_t b = 0; b < B; ++b) rotate_heads(x + b * heads * D, cos + b * D, sin + b * D, heads, D);
}

void cached_attention_f32(const float* q, const float* k_cache, const float* v_cache,
                          int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t cache_rows,
                          int64_t L, const int32_t* seqlen, const float* kp_cache, const float* vp_cache,
                          int64_t Lp, const int32_t* prefix_row, const int32_t* prefix_len, float scale,
                          float* out, const int64_t* own_rows) {
  const int64_t G = Hq / Hkv;
  (void)cache_rows;
  // Units of rows attended together (CSR over `members`): the rows with one shared prefix
  // (same pool row and length, all of it within their seqlen) form one unit, read block by
  // block for all of them (attend_group); every other row is a unit of its own.
  std::vector<int64_t> members(static_cast<size_t>(B)), unit_start;
  for (int64_t b = 0; b < B; ++b) members[b] = b;
  auto shares = [&](int64_t b) { return prefix_row != nullptr && prefix_len[b] > 0 && seqlen[b] >= prefix_len[b]; };
  if (prefix_row != nullptr) {  // group order: sharing rows by (pool row, length), then the rest in row order
    std::stable_sort(members.begin(), members.end(), [&](int64_t a, int64_t b) {
      const bool sa = shares(a), sb = shares(b);
      if (sa != sb) return sa;
      if (!sa) return false;
      return prefix_row[a] != prefix_row[b] ? prefix_row[a] < prefix_row[b] : prefix_len[a] < prefix_len[b];
    });
  }
  int64_t widest = 1;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t a = members[i], p = i > 0 ? members[i - 1] : -1;
    const bool joins = i > 0 && shares(a) && shares(p) && prefix_row[a] == prefix_row[p] &&
                       prefix_len[a] == prefix_len[p];
    if (!joins) unit_start.push_back(i);
    else widest = std::max<int64_t>(widest, i - unit_start.back() + 1);
  }
  unit_start.push_back(B);
  const int64_t units = static_cast<int64_t>(unit_start.size()) - 1;
#pragma omp parallel if (fork_for(B * Hkv * (L + Lp) * D))
  {
    std::vector<float> scores(static_cast<size_t>(widest * (L + Lp)));
    std::vector<const float*> gq, gko, gvo;
    std::vector<float*> gout;
    std::vector<int64_t> gn;
    // dynamic: a unit of many rows is many times the work of a single row
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < units * Hkv; ++item) {
      const int64_t u = item / Hkv, h = item % Hkv, m = unit_start[u + 1] - unit_start[u];
      if (m > 1) {
        const int64_t* rows = members.data() + unit_start[u];
        gq.resize(m), gko.resize(m), gvo.resize(m), gout.resize(m), gn.resize(m);
        for (int64_t i = 0; i < m; ++i) {
          const int64_t b = rows[i], own = own_rows ? own_rows[b] : b;
          gq[i] = q + (b * Hq + h * G) * D;
          gout[i] = out + (b * Hq + h * G) * D;
          gko[i] = k_cache + (own * Hkv + h) * L * D;
          gvo[i] = v_cache + (own * Hkv + h) * L * D;
          gn[i] = seqlen[b];
        }
        const int64_t pre = (prefix_row[rows[0]] * Hkv + h) * Lp * D;
        attend_group_any(gq.data(), kp_cache + pre, vp_cache + pre, gko.data(), gvo.data(), prefix_len[rows[0]],
                         gn.data(), m, G, D, scale, scores.data(), L + Lp, gout.data());
        continue;
      }
      const int64_t b = members[unit_start[u]];
      const int64_t n = seqlen[b];
      const float* qb = q + (b * Hq + h * G) * D;
      float* ob = out + (b * Hq + h * G) * D;
      if (n <= 0) {
        std::fill(ob, ob + G * D, 0.0f);
        continue;
      }
      const int64_t own = own_rows ? own_rows[b] : b;
      const int64_t plen = prefix_row ? std::min<int64_t>(prefix_len[b], n) : 0;
      const int64_t pre = prefix_row ? (prefix_row[b] * Hkv + h) * Lp * D : 0;
      attend_item_any(qb, prefix_row ? kp_cache + pre : nullptr, prefix_row ? vp_cache + pre : nullptr,
                      k_cache + (own * Hkv + h) * L * D, v_cache + (own * Hkv + h) * L * D, plen, n, G, D,
                      scale, scores.data(), ob);
    }
  }
}

void add_inplace_f32(float* a, const float* b, int64_t n) { add_range(a, b, n); }

void add_bias_rows_f32(float* y, const float* bias, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) add_range(y + r * n, bias, n);
}

void causal_softmax_rows_f32(float* s, int64_t S, int64_t ld, int64_t pad, float scale, int64_t row0) {
  for (int64_t i = row0; i < S; ++i) causal_softmax_row(s + i * ld, S, i >= pad ? pad : i, i + 1, scale);
}

void silu_mul_f32(float* g, const float* u, int64_t n) {
  const int64_t chunk = 4096;
  const int64_t chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) if (chunks > 1 && fork_for(n))
  for (int64_t c = 0; c < chunks; ++c) silu_mul_range(g, u, c * chunk, std::min(n, (c + 1) * chunk));
}

}  // namespace pgen
