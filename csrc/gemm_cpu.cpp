#include "gemm_cpu.h"

#include <algorithm>
#include <stdexcept>

#if defined(__x86_64__) && defined(__GNUC__)
#define PGEN_HAVE_AVX512_GEMM 1
#include <immintrin.h>
#endif

namespace pgen {

int64_t packed_weight_floats(int64_t N, int64_t K) { return (N + 15) / 16 * 16 * K; }

#ifdef PGEN_HAVE_AVX512_GEMM
namespace {
// The first `cols` of a panel's 16 lanes (all of them from 16 on).
__mmask16 tail_mask(int64_t cols) {
  return cols >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << cols) - 1);
}

// One panel: row k of the panel is a gather of W[j0 + c][k] over its 16 columns c (masked:
// padding columns read nothing and store 0). Measured 3-4x the rate of the scalar loop below,
// which reads W 16 rows K apart per k; scattering rows into the panel instead was slower still
// (strided stores).
__attribute__((target("avx512f"))) void pack_panel_avx512(const float* W, int64_t K, int64_t cols, float* panel) {
  const __m512i rows = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(static_cast<int>(K)));
  const __mmask16 m = tail_mask(cols);
  for (int64_t k = 0; k < K; ++k) {
    _mm512_storeu_ps(panel + k * 16, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, rows, W + k, 4));
  }
}
}  // namespace
#endif

void pack_weight_f32(const float* W, int64_t N, int64_t K, float* P) {
#ifdef PGEN_HAVE_AVX512_GEMM
  // 32-bit gather offsets: row 15 of a panel starts 15 * K floats in
  if (packed_gemm_available() && 15 * K < (int64_t{1} << 31)) {
    for (int64_t j0 = 0; j0 < N; j0 += 16) pack_panel_avx512(W + j0 * K, K, std::min<int64_t>(16, N - j0), P + j0 * K);
    return;
  }
#endif
  for (int64_t j0 = 0; j0 < N; j0 += 16) {
    float* panel = P + j0 * K;
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t c = 0; c < 16; ++c) panel[k * 16 + c] = j0 + c < N ? W[(j0 + c) * K + k] : 0.0f;
    }
  }
}

#ifdef PGEN_HAVE_AVX512_GEMM
namespace {

// MR rows x NP panels of 16 columns, accumulated over k in [0, K) in registers. x rows are
// ldx apart; ps = floats per panel (16 x the K the panels were packed with).
template <int MR, int NP>
__attribute__((target("avx512f"), always_inline)) inline void micro(const float* x, int64_t ldx, int64_t K,
                                                                     const float* P, int64_t ps, float* y,
                                                                     int64_t ldy, __mmask16 last) {
  __m512 acc[MR][NP];
  for (int r = 0; r < MR; ++r) {
    for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    __m512 w[NP];
    for (int p = 0; p < NP; ++p) w[p] = _mm512_loadu_ps(P + p * ps + k * 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * ldx + k]);
      for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_fmadd_ps(xb, w[p], acc[r][p]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int p = 0; p < NP; ++p) {
      _mm512_mask_storeu_ps(y + r * ldy + p * 16, p == NP - 1 ? last : static_cast<__mmask16>(0xFFFF), acc[r][p]);
    }
  }
}

template <int MR>
__attribute__((target("avx512f"))) void row_block(const float* x, int64_t ldx, int64_t K, const float* P,
                                                  int64_t kp, int64_t N, float* y, int64_t ldy) {
  const int64_t panels = (N + 15) / 16, ps = 16 * kp;
  int64_t p = 0;
  for (; p + 2 <= panels; p += 2) micro<MR, 2>(x, ldx, K, P + p * ps, ps, y + p * 16, ldy, tail_mask(N - (p + 1) * 16));
  if (p < panels) micro<MR, 1>(x, ldx, K, P + p * ps, ps, y + p * 16, ldy, tail_mask(N - p * 16));
}

}  // namespace

bool packed_gemm_available() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

void gemm_packed_f32(const float* x, int64_t M, int64_t K, const float* P, int64_t N, float* y, int64_t ldy,
                     int64_t ldx, int64_t kp) {
  if (!packed_gemm_available()) throw std::runtime_error("gemm_packed_f32: this CPU has no AVX-512F");
  if (ldy < 0) ldy = N;
  if (ldx < 0) ldx = K;
  if (kp < 0) kp = K;
  // Row blocks of at most 8 (8 x 32 accumulators: 16 of the 32 vector registers), as equal as
  // possible: blocks of 4+ rows run at the FMA rate, 2-3-row blocks at half of it (two weight
  // loads per k for too few FMAs), so 8 rows are one block, not 6 + 2.
  const int64_t blocks = (M + 7) / 8;
  // Columns in chunks of 8 panels (K x 128 floats of W: 128 KiB at K = 256, kept in L2 while
  // every row block uses them), so a wide W (a 16384-code head) streams from memory once per
  // call, not once per row block.
  constexpr int64_t kChunk = 128;
  for (int64_t c0 = 0; c0 < N; c0 += kChunk) {
    const int64_t nc = std::min(kChunk, N - c0);
    const float* Pc = P + c0 * kp;
    int64_t r = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t mr = (M - r) / (blocks - b);
      const float* xb = x + r * ldx;
      float* yb = y + r * ldy + c0;
      switch (mr) {
        case 1: row_block<1>(xb, ldx, K, Pc, kp, nc, yb, ldy); break;
        case 2: row_block<2>(xb, ldx, K, Pc, kp, nc, yb, ldy); break;
        case 3: row_block<3>(xb, ldx, K, Pc, kp, nc, yb, ldy); break;
        case 4: row_block<4>(xb, ldx, K, Pc, kp, nc, yb, ldy); break;
        case 5: row_block<5>(xb, ldx, K, Pc, kp, nc, yb, ldy); break;
        case 6: row_block<6>(xb, ldx, K, Pc, kp, nc, yb, ldy); break;
        case 7: row_block<7>(xb, ldx, K, Pc, kp, nc, yb, ldy); break;
        default: row_block<8>(xb, ldx, K, Pc, kp, nc, yb, ldy); break;
      }
      r += mr;
    }
  }
}

#else  // no AVX-512 build: callers use the BLAS

bool packed_gemm_available() { return false; }

void gemm_packed_f32(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, int64_t, int64_t) {
  throw std::runtime_error("gemm_packed_f32: built without AVX-512 support");
}

#endif

}  // namespace pgen
