// CPU batch sampler (host side, no torch dependency): CFG mix, temperature, top-k, top-p,
// then one seeded draw per row. Semantics (shared with the torch reference and the CUDA
// kernel, token for token on inputs without ties):
//   1. x = u + s*(c - u) when an unconditional row is given and s != 1, else x = c
//   2. x /= T                                  (T > 0)
//   3. p = softmax(x)                          (fp32, max subtracted)
//   4. top-k (0 < k < V): keep {i : x_i >= k-th largest x}
//   5. top-p (p < 1): among kept, M = sum kept p; t = the largest value with
//      sum_{kept j, p_j >= t} p_j >= top_p * M; keep {kept i : p_i >= t}
//   6. u = uniform_from_seed(seed); target = u * sum(kept p); token = smallest kept index
//      whose inclusive prefix sum over kept tokens > target, else the largest kept index.
#pragma once

#include <cstdint>

namespace pgen {

// splitmix64 finaliser of the seed -> a float in [0, 1) with 24 random bits.
inline float uniform_from_seed(int64_t seed) {
  uint64_t z = static_cast<uint64_t>(seed) + 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z = z ^ (z >> 31);
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
}

// logits, uncond: row-major fp32 [B, V] (uncond may be nullptr); seeds int64 [B];
// out int64 [B]. Rows run in parallel (OpenMP when available).
void sample_rows_cpu(const float* logits, const float* uncond, int64_t B, int64_t V,
                     float guidance_scale, float temperature, int64_t top_k, float top_p,
                     const int64_t* seeds, int64_t* out);

}  // namespace pgen
