// Torch glue of the CUDA kernels in kernels/ (compiled only when PGEN_WITH_CUDA is defined,
// i.e. setup.py found a CUDA torch and nvcc). Validates shapes, dtypes and devices,
// then enqueues the torch-free launchers on the current stream (no host sync).
#ifdef PGEN_WITH_CUDA

#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <initializer_list>

#include "paged_kv.cuh"
#include "sampling.cuh"

namespace py = pybind11;

namespace pgen {
namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// Float32 contiguous [B, V] CUDA rows (bf16/fp16 logits or strided views are converted).
torch::Tensor as_f32_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "sample_cuda: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.is_floating_point(), "sample_cuda: ", name,
              " must be a floating tensor (float32/bfloat16/float16), got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "sample_cuda: ", name, " must be 2-D [B, V], got shape ", t.sizes());
  return t.to(torch::kFloat32).contiguous();
}

torch::Tensor sample_cuda(const torch::Tensor& logits,
                          const c10::optional<torch::Tensor>& uncond, double guidance_scale,
                          double temperature, int64_t top_k, double top_p,
                          const torch::Tensor& seeds) {
  const torch::Tensor lg = as_f32_rows(logits, "logits");
  const int64_t B = lg.size(0), V = lg.size(1);
  TORCH_CHECK(V >= 1, "sample_cuda: vocabulary size must be >= 1");
  TORCH_CHECK(temperature > 0.0, "sample_cuda: temperature must be > 0, got ", temperature);
  TORCH_CHECK(top_k >= 0, "sample_cuda: top_k must be >= 0 (0 = off), got ", top_k);
  TORCH_CHECK(top_p > 0.0 && top_p <= 1.0, "sample_cuda: top_p must be in (0, 1], got ", top_p);
  torch::Tensor un;
  if (uncond.has_value()) {
    TORCH_CHECK(uncond->sizes() == logits.sizes(), "sample_cuda: uncond_logits shape ",
                uncond->sizes(), " != logits shape ", logits.sizes());
    TORCH_CHECK(uncond->device() == logits.device(), "sample_cuda: uncond_logits on ",
                uncond->device(), " but logits on ", logits.device());
    un = as_f32_rows(*uncond, "uncond_logits");
  }
  TORCH_CHECK(seeds.device() == logits.device() && seeds.scalar_type() == torch::kInt64 &&
                  seeds.dim() == 1 && seeds.size(0) == B,
              "sample_cuda: seeds must be an int64 tensor of shape [", B, "] on ", logits.device(),
              ", got ", seeds.scalar_type(), " ", seeds.sizes(), " on ", seeds.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  auto seeds_c = seeds.contiguous();
  auto out = torch::empty({B}, logits.options().dtype(torch::kInt64));
  check_cuda(kernels::launch_sample(lg.data_ptr<float>(), un.defined() ? un.data_ptr<float>() : nullptr,
                                    B, V, lg.stride(0),
                                    static_cast<float>(guidance_scale),
                                    static_cast<float>(temperature), top_k,
                                    static_cast<float>(top_p), seeds_c.data_ptr<int64_t>(),
                                    out.data_ptr<int64_t>(),
                                    c10::cuda::getCurrentCUDAStream().stream()),
             "sample_cuda");
  return out;
}

void paged_kv_write_cuda(torch::Tensor k_cache, torch::Tensor v_cache,
                         const torch::Tensor& k_new, const torch::Tensor& v_new,
                         const torch::Tensor& slot_mapping) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "paged_kv_write_cuda: caches must both be [num_blocks, block_size, Hkv, D], got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_kv_write_cuda: caches must be contiguous");
  const auto dt = k_cache.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kFloat16,
              "paged_kv_write_cuda: cache dtype must be float32/bfloat16/float16, got ", dt);
  // Typed list: the caches are non-const, the new rows const, so `{&a, &b}` cannot deduce.
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&v_cache, &k_new, &v_new}) {
    TORCH_CHECK(t->scalar_type() == dt, "paged_kv_write_cuda: dtype mismatch: caches are ", dt,
                " but got ", t->scalar_type());
  }
  const int64_t Hkv = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(k_new.dim() == 3 && k_new.size(1) == Hkv && k_new.size(2) == D &&
                  v_new.sizes() == k_new.sizes(),
              "paged_kv_write_cuda: k_new/v_new must both be [N, ", Hkv, ", ", D, "], got ",
              k_new.sizes(), " and ", v_new.sizes());
  const int64_t N = k_new.size(0);
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == N,
              "paged_kv_write_cuda: slot_mapping must be int64 [", N, "], got ",
              slot_mapping.scalar_type(), " ", slot_mapping.sizes());
  for (const torch::Tensor* t :
       std::initializer_list<const torch::Tensor*>{&k_cache, &v_cache, &k_new, &v_new, &slot_mapping}) {
    TORCH_CHECK(t->is_cuda() && t->device() == k_cache.device(),
                "paged_kv_write_cuda: every tensor must be on ", k_cache.device(), ", got ",
                t->device());
  }
  const c10::cuda::CUDAGuard guard(k_cache.device());
  // Rows [Hkv, D] must be dense; the token stride may be anything (e.g. a slice of qkv).
  auto kn = (k_new.stride(2) == 1 && k_new.stride(1) == D) ? k_new : k_new.contiguous();
  auto vn = (v_new.stride(2) == 1 && v_new.stride(1) == D) ? v_new : v_new.contiguous();
  auto slots = slot_mapping.contiguous();
  const int64_t esz = k_cache.element_size();
  check_cuda(kernels::launch_paged_kv_write(
                 k_cache.data_ptr(), v_cache.data_ptr(), kn.data_ptr(), vn.data_ptr(),
                 slots.data_ptr<int64_t>(), N, k_cache.size(0) * k_cache.size(1), Hkv * D * esz,
                 kn.stride(0) * esz, vn.stride(0) * esz, c10::cuda::getCurrentCUDAStream().stream()),
             "paged_kv_write_cuda");
}

}  // namespace

void register_cuda_ops(py::module_& m) {
  m.def("sample_cuda", &sample_cuda, py::arg("logits"), py::arg("uncond_logits"),
        py::arg("guidance_scale"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("seeds"),
        "GPU twin of sample_cpu: float32 [B, V] CUDA logits, int64 [B] CUDA seeds -> int64 [B].");
  m.def("paged_kv_write_cuda", &paged_kv_write_cuda, py::arg("k_cache"), py::arg("v_cache"),
        py::arg("k_new"), py::arg("v_new"), py::arg("slot_mapping"),
        "In place: k_new/v_new [N, Hkv, D] into flat slots of the [num_blocks, block_size, Hkv, "
        "D] caches; slot -1 is skipped.");
}

}  // namespace pgen

#endif  // PGEN_WITH_CUDA
