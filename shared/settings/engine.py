"""The engine knobs (`jetserve worker`, `generate`, `up`); the engine's EngineConfig is
these plus the model folder, so a default lives here and nowhere else."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import ByteSize, field_validator, model_validator

from shared.settings.fields import Settings, setting

CPU_KV_CACHE_MEMORY = ByteSize(512 * 1024 * 1024)  # KV cache on CPU when none is given


class EngineSettings(Settings):
    section: ClassVar[str] = "engine"

    device: str = setting("auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto",
        help="weights' and compute dtype (and the KV cache's, unless --kv-cache-dtype); auto "
        "keeps the checkpoint's on GPU, and on CPU float32 (bfloat16 for a bfloat16 "
        "checkpoint where the CPU has AMX)",
    )
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto",
        help="KV cache dtype: auto is --dtype's; under a float32 model, bfloat16 or float16 "
        "halve the cache's bytes (twice the tokens in the same memory, half the bytes "
        "attention reads per context token) at the cost of rounding K and V once when "
        "stored; attention still sums in float32. bfloat16 keeps float32's range; float16 "
        "turns K or V beyond 65504 into inf",
    )
    block_size: int = setting(
        16,
        ge=1,
        le=256,
        help="tokens per KV cache block (a power of two): the paging and prefix-cache unit",
    )
    kv_cache_memory: ByteSize | None = setting(
        None,
        ge=1,
        help="KV cache size in bytes, exactly; unset: on CUDA the cache gets "
        "--gpu-memory-utilization of the GPU's memory minus what weights and activations "
        "use, on CPU 512 MiB",
        shown_default="unset (see help)",
    )
    gpu_memory_utilization: float = setting(
        0.9,
        gt=0,
        le=1,
        help="fraction of the GPU's total memory this worker may use (weights, activations "
        "and KV cache); sizes the KV cache when --kv-cache-memory is not given",
    )
    num_kv_blocks: int | None = setting(
        None, ge=1, help="KV cache size in blocks; overrides --kv-cache-memory (tests, benchmarks)"
    )
    max_num_seqs: int = setting(
        64, ge=1, help="most sequences decoded together in one step (the batch size)"
    )
    max_num_batched_tokens: int = setting(
        2048,
        ge=1,
        help="token budget of one step: decodes first, then prompts, a longer prompt is "
        "prefilled in chunks of what is left (chunked prefill)",
    )
    max_model_len: int | None = setting(
        None,
        ge=2,
        help="longest prompt + output in tokens; unset: the model's max_position_embeddings, "
        "cut to what the KV cache holds (with a warning); set: start fails if the cache "
        "cannot hold one sequence this long",
    )
    enable_prefix_caching: bool = setting(
        True, help="reuse the KV blocks of a prompt prefix already computed (chained block hashes)"
    )
    attention_backend: Literal["auto", "torch", "cpu", "triton"] = setting(
        "auto",
        help="attention kernels: auto takes triton on CUDA and, on CPU, the C++ kernels "
        "(cpu: built at first use, needs a C++ compiler and ninja) or the torch reference "
        "(torch) where they cannot be built",
    )
    quantization: Literal["none", "int8", "fp8"] = setting(
        "none",
        help="weight-only quantization of every Linear, applied at load from an ordinary "
        "checkpoint with one scale per output channel: int8 (a quarter of fp32's bytes) or "
        "fp8 e4m3 (fp8 matmuls on GPUs that have them, dequantized elsewhere); "
        "none keeps --dtype",
    )
    cuda_graphs: bool = setting(
        True,
        help="capture decode steps in CUDA graphs (CUDA with the triton backend only); "
        "--no-cuda-graphs runs eagerly, like vLLM's --enforce-eager",
    )
    async_scheduling: Literal["auto", "on", "off"] = setting(
        "auto",
        help="schedule and launch each step while the previous one still runs, reading its "
        "tokens afterwards, so the host's per-step work (scheduling, stop checks, outputs) "
        "overlaps the device's; auto: on where the device runs apart from the host (CUDA, "
        "the simulated device), off on the CPU, whose forward is the host's own work. "
        "Steps with penalties, grammars, embeddings or speculation run synchronously",
    )
    tensor_parallel_size: int = setting(
        1,
        ge=1,
        le=64,
        help="ranks one engine's model is split across (tensor parallelism): rank 0 runs the "
        "scheduler and this worker, the others are processes it spawns, one GPU each "
        "(cuda:0..N-1, NCCL) or a share of the CPU cores (gloo); must divide the model's "
        "attention heads, key/value heads and intermediate size",
    )
    seed: int = setting(
        0, ge=0, help="seed of the engine's sampler for requests that bring no seed of their own"
    )
    speculative_method: Literal["off", "ngram", "draft"] = setting(
        "off",
        help="speculative decoding: ngram proposes the tokens that followed the latest earlier "
        "occurrence of the sequence's last n tokens (prompt lookup, no extra model); draft "
        "runs --speculative-model; the model then checks every proposal in one forward. "
        "Greedy outputs are unchanged and sampled ones keep their distribution",
    )
    num_speculative_tokens: int = setting(
        4, ge=1, le=16, help="tokens proposed per sequence and step when speculating"
    )
    ngram_prompt_lookup_max: int = setting(
        3, ge=1, le=16, help="longest suffix n-gram the ngram proposer looks up"
    )
    ngram_prompt_lookup_min: int = setting(
        1, ge=1, le=16, help="shortest suffix n-gram the ngram proposer falls back to"
    )
    speculative_model: str = setting(
        "",
        help="draft model folder for --speculative-method draft: a smaller checkpoint with "
        "the target's tokenizer, run in the same worker with its own paged KV cache (as "
        "many blocks as the target's; the KV cache budget pays for both caches)",
    )
    load_format: Literal["safetensors", "dummy", "simulated"] = setting(
        "safetensors",
        help="safetensors: the checkpoint's weights; dummy: random weights of its shape; "
        "simulated: no model, a roofline clock stands in for the GPU (a test and benchmark "
        "tool, see engine_worker/engine/simulated/; needs --simulate-profile)",
    )
    simulate_profile: str = setting(
        "",
        help="model and GPU the simulated engine stands in for (h100-llama3-8b, "
        "h200-llama3-8b, l4-llama3-8b); only with --load-format simulated",
    )

    @model_validator(mode="after")
    def _simulation_named(self) -> EngineSettings:
        if (self.load_format == "simulated") != bool(self.simulate_profile):
            raise ValueError("--load-format simulated and --simulate-profile go together")
        return self

    @model_validator(mode="after")
    def _speculation_consistent(self) -> EngineSettings:
        if self.ngram_prompt_lookup_min > self.ngram_prompt_lookup_max:
            raise ValueError("--ngram-prompt-lookup-min exceeds --ngram-prompt-lookup-max")
        if (self.speculative_method == "draft") != bool(self.speculative_model):
            raise ValueError("--speculative-method draft and --speculative-model go together")
        return self

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("must be a power of two")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        kind, _, index = value.partition(":")
        if kind not in ("auto", "cpu", "cuda") or (
            index and (kind != "cuda" or not index.isdigit())
        ):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value
