// Scatter of new K/V rows into a paged KV cache. Torch-free so `nvcc -c` compiles the .cu
// standalone; the torch glue (shape/dtype checks) lives in csrc/cuda_ops.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace pgen {
namespace kernels {

// k_cache, v_cache: device [num_slots, row_bytes] byte views of the contiguous caches
// [num_blocks, block_size, Hkv, D]; k_new, v_new: device rows of `row_bytes` bytes, token n at
// byte offset n * new_stride_bytes; slots: device int64 [N]. Row n is copied to slot
// slots[n]; slot -1 (any slot outside [0, num_slots)) is skipped. The copy is dtype-agnostic
// (fp32/bf16/fp16 rows are just bytes); vector width follows the common alignment.
cudaError_t launch_paged_kv_write(void* k_cache, void* v_cache, const void* k_new,
                                  const void* v_new, const int64_t* slots, int64_t N,
                                  int64_t num_slots, int64_t row_bytes, int64_t k_new_stride_bytes,
                                  int64_t v_new_stride_bytes, cudaStream_t stream);

}  // namespace kernels
}  // namespace pgen
