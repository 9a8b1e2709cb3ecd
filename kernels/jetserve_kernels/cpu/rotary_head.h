// Rotary embedding of one head (rotate-half layout): cs holds cos in its first half and
// sin in its second. One definition for the plain rotary op (ops.cpp) and the fused
// rotary-and-cache-write op (qkv_cache.cpp), so both round alike.
#pragma once

#include <cstdint>

namespace jsk {

// y may be of another dtype than x (a bf16 KV cache under an fp32 model): the rotation is
// computed in fp32 and rounded once, into y's dtype.
template <typename T, typename Y>
inline void rotate_head(const T* x, Y* y, const float* cs, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[i + half]);
    y[i] = static_cast<Y>(x1 * cs[i] - x2 * cs[half + i]);
    y[i + half] = static_cast<Y>(x2 * cs[i] + x1 * cs[half + i]);
  }
}

}  // namespace jsk
