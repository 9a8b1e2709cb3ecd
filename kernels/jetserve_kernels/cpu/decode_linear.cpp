// y = x W^T (+ b) with fp32 sums for the few rows of a decode step (x [M, K], M small;
// W [N, K] as Hugging Face stores it; fp32, bf16 or int8). At these sizes a matmul is a
// pass over the weight bytes, and torch's fp32 matmul streams a [N, K] weight at a third
// of what the memory system gives one core (6-10 GB/s against ~23 GB/s for a plain sum on
// the issue-16 box): the LM head alone was 10 of a 22 ms batch-1 step. Here each weight row is read once, in order, and
// used against every row of x while it is in L1; threads split the output channels.
//
// AVX-512 or AVX2 as -march=native finds them (plain scalar code elsewhere). The reduction
// order differs from MKL's, as any two fp32 matmuls' do; the token-equality tests against
// Hugging Face hold with it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "bf16_vec.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
using Vec = __m512;
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float lane_sum(Vec v) { return _mm512_reduce_add_ps(v); }
inline Vec load(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline Vec load(const at::BFloat16* p) { return jsk::widen_bf16(p); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kLanes = 8;
using Vec = __m256;
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float lane_sum(Vec v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
inline Vec load(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline Vec load(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#else  // any other CPU: one lane, the compiler's own vectorisation
constexpr int64_t kLanes = 1;
using Vec = float;
inline Vec zero() { return 0.0f; }
inline Vec load(const float* p) { return *p; }
inline Vec fma(Vec a, Vec b, Vec c) { return a * b + c; }
inline float lane_sum(Vec v) { return v; }
inline Vec load(const int8_t* p) { return static_cast<float>(*p); }
inline Vec load(const at::BFloat16* p) { return static_cast<float>(*p); }
#endif

// MR rows of x against one output channel: the channel's weight row is read once, front
// to back, so the whole weight streams in address order (what the hardware prefetchers
// follow best: interleaving four channels' rows made 2 KB streams that they lost, at
// 9.7 GB/s against 13.5 GB/s). Two accumulators per row over alternate vectors of K hide
// the FMA latency.
//
// With two or more rows each weight line carries MR FMAs and MR loads of x, so fewer lines
// fit the out-of-order window and the stream slowed: one thread read a 32 MB weight at
// 6.1 GB/s for five rows against 8.2 GB/s for one (a verification step of speculative
// decoding, 4 rows of proposals + 1). Prefetching every line 4 KB ahead keeps the misses
// in flight: five rows then cost what one does (3.2 ms either way, 2-core AMX VM), eight
// 1.1-1.4x less than without. One row keeps no prefetch: it gained 5-11% on that VM but
// lost on an earlier box.
constexpr int64_t kPrefetchAhead = 4096;  // bytes
template <int MR, typename W>
inline void channel(const float* x, int64_t ldx, const W* w, int64_t K, float* y,
                    int64_t ldy) {
  Vec a[MR], b[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) a[m] = b[m] = zero();
  const int64_t pairs = K - K % (2 * kLanes);
  int64_t k = 0;
  const char* ahead = reinterpret_cast<const char*>(w) + kPrefetchAhead;
  for (; k < pairs; k += 2 * kLanes) {
    if constexpr (MR >= 2) {  // both lines of a pair of fp32 vectors (one line for bf16)
      __builtin_prefetch(ahead + k * sizeof(W), 0, 3);
      __builtin_prefetch(ahead + (k + kLanes) * sizeof(W), 0, 3);
    }
    const Vec w0 = load(w + k), w1 = load(w + k + kLanes);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      a[m] = fma(load(x + m * ldx + k), w0, a[m]);
      b[m] = fma(load(x + m * ldx + k + kLanes), w1, b[m]);
    }
  }
  if (k + kLanes <= K) {
    const Vec w0 = load(w + k);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) a[m] = fma(load(x + m * ldx + k), w0, a[m]);
    k += kLanes;
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    float s = lane_sum(a[m]) + lane_sum(b[m]);
    for (int64_t t = k; t < K; ++t) s += x[m * ldx + t] * static_cast<float>(w[t]);
    y[m * ldy] = s;
  }
}

// Output channels [begin, end) for all M rows, up to eight rows per pass over the weight.
template <int MR, typename W>
inline void rows_block(const float* x, int64_t ldx, const W* w, int64_t K, float* y,
                       int64_t ldy, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) channel<MR, W>(x, ldx, w + n * K, K, y + n, ldy);
}

template <typename W>
void channels(const float* x, int64_t ldx, int64_t M, const W* w, int64_t K, float* y,
              int64_t ldy, int64_t begin, int64_t end) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) rows_block<8, W>(x + m * ldx, ldx, w, K, y + m * ldy, ldy, begin, end);
  const float* xm = x + m * ldx;
  float* ym = y + m * ldy;
  switch (M - m) {
    case 7: rows_block<7, W>(xm, ldx, w, K, ym, ldy, begin, end); break;
    case 6: rows_block<6, W>(xm, ldx, w, K, ym, ldy, begin, end); break;
    case 5: rows_block<5, W>(xm, ldx, w, K, ym, ldy, begin, end); break;
    case 4: rows_block<4, W>(xm, ldx, w, K, ym, ldy, begin, end); break;
    case 3: rows_block<3, W>(xm, ldx, w, K, ym, ldy, begin, end); break;
    case 2: rows_block<2, W>(xm, ldx, w, K, ym, ldy, begin, end); break;
    case 1: rows_block<1, W>(xm, ldx, w, K, ym, ldy, begin, end); break;
    default: break;
  }
}


// Both weight types: int8 weights (one byte each, widened to fp32 in registers) are the
// same pass over a quarter of the bytes, their per-channel scales applied once at the end.
template <typename W>
at::Tensor stream_weights(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x is [M, K] with contiguous rows");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight is contiguous [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "decode_linear takes fp32 activations");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "x has ", K, " columns, weight ", weight.size(1));
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const W* wp = weight.data_ptr<W>();
  float* yp = y.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  // Channels per task: a few hundred KB of weight, so two threads split even a 512-row
  // projection while each still streams long contiguous runs.
  const int64_t row_bytes = std::max<int64_t>(K * static_cast<int64_t>(sizeof(W)), 1);
  const int64_t grain = std::max<int64_t>(4, (256 * 1024) / row_bytes / 4 * 4);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    channels<W>(xp, ldx, M, wp, K, yp, N, begin, end);
  });
  return y;
}

}  // namespace

// fp32 weights with fp32 x, or bf16 weights with bf16 x (a bf16 model): the bf16 rows of
// x are widened once, the weight in registers as it streams, every sum is fp32, and y
// comes back in x's dtype. oneDNN's bf16 matmul for a few rows ran at half this pass's
// speed on an AMX box (the tiles pay off from many rows up).
at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias) {
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "decode_linear is fp32 or bf16");
  TORCH_CHECK(x.scalar_type() == dtype, "x and the weight have one dtype");
  auto y = dtype == at::kFloat ? stream_weights<float>(x, weight)
                               : stream_weights<at::BFloat16>(x.to(at::kFloat), weight);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == weight.size(0) && bias->scalar_type() == dtype,
                "bias is [N] in the weight's dtype");
    y.add_(*bias);
  }
  return dtype == at::kFloat ? y : y.to(at::kBFloat16);
}

// int8_linear's path for fp32 activations (ops.cpp).
at::Tensor decode_linear_int8(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& scales) {
  TORCH_CHECK(weight.scalar_type() == at::kChar, "weight is int8");
  return stream_weights<int8_t>(x, weight).mul_(scales);
}

TORCH_LIBRARY_FRAGMENT(jetserve_cpu, m) { m.def("decode_linear", &decode_linear); }
