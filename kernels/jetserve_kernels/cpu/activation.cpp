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

#include "bf16_vec.h"
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

// bf16 rows (a bf16 model): the torch reference's two roundings, silu(gate) to bf16 and
// then the product to bf16, each from fp32 arithmetic, round to nearest even.
#if defined(__AVX512F__)
inline __m512 round_bf16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_and_si512(jsk::round_bf16_bits(v),
                                              _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#endif

void silu_mul_row(const at::BFloat16* g, const at::BFloat16* u, at::BFloat16* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= n; i += 16) {
    const __m512 gv = jsk::widen_bf16(g + i);
    const __m512 e = jsk::exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    const __m512 s = round_bf16(_mm512_div_ps(gv, _mm512_add_ps(one, e)));
    const __m512 prod = _mm512_mul_ps(s, jsk::widen_bf16(u + i));
    const __m512i out = _mm512_srli_epi32(jsk::round_bf16_bits(prod), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), _mm512_cvtepi32_epi16(out));
  }
#endif
  for (; i < n; ++i) {
    const float gf = static_cast<float>(g[i]);
    const at::BFloat16 s(gf / (1.0f + std::exp(-gf)));
    y[i] = at::BFloat16(static_cast<float>(s) * static_cast<float>(u[i]));
  }
}

}  // namespace

template <typename T>
void silu_and_mul_rows(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  const T* src = gate_up.data_ptr<T>();
  T* dst = out.data_ptr<T>();
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
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  const auto dtype = gate_up.scalar_type();
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0 &&
                  (dtype == at::kFloat || dtype == at::kBFloat16),
              "gate_up is fp32 or bf16 [T, 2I] with contiguous rows");
  auto out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  if (dtype == at::kFloat) {
    silu_and_mul_rows<float>(gate_up, out);
  } else {
    silu_and_mul_rows<at::BFloat16>(gate_up, out);
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(jetserve_cpu, m) { m.def("silu_and_mul", &silu_and_mul); }
