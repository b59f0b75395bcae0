#include "paged_kv.cuh"

namespace pgen {
namespace kernels {
namespace {

constexpr int kThreads = 128;

// One block per token: K row and V row, each `row_bytes` long, moved in VecT chunks.
template <typename VecT>
__global__ void paged_kv_write_kernel(char* __restrict__ k_cache, char* __restrict__ v_cache,
                                      const char* __restrict__ k_new,
                                      const char* __restrict__ v_new,
                                      const int64_t* __restrict__ slots, int64_t num_slots,
                                      int64_t row_bytes, int64_t k_stride, int64_t v_stride) {
  const int64_t n = blockIdx.x;
  const int64_t slot = slots[n];
  if (slot < 0 || slot >= num_slots) return;
  const int64_t nvec = row_bytes / static_cast<int64_t>(sizeof(VecT));
  const VecT* ks = reinterpret_cast<const VecT*>(k_new + n * k_stride);
  const VecT* vs = reinterpret_cast<const VecT*>(v_new + n * v_stride);
  VecT* kd = reinterpret_cast<VecT*>(k_cache + slot * row_bytes);
  VecT* vd = reinterpret_cast<VecT*>(v_cache + slot * row_bytes);
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    kd[i] = ks[i];
    vd[i] = vs[i];
  }
}

template <typename VecT>
cudaError_t launch(void* k_cache, void* v_cache, const void* k_new, const void* v_new,
                   const int64_t* slots, int64_t N, int64_t num_slots, int64_t row_bytes,
                   int64_t ks, int64_t vs, cudaStream_t stream) {
  const int64_t nvec = row_bytes / static_cast<int64_t>(sizeof(VecT));
  const int threads = static_cast<int>(nvec < kThreads ? (nvec < 32 ? 32 : nvec) : kThreads);
  paged_kv_write_kernel<VecT><<<static_cast<unsigned int>(N), threads, 0, stream>>>(
      static_cast<char*>(k_cache), static_cast<char*>(v_cache), static_cast<const char*>(k_new),
      static_cast<const char*>(v_new), slots, num_slots, row_bytes, ks, vs);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_paged_kv_write(void* k_cache, void* v_cache, const void* k_new,
                                  const void* v_new, const int64_t* slots, int64_t N,
                                  int64_t num_slots, int64_t row_bytes, int64_t k_new_stride_bytes,
                                  int64_t v_new_stride_bytes, cudaStream_t stream) {
  if (N <= 0 || row_bytes <= 0) return cudaSuccess;
  if (N > 0x7fffffffLL) return cudaErrorInvalidValue;
  // Widest access every pointer, stride and the row length are aligned to.
  uint64_t align = static_cast<uint64_t>(row_bytes) | static_cast<uint64_t>(k_new_stride_bytes) |
                   static_cast<uint64_t>(v_new_stride_bytes) |
                   reinterpret_cast<uintptr_t>(k_cache) | reinterpret_cast<uintptr_t>(v_cache) |
                   reinterpret_cast<uintptr_t>(k_new) | reinterpret_cast<uintptr_t>(v_new);
  if (align % 16 == 0)
    return launch<uint4>(k_cache, v_cache, k_new, v_new, slots, N, num_slots, row_bytes,
                         k_new_stride_bytes, v_new_stride_bytes, stream);
  if (align % 8 == 0)
    return launch<uint2>(k_cache, v_cache, k_new, v_new, slots, N, num_slots, row_bytes,
                         k_new_stride_bytes, v_new_stride_bytes, stream);
  if (align % 4 == 0)
    return launch<uint32_t>(k_cache, v_cache, k_new, v_new, slots, N, num_slots, row_bytes,
                            k_new_stride_bytes, v_new_stride_bytes, stream);
  if (align % 2 == 0)
    return launch<uint16_t>(k_cache, v_cache, k_new, v_new, slots, N, num_slots, row_bytes,
                            k_new_stride_bytes, v_new_stride_bytes, stream);
  return launch<uint8_t>(k_cache, v_cache, k_new, v_new, slots, N, num_slots, row_bytes,
                         k_new_stride_bytes, v_new_stride_bytes, stream);
}

}  // namespace kernels
}  // namespace pgen
