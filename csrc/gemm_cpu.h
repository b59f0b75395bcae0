// Float32 GEMM for few rows against pre-packed weights: y [M, N] = x [M, K] . W^T, W [N, K].
//
// Why: in a CPU decode step each BLAS call multiplies a handful of rows (2-32) by a weight
// matrix, and the BLAS re-packs the whole weight every call (as much work as the product
// at 8 rows). Packing once per generation call and running an AVX-512 register-blocked
// kernel (up to 8 rows x 32 columns of accumulators, one fused multiply-add per weight element
// and row, k in order) runs these products about 1.3-3x faster. Every output is the same
// sequential sum over k whatever M is, so a row's result does not depend on its batch.
#pragma once

#include <cstdint>

namespace pgen {

// True when this CPU and build can run gemm_packed_f32 (x86-64 with AVX-512F).
bool packed_gemm_available();

// Floats needed for W [N, K] packed: panels of 16 output columns, [ceil(N / 16)][K][16].
int64_t packed_weight_floats(int64_t N, int64_t K);

// Packs row-major W [N, K] into P (packed_weight_floats(N, K) floats; padding columns = 0).
void pack_weight_f32(const float* W, int64_t N, int64_t K, float* P);

// y [M, N] (row-major, row stride ldy; default N) = x [M, K] (row-major, row stride ldx;
// default K) . W^T with W packed in P. Prefixes of the packed W work: N may be less than W's
// rows (the first N outputs) and K less than the kp columns W was packed with (default K: the
// first K terms of each sum). Needs packed_gemm_available(); single-threaded.
void gemm_packed_f32(const float* x, int64_t M, int64_t K, const float* P, int64_t N, float* y, int64_t ldy = -1,
                     int64_t ldx = -1, int64_t kp = -1);

}  // namespace pgen
