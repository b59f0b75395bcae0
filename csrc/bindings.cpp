// pybind11 module pgen_engine._C. Only the glue units (this file, decode_ops.cpp,
// decode_loop.cpp, prefill_cpu.cpp and cuda_ops.cpp) include torch; the cores in csrc/ are plain
// C++ so they compile fast and can be unit-checked alone.
#include <torch/extension.h>

#include <cstring>
#include <vector>

#include "block_manager.h"
#include "errors.h"
#include "sampler_cpu.h"
#include "scheduler.h"

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

torch::Tensor i64_tensor(const std::vector<int64_t>& v) {
  auto t = torch::empty({static_cast<int64_t>(v.size())}, torch::kInt64);
  if (!v.empty()) std::memcpy(t.data_ptr<int64_t>(), v.data(), v.size() * sizeof(int64_t));
  return t;
}

torch::Tensor i32_tensor(const std::vector<int32_t>& v, std::vector<int64_t> shape) {
  auto t = torch::empty(shape, torch::kInt32);
  if (!v.empty()) std::memcpy(t.data_ptr<int32_t>(), v.data(), v.size() * sizeof(int32_t));
  return t;
}

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


// Read-only view of a BlockManager owned by someone else (the Scheduler).
struct BlockManagerView {
  const pgen::BlockManager* bm;
};

// The read-only methods of a BlockManager, bound on `cls` whose instances give their
// BlockManager through `get`. Ranges and widths are checked before any tensor is sized.
template <class C, class Get>
void def_block_manager_reads(py::class_<C>& cls, Get get) {
  cls.def_property_readonly("num_blocks", [get](const C& c) { return get(c).num_blocks(); })
      .def_property_readonly("block_size", [get](const C& c) { return get(c).block_size(); })
      .def("num_free_blocks", [get](const C& c) { return get(c).num_free_blocks(); })
      .def("num_seqs", [get](const C& c) { return get(c).num_seqs(); })
      .def(
          "blocks_for_tokens", [get](const C& c, int64_t n) { return get(c).blocks_for_tokens(n); },
          py::arg("num_tokens"))
      .def(
          "can_allocate", [get](const C& c, int64_t n) { return get(c).can_allocate(n); },
          py::arg("num_tokens"))
      .def(
          "has_seq", [get](const C& c, int64_t seq) { return get(c).has_seq(seq); },
          py::arg("seq"))
      .def(
          "seq_len", [get](const C& c, int64_t seq) { return get(c).seq_len(seq); },
          py::arg("seq"))
      .def(
          "block_table", [get](const C& c, int64_t seq) { return get(c).block_table(seq); },
          py::arg("seq"))
      .def(
          "refcount", [get](const C& c, int64_t block) { return get(c).refcount(block); },
          py::arg("block"))
      .def("seq_ids", [get](const C& c) { return get(c).seq_ids(); })
      .def(
          "slot_mapping",
          [get](const C& c, int64_t seq, int64_t start, c10::optional<int64_t> end) {
            const pgen::BlockManager& bm = get(c);
            const int64_t e = end.has_value() ? *end : bm.seq_len(seq);
            bm.check_slot_range(seq, start, e);  // before sizing the tensor
            auto t = torch::empty({e - start}, torch::kInt64);
            bm.slot_mapping_into(seq, start, e, t.data_ptr<int64_t>());
            return t;
          },
          py::arg("seq"), py::arg("start") = 0, py::arg("end") = py::none())
      .def(
          "block_tables_tensor",
          [get](const C& c, const std::vector<int64_t>& seqs, int64_t max_blocks) {
            const pgen::BlockManager& bm = get(c);
            bm.check_block_tables(seqs, max_blocks);  // before sizing the tensor
            auto t = torch::empty({static_cast<int64_t>(seqs.size()), max_blocks}, torch::kInt32);
            bm.block_tables_into(seqs, max_blocks, t.data_ptr<int32_t>());
            return t;
          },
          py::arg("seqs"), py::arg("max_blocks"));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pgen_engine host extension: paged KV block manager, continuous-batching "
            "scheduler, CPU sampler, CPU decode step (and CUDA kernels when built with CUDA).";

  // Python exception types: OutOfKVBlocksError is a MemoryError (pool exhausted),
  // UnknownIdError a KeyError (bad sequence/request id), SchedulerStateError a RuntimeError.
  py::register_exception<pgen::OutOfBlocksError>(m, "OutOfKVBlocksError", PyExc_MemoryError);
  py::register_exception<pgen::UnknownIdError>(m, "UnknownIdError", PyExc_KeyError);
  py::register_exception<pgen::StateError>(m, "SchedulerStateError", PyExc_RuntimeError);

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

  py::class_<pgen::AppendResult>(m, "AppendResult")
      .def_readonly("slot", &pgen::AppendResult::slot)
      .def_readonly("cow_src", &pgen::AppendResult::cow_src)
      .def_readonly("cow_dst", &pgen::AppendResult::cow_dst)
      .def("__repr__", [](const pgen::AppendResult& r) {
        return "AppendResult(slot=" + std::to_string(r.slot) + ", cow_src=" +
               std::to_string(r.cow_src) + ", cow_dst=" + std::to_string(r.cow_dst) + ")";
      });

  py::class_<pgen::BlockManager> bm_cls(m, "BlockManager");
  bm_cls.def(py::init<int64_t, int64_t>(), py::arg("num_blocks"), py::arg("block_size"))
      .def("allocate", &pgen::BlockManager::allocate, py::arg("seq"), py::arg("num_tokens"))
      .def("append_slot", &pgen::BlockManager::append_slot, py::arg("seq"))
      .def("fork", &pgen::BlockManager::fork, py::arg("parent"), py::arg("child"))
      .def("free", &pgen::BlockManager::free, py::arg("seq"));
  def_block_manager_reads(bm_cls, [](const pgen::BlockManager& bm) -> const pgen::BlockManager& {
    return bm;
  });
  // What Scheduler.block_manager returns: the scheduler's pool, read-only (allocating or
  // freeing behind the scheduler's back would break its reservations and sample table).
  py::class_<BlockManagerView> view_cls(m, "BlockManagerView");
  def_block_manager_reads(view_cls, [](const BlockManagerView& v) -> const pgen::BlockManager& {
    return *v.bm;
  });

  py::class_<pgen::PrefillItem>(m, "PrefillItem")
      .def_readonly("request_id", &pgen::PrefillItem::request_id)
      .def_readonly("prompt_len", &pgen::PrefillItem::prompt_len)
      .def_readonly("seq_id", &pgen::PrefillItem::seq_id)
      .def_readonly("uncond_seq_id", &pgen::PrefillItem::uncond_seq_id)
      .def_readonly("sample_seq_ids", &pgen::PrefillItem::sample_seq_ids)
      .def_readonly("uncond_sample_seq_ids", &pgen::PrefillItem::uncond_sample_seq_ids);

  py::class_<pgen::BatchPlan>(m, "BatchPlan")
      .def_readonly("prefill", &pgen::BatchPlan::prefill)
      .def_readonly("prefill_seq_ids", &pgen::BatchPlan::prefill_seq_ids)
      .def_readonly("prefill_lens", &pgen::BatchPlan::prefill_lens)
      .def_property_readonly("prefill_slot_mapping",
                             [](const pgen::BatchPlan& p) { return i64_tensor(p.prefill_slot_mapping); })
      .def_readonly("decode_sample_ids", &pgen::BatchPlan::decode_sample_ids)
      .def_readonly("decode_seq_ids", &pgen::BatchPlan::decode_seq_ids)
      .def_property_readonly("decode_slot_mapping",
                             [](const pgen::BatchPlan& p) { return i64_tensor(p.decode_slot_mapping); })
      .def_property_readonly("decode_context_lens",
                             [](const pgen::BatchPlan& p) {
                               return i32_tensor(p.decode_context_lens,
                                                 {static_cast<int64_t>(p.decode_context_lens.size())});
                             })
      .def_property_readonly("decode_block_tables",
                             [](const pgen::BatchPlan& p) {
                               return i32_tensor(p.decode_block_tables,
                                                 {static_cast<int64_t>(p.decode_seq_ids.size()),
                                                  p.decode_max_blocks});
                             })
      .def_readonly("decode_max_blocks", &pgen::BatchPlan::decode_max_blocks)
      .def_property_readonly("copies", [](const pgen::BatchPlan& p) {
        auto t = torch::empty({static_cast<int64_t>(p.copies.size()), 2}, torch::kInt64);
        auto a = t.accessor<int64_t, 2>();
        for (size_t i = 0; i < p.copies.size(); ++i) {
          a[i][0] = p.copies[i].first;
          a[i][1] = p.copies[i].second;
        }
        return t;
      });

  py::class_<pgen::SchedulerStats>(m, "SchedulerStats")
      .def_readonly("num_blocks", &pgen::SchedulerStats::num_blocks)
      .def_readonly("num_free_blocks", &pgen::SchedulerStats::num_free_blocks)
      .def_readonly("reserved_blocks", &pgen::SchedulerStats::reserved_blocks)
      .def_readonly("num_waiting", &pgen::SchedulerStats::num_waiting)
      .def_readonly("num_running_requests", &pgen::SchedulerStats::num_running_requests)
      .def_readonly("num_running_rows", &pgen::SchedulerStats::num_running_rows)
      .def_readonly("num_pending_samples", &pgen::SchedulerStats::num_pending_samples);

  py::class_<pgen::SampleInfo>(m, "SampleInfo")
      .def_readonly("request_id", &pgen::SampleInfo::request_id)
      .def_readonly("sample_index", &pgen::SampleInfo::sample_index)
      .def_readonly("uncond_seq_id", &pgen::SampleInfo::uncond_seq_id)
      .def_readonly("num_generated", &pgen::SampleInfo::num_generated);

  py::class_<pgen::Scheduler>(m, "Scheduler")
      .def(py::init<int64_t, int64_t, int64_t, bool>(), py::arg("num_blocks"),
           py::arg("block_size"), py::arg("max_batch_rows"), py::arg("cfg"))
      .def("worst_case_blocks", &pgen::Scheduler::worst_case_blocks, py::arg("prompt_len"),
           py::arg("num_samples"), py::arg("max_new_tokens"))
      .def("add_request", &pgen::Scheduler::add_request, py::arg("request_id"),
           py::arg("prompt_len"), py::arg("num_samples"), py::arg("max_new_tokens"))
      .def("schedule", &pgen::Scheduler::schedule)
      .def("step_done", &pgen::Scheduler::step_done, py::arg("sample_ids"), py::arg("finished"))
      .def("abort", &pgen::Scheduler::abort, py::arg("request_id"))
      .def("stats", &pgen::Scheduler::stats)
      .def("sample_info", &pgen::Scheduler::sample_info, py::arg("sample_id"))
      .def("has_unfinished", &pgen::Scheduler::has_unfinished)
      .def_property_readonly("cfg", &pgen::Scheduler::cfg)
      .def_property_readonly("max_batch_rows", &pgen::Scheduler::max_batch_rows)
      .def_property_readonly(
          "block_manager",
          // read-only view that keeps the scheduler alive while it is referenced
          py::cpp_function(
              [](const pgen::Scheduler& s) { return BlockManagerView{&s.block_manager()}; },
              py::keep_alive<0, 1>()));

  pgen::register_decode_ops(m);
  pgen::register_decode_loop(m);
  pgen::register_prefill_ops(m);
#ifdef PGEN_WITH_CUDA
  pgen::register_cuda_ops(m);
#endif
}
