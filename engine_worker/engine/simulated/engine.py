"""The engine with its model forward replaced by a wait on a roofline clock.

Everything else is the real engine: scheduler (continuous batching, chunked prefill,
preemption), block manager (paged KV, prefix caching), sequences, stop checks, deltas.
The forward sleeps for the step time `cost_model.step_cost` gives for the scheduled
batch; `time.sleep` releases the GIL as a GPU kernel does, so the worker's event loop
runs meanwhile exactly as it would beside a real device. Under async scheduling (the
default here, as on CUDA) a launched step is queued on a device timeline instead: it
starts when the step before it is done, and reading its tokens waits until its time is
up, so the host's work overlaps the device's as it does beside a GPU. Tokens come from
`tokens.next_token`. A test and benchmark tool: selected with load_format
"simulated", never by default.

The tokenizer and vocabulary come from the model folder (a tiny checkpoint or the demo
model), the costs and the KV cache size from the profile (e.g. Llama-3.1-8B on an H100).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine_worker.engine.config import EngineConfig, load_model_config
from engine_worker.engine.llm_engine import InFlightStep, LLMEngine
from engine_worker.engine.outputs import TokenLogprob
from engine_worker.engine.scheduler import ScheduledBatch
from engine_worker.engine.sequence import Sequence
from engine_worker.engine.simulated.cost_model import shape_of, step_cost
from engine_worker.engine.simulated.profiles import Profile, get_profile
from engine_worker.engine.simulated.tokens import allowed_token_ids, next_token
from shared.logging import get_logger

STATS_LOG_INTERVAL_S = 2.0


@dataclass
class DeviceStats:
    """The simulated device's own account, to compare with what the host achieved.

    `busy_period_s` sums the wall time between consecutive step starts while work was
    pending throughout; `busy_device_s` the simulated time of those same steps. Their
    ratio minus one is the step-period inflation the host (scheduler, worker, NATS
    client sharing the process) adds to the device's step time.
    """

    steps: int = 0
    device_s: float = 0.0
    tokens: int = 0
    busy_period_s: float = 0.0
    busy_device_s: float = 0.0

    @property
    def inflation(self) -> float:
        return self.busy_period_s / self.busy_device_s - 1 if self.busy_device_s else 0.0


class SimulatedEngine(LLMEngine):
    def __init__(self, config: EngineConfig) -> None:  # no super(): there is no model
        self.config = config
        self.profile: Profile = get_profile(config.simulate_profile)
        self.model_dir = Path(config.model)
        self.model_config = load_model_config(self.model_dir)
        self.device = torch.device("cpu")
        self.dtype = torch.bfloat16  # the profiles model a bf16 model and KV cache
        self.kv_dtype = config.resolve_kv_cache_dtype(self.dtype)
        limit = config.max_model_len or self.profile.model.max_position_embeddings
        num_blocks = config.num_kv_blocks or self.profile.num_kv_blocks(config.block_size)
        self._init_scheduling(num_blocks, limit)
        self.device_stats = DeviceStats()
        self._allowed: list[int] | None = None
        self._last_start: float | None = None
        self._last_device_s = 0.0
        self._device_free_at = 0.0  # async scheduling: when the queued steps are done
        self._last_log = time.monotonic()
        self._log = get_logger("engine_worker.simulated").bind(profile=self.profile.name)

    @property
    def num_parameters(self) -> int:
        return self.profile.model.total_params  # the simulated model's, not the tokenizer's

    @property
    def runs_apart_from_host(self) -> bool:
        return True  # it stands in for a GPU

    def _launch_forward(
        self, batch: ScheduledBatch, sample_mask: list[bool], previous: InFlightStep | None
    ) -> InFlightStep:
        """Queue the step on the device's timeline: it starts when the step before it is
        done (or now, if the device is idle) and takes the cost model's time."""
        now = time.perf_counter()
        seconds = self._step_seconds(batch)
        start = max(now, self._device_free_at)
        self._device_free_at = start + seconds
        self._account(start, seconds, batch.num_tokens)
        samplers = self.scheduler.commit(batch)
        return InFlightStep(batch.items, samplers, done_at=self._device_free_at)

    def _read_tokens(self, step: InFlightStep) -> tuple[list[int], list[TokenLogprob | None]]:
        """The step's tokens once its device time is up. They follow each sequence's tokens
        known by now, which are all that precede them (the step before has landed); the
        host makes them before the wait, so that work overlaps the device time."""
        allowed = self._allowed_ids()
        tokens = [next_token(seq.token_ids, allowed) for seq in step.samplers]
        logprobs = [_logprob(seq, t) for seq, t in zip(step.samplers, tokens, strict=True)]
        remaining = step.done_at - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
        return tokens, logprobs

    def _step_seconds(self, batch: ScheduledBatch) -> float:
        shape = shape_of([(n, seq.num_computed_tokens + n) for seq, n in batch.items])
        return step_cost(self.profile, shape).seconds

    def _forward_and_sample(
        self, batch: ScheduledBatch, sample_mask: list[bool]
    ) -> tuple[list[Sequence], list[int], list[TokenLogprob | None]]:
        """A synchronous step: launched on the timeline and waited for at once."""
        step = self._launch_forward(batch, sample_mask, None)
        tokens, logprobs = self._read_tokens(step)
        return step.samplers, tokens, logprobs

    def _allowed_ids(self) -> list[int]:
        """Resolved lazily: the worker adds the tokenizer's EOS ids after construction."""
        if self._allowed is None:
            self._allowed = allowed_token_ids(self.model_config.vocab_size, self.eos_token_ids)
        return self._allowed

    def _account(self, start: float, seconds: float, num_tokens: int) -> None:
        s = self.device_stats
        if self._last_start is not None:
            s.busy_period_s += start - self._last_start
            s.busy_device_s += self._last_device_s
        s.steps += 1
        s.device_s += seconds
        s.tokens += num_tokens
        self._last_start, self._last_device_s = start, seconds
        if start - self._last_log >= STATS_LOG_INTERVAL_S:
            self._last_log = start
            self.log_stats()

    def step(self):  # type: ignore[override]
        outputs = super().step()
        if not self.has_unfinished_requests():
            self._last_start = None  # idle next: the gap before new work is not a period
        return outputs

    def log_stats(self) -> None:
        s = self.device_stats
        self._log.info(
            "simulated_device",
            steps=s.steps,
            device_s=round(s.device_s, 6),
            tokens=s.tokens,
            busy_period_s=round(s.busy_period_s, 6),
            busy_device_s=round(s.busy_device_s, 6),
            inflation=round(s.inflation, 5),
        )


def _logprob(seq: Sequence, token: int) -> TokenLogprob | None:
    """Stand-in logprobs, when asked: the drawn token is certain; alternatives trail."""
    k = seq.params.logprobs
    if k is None:
        return None
    top = [(token, 0.0)] + [((token + i) % 2**31, -float(i)) for i in range(1, k)]
    return TokenLogprob(token, 0.0, top[:k])
