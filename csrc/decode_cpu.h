// Float32 CPU kernels of one cached decode step (plain C++, no torch): the elementwise and
// attention parts of a Llama layer. The projections stay in the BLAS (torch::mm); these fill
// the gaps between them so a whole layer is 7 BLAS calls plus 4 passes over small buffers,
// instead of ~40 eager torch ops.
//
// Shapes (row-major, contiguous): B rows (one new token each), H hidden, Hq/Hkv heads, D head
// dim, caches head-major [rows, Hkv, L, D]. Rows run in parallel (OpenMP when available),
// except when called from inside a parallel region.
#pragma once

#include <cstdint>

namespace pgen {

// y[b] = w * (x[b] * 1/sqrt(mean(x[b]^2) + eps)); x, y [B, H] (may alias), w [H].
void rms_norm_rows_f32(const float* x, const float* w, float* y, int64_t B, int64_t H, float eps);

// Rotates q [B, Hq, D] and k [B, Hkv, D] in place (rotate_half convention, cos/sin [B, D]),
// then stores k and v [B, Hkv, D] into the caches at row slot[b] / L, position slot[b] % L.
void rotary_kv_write_f32(float* q, float* k, const float* v, const float* cos, const float* sin,
                         int64_t B, int64_t Hq, int64_t Hkv, int64_t D, float* k_cache,
                         float* v_cache, int64_t cache_rows, int64_t L, const int64_t* slot);

// One query per row over its cached keys, with optional shared prefixes (cascade layout):
// query row b owns cache row own_rows[b] (own_rows == nullptr: row b). With prefix_row, it
// attends to positions [0, prefix_len[b]) stored in row prefix_row[b] of the prefix pool
// (kp/vp [prefix rows, Hkv, Lp, D], written once and shared by every row of its group) and to
// its own positions [prefix_len[b], seqlen[b]) stored from index 0 of its own cache row
// (k/v [rows, Hkv, L, D]); prefix_row == nullptr: all positions [0, seqlen[b]) from its own
// row. q [B, Hq, D] -> out [B, Hq, D]; scores in fp32, softmax with the row max subtracted.
// Rows whose seqlen is 0 get zeros.
void cached_attention_f32(const float* q, const float* k_cache, const float* v_cache,
                          int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t cache_rows,
                          int64_t L, const int32_t* seqlen, const float* kp_cache, const float* vp_cache,
                          int64_t Lp, const int32_t* prefix_row, const int32_t* prefix_len, float scale,
                          float* out, const int64_t* own_rows = nullptr);

// Rotates x [B, heads, D] in place (rotate_half convention, cos/sin [B, D]).
void rotary_rows_f32(float* x, const float* cos, const float* sin, int64_t B, int64_t heads, int64_t D);

// Causal softmax in place over scores [S, S] (row stride ld) of one left-padded prompt with
// `pad` padding tokens: row i is scaled by `scale` and softmaxed over columns [pad, i] (a
// padding row, i < pad, over [i, i]: itself only); every other column becomes 0. Only rows
// [row0, S) are touched (row0 = S - 1: the last query alone, as the full pass computes it).
void causal_softmax_rows_f32(float* s, int64_t S, int64_t ld, int64_t pad, float scale, int64_t row0 = 0);

// a += b over [n] elements (residual adds).
void add_inplace_f32(float* a, const float* b, int64_t n);

// y[r] += bias over rows of y [rows, n] (a linear layer's bias after its GEMM).
void add_bias_rows_f32(float* y, const float* bias, int64_t rows, int64_t n);

// g = silu(g) * u over [n] elements (the SwiGLU gate).
void silu_mul_f32(float* g, const float* u, int64_t n);

}  // namespace pgen
