// A team of threads decoding one wave together: every projection of a step is split by
// output columns across the team (each thread multiplies all rows by its share of the weight
// columns), the row-wise work (norms, rotary, cache writes, attention, sampling) by rows.
//
// Why: at a few rows per thread a decode step's packed GEMM is bound by reading the weights
// (8 rows x 2 FLOPs per 4-byte weight), not by the FMA rate. When each thread decodes its own
// rows, every thread streams all of the weights each step; split by columns, the team streams
// them once, shared out. The price is a barrier between phases (about 7 per layer): 0.2-0.3 us
// each when the team's threads own their cores (2 threads, 200k back-to-back waits, 2-core VM;
// a 4-layer, 64-token wave passes ~1,800 of them, ~0.5 ms).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <thread>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "gemm_cpu.h"

namespace pgen {

// Thrown out of SpinBarrier::wait in the threads still waiting when another thread of the team
// failed (its exception is the one the caller sees), so no thread waits for one that left.
struct TeamAborted : std::runtime_error {
  TeamAborted() : std::runtime_error("decode team aborted: another thread of the team failed") {}
};

// Sense-reversing barrier for `n` threads. Spins (pause) for a while, then yields: a thread
// whose partner lost its core to another process must not burn its own core waiting.
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  void wait() {
    const int gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      count_.store(0, std::memory_order_relaxed);
      gen_.store(gen + 1, std::memory_order_release);
      return;
    }
    for (int spins = 0; gen_.load(std::memory_order_acquire) == gen; ++spins) {
      if (failed_.load(std::memory_order_relaxed)) throw TeamAborted();
      if (spins < 256) {
#if defined(__x86_64__)
        _mm_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }
  // Called by a thread that leaves the team on an exception: wakes the others (TeamAborted).
  void fail() { failed_.store(true, std::memory_order_relaxed); }

 private:
  const int n_;
  alignas(64) std::atomic<int> count_{0};
  alignas(64) std::atomic<int> gen_{0};
  alignas(64) std::atomic<bool> failed_{false};
};

// One thread's view of the team: its index, the team size and the shared barrier.
struct Team {
  int tid = 0, size = 1;
  SpinBarrier* barrier = nullptr;

  void sync() const {
    if (size > 1) barrier->wait();
  }

  // [c0, c1): this thread's share of N output columns, in whole 16-column panels (the packed
  // weight's layout), as equal as the panels allow.
  void columns(int64_t N, int64_t* c0, int64_t* c1) const {
    const int64_t panels = (N + 15) / 16;
    *c0 = std::min(N, panels * tid / size * 16);
    *c1 = std::min(N, panels * (tid + 1) / size * 16);
  }

  // Columns [c0, c1) of y [M, N] (row stride N) = x [M, K] . W^T, W [N, K] packed in P
  // (pack_weight_f32): the same sums, bit for bit, as one gemm_packed_f32 over all columns.
  void gemm(const float* x, int64_t M, int64_t K, const float* P, int64_t N, float* y) const {
    int64_t c0 = 0, c1 = 0;
    columns(N, &c0, &c1);
    if (c1 > c0) gemm_packed_f32(x, M, K, P + c0 * K, c1 - c0, y + c0, N);
  }
};

}  // namespace pgen
