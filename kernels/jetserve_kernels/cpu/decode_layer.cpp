// One decoder layer of a Llama-family model as one call: the same kernels, in the same
// order, as the model's Python runs them one by one (RMSNorm with the residual add, the
// qkv matmul, rotary + KV-cache write, paged attention, o_proj, RMSNorm, gate_up,
// silu * up, down), so the results are the same bits. At batch 1 a step is ~5 ms of
// streamed weights, and the ~70 Python-to-kernel round trips around them (dispatch,
// argument checks, module calls) were another ~0.5 ms; a speculative verification step
// (a sequence's last token and its proposals) is as short and paid the same.
// Each matmul takes the kernel the layer's Linear would: decode_linear for up to
// `max_streamed` rows, else oneDNN's prepacked weight where the Linear has one
// (kernels/jetserve_kernels/cpu/packed_matmul.py), else at::linear. The caller (models/llama.py) takes this
// path only where every module of the layer is exactly that chain.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <string>
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

// x [T, K] contiguous against w [N, K]: what the layer's Linear computes for T rows.
// `packed`: the Linear's oneDNN-prepacked weight, or an empty tensor where it has none.
static at::Tensor layer_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& packed,
                               int64_t max_streamed) {
  if (x.size(0) <= max_streamed) return decode_linear(x, w, c10::nullopt);
  if (packed.numel() == 0) return at::linear(x, w);
  // PackedMatmul's call: mkldnn::_linear_pointwise(X, W, B?, attr, scalars, algorithm).
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x,
                          packed,
                          c10::IValue(),
                          std::string("none"),
                          c10::List<c10::optional<at::Scalar>>(),
                          std::string("")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// weights: input norm, qkv, o_proj, post-attention norm, gate_up, down; packed: the
// prepacked qkv, o_proj, gate_up and down (empty tensors where a Linear has none).
// Returns the MLP's output and the residual stream, as DecoderLayer.forward does.
std::vector<at::Tensor> decode_layer(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                     at::TensorList weights, at::TensorList packed,
                                     int64_t max_streamed, double eps,
                                     const at::Tensor& positions, const at::Tensor& cos_sin,
                                     const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& slot_mapping,
                                     const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                                     const at::Tensor& block_tables, int64_t num_heads,
                                     int64_t num_kv_heads, double scale, int64_t tile_tokens) {
  TORCH_CHECK(weights.size() == 6, "weights: input_norm, qkv, o_proj, post_norm, gate_up, down");
  TORCH_CHECK(packed.size() == 4, "packed: qkv, o_proj, gate_up, down (empty where none)");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x is [T, hidden], contiguous");
  auto normed = rms_norm(x, weights[0], eps, residual);
  const at::Tensor resid = residual.has_value() ? normed[1] : x;
  const at::Tensor qkv = layer_linear(normed[0], weights[1], packed[0], max_streamed);
  const at::Tensor q = rotary_write_kv(qkv, positions, cos_sin, k_cache, v_cache, slot_mapping,
                                       num_heads, num_kv_heads);
  const at::Tensor o = paged_attention(q, k_cache, v_cache, query_start_loc, seq_lens,
                                       block_tables, scale, tile_tokens);
  const at::Tensor attn =
      layer_linear(o.reshape({x.size(0), -1}), weights[2], packed[1], max_streamed);
  auto post = rms_norm(attn, weights[3], eps, resid);
  const at::Tensor gate_up = layer_linear(post[0], weights[4], packed[2], max_streamed);
  return {layer_linear(silu_and_mul(gate_up), weights[5], packed[3], max_streamed), post[1]};
}

TORCH_LIBRARY_FRAGMENT(jetserve_cpu, m) { m.def("decode_layer", &decode_layer); }
