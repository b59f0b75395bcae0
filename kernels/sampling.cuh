// Batched CFG / temperature / top-k / top-p sampling on the GPU: one thread block per row,
// thresholds found by radix selection over the float bits (no sort). Semantics are those
// of csrc/sampler_cpu.h, step for step. This header is free of torch so that the .cu file
// compiles standalone with `nvcc -c`; the torch glue lives in csrc/cuda_ops.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace pgen {
namespace kernels {

// logits, uncond: device fp32 [B, V], rows `row_stride` elements apart (uncond may be null:
// no CFG); seeds: device int64 [B]; out: device int64 [B]. Enqueued on `stream`, no sync.
// Returns the launch status (cudaSuccess or the launch error).
cudaError_t launch_sample(const float* logits, const float* uncond, int64_t B, int64_t V,
                          int64_t row_stride, float guidance_scale, float temperature,
                          int64_t top_k, float top_p, const int64_t* seeds, int64_t* out,
                          cudaStream_t stream);

}  // namespace kernels
}  // namespace pgen
