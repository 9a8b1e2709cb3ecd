// The MLP's activation on the CPU: silu(gate) * up of the fused gate_up projection's output
// [T, 2I] (gate first) in one pass into [T, I]. torch made a silu tensor and then a product
// tensor of the MLP's widest activation (1.6% of a 64-sequence decode step, 1 core).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "vec_exp.h"

namespace {

void silu_mul_row(const float* g, const float* u, float* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= n; i += 16) {
    const __m512 gv = _mm512_loadu_ps(g + i);
    const __m512 e = jsk::exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
    _mm512_storeu_ps(y + i, _mm512_mul_ps(s, _mm512_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) y[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

}  // namespace

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0 &&
                  gate_up.scalar_type() == at::kFloat,
              "gate_up is fp32 [T, 2I] with contiguous rows");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  auto out = at::empty({rows, inter}, gate_up.options());
  const float* src = gate_up.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t stride = gate_up.stride(0);
  // Rows per task: 128K outputs, so a decode step's [64, 1536] runs on one thread (32 us
  // there, 26 on two): a parallel region's barrier stalls for a scheduler slice whenever
  // the other thread is preempted on a shared box.
  at::parallel_for(0, rows, std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(inter, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r)
                       silu_mul_row(src + r * stride, src + r * stride + inter, dst + r * inter,
                                    inter);
                   });
  return out;
}

TORCH_LIBRARY_FRAGMENT(jetserve_cpu, m) { m.def("silu_and_mul", &silu_and_mul); }
