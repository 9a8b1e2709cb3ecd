"""The engine: requests in, per-step token deltas out. No NATS, no asyncio, one thread."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine_worker.engine.attention.backend import resolve_backend_name, select_backend
from engine_worker.engine.block_manager import BlockManager
from engine_worker.engine.config import EngineConfig, ModelConfig, load_model_config
from engine_worker.engine.kv_budget import blocks_in_budget, fit_context, kv_cache_bytes
from engine_worker.engine.model_runner import (
    DeviceTokens,
    ModelRunner,
    allocate_kv_cache,
    kv_bytes_per_block,
    profile_step,
)
from engine_worker.engine.models.layers import layer_ops_for
from engine_worker.engine.models.linear import bind_weight_matmuls
from engine_worker.engine.models.llama import LlamaForCausalLM
from engine_worker.engine.models.loader import build_model, init_random_weights, load_weights
from engine_worker.engine.models.quantization import quantize_model
from engine_worker.engine.outputs import (
    CompletionDelta,
    EngineStats,
    RequestOutput,
    TokenLogprob,
)
from engine_worker.engine.parallel.group import TensorParallel
from engine_worker.engine.parallel.launch import RankProcesses, launch_ranks, rank_device
from engine_worker.engine.parallel.sharding import (
    SHARDED_MODULES,
    shard_config,
    whole_row_amax,
)
from engine_worker.engine.sampler import SampledRows, read_rows, sample, sample_rows, torch_argmax
from engine_worker.engine.scheduler import ScheduledBatch, Scheduler
from engine_worker.engine.sequence import Sequence, SequenceStatus
from engine_worker.engine.speculative.counters import SpecCounters
from engine_worker.engine.speculative.draft_model import DraftModelProposer, load_draft_model
from engine_worker.engine.speculative.ngram import NgramProposer
from engine_worker.engine.speculative.verify import verify
from engine_worker.engine.structured.constraint import SequenceConstraint
from engine_worker.engine.structured.grammars import DEFAULT_CACHE_SIZE, GrammarCache
from engine_worker.engine.structured.masks import MaskFiller
from shared.sampling_params import SamplingParams


@dataclass
class RequestState:
    request_id: str
    seqs: list[Sequence]
    num_prompt_tokens: int

    @property
    def finished(self) -> bool:
        # Asked twice per request per step: a plain loop, no generator.
        for s in self.seqs:
            if s.status is not SequenceStatus.FINISHED:
                return False
        return True


@dataclass
class InFlightStep:
    """A launched step whose sampled tokens the host has not read yet (async scheduling):
    the batch it ran, the sequences that sample in it, and where their tokens are."""

    items: list[tuple[Sequence, int]]
    samplers: list[Sequence]
    device_tokens: DeviceTokens | None = None  # the next step's inputs take them here
    host_rows: SampledRows | None = None  # the host's copy, under way
    done_at: float = 0.0  # the simulated device: when the step's time is up


def pool(seq: Sequence, last: torch.Tensor) -> list[float]:
    """The embedding of a fully prefilled sequence: last token or mean, maybe L2-normalized."""
    assert seq.pooled_sum is not None
    vec = last if seq.params.pooling == "last" else seq.pooled_sum / seq.num_tokens
    if seq.params.normalize:
        vec = torch.nn.functional.normalize(vec, dim=0)
    return vec.tolist()


def _seed_for(seed: int, index: int) -> int:
    """Distinct, reproducible streams for a request's n completions."""
    return (seed * 1_000_003 + index) % (2**63)


class LLMEngine:
    # Rank 0's view of the other tensor-parallel ranks; None on one rank (and for
    # subclasses that build no model, like the simulated engine).
    ranks: RankProcesses | None = None
    parallel: TensorParallel | None = None
    # Greedy token choice of the backend's ops (the CPU kernels bring a vectorised one).
    argmax: Callable[[torch.Tensor], torch.Tensor] = staticmethod(torch_argmax)

    def __init__(
        self,
        config: EngineConfig,
        load_format: str | None = None,
        parallel: TensorParallel | None = None,
    ) -> None:
        """`parallel`: this process is a tensor-parallel rank other than 0 (rank_main.py).
        Without it and with --tensor-parallel-size N > 1, this engine is rank 0 and starts
        the other N - 1 ranks itself (parallel/launch.py); `close()` stops them."""
        load_format = load_format or config.load_format
        self.config = config
        self.model_dir = Path(config.model)
        self.model_config: ModelConfig = load_model_config(self.model_dir)
        # This rank's share of the model: all of it on one rank.
        self.rank_config = shard_config(self.model_config, config.tensor_parallel_size)
        self.device = config.resolve_device()
        if parallel is None and config.tensor_parallel_size > 1:
            self.ranks, parallel = launch_ranks(config, load_format, self.device)
        self.parallel = parallel
        if parallel is not None:
            self.device = rank_device(self.device, parallel.rank)
        self.dtype = config.resolve_dtype(self.model_config, self.device)
        self.kv_dtype = config.resolve_kv_cache_dtype(self.dtype)
        mc = self.model_config
        limit = config.max_model_len or mc.max_position_embeddings
        if config.max_model_len and config.max_model_len > mc.max_position_embeddings:
            raise ValueError(
                f"--max-model-len {config.max_model_len} exceeds the model's "
                f"max_position_embeddings {mc.max_position_embeddings}"
            )
        backend_name = resolve_backend_name(config.attention_backend, self.device)
        ops = layer_ops_for(backend_name)
        self.argmax = ops.argmax
        model = build_model(
            self.rank_config,
            self.dtype,
            self.device,
            max_positions=limit,
            ops=ops,
            tp=parallel,
        )
        if load_format == "dummy":
            init_random_weights(model, config.seed)
        elif load_format == "safetensors":
            load_weights(model, self.model_dir)
        else:
            raise ValueError(f"load_format must be 'safetensors' or 'dummy', got {load_format!r}")
        if config.quantization != "none":
            quantize_model(model, config.quantization, whole_row_amax(parallel))
        if ops.matmul_for is not None:  # the CPU backend packs fp32 weights, once
            bind_weight_matmuls(model, ops.matmul_for)
        # The draft model lives on rank 0, which schedules; loaded before the KV cache is
        # sized, since its cache comes out of the same budget.
        leader = parallel is None or parallel.is_leader
        draft = None
        if leader and config.speculative_method == "draft":
            draft = load_draft_model(
                config.speculative_model,
                mc,
                limit,
                self.dtype,
                self.device,
                backend_name,
                config.quantization,
            )

        block_size = config.block_size
        num_blocks = self._num_kv_blocks(model, limit, backend_name, draft)
        if parallel is not None:  # every rank sized its own share; all must hold as many
            num_blocks = parallel.min_over_ranks(num_blocks)
        self._init_scheduling(num_blocks, limit)
        kv = allocate_kv_cache(self.rank_config, num_blocks, block_size, self.kv_dtype, self.device)
        # Decode graphs would have to capture the ranks' collectives: eager under TP.
        use_graphs = config.cuda_graphs and self.device.type == "cuda" and parallel is None
        backend = select_backend(
            backend_name,
            self.device,
            max_decode_seq_len=self.max_model_len if use_graphs else None,
        )
        self.runner = ModelRunner(model, kv, backend, block_size, self.device, parallel)
        if use_graphs and backend.name == "triton":
            self.runner.enable_cuda_graphs(config.max_num_seqs, self.max_model_len)
        if not leader:
            return  # proposals and the draft model live on rank 0, which schedules
        if config.speculative_method == "ngram":
            self.proposer = NgramProposer(
                config.ngram_prompt_lookup_max, config.ngram_prompt_lookup_min
            )
        elif draft is not None:
            self.proposer = DraftModelProposer(
                draft, num_blocks, block_size, self.kv_dtype, self.device, backend_name
            )

    def _num_kv_blocks(
        self,
        model: torch.nn.Module,
        limit: int,
        backend_name: str,
        draft: LlamaForCausalLM | None = None,
    ) -> int:
        """--num-kv-blocks, else what the KV cache budget (kv_budget.py) holds; under
        tensor parallelism the budget is per rank, and a rank's block holds its heads only.
        A draft model's cache (rank 0's) has as many blocks, paid from the same budget."""
        config, mc = self.config, self.rank_config
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks

        def profile() -> int:
            backend = select_backend(backend_name, self.device)
            tokens = min(config.max_num_batched_tokens, limit)
            return profile_step(
                model,  # type: ignore[arg-type]
                mc,
                backend,
                config.block_size,
                tokens,
                config.max_num_seqs,
                self.kv_dtype,
                self.device,
            )

        budget = kv_cache_bytes(config, self.device, profile)
        per_block = [kv_bytes_per_block(mc, config.block_size, self.kv_dtype)]
        if draft is not None:
            per_block.append(kv_bytes_per_block(draft.cfg, config.block_size, self.kv_dtype))
        return blocks_in_budget(budget, per_block)

    def _init_scheduling(self, num_blocks: int, limit: int) -> None:
        """Everything but the model: cache blocks, scheduler, request table, generator."""
        config = self.config
        block_size = config.block_size
        # A sequence must fit the cache on its own, or preemption could never make room.
        self.max_model_len = fit_context(
            limit, config.max_model_len is not None, num_blocks, block_size
        )
        self.block_manager = BlockManager(num_blocks, block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens
        )
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.eos_token_ids: set[int] = set(self.model_config.eos_token_ids)
        self.requests: dict[str, RequestState] = {}
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self._pending: list[RequestOutput] = []
        # Structured outputs: built on the first constrained request (needs xgrammar).
        self.grammars: GrammarCache | None = None
        self.masks: MaskFiller | None = None
        # Speculative decoding: set by __init__ when configured (never on the simulated device).
        self.proposer: NgramProposer | DraftModelProposer | None = None
        self.spec_counters = SpecCounters()
        # Async scheduling (`step`): what the device is running now, and the requests
        # that need every token on the host before their next step is scheduled.
        self.async_scheduling = config.async_scheduling == "on" or (
            config.async_scheduling == "auto" and self.runs_apart_from_host
        )
        if config.speculative_method != "off":
            self.async_scheduling = False  # proposals are made from the host's tokens
        self._inflight: InFlightStep | None = None
        self._sync_requests: set[str] = set()

    @property
    def runs_apart_from_host(self) -> bool:
        """Whether the device computes while the host goes on (CUDA queues kernels; on the
        CPU the forward is the host's own work), which async scheduling needs to pay."""
        return self.device.type == "cuda"

    @property
    def model_name(self) -> str:
        return self.model_dir.name

    @property
    def num_parameters(self) -> int:
        """The whole model's, also when quantized (int8/fp8 weights are buffers) and under
        tensor parallelism (a sharded projection counts once per rank)."""
        size = self.parallel.size if self.parallel is not None else 1

        def count(name: str, t: torch.Tensor) -> int:
            sharded = name.rsplit(".", 1)[0].endswith(SHARDED_MODULES)
            return t.numel() * (size if sharded else 1)

        model = self.runner.model
        quantized = sum(count(n, b) for n, b in model.named_buffers() if n.endswith("qweight"))
        return sum(count(n, p) for n, p in model.named_parameters()) + quantized

    # -- tensor-parallel ranks ------------------------------------------------
    def check_health(self, wait_s: float = 0.0) -> None:
        """Raise RankFailed if a tensor-parallel rank has died, or dies within `wait_s`
        (after a step failed: was a rank the cause?); nothing to check on one rank."""
        if self.ranks is not None:
            self.ranks.check(wait_s)

    def close(self) -> None:
        """Stop the other tensor-parallel ranks; the engine cannot step after this."""
        if self.ranks is None:
            return
        ranks, self.ranks = self.ranks, None
        try:
            ranks.check()
            self.runner.stop_followers()
            ranks.wait(timeout_s=10)
        except Exception:
            ranks.kill()

    # -- requests -----------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        resume_token_ids: list[list[int]] | None = None,
    ) -> None:
        """Validate and queue; raises ValueError and leaves the engine untouched on bad input.

        `resume_token_ids` continues a request another engine started (a worker taking over
        a redelivered job): per completion index, the tokens already produced. They become
        part of each sequence (re-prefilled, prefix-cached where possible) while the prompt
        length stays the original one, so max_tokens and penalties count as if never
        interrupted; a completion whose last token already ended it is not run again.
        """
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        params.validate()
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens; this model accepts at most "
                f"{self.max_model_len - 1} so that one token can be generated"
            )
        produced = self._check_resume(resume_token_ids, params, len(prompt_token_ids))
        compiled = self._compiled_grammar(params)
        seqs: list[Sequence] = []
        for index in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(_seed_for(params.seed, index))
                if not params.greedy:
                    self._advance_generator(gen, len(produced[index]))
            seq = Sequence(
                seq_id=next(self._seq_ids),
                request_id=request_id,
                index=index,
                token_ids=[*prompt_token_ids, *produced[index]],
                num_prompt_tokens=len(prompt_token_ids),
                params=params,
                priority=priority,
                arrival=next(self._arrivals),
                generator=gen,
                prefill_leader=seqs[0] if seqs and self.config.enable_prefix_caching else None,
            )
            seq.num_emitted = len(produced[index])
            if compiled is not None:
                seq.constraint = SequenceConstraint.start(compiled, self.eos_token_ids)
                seq.constraint.replay(produced[index])  # a takeover continues mid-grammar
            if produced[index]:
                self._check_stop(seq, produced[index][-1])
            seqs.append(seq)
        if all(seq.is_finished for seq in seqs):
            raise ValueError("every completion of the resumed request has already finished")
        self.requests[request_id] = RequestState(request_id, seqs, len(prompt_token_ids))
        if params.needs_penalties or compiled is not None or params.pooling is not None:
            self._sync_requests.add(request_id)  # their logits or outputs read host tokens
        for seq in seqs:
            if not seq.is_finished:
                self.scheduler.add(seq)

    def _compiled_grammar(self, params: SamplingParams) -> object | None:
        """The request's compiled grammar (cached by spec); ValueError if it cannot be had."""
        if params.structured is None:
            return None
        if self.grammars is None:
            self.grammars = GrammarCache.for_model(
                self.model_dir,
                self.model_config.vocab_size,
                self.eos_token_ids,
                capacity=DEFAULT_CACHE_SIZE,
            )
            self.masks = MaskFiller(self.model_config.vocab_size)
        return self.grammars.get(params.structured)

    def _check_resume(
        self, resume_token_ids: list[list[int]] | None, params: SamplingParams, num_prompt: int
    ) -> list[list[int]]:
        """The produced tokens per completion index (empty lists for a fresh request)."""
        if resume_token_ids is None:
            return [[] for _ in range(params.n)]
        if len(resume_token_ids) != params.n:
            raise ValueError(
                f"resume_token_ids has {len(resume_token_ids)} entries for n={params.n}"
            )
        vocab = self.model_config.vocab_size
        for tokens in resume_token_ids:
            if any(not isinstance(t, int) or t < 0 or t >= vocab for t in tokens):
                raise ValueError(f"resumed token ids must be integers in [0, {vocab})")
            if len(tokens) > params.max_tokens or num_prompt + len(tokens) > self.max_model_len:
                raise ValueError("resumed tokens exceed max_tokens or the model length")
        return [list(tokens) for tokens in resume_token_ids]

    def _advance_generator(self, gen: torch.Generator, num_tokens: int) -> None:
        """Skip the noise of tokens already sampled: the sampler draws one Exp(1) vector of
        vocabulary size per sampled token of a non-greedy sequence, so a seeded
        continuation then draws exactly what an uninterrupted run would have."""
        vocab = self.model_config.vocab_size
        scratch = torch.empty(vocab, dtype=torch.float32, device=self.device)
        for _ in range(num_tokens):
            scratch.exponential_(generator=gen)

    def abort_request(self, request_id: str) -> None:
        """Free its blocks now; its final output (finish_reason "abort") comes with the next step."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return
        self._sync_requests.discard(request_id)
        deltas = []
        for seq in state.seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                seq.finish_reason = "abort"
                deltas.append(self._delta(seq))
        self._pending.append(self._output(state, deltas))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._pending)

    def can_admit(self, num_prompt_tokens: int) -> bool:
        return self.scheduler.can_admit(num_prompt_tokens)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            kv_cache_usage=bm.usage,
            prefix_cache_hit_rate=bm.prefix_hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            spec=self.spec_counters.copy(),
        )

    # -- the step -----------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run a step; the outputs of the requests it advanced (and of aborts since).

        Under async scheduling a call schedules and launches the next step first and
        then reads the tokens of the one launched by the call before, so the host's work
        of each step runs while the device computes the next: the outputs a call returns
        are those of the step before the one it launched.
        """
        if self.async_scheduling and not self._sync_requests:
            return self._step_overlapped()
        outputs, self._pending = self._pending, []
        if self._inflight is not None:  # a request that needs host tokens came in: land first
            launched, self._inflight = self._inflight, None
            self._land(launched, outputs)
            return outputs
        if self.proposer is not None:
            self._propose()
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        if isinstance(self.proposer, DraftModelProposer):
            speculating = [seq for seq, _ in batch.items if seq.spec_token_ids]
            if speculating:
                self.proposer.fill(speculating, self.generator)
        # Embedding sequences never sample: their prefill ends in a pooled vector instead.
        sample_mask = [
            seq.num_computed_tokens + n - len(seq.spec_token_ids) == seq.num_tokens
            and seq.params.pooling is None
            for seq, n in batch.items
        ]
        embedded: list[Sequence] = []
        if any(seq.params.pooling is not None for seq, _ in batch.items):
            samplers, tokens, logprobs, embedded = self._forward_pool_and_sample(batch, sample_mask)
            emitted, emitted_lps = [[t] for t in tokens], [[lp] for lp in logprobs]
        elif any(seq.spec_token_ids for seq, _ in batch.items):
            samplers, emitted, emitted_lps = self._forward_and_verify(batch, sample_mask)
        else:
            samplers, tokens, logprobs = self._forward_and_sample(batch, sample_mask)
            emitted, emitted_lps = [[t] for t in tokens], [[lp] for lp in logprobs]
        touched: dict[str, RequestState] = {}
        for seq in embedded:
            seq.finish_reason, seq.status = "stop", SequenceStatus.FINISHED
            self.scheduler.remove(seq)
            touched[seq.request_id] = self.requests[seq.request_id]
        for seq, tokens, lps in zip(samplers, emitted, emitted_lps, strict=True):
            self._append(seq, tokens, lps)
            touched[seq.request_id] = self.requests[seq.request_id]
        self._emit(touched, embedded, outputs)
        return outputs

    def _emit(
        self,
        touched: dict[str, RequestState],
        embedded: list[Sequence],
        outputs: list[RequestOutput],
    ) -> None:
        """An output per request a step advanced; finished requests leave the table."""
        for state in touched.values():
            deltas = [
                self._delta(s)
                for s in state.seqs
                if s.num_emitted < s.num_output_tokens or s in embedded
            ]
            finished = state.finished
            outputs.append(self._output(state, deltas, finished))
            if finished:
                del self.requests[state.request_id]
                self._sync_requests.discard(state.request_id)

    # -- async scheduling -------------------------------------------------------
    def _step_overlapped(self) -> list[RequestOutput]:
        """Schedule and launch step N+1, then land step N (still running when N+1 was
        scheduled: its samplers were counted one token ahead, `Sequence.num_inflight`)."""
        outputs, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        previous = self._inflight
        self._inflight = self._launch(batch, previous) if batch else None
        if previous is not None:
            self._land(previous, outputs)
        return outputs

    def _launch(self, batch: ScheduledBatch, previous: InFlightStep | None) -> InFlightStep:
        sample_mask = [seq.num_computed_tokens + n == seq.num_tokens for seq, n in batch.items]
        step = self._launch_forward(batch, sample_mask, previous)
        for seq in step.samplers:
            seq.num_inflight += 1
            if self._reaches_length(seq, seq.num_tokens):
                seq.last_in_flight = True  # `_check_stop` ends it by length when it lands
        return step

    def _launch_forward(
        self, batch: ScheduledBatch, sample_mask: list[bool], previous: InFlightStep | None
    ) -> InFlightStep:
        """Queue the step's forward and sampling on the device and commit the batch;
        nothing here waits for the device. The simulated engine replaces it."""
        source = previous.device_tokens if previous is not None else None
        logits = self.runner.execute(batch.items, sample_mask, source)
        samplers = self.scheduler.commit(batch)
        rows = sample_rows(logits, samplers, self.generator, None, self.argmax)
        tokens = DeviceTokens(rows.tokens, {seq.seq_id: i for i, seq in enumerate(samplers)})
        return InFlightStep(batch.items, samplers, tokens, rows.copy_to_host())

    def _read_tokens(self, step: InFlightStep) -> tuple[list[int], list[TokenLogprob | None]]:
        """Wait for a launched step's tokens; the simulated engine replaces it."""
        assert step.host_rows is not None
        return read_rows(step.host_rows, step.samplers)

    def _land(self, step: InFlightStep, outputs: list[RequestOutput]) -> None:
        """Read a launched step's tokens and account them as a synchronous step would. A
        sequence that ended (or was aborted) after the step launched drops its token."""
        tokens, lps = self._read_tokens(step) if step.samplers else ([], [])
        touched: dict[str, RequestState] = {}
        for seq, token, lp in zip(step.samplers, tokens, lps, strict=True):
            if seq.is_finished:
                continue
            seq.num_inflight -= 1
            self._append(seq, [token], [lp])
            touched[seq.request_id] = self.requests[seq.request_id]
        for seq, _ in step.items:  # blocks whose last token id was only now known
            if not seq.is_finished:
                self.block_manager.cache_full_blocks(seq)
        self._emit(touched, [], outputs)

    def _append(self, seq: Sequence, tokens: list[int], lps: list[TokenLogprob | None]) -> None:
        """Add a step's verified tokens one by one until one ends the sequence; every
        token but the last is an accepted proposal whose KV this step computed."""
        num_proposed = len(seq.spec_token_ids)
        accepted = 0
        for i, (token, lp) in enumerate(zip(tokens, lps, strict=True)):
            seq.token_ids.append(token)
            if i < len(tokens) - 1:
                accepted += 1
            if seq.constraint is not None and not seq.constraint.accept(token):
                seq.finish_reason, seq.status = "error", SequenceStatus.FINISHED
            if lp is not None:
                seq.pending_logprobs.append(lp)
            self._check_stop(seq, token)
            if seq.is_finished:
                break
        if num_proposed:
            self.spec_counters.record(num_proposed, len(tokens) - 1)
            self.scheduler.finish_speculation(seq, accepted)
        if seq.is_finished:
            self.scheduler.remove(seq)

    # -- speculative decoding ---------------------------------------------------
    def _speculates(self, seq: Sequence) -> bool:
        """Plain decoding for what verification does not model: penalties and grammars
        (their logits depend on each proposal), embeddings, and requests that opted out."""
        p = seq.params
        return (
            p.speculative
            and p.pooling is None
            and seq.constraint is None
            and not p.needs_penalties
            and seq.num_tokens - seq.num_computed_tokens == 1
        )

    def _propose(self) -> None:
        """Proposals for the running sequences that decode next, capped so that neither
        max_tokens nor the context length can be overrun by what they would add."""
        assert self.proposer is not None
        queued = itertools.chain(self.scheduler.running, self.scheduler.waiting)
        if any(s.params.pooling is not None for s in queued):
            return  # the pooling forward reads one logits row per sampler
        seqs, limits = [], []
        k = self.config.num_speculative_tokens
        for seq in self.scheduler.running:
            seq.spec_token_ids, seq.spec_draft_probs = [], None
            if not self._speculates(seq):
                continue
            room = min(
                seq.params.max_tokens - seq.num_output_tokens,
                self.max_model_len - seq.num_tokens,
            )
            if room > 1:
                seqs.append(seq)
                limits.append(min(k, room - 1))
        if not seqs:
            return
        if isinstance(self.proposer, DraftModelProposer):
            for seq, limit in zip(seqs, limits, strict=True):
                seq.spec_token_ids = [0] * limit  # room the scheduler reserves; fill() proposes
            return
        # Prompt lookup, or another proposer of sequences (the tests install an oracle).
        proposals = self.proposer.propose(seqs, limits)
        for seq, proposal in zip(seqs, proposals, strict=True):
            seq.spec_token_ids = proposal

    def _forward_and_verify(
        self, batch: ScheduledBatch, sample_mask: list[bool]
    ) -> tuple[list[Sequence], list[list[int]], list[list[TokenLogprob | None]]]:
        """`_forward_and_sample` for a batch where some sequences speculate: their rows
        are verified (speculative/verify.py), the others sampled as usual. Per sampler:
        the tokens to emit and their logprobs."""
        pending = None
        if self.masks is not None:
            will_sample = [
                seq
                for (seq, _), s in zip(batch.items, sample_mask, strict=True)
                if s and not seq.spec_token_ids
            ]
            pending = self.masks.start(will_sample)
        logits = self.runner.execute(batch.items, sample_mask)
        samplers = self.scheduler.commit(batch)
        plain_rows: list[int] = []
        plain: list[Sequence] = []
        spans: list[tuple[int, int]] = []  # per sampler: its first row, its row count
        row = 0
        for seq in samplers:
            n = 1 + len(seq.spec_token_ids)
            spans.append((row, n))
            if n == 1:
                plain_rows.append(row)
                plain.append(seq)
            row += n
        apply_mask = None
        if pending is not None and self.masks is not None:
            apply_mask = functools.partial(self.masks.apply, pending)
        plain_tokens: list[int] = []
        plain_lps: list[TokenLogprob | None] = []
        if plain:
            plain_tokens, plain_lps = sample(
                logits[plain_rows], plain, self.generator, apply_mask, self.argmax
            )
        plain_out = iter(zip(plain_tokens, plain_lps, strict=True))
        emitted: list[list[int]] = []
        lps: list[list[TokenLogprob | None]] = []
        for seq, (first, n) in zip(samplers, spans, strict=True):
            if n == 1:
                token, lp = next(plain_out)
                emitted.append([token])
                lps.append([lp])
            else:
                tokens, token_lps = verify(logits[first : first + n], seq, self.generator)
                emitted.append(tokens)
                lps.append(token_lps)
        return samplers, emitted, lps

    def _forward_pool_and_sample(
        self, batch: ScheduledBatch, sample_mask: list[bool]
    ) -> tuple[list[Sequence], list[int], list[TokenLogprob | None], list[Sequence]]:
        """`_forward_and_sample` for a batch with embedding sequences in it: their hidden
        states are summed across prefill chunks, and those whose prompt is now fully
        computed get their pooled vector (the last list)."""
        pool_mask = [seq.params.pooling is not None for seq, _ in batch.items]
        starts = [seq.num_computed_tokens for seq, _ in batch.items]
        pending = None
        if self.masks is not None:
            will_sample = [seq for (seq, _), s in zip(batch.items, sample_mask, strict=True) if s]
            pending = self.masks.start(will_sample)
        logits, pooled = self.runner.execute_pooling(batch.items, sample_mask, pool_mask)
        committed = self.scheduler.commit(batch)
        for (seq, _), start, rows in zip(batch.items, starts, pooled, strict=True):
            if rows is None:
                continue
            if start == 0 or seq.pooled_sum is None:  # a preemption restarts the prefill
                seq.pooled_sum = rows.total
            else:
                seq.pooled_sum = seq.pooled_sum + rows.total
            if seq.num_computed_tokens == seq.num_tokens:
                seq.embedding = pool(seq, rows.last)
        samplers = [s for s in committed if s.params.pooling is None]
        embedded = [s for s in committed if s.params.pooling is not None]
        apply_mask = None
        if pending is not None and self.masks is not None:
            apply_mask = functools.partial(self.masks.apply, pending)
        tokens, logprobs = sample(logits, samplers, self.generator, apply_mask, self.argmax)
        return samplers, tokens, logprobs, embedded

    def _forward_and_sample(
        self, batch: ScheduledBatch, sample_mask: list[bool]
    ) -> tuple[list[Sequence], list[int], list[TokenLogprob | None]]:
        """Run the model on the batch, commit it, and sample a token for each sequence
        whose known tokens are now all computed (those sequences, their tokens).

        The one place the device is touched; the simulated engine replaces it. Grammar
        masks of this step's constrained samplers fill on a helper thread while the model
        runs and are applied to the logits before sampling.
        """
        pending = None
        if self.masks is not None:
            will_sample = [seq for (seq, _), s in zip(batch.items, sample_mask, strict=True) if s]
            pending = self.masks.start(will_sample)
        logits = self.runner.execute(batch.items, sample_mask)
        samplers = self.scheduler.commit(batch)
        apply_mask = None
        if pending is not None and self.masks is not None:
            apply_mask = functools.partial(self.masks.apply, pending)
        tokens, logprobs = sample(logits, samplers, self.generator, apply_mask, self.argmax)
        return samplers, tokens, logprobs

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        reason = None
        if seq.is_finished:
            return
        if seq.constraint is not None and seq.constraint.terminated:
            reason, seq.stop_token_id = "stop", token  # the grammar is complete (even ignore_eos)
        elif not p.ignore_eos and token in self.eos_token_ids:
            reason, seq.stop_token_id = "stop", token
        elif token in p.stop_token_ids:
            reason, seq.stop_token_id = "stop", token
        elif self._reaches_length(seq, len(seq.token_ids)):
            reason = "length"
        if reason:
            seq.finish_reason = reason
            seq.status = SequenceStatus.FINISHED

    def _reaches_length(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether the sequence ends by length once it holds `num_tokens` tokens: its
        max_tokens or the model's length (counted with the token in flight, `_launch`)."""
        return (
            num_tokens - seq.num_prompt_tokens >= seq.params.max_tokens
            or num_tokens >= self.max_model_len
        )

    def _delta(self, seq: Sequence) -> CompletionDelta:
        # One slice of the new tokens (slicing all outputs first made each step O(length)).
        new = seq.token_ids[seq.num_prompt_tokens + seq.num_emitted :]
        seq.num_emitted += len(new)
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs, seq.pending_logprobs = seq.pending_logprobs, []
        return CompletionDelta(
            index=seq.index,
            token_ids=new,
            logprobs=logprobs,
            finish_reason=seq.finish_reason if seq.is_finished else None,
            stop_token_id=seq.stop_token_id,
        )

    def _output(
        self, state: RequestState, deltas: list[CompletionDelta], finished: bool | None = None
    ) -> RequestOutput:
        seqs = state.seqs
        return RequestOutput(
            request_id=state.request_id,
            deltas=deltas,
            finished=state.finished if finished is None else finished,
            num_prompt_tokens=state.num_prompt_tokens,
            num_cached_tokens=(
                seqs[0].num_cached_tokens
                if len(seqs) == 1
                else max(s.num_cached_tokens for s in seqs)
            ),
            embedding=seqs[0].embedding,
        )
