"""The Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) over a paged KV cache.

One module covers the family: they differ only in qkv bias (Qwen2), per-head q/k
RMSNorm (Qwen3), tied embeddings and rope scaling. Projections are fused (qkv,
gate+up) so a layer is four matmuls; the loader splits HF's separate weights in.
Under tensor parallelism (parallel/sharding.py) `cfg` is one rank's share (its heads, its
slice of the MLP) and the two row-parallel outputs (o_proj, down) are summed over ranks.
Inputs are a flattened batch of tokens from many sequences; attention goes through
the backend with the step's metadata.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine_worker.engine.attention.backend import AttentionBackend
from engine_worker.engine.attention.metadata import AttentionMetadata
from engine_worker.engine.config import ModelConfig
from engine_worker.engine.models.layers import LayerOps
from engine_worker.engine.models.linear import Linear
from engine_worker.engine.parallel.group import TensorParallel
from jetserve_kernels.rotary import build_cos_sin_cache


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, ops: LayerOps) -> None:
        super().__init__()
        self.weight = _param(size)
        self.eps = eps
        self.fn = ops.rms_norm

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.fn(x, self.weight, self.eps, residual)


def _row_parallel_reduce(tp: TensorParallel | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Sums a row-parallel Linear's partial output over the ranks; identity on one rank."""
    if tp is None or tp.size == 1:
        return _identity
    return tp.all_reduce


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: LayerOps, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.reduce = _row_parallel_reduce(tp)
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv = Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias, matmul=ops.linear
        )
        self.o_proj = Linear(self.q_size, cfg.hidden_size, matmul=ops.linear)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.rotary = ops.rotary
        self.scale = cfg.head_dim**-0.5

    def _qkv(
        self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token q, k, v ([T, heads, head_dim]) after the q/k norms and rotary."""
        qkv = self.qkv(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q)[0]
            k = self.k_norm(k)[0]
        q, k = self.rotary(positions, q, k, cos_sin)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        fused = getattr(backend, "rotary_write_kv", None)
        if fused is not None and self.q_norm is None:
            # one kernel from the qkv rows to a rotated q and filled cache slots (CPU)
            q = fused(
                self.qkv(x),
                positions,
                cos_sin,
                k_cache,
                v_cache,
                meta.slot_mapping,
                self.num_heads,
                self.num_kv_heads,
            )
        else:
            q, k, v = self._qkv(x, positions, cos_sin)
            backend.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        o = backend.forward(q, k_cache, v_cache, meta, self.scale)
        return self.reduce(self.o_proj(o.reshape(-1, self.q_size)))

    def forward_causal(
        self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, batch: int
    ) -> torch.Tensor:
        """`batch` equal-length sequences flattened to [batch * T]; plain causal attention."""
        q, k, v = (
            t.view(batch, -1, t.shape[1], self.head_dim).transpose(1, 2)
            for t in self._qkv(x, positions, cos_sin)
        )
        o = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.scale, enable_gqa=True
        )
        return self.reduce(self.o_proj(o.transpose(1, 2).reshape(-1, self.q_size)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: LayerOps, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.reduce = _row_parallel_reduce(tp)
        self.gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, matmul=ops.linear)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size, matmul=ops.linear)
        self.act = ops.silu_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.down(self.act(self.gate_up(x))))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: LayerOps, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.attn = Attention(cfg, ops, tp)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = MLP(cfg, ops, tp)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            h, residual = self.input_norm(x)[0], x
        else:
            h, residual = self.input_norm(x, residual)
        h = self.attn(h, positions, cos_sin, kv_cache, meta, backend)
        h, residual = self.post_attn_norm(h, residual)
        return self.mlp(h), residual  # type: ignore[return-value]

    def forward_causal(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        batch: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = (
            self.input_norm(x, residual) if residual is not None else (self.input_norm(x)[0], x)
        )
        h = self.attn.forward_causal(h, positions, cos_sin, batch)
        h, residual = self.post_attn_norm(h, residual)
        return self.mlp(h), residual  # type: ignore[return-value]


def fused_decode_weights(
    layer: DecoderLayer,
) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """The layer's six weights and its Linears' four prepacked weights (empty tensors where
    a Linear has none) for the CPU's one-call decoder layer (kernels/jetserve_kernels/cpu/decode_layer.cpp),
    or None where the layer is not exactly the chain that kernel runs: the CPU backend's
    ops, plain Linears (not quantized, not sharded) without biases, fp32 or bf16 weights,
    no q/k norms."""
    from jetserve_kernels.cpu.ops import KERNEL_DTYPES, linear_cpu, rms_norm_cpu, silu_and_mul_cpu
    from jetserve_kernels.cpu.packed_matmul import PackedMatmul

    attn, mlp = layer.attn, layer.mlp
    linears = (attn.qkv, attn.o_proj, mlp.gate_up, mlp.down)
    plain = all(
        type(lin) is Linear
        and lin.bias is None
        and (lin.matmul is linear_cpu or isinstance(lin.matmul, PackedMatmul))
        and lin.weight.dtype in KERNEL_DTYPES
        and lin.weight.is_contiguous()
        for lin in linears
    )
    if not (
        plain
        and layer.input_norm.fn is rms_norm_cpu
        and layer.post_attn_norm.fn is rms_norm_cpu
        and layer.input_norm.eps == layer.post_attn_norm.eps
        and mlp.act is silu_and_mul_cpu
        and attn.q_norm is None
        and attn.reduce is _identity
        and mlp.reduce is _identity
    ):
        return None
    weights = [
        layer.input_norm.weight, attn.qkv.weight, attn.o_proj.weight,
        layer.post_attn_norm.weight, mlp.gate_up.weight, mlp.down.weight,
    ]  # fmt: skip
    packed = [
        lin.matmul.packed
        if isinstance(lin.matmul, PackedMatmul) and lin.matmul.packs(lin.weight)
        else lin.weight.new_empty(0)
        for lin in linears
    ]
    return weights, packed


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        max_positions: int,
        ops: LayerOps | None = None,
        tp: TensorParallel | None = None,
    ) -> None:
        """`tp` given: `cfg` is this rank's share (parallel/sharding.py `shard_config`)."""
        super().__init__()
        ops = ops or LayerOps()
        self.cfg = cfg
        self.tp = tp
        self.embed = _param(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, matmul=ops.linear)
        )
        self.matmul = ops.linear
        self.register_buffer(
            "cos_sin",
            build_cos_sin_cache(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling),
            persistent=False,
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm."""
        x = F.embedding(input_ids, self.embed)
        residual = None
        fused = self._fused_decode(backend, x)
        if fused is not None:
            from jetserve_kernels.cpu.ops import decode_layer_cpu

            attn = self.layers[0].attn
            for (weights, packed), (k_cache, v_cache) in zip(fused, kv_caches, strict=True):
                x, residual = decode_layer_cpu(
                    x, residual, weights, packed, self.norm.eps, positions, self.cos_sin,
                    k_cache, v_cache, meta, attn.num_heads, attn.num_kv_heads, attn.scale,
                )  # fmt: skip
            return self.norm(x, residual)[0]
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, positions, self.cos_sin, kv, meta, backend)
        return self.norm(x, residual)[0]

    def _fused_decode(self, backend: AttentionBackend, x: torch.Tensor) -> list | None:
        """Every layer's weights for the one-call CPU decoder layer when this step can take
        it (the CPU backend, fp32/bf16 rows, every layer eligible), else None. Any number of
        rows: each matmul in it takes the kernel its Linear would for that many (a decode
        step's few stream the weight; a verification step's or a prefill's take the
        prepacked one), so only the Python around the kernels is saved. Decided once per
        backend."""
        if getattr(backend, "name", None) != "cpu" or x.dim() != 2:
            return None
        from jetserve_kernels.cpu.ops import KERNEL_DTYPES

        if x.dtype not in KERNEL_DTYPES:
            return None
        cached = self.__dict__.get("_fused_cache")
        if cached is None or cached[0] is not backend:
            weights = [fused_decode_weights(layer) for layer in self.layers]
            same_eps = all(layer.input_norm.eps == self.norm.eps for layer in self.layers)
            ok = same_eps and all(w is not None for w in weights)
            cached = (backend, weights if ok else None)
            self.__dict__["_fused_cache"] = cached
        return cached[1]

    def forward_causal(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab] of whole sequences from position 0, without a KV cache.

        Plain causal attention and differentiable (with `requires_grad_`): the demo
        builder trains this very model, and tests compare it with transformers.
        """
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).repeat(batch)
        x = F.embedding(input_ids.reshape(-1), self.embed)
        residual = None
        for layer in self.layers:
            x, residual = layer.forward_causal(x, residual, positions, self.cos_sin, batch)
        hidden = self.norm(x, residual)[0]
        return self.compute_logits(hidden).view(batch, length, -1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return self.matmul(hidden, self.embed).float()
        return self.lm_head(hidden).float()
