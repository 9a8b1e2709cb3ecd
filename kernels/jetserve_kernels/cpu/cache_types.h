// The (compute dtype, KV-cache dtype) pairs the CPU kernels take: a cache in the model's
// own dtype, or an fp32 model over a bf16 or fp16 cache (--kv-cache-dtype), which halves
// the bytes attention reads per context token while every sum stays in fp32.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace jsk {

// Calls f(T{}, C{}) with T the compute type and C the cache's element type.
template <typename F>
void dispatch_with_cache(at::ScalarType compute, at::ScalarType cache, const char* name, F&& f) {
  if (compute == at::kFloat && cache == at::kBFloat16) return f(float{}, at::BFloat16{});
  if (compute == at::kFloat && cache == at::kHalf) return f(float{}, at::Half{});
  TORCH_CHECK(compute == cache, name, ": a ", compute, " input takes a ", compute,
              " cache, or (fp32 input) a bf16 or fp16 one; got ", cache);
  switch (compute) {
    case at::kFloat: return f(float{}, float{});
    case at::kDouble: return f(double{}, double{});
    case at::kBFloat16: return f(at::BFloat16{}, at::BFloat16{});
    case at::kHalf: return f(at::Half{}, at::Half{});
    default: TORCH_CHECK(false, name, ": unsupported dtype ", compute);
  }
}

// One row into the cache: a copy in the same dtype, else rounded to the cache's.
template <typename C, typename T>
inline void store_row(C* dst, const T* src, int64_t n) {
  if constexpr (std::is_same_v<C, T>) {
    std::memcpy(dst, src, n * sizeof(T));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<C>(static_cast<float>(src[i]));
  }
}

}  // namespace jsk
