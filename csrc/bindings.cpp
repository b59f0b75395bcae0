// pybind11 module pgen_engine._C. Only the glue units (this file, decode_ops.cpp,
// decode_loop.cpp, prefill_cpu.cpp and cuda_ops.cpp) include torch; the cores in csrc/ are plain
// C++ so they compile fast and can be unit-checked alone.
#include <torch/extension.h>

#include "sampler_cpu.h"

namespace py = pybind11;

namespace pgen {
void register_decode_ops(py::module_& m);   // csrc/decode_ops.cpp
void register_decode_loop(py::module_& m);  // csrc/decode_loop.cpp
void register_prefill_ops(py::module_& m);  // csrc/prefill_cpu.cpp
#ifdef PGEN_WITH_CUDA
void register_cuda_ops(py::module_& m);  // csrc/cuda_ops.cpp
#endif
}  // namespace pgen

namespace {

// Float32 contiguous view of a [B, V] floating CPU tensor (bf16/fp16 logits and strided
// views are converted, which is what the ops-level dispatcher passes through).
torch::Tensor as_f32_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "sample_cpu: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.is_floating_point(), "sample_cpu: ", name,
              " must be a floating tensor (float32/bfloat16/float16), got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "sample_cpu: ", name, " must be 2-D [B, V], got shape ", t.sizes());
  return t.to(torch::kFloat32).contiguous();
}

torch::Tensor sample_cpu(const torch::Tensor& logits, const c10::optional<torch::Tensor>& uncond,
                         double guidance_scale, double temperature, int64_t top_k, double top_p,
                         const torch::Tensor& seeds) {
  const torch::Tensor lg = as_f32_rows(logits, "logits");
  const int64_t B = lg.size(0), V = lg.size(1);
  torch::Tensor un;
  if (uncond.has_value()) {
    TORCH_CHECK(uncond->sizes() == logits.sizes(), "sample_cpu: uncond_logits shape ",
                uncond->sizes(), " != logits shape ", logits.sizes());
    un = as_f32_rows(*uncond, "uncond_logits");
  }
  TORCH_CHECK(seeds.device().is_cpu() && seeds.scalar_type() == torch::kInt64 &&
                  seeds.dim() == 1 && seeds.size(0) == B,
              "sample_cpu: seeds must be a CPU int64 tensor of shape [", B, "], got ",
              seeds.scalar_type(), " ", seeds.sizes(), " on ", seeds.device());
  const torch::Tensor sd = seeds.contiguous();
  auto out = torch::empty({B}, torch::kInt64);
  {
    py::gil_scoped_release no_gil;
    pgen::sample_rows_cpu(lg.data_ptr<float>(), un.defined() ? un.data_ptr<float>() : nullptr, B,
                          V, static_cast<float>(guidance_scale),
                          static_cast<float>(temperature), top_k, static_cast<float>(top_p),
                          sd.data_ptr<int64_t>(), out.data_ptr<int64_t>());
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pgen_engine host extension: CPU sampler, CPU decode step, prefill and wave decode "
            "loop (and CUDA kernels when built with CUDA).";

  m.attr("with_cuda") =
#ifdef PGEN_WITH_CUDA
      true;
#else
      false;
#endif

  m.def("uniform_from_seed", &pgen::uniform_from_seed, py::arg("seed"),
        "splitmix64(seed) -> float in [0, 1) with 24 random bits.");
  m.def("sample_cpu", &sample_cpu, py::arg("logits"), py::arg("uncond_logits"),
        py::arg("guidance_scale"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("seeds"),
        "CFG + temperature + top-k + top-p sampling of [B, V] logits (computed in float32) with "
        "int64 [B] seeds "
        "seeds -> int64 [B] token ids (rows in parallel).");

  pgen::register_decode_ops(m);
  pgen::register_decode_loop(m);
  pgen::register_prefill_ops(m);
#ifdef PGEN_WITH_CUDA
  pgen::register_cuda_ops(m);
#endif
}
