#include "sampler_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pgen {
namespace {

constexpr int kHistBits = 11;  // first-level radix: sign, exponent and 2 mantissa bits
constexpr int kBins = 1 << kHistBits;
constexpr int kShift = 32 - kHistBits;

// Order-preserving map float -> uint32 (larger float, larger key).
inline uint32_t ordered_key(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Threshold t of step 5 among `vals` (kept probabilities, all >= 0): the largest value such
// that the mass of values >= t reaches `target`. A one-pass histogram over the top key bits
// finds the bin where the mass crosses target; only that bin's values are then ranked
// (quickselect on the mass), so the cost is O(n) plus a small selection.
float top_p_threshold(const std::vector<float>& vals, double target, std::vector<float>& cand,
                      std::vector<double>& mass, std::vector<uint32_t>& count) {
  mass.assign(kBins, 0.0);
  count.assign(kBins, 0);
  for (float v : vals) {
    const uint32_t bin = ordered_key(v) >> kShift;
    mass[bin] += v;
    count[bin] += 1;
  }
  double acc = 0.0;  // mass of the bins above the selected one
  int bin = kBins - 1;
  for (; bin >= 0; --bin) {
    if (count[bin] == 0) continue;
    if (acc + mass[bin] >= target) break;
    acc += mass[bin];
  }
  if (bin < 0) {
    // Rounding left the total just short of target: keep everything (t = smallest value).
    return *std::min_element(vals.begin(), vals.end());
  }
  cand.clear();
  for (float v : vals) {
    if ((ordered_key(v) >> kShift) == static_cast<uint32_t>(bin)) cand.push_back(v);
  }
  auto greater = std::greater<float>();
  size_t lo = 0, hi = cand.size();
  while (hi - lo > 32) {
    const size_t mid = lo + (hi - lo) / 2;
    std::nth_element(cand.begin() + lo, cand.begin() + mid, cand.begin() + hi, greater);
    double top = 0.0;  // [lo, mid] are the (mid - lo + 1) largest of the range
    for (size_t i = lo; i <= mid; ++i) top += cand[i];
    if (acc + top >= target) {
      hi = mid + 1;
    } else {
      acc += top;
      lo = mid + 1;
    }
  }
  std::sort(cand.begin() + lo, cand.begin() + hi, greater);
  for (size_t i = lo; i < hi; ++i) {
    acc += cand[i];
    if (acc >= target) return cand[i];
  }
  // Rounding inside the bin: the crossing is at the bin's smallest value.
  return cand[hi - 1];
}

// k-th largest of x (1 <= k <= n): histogram of the top key bits locates the bin holding it,
// then nth_element runs on that bin only.
float kth_largest(const std::vector<float>& x, int64_t k, std::vector<float>& cand,
                  std::vector<uint32_t>& count) {
  count.assign(kBins, 0);
  for (float v : x) count[ordered_key(v) >> kShift] += 1;
  int64_t above = 0;
  int bin = kBins - 1;
  for (; bin > 0; --bin) {
    if (above + count[bin] >= k) break;
    above += count[bin];
  }
  cand.clear();
  for (float v : x) {
    if ((ordered_key(v) >> kShift) == static_cast<uint32_t>(bin)) cand.push_back(v);
  }
  const int64_t r = k - above - 1;  // rank inside the bin, 0 = largest
  std::nth_element(cand.begin(), cand.begin() + r, cand.end(), std::greater<float>());
  return cand[r];
}

int64_t sample_row(const float* c, const float* u, int64_t V, float s, float T, int64_t top_k,
                   float top_p, int64_t seed, std::vector<float>& x, std::vector<float>& p,
                   std::vector<float>& scratch, std::vector<float>& cand,
                   std::vector<double>& mass, std::vector<uint32_t>& count) {
  bool finite = true;
  for (int64_t i = 0; i < V; ++i) {
    float v = u ? u[i] + s * (c[i] - u[i]) : c[i];
    x[i] = v / T;
    finite = finite && std::isfinite(x[i]);
  }
  if (!finite) return -1;  // no distribution to draw from (see ops/sampling.py)
  const float m = *std::max_element(x.begin(), x.end());
  double z = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    p[i] = std::exp(x[i] - m);
    z += p[i];
  }
  const float zf = static_cast<float>(z);
  for (int64_t i = 0; i < V; ++i) p[i] = p[i] / zf;

  // kept(i) is encoded by p[i] >= 0; dropped tokens get p = -1 (probabilities are >= 0).
  if (top_k > 0 && top_k < V) {
    const float thr = kth_largest(x, top_k, cand, count);
    for (int64_t i = 0; i < V; ++i) {
      if (!(x[i] >= thr)) p[i] = -1.0f;
    }
  }
  if (top_p < 1.0f) {
    scratch.clear();
    double kept_mass = 0.0;
    for (int64_t i = 0; i < V; ++i) {
      if (p[i] >= 0.0f) {
        scratch.push_back(p[i]);
        kept_mass += p[i];
      }
    }
    const float t = top_p_threshold(scratch, static_cast<double>(top_p) * kept_mass, cand, mass, count);
    for (int64_t i = 0; i < V; ++i) {
      if (p[i] >= 0.0f && !(p[i] >= t)) p[i] = -1.0f;
    }
  }
  double total = 0.0;
  int64_t last_kept = -1;
  for (int64_t i = 0; i < V; ++i) {
    if (p[i] >= 0.0f) {
      total += p[i];
      last_kept = i;
    }
  }
  const double target = static_cast<double>(uniform_from_seed(seed)) * total;
  double run = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    if (p[i] >= 0.0f) {
      run += p[i];
      if (run > target) return i;
    }
  }
  return last_kept;
}

}  // namespace

void sample_rows_cpu(const float* logits, const float* uncond, int64_t B, int64_t V,
                     float guidance_scale, float temperature, int64_t top_k, float top_p,
                     const int64_t* seeds, int64_t* out) {
  if (V < 1) throw std::invalid_argument("sample_cpu: vocabulary size must be >= 1");
  if (!(temperature > 0.0f) || !std::isfinite(temperature)) {
    throw std::invalid_argument("sample_cpu: temperature must be a finite value > 0, got " +
                                std::to_string(temperature));
  }
  if (top_k < 0) {
    throw std::invalid_argument("sample_cpu: top_k must be >= 0 (0 = off), got " +
                                std::to_string(top_k));
  }
  if (!(top_p > 0.0f && top_p <= 1.0f)) {
    throw std::invalid_argument("sample_cpu: top_p must be in (0, 1], got " +
                                std::to_string(top_p));
  }
  const float* u = guidance_scale != 1.0f ? uncond : nullptr;
#pragma omp parallel
  {
    std::vector<float> x(V), p(V), scratch, cand;
    std::vector<double> mass;
    std::vector<uint32_t> count;
    scratch.reserve(V);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      out[b] = sample_row(logits + b * V, u ? u + b * V : nullptr, V, guidance_scale,
                          temperature, top_k, top_p, seeds[b], x, p, scratch, cand, mass,
                          count);
    }
  }
}

}  // namespace pgen
