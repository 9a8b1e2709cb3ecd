// The attention's work between the qkv projection and attention in one call: rotary on q
// and k straight out of the fused qkv rows, k and v written into their paged-cache slots,
// the rotated q returned. Split, reshapes, the rotary op and the cache write were four
// Python-level steps and two kernel calls per layer, with a rotated-k tensor in between
// (jetserve's per-layer host work at a 64-sequence decode step, issue 16). Rounds exactly
// as the rotary op followed by write_kv (the same rotate_head).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "cache_types.h"
#include "rotary_head.h"

// qkv [T, (Hq + 2 Hkv) D] with contiguous rows (q heads, then k, then v); positions int64
// [T]; cos_sin fp32 [max_positions, D]; caches [blocks, block_size, Hkv, D]; slot_mapping
// int64 [T], negative slots skipped. Returns q [T, Hq, D], rotated.
at::Tensor rotary_write_kv(const at::Tensor& qkv, const at::Tensor& positions,
                           const at::Tensor& cos_sin, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& slot_mapping,
                           int64_t num_heads, int64_t num_kv_heads) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.stride(3) == 1,
              "caches are [num_blocks, block_size, kv_heads, head_dim], head dim contiguous");
  TORCH_CHECK(k_cache.strides() == v_cache.strides() && k_cache.sizes() == v_cache.sizes(),
              "k_cache and v_cache must share one shape and layout");
  const int64_t dim = k_cache.size(3), half = dim / 2;
  TORCH_CHECK(k_cache.size(2) == num_kv_heads && dim % 2 == 0, "cache heads or head dim differ");
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 &&
                  qkv.size(1) == (num_heads + 2 * num_kv_heads) * dim,
              "qkv is [T, (heads + 2 kv_heads) * head_dim] with contiguous rows");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                  slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "positions and slot_mapping are contiguous int64");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.is_contiguous() &&
                  cos_sin.size(1) == dim,
              "cos_sin is contiguous fp32 [max_positions, head_dim]");
  const int64_t num_tokens = qkv.size(0);
  TORCH_CHECK(positions.numel() == num_tokens && slot_mapping.numel() == num_tokens,
              "one position and one slot per token");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t block_size = k_cache.size(1), capacity = k_cache.size(0) * block_size;
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos_sin.size(0), "position ", pos[t],
                " beyond the rotary table");
    TORCH_CHECK(slots[t] < capacity, "slot ", slots[t], " is outside the cache");
  }
  auto q_out = at::empty({num_tokens, num_heads, dim}, qkv.options());
  const float* table = cos_sin.data_ptr<float>();
  const int64_t s0 = k_cache.stride(0), s1 = k_cache.stride(1), s2 = k_cache.stride(2);
  jsk::dispatch_with_cache(qkv.scalar_type(), k_cache.scalar_type(), "rotary_write_kv",
                           [&](auto t_, auto c_) {
    using scalar_t = decltype(t_);
    using cache_t = decltype(c_);
    const scalar_t* src = qkv.data_ptr<scalar_t>();
    scalar_t* q = q_out.data_ptr<scalar_t>();
    cache_t* kc = k_cache.data_ptr<cache_t>();
    cache_t* vc = v_cache.data_ptr<cache_t>();
    const int64_t ld = qkv.stride(0);
    at::parallel_for(0, num_tokens, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* cs = table + pos[t] * dim;
        const scalar_t* row = src + t * ld;
        for (int64_t h = 0; h < num_heads; ++h)
          jsk::rotate_head(row + h * dim, q + (t * num_heads + h) * dim, cs, half);
        const int64_t slot = slots[t];
        if (slot < 0) continue;
        const int64_t base = (slot / block_size) * s0 + (slot % block_size) * s1;
        const scalar_t* k = row + num_heads * dim;
        const scalar_t* v = k + num_kv_heads * dim;
        for (int64_t h = 0; h < num_kv_heads; ++h) {
          jsk::rotate_head(k + h * dim, kc + base + h * s2, cs, half);
          jsk::store_row(vc + base + h * s2, v + h * dim, dim);
        }
      }
    });
  });
  return q_out;
}

TORCH_LIBRARY_FRAGMENT(jetserve_cpu, m) { m.def("rotary_write_kv", &rotary_write_kv); }
