"""What the simulated device is: a model's shapes and a GPU's roofline numbers.

Numbers are public datasheet figures (dense bf16 tensor-core peak, HBM bandwidth,
memory size); the efficiencies say how much of each a tuned serving stack reaches on
small decode batches, and `step_overhead_s` is the per-step cost that is neither
(kernel launches, sampling, host-device sync). They are stated, not fitted to any
single benchmark: change them here, and the cost-model tests show the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """The architecture facts the cost of a forward depends on (Llama family)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    bytes_per_param: int = 2  # bf16
    tied_embeddings: bool = False

    @property
    def layer_params(self) -> int:
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q_out = self.num_heads * self.head_dim
        attention = h * q_out + 2 * h * kv + q_out * h
        mlp = 3 * h * self.intermediate_size
        return attention + mlp

    @property
    def matmul_params(self) -> int:
        """Parameters every token multiplies through: the layers and the LM head."""
        return self.num_layers * self.layer_params + self.vocab_size * self.hidden_size

    @property
    def weight_bytes_read(self) -> int:
        """Bytes of weights a forward streams from HBM (embedding rows are a lookup)."""
        return self.matmul_params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.bytes_per_param

    @property
    def total_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        return self.matmul_params + (0 if self.tied_embeddings else embed)


@dataclass(frozen=True)
class GpuSpec:
    name: str
    hbm_bytes_per_s: float
    peak_flops: float  # dense bf16
    memory_bytes: int
    memory_efficiency: float = 0.6
    compute_efficiency: float = 0.4
    step_overhead_s: float = 0.002


@dataclass(frozen=True)
class Profile:
    name: str
    model: ModelShape
    gpu: GpuSpec
    gpu_memory_utilization: float = 0.9

    def num_kv_blocks(self, block_size: int) -> int:
        """Blocks that fit beside the weights, as a real worker would size its cache."""
        budget = self.gpu.memory_bytes * self.gpu_memory_utilization
        budget -= self.model.total_params * self.model.bytes_per_param + 2**30  # activations
        return max(int(budget // (self.model.kv_bytes_per_token * block_size)), 1)


LLAMA_3_1_8B = ModelShape(
    name="Llama-3.1-8B",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
)

H100_SXM = GpuSpec(
    name="H100-SXM", hbm_bytes_per_s=3.35e12, peak_flops=989e12, memory_bytes=80 * 10**9
)
H200 = GpuSpec(name="H200", hbm_bytes_per_s=4.8e12, peak_flops=989e12, memory_bytes=141 * 10**9)
# An inference card where prefill, not the host, dominates time to first token (1k tokens
# of Llama-3.1-8B take ~0.3 s): what prefix caching saves shows even on a busy host.
L4 = GpuSpec(name="L4", hbm_bytes_per_s=3.0e11, peak_flops=121e12, memory_bytes=24 * 10**9)

PROFILES: dict[str, Profile] = {
    "h100-llama3-8b": Profile("h100-llama3-8b", LLAMA_3_1_8B, H100_SXM),
    "h200-llama3-8b": Profile("h200-llama3-8b", LLAMA_3_1_8B, H200),
    "l4-llama3-8b": Profile("l4-llama3-8b", LLAMA_3_1_8B, L4),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown simulate profile {name!r}; known: {', '.join(sorted(PROFILES))}"
        ) from None
