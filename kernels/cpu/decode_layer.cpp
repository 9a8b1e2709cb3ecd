// One decoder layer of a Llama-family model for a decode step's few rows, as one call:
// the same kernels, in the same order, as the model's Python runs them one by one
// (RMSNorm with the residual add, the qkv matmul, rotary + KV-cache write, paged
// attention, o_proj, RMSNorm, gate_up, silu * up, down), so the results are the same bits.
// At batch 1 a step is ~5 ms of streamed weights, and the ~70 Python-to-kernel round
// trips around them (dispatch, argument checks, module calls) were another ~0.5 ms.
// Only the fp32/bf16 decode_linear path: the caller (models/llama.py) takes it where every
// Linear of the layer would stream its plain weight anyway.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

// The kernels this layer chains, defined beside it in this library.
at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias);
std::vector<at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                 const c10::optional<at::Tensor>& residual);
at::Tensor rotary_write_kv(const at::Tensor& qkv, const at::Tensor& positions,
                           const at::Tensor& cos_sin, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& slot_mapping,
                           int64_t num_heads, int64_t num_kv_heads);
at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& query_start_loc,
                           const at::Tensor& seq_lens, const at::Tensor& block_tables,
                           double scale, int64_t tile_tokens);
at::Tensor silu_and_mul(const at::Tensor& gate_up);

// weights: input norm, qkv, o_proj, post-attention norm, gate_up, down.
// Returns the MLP's output and the residual stream, as DecoderLayer.forward does.
std::vector<at::Tensor> decode_layer(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                     at::TensorList weights, double eps,
                                     const at::Tensor& positions, const at::Tensor& cos_sin,
                                     const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& slot_mapping,
                                     const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                                     const at::Tensor& block_tables, int64_t num_heads,
                                     int64_t num_kv_heads, double scale, int64_t tile_tokens) {
  TORCH_CHECK(weights.size() == 6, "weights: input_norm, qkv, o_proj, post_norm, gate_up, down");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x is [T, hidden], contiguous");
  const c10::optional<at::Tensor> none;
  auto normed = rms_norm(x, weights[0], eps, residual);
  const at::Tensor resid = residual.has_value() ? normed[1] : x;
  const at::Tensor qkv = decode_linear(normed[0], weights[1], none);
  const at::Tensor q = rotary_write_kv(qkv, positions, cos_sin, k_cache, v_cache, slot_mapping,
                                       num_heads, num_kv_heads);
  const at::Tensor o = paged_attention(q, k_cache, v_cache, query_start_loc, seq_lens,
                                       block_tables, scale, tile_tokens);
  const at::Tensor attn = decode_linear(o.reshape({x.size(0), -1}), weights[2], none);
  auto post = rms_norm(attn, weights[3], eps, resid);
  const at::Tensor gate_up = decode_linear(post[0], weights[4], none);
  return {decode_linear(silu_and_mul(gate_up), weights[5], none), post[1]};
}

TORCH_LIBRARY_FRAGMENT(jetserve_cpu, m) { m.def("decode_layer", &decode_layer); }
