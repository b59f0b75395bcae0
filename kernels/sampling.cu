#include "sampling.cuh"

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

namespace pgen {
namespace kernels {
namespace {

constexpr int kThreads = 512;
constexpr int kBins = 256;

__device__ __forceinline__ float uniform_from_seed(int64_t seed) {
  uint64_t z = static_cast<uint64_t>(seed) + 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z = z ^ (z >> 31);
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
}

// Steps 1-2. Explicit _rn intrinsics: no FMA contraction, so the result is bit-identical to
// the CPU sampler's `u + s*(c-u)` then `/ T`.
__device__ __forceinline__ float logit_at(const float* c, const float* u, int64_t i, float s,
                                          float inv_t_unused, float T) {
  (void)inv_t_unused;
  const float v = u ? __fadd_rn(u[i], __fmul_rn(s, __fsub_rn(c[i], u[i]))) : c[i];
  return __fdiv_rn(v, T);
}

// Order-preserving map float -> uint32 (larger float, larger key).
__device__ __forceinline__ uint32_t ordered_key(float f) {
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float key_to_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

struct RowCtx {
  const float* c;
  const float* u;
  int64_t V;
  float s, T, m, z;
  bool use_topk;
  float x_thr;  // keep x >= x_thr (top-k)
  bool use_topp;
  float p_thr;  // keep p >= p_thr (top-p)
};

__device__ __forceinline__ float prob_at(const RowCtx& r, float x) {
  return __fdiv_rn(expf(__fsub_rn(x, r.m)), r.z);
}

// Returns the probability of token i, or -1 when token i is filtered out by the thresholds
// found so far.
__device__ __forceinline__ float kept_prob(const RowCtx& r, int64_t i) {
  const float x = logit_at(r.c, r.u, i, r.s, 0.f, r.T);
  if (r.use_topk && !(x >= r.x_thr)) return -1.0f;
  const float p = prob_at(r, x);
  if (r.use_topp && !(p >= r.p_thr)) return -1.0f;
  return p;
}

__global__ void __launch_bounds__(kThreads)
    sample_kernel(const float* __restrict__ logits, const float* __restrict__ uncond, int64_t V,
                  int64_t row_stride, float s, float T, int64_t top_k, float top_p,
                  const int64_t* __restrict__ seeds, int64_t* __restrict__ out) {
  using ReduceF = cub::BlockReduce<float, kThreads>;
  using ReduceD = cub::BlockReduce<double, kThreads>;
  using ScanD = cub::BlockScan<double, kThreads>;
  __shared__ union {
    typename ReduceF::TempStorage rf;
    typename ReduceD::TempStorage rd;
    typename ScanD::TempStorage sd;
  } tmp;
  __shared__ unsigned int hist_n[kBins];
  __shared__ double hist_m[kBins];
  __shared__ float bcast_f;
  __shared__ double bcast_d;
  __shared__ uint32_t sel_digit;
  __shared__ long long sel_rem;
  __shared__ double sel_acc;
  __shared__ int found_idx;
  __shared__ int last_kept;

  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;
  RowCtx r;
  r.c = logits + row * row_stride;
  r.u = uncond ? uncond + row * row_stride : nullptr;
  r.V = V;
  r.s = s;
  r.T = T;
  r.use_topk = false;
  r.use_topp = false;
  r.x_thr = 0.f;
  r.p_thr = 0.f;

  // Step 3: softmax statistics. A row with a NaN / Inf scaled logit gets -1 (ops/sampling.py).
  float lmax = -INFINITY;
  int lbad = 0;
  for (int64_t i = tid; i < V; i += kThreads) {
    const float x = logit_at(r.c, r.u, i, s, 0.f, T);
    lmax = fmaxf(lmax, x);
    lbad |= !isfinite(x);
  }
  if (__syncthreads_or(lbad)) {  // uniform across the block: every thread leaves together
    if (tid == 0) out[row] = -1;
    return;
  }
  float m = ReduceF(tmp.rf).Reduce(lmax, [](float a, float b) { return fmaxf(a, b); });
  if (tid == 0) bcast_f = m;
  __syncthreads();
  r.m = bcast_f;
  double lz = 0.0;
  for (int64_t i = tid; i < V; i += kThreads)
    lz += static_cast<double>(expf(__fsub_rn(logit_at(r.c, r.u, i, s, 0.f, T), r.m)));
  double z = ReduceD(tmp.rd).Sum(lz);
  if (tid == 0) bcast_d = z;
  __syncthreads();
  r.z = static_cast<float>(bcast_d);

  // Step 4: k-th largest logit by 4 passes of 8-bit radix selection on the ordered keys.
  if (top_k > 0 && top_k < V) {
    uint32_t prefix = 0, mask = 0;
    if (tid == 0) sel_rem = top_k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = tid; b < kBins; b += kThreads) hist_n[b] = 0;
      __syncthreads();
      for (int64_t i = tid; i < V; i += kThreads) {
        const uint32_t k = ordered_key(logit_at(r.c, r.u, i, s, 0.f, T));
        if ((k & mask) == prefix) atomicAdd(&hist_n[(k >> shift) & 0xff], 1u);
      }
      __syncthreads();
      if (tid == 0) {
        long long rem = sel_rem, cum = 0;
        int d = kBins - 1;
        for (; d > 0; --d) {
          if (cum + hist_n[d] >= rem) break;
          cum += hist_n[d];
        }
        sel_digit = static_cast<uint32_t>(d);
        sel_rem = rem - cum;
      }
      __syncthreads();
      prefix |= sel_digit << shift;
      mask |= 0xffu << shift;
    }
    r.use_topk = true;
    r.x_thr = key_to_float(prefix);
  }

  // Step 5: top-p threshold by radix selection on the probability bits (p >= 0, so the raw
  // bits are ordered), histogramming mass instead of counts.
  if (top_p < 1.0f) {
    double lm = 0.0;
    for (int64_t i = tid; i < V; i += kThreads) {
      const float p = kept_prob(r, i);
      if (p >= 0.f) lm += p;
    }
    double mass = ReduceD(tmp.rd).Sum(lm);
    if (tid == 0) {
      bcast_d = mass;
      sel_acc = 0.0;
    }
    __syncthreads();
    const double target = static_cast<double>(top_p) * bcast_d;
    uint32_t prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = tid; b < kBins; b += kThreads) {
        hist_n[b] = 0;
        hist_m[b] = 0.0;
      }
      __syncthreads();
      for (int64_t i = tid; i < V; i += kThreads) {
        const float p = kept_prob(r, i);
        if (p < 0.f) continue;
        const uint32_t k = __float_as_uint(p);
        if ((k & mask) == prefix) {
          atomicAdd(&hist_n[(k >> shift) & 0xff], 1u);
          atomicAdd(&hist_m[(k >> shift) & 0xff], static_cast<double>(p));
        }
      }
      __syncthreads();
      if (tid == 0) {
        double acc = sel_acc, above = 0.0;
        int d = kBins - 1, lowest = -1;
        bool hit = false;
        for (; d >= 0; --d) {
          if (hist_n[d] == 0) continue;
          lowest = d;
          if (acc + above + hist_m[d] >= target) {
            hit = true;
            break;
          }
          above += hist_m[d];
        }
        if (!hit) {  // rounding: the mass never reached target; keep all -> minimum value
          d = lowest;
          above -= hist_m[d];
        }
        sel_digit = static_cast<uint32_t>(d < 0 ? 0 : d);
        sel_acc = acc + above;
      }
      __syncthreads();
      prefix |= sel_digit << shift;
      mask |= 0xffu << shift;
    }
    r.use_topp = true;
    r.p_thr = __uint_as_float(prefix);
  }

  // Step 6: inverse-CDF draw over the kept tokens in vocabulary order.
  double ls = 0.0;
  int llast = -1;
  for (int64_t i = tid; i < V; i += kThreads) {
    const float p = kept_prob(r, i);
    if (p >= 0.f) {
      ls += p;
      llast = static_cast<int>(i);
    }
  }
  if (tid == 0) {
    last_kept = -1;
    found_idx = 0x7fffffff;
  }
  __syncthreads();
  if (llast >= 0) atomicMax(&last_kept, llast);
  double total = ReduceD(tmp.rd).Sum(ls);
  if (tid == 0) bcast_d = total;
  __syncthreads();
  const double target = static_cast<double>(uniform_from_seed(seeds[row])) * bcast_d;
  double carry = 0.0;
  for (int64_t base = 0; base < V; base += kThreads) {
    const int64_t i = base + tid;
    float p = i < V ? kept_prob(r, i) : -1.0f;
    const double v = p >= 0.f ? static_cast<double>(p) : 0.0;
    double incl, chunk;
    ScanD(tmp.sd).InclusiveSum(v, incl, chunk);
    const bool hit = p >= 0.f && carry + incl > target;
    if (hit) atomicMin(&found_idx, static_cast<int>(i));
    if (__syncthreads_or(hit)) break;
    carry += chunk;
  }
  if (tid == 0) out[row] = found_idx != 0x7fffffff ? found_idx : last_kept;
}

}  // namespace

cudaError_t launch_sample(const float* logits, const float* uncond, int64_t B, int64_t V,
                          int64_t row_stride, float guidance_scale, float temperature,
                          int64_t top_k, float top_p, const int64_t* seeds, int64_t* out,
                          cudaStream_t stream) {
  if (B <= 0) return cudaSuccess;
  if (V <= 0 || V > 0x7fffffffLL || B > 0x7fffffffLL) return cudaErrorInvalidValue;
  const float* u = guidance_scale != 1.0f ? uncond : nullptr;
  sample_kernel<<<static_cast<unsigned int>(B), kThreads, 0, stream>>>(
      logits, u, V, row_stride, guidance_scale, temperature, top_k, top_p, seeds, out);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace pgen
