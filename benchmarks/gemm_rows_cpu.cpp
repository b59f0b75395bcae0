// The CPU decode's packed GEMM alone, over the realistic benchmark stack: how fast a step's
// projections can run at a given number of rows per thread, with no attention, norms or
// sampling around them. Each OpenMP thread multiplies its own `rows` rows by every weight of 4
// layers (q, k, v, o 256x256; gate, up 1024x256; down 256x1024) and the generation head
// (256x256, 1024x256), 63 times (one wave's decode steps), as the groups mode does.
//
//   g++ -O3 -fopenmp -Icsrc benchmarks/gemm_rows_cpu.cpp csrc/gemm_cpu.cpp -o /tmp/gemm_rows
//   OMP_NUM_THREADS=2 /tmp/gemm_rows 8      (rows per thread; prints ms and GFLOP/s, 3 repeats)
//
// Needs an AVX-512 CPU (the packed kernel's requirement).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <utility>
#include <vector>

#include <omp.h>

#include "gemm_cpu.h"

int main(int argc, char** argv) {
  using pgen::gemm_packed_f32;
  if (!pgen::packed_gemm_available()) {
    std::fprintf(stderr, "gemm_rows_cpu: this CPU has no AVX-512F\n");
    return 1;
  }
  const int rows = argc > 1 ? std::atoi(argv[1]) : 8;
  if (rows < 1 || rows > 1024) {
    std::fprintf(stderr, "gemm_rows_cpu: rows per thread must be in [1, 1024], got %s\n", argv[1]);
    return 2;
  }
  const int steps = 63;
  std::vector<std::pair<int64_t, int64_t>> shapes;  // (N, K) of W [N, K]
  for (int l = 0; l < 4; ++l) {
    for (int i = 0; i < 4; ++i) shapes.push_back({256, 256});
    shapes.push_back({1024, 256});
    shapes.push_back({1024, 256});
    shapes.push_back({256, 1024});
  }
  shapes.push_back({256, 256});
  shapes.push_back({1024, 256});
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  std::vector<std::vector<float>> packed;
  double flops_per_row = 0;
  for (auto [N, K] : shapes) {
    std::vector<float> w(N * K);
    for (float& v : w) v = normal(gen);
    packed.emplace_back(pgen::packed_weight_floats(N, K));
    pgen::pack_weight_f32(w.data(), N, K, packed.back().data());
    flops_per_row += 2.0 * N * K;
  }
  const int threads = omp_get_max_threads();
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel
    {
      std::vector<float> x(rows * 1024, 0.5f), y(rows * 1024);
      for (int s = 0; s < steps; ++s) {
        for (size_t i = 0; i < shapes.size(); ++i) {
          gemm_packed_f32(x.data(), rows, shapes[i].second, packed[i].data(), shapes[i].first, y.data());
        }
      }
    }
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("threads %d, rows per thread %d: %.1f ms, %.1f GFLOP/s (all threads)\n", threads, rows, dt * 1e3,
                flops_per_row * rows * steps * threads / dt / 1e9);
  }
  return 0;
}
