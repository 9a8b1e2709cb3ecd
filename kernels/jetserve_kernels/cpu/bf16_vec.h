// bf16 on 16 AVX-512 lanes, shared by the streamed matmul (decode_linear.cpp) and the
// MLP's SiLU (activation.cpp): a bf16 is the top half of an fp32, so widening is a shift,
// and narrowing rounds to nearest even on the bits.
#pragma once

#if defined(__AVX512F__)
#include <ATen/ATen.h>
#include <immintrin.h>

namespace jsk {

inline __m512 widen_bf16(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// fp32 bits rounded to nearest even at bf16 precision, still in the top half (no NaN
// handling: the callers' values are finite).
inline __m512i round_bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
}

}  // namespace jsk
#endif
