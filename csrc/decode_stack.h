// The Llama layer stack of one float32 CPU decode step, shared by the one-step op
// (decode_ops.cpp: decode_layers_cpu) and the whole-wave loop (decode_loop.cpp).
// check_stack validates the weights and caches once; run_stack then takes any set of rows
// (one new token each) through every layer and the final norm without further checks.
#pragma once

#include <torch/extension.h>

#include <dlfcn.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "decode_team.h"

namespace pgen {

// MKL's per-thread BLAS thread count, when torch's MKL exports it (looked up at run time so the
// extension still loads against a torch built without MKL). A group's tiny GEMMs must run on
// its own thread: forking MKL's team for a 2-row product costs more than the product.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() {
    using Fn = int (*)(int);
    static const Fn set_local = reinterpret_cast<Fn>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
    set_ = set_local;
    if (set_) prev_ = set_(1);
  }
  ~SingleThreadedBlas() {
    if (set_) set_(prev_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int (*set_)(int) = nullptr;
  int prev_ = 0;
};


constexpr int kWeightsPerLayer = 9;
// The per-layer weights that are projections (q, k, v, o, gate, up, down), in packed order.
constexpr int kProjections[7] = {1, 2, 3, 4, 6, 7, 8};

// The memory a stack's packed weights live in. Packing into fresh memory every call costs a
// page fault per 4 KiB page (an 18 MB stack: ~4,600 faults, several ms on a VM, as much as the
// packing itself), so one buffer per process is reused: a call leases it and returns it when
// its DecodeStack (every copy) is gone; a call made while it is leased gets memory of its own.
struct PackLease {
  torch::Tensor buffer;  // at least the floats asked for
  static std::shared_ptr<PackLease> acquire(int64_t floats);
  ~PackLease();

 private:
  bool from_arena_ = false;
};

// Frees the reused packing buffer (held between calls; at most PGEN_CPU_PACK_MAX_MB); returns
// the bytes it held. The next packing call allocates it again.
int64_t release_pack_arena();

// Validated float32 views of a decoder's weights and its head-major KV caches.
struct DecodeStack {
  std::vector<torch::Tensor> weights;  // 9 per layer: ln1, q, k, v, o, ln2, gate, up, down
  torch::Tensor final_norm;            // [H]
  std::vector<torch::Tensor> k, v;     // per layer [rows, Hkv, L, D]: each row's own positions
  // Optional shared-prefix pool (attach_prefix): per layer [prows, Hkv, Lp, D]; a row with a
  // prefix reads positions [0, prefix_len) from pool row prefix_row and stores its own
  // positions from index 0 of its own row (see cached_attention_f32).
  std::vector<torch::Tensor> pk, pv;
  int64_t prows = 0, Lp = 0;
  int64_t layers = 0, H = 0, Hq = 0, Hkv = 0, D = 0, I = 0, rows = 0, L = 0;
  float eps = 0.0f, scale = 0.0f;
  // Optional (pack_stack): the 7 projection weights of every layer (kProjections order)
  // packed for gemm_packed_f32 (gemm_cpu.h); empty = the projections go through torch::mm.
  std::vector<torch::Tensor> packed;
  std::shared_ptr<PackLease> pack_lease;  // the memory `packed` views

  // Packed weight i (a kProjections entry) of layer l; needs a packed stack.
  const torch::Tensor& packed_weight(int64_t l, int i) const {
    static constexpr int kSlot[kWeightsPerLayer] = {-1, 0, 1, 2, 3, -1, 4, 5, 6};
    return packed[7 * l + kSlot[i]];
  }
};

// W [N, K] packed for gemm_packed_f32 (a float32 tensor of packed_weight_floats(N, K)).
torch::Tensor pack_weight(const torch::Tensor& w);

// Packs st's projection weights when this CPU runs the packed kernel and the packed copy
// (about the weights' size, held for the call) is at most PGEN_CPU_PACK_MAX_MB (default
// 1024); else leaves st unpacked and the projections go through torch::mm.
void pack_stack(DecodeStack& st);

// Checks shapes / dtypes / contiguity of everything (errors name the op `fn` and the tensor).
DecodeStack check_stack(const char* fn, const std::vector<torch::Tensor>& weights,
                        const torch::Tensor& final_norm, const std::vector<torch::Tensor>& k_caches,
                        const std::vector<torch::Tensor>& v_caches, int64_t num_heads,
                        int64_t num_kv_heads, double eps, double scale);

// Validates and attaches the shared-prefix pool (empty lists: none).
void attach_prefix(DecodeStack& st, const char* fn, const std::vector<torch::Tensor>& prefix_k,
                   const std::vector<torch::Tensor>& prefix_v);

// Checks prefix_row / prefix_len ([n] int32 each) against st's prefix pool and each row's
// seqlen (own positions seqlen - prefix_len must fit the own rows' L); seqlen may be null.
void check_prefix_rows(const DecodeStack& st, const char* fn, const int32_t* prefix_row,
                       const int32_t* prefix_len, int64_t n);

// Scratch buffers of run_stack for up to `capacity` rows, reused across steps (a decode step
// of a few rows otherwise spends a good part of its time allocating).
struct StackWorkspace {
  int64_t capacity = 0;
  torch::Tensor x, q, k, v, attn, tmp, g, u;
  void reserve(const DecodeStack& st, int64_t rows);
};

// One token per row through every layer, then the final norm. h [n, H] (contiguous) is the
// residual stream, updated in place; y ([n, H] floats) receives the final-normed output.
// Per row b: cos/sin [n, D] rows, slot[b] (= own_row * L + position) where this token's K/V
// are written, seqlen[b] keys attended (the new one included), own_rows[b] the cache row it
// owns, and optionally a shared prefix (prefix_row[b], prefix_len[b]); all pre-validated.
// Single-threaded BLAS when called inside a parallel region.
void run_stack(const DecodeStack& st, torch::Tensor h, float* y, const float* cos, const float* sin,
               const int64_t* slot, const int32_t* seqlen, const int64_t* own_rows,
               const int32_t* prefix_row, const int32_t* prefix_len, StackWorkspace* ws = nullptr);

// run_stack for a thread team (decode_team.h) decoding one matrix of M rows together: h
// [M, H] (the residual stream, in place) and y [M, H] span every thread's rows, as do the
// per-row inputs (cos / sin [M, D], slot, seqlen, own_rows, the optional prefix_row /
// prefix_len). This thread does the row-wise work of rows [r0, r0 + n) (n may be 0) and its
// share of every projection's output columns over all M rows; the values are the bits a team
// of one gives the same rows (run_stack is that team of one). Needs ws reserved for M rows, and
// a packed stack unless the team is one thread; every thread of the team must call it (it
// synchronises the team between phases and once at the end).
void run_stack_team(const DecodeStack& st, float* h, int64_t M, float* y, const float* cos, const float* sin,
                    const int64_t* slot, const int32_t* seqlen, const int64_t* own_rows, const int32_t* prefix_row,
                    const int32_t* prefix_len, int64_t r0, int64_t n, StackWorkspace& ws, const Team& team);

}  // namespace pgen
