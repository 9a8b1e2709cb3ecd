"""The engine link's messages as msgpack: positional arrays, one frame per message.

Both ends run the same code (the worker spawns the engine process from its own
install), so messages are plain arrays in declared field order, with no version and
no per-field checks: cheap to build in the engine process and cheap to read in the
worker, where every microsecond is taken from its NATS work. A StepResult carries all
of a step's outputs; the worker decodes one frame per step however many jobs it ran.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from engine_worker.engine.outputs import (
    CompletionDelta,
    EngineStats,
    RequestOutput,
    TokenLogprob,
)
from engine_worker.engine.speculative.counters import SpecCounters
from engine_worker.engine_core.messages import (
    AbortRequest,
    AddRequest,
    Command,
    EngineInfo,
    StepResult,
    Stop,
)
from engine_worker.worker.model_facts import ModelFacts
from shared.sampling_params import SamplingParams
from shared.structured_output import StructuredOutput

# The first element of every message says what it is.
INIT, COMMANDS, INFO, STEP = 0, 1, 2, 3
ADD, ABORT, STOP = 0, 1, 2

SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
STATS_FIELDS = tuple(f.name for f in dataclasses.fields(EngineStats))
SPEC_AT = STATS_FIELDS.index("spec")  # SpecCounters travel as their four fields
FACTS_FIELDS = tuple(f.name for f in dataclasses.fields(ModelFacts))


class CodecError(ValueError):
    """Bytes that are not a message of the engine link."""


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes, use_list: bool = False) -> Any:
    """Arrays as tuples by default: msgpack builds them several times faster than lists,
    and only the lists the message classes hold (token ids) are made lists again."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=use_list)
    except (ValueError, msgpack.UnpackException) as e:
        raise CodecError(f"undecodable engine link message: {e}") from e


# -- worker -> engine --------------------------------------------------------------------


def encode_init(settings: dict[str, Any]) -> bytes:
    """What the engine process needs to build its engine (the first frame it reads)."""
    return _pack([INIT, settings])


def _sampling(p: SamplingParams) -> list[Any]:
    values = [getattr(p, name) for name in SAMPLING_FIELDS]
    if p.structured is not None:
        values[SAMPLING_FIELDS.index("structured")] = [p.structured.kind, p.structured.spec]
    return values


def _sampling_from(values: tuple[Any, ...]) -> SamplingParams:
    kwargs = dict(zip(SAMPLING_FIELDS, values, strict=True))
    if kwargs["structured"] is not None:
        kwargs["structured"] = StructuredOutput(*kwargs["structured"])
    kwargs["stop_token_ids"] = list(kwargs["stop_token_ids"])
    return SamplingParams(**kwargs)


def _command(cmd: Command) -> list[Any]:
    if isinstance(cmd, AddRequest):
        return [
            ADD,
            cmd.request_id,
            cmd.prompt_token_ids,
            _sampling(cmd.params),
            cmd.priority,
            cmd.resume_token_ids,
        ]
    if isinstance(cmd, AbortRequest):
        return [ABORT, cmd.request_id]
    return [STOP]


def _command_from(m: tuple[Any, ...]) -> Command:
    if m[0] == ADD:
        _, request_id, prompt, params, priority, resume = m
        if resume is not None:
            resume = [list(tokens) for tokens in resume]
        return AddRequest(request_id, list(prompt), _sampling_from(params), priority, resume)
    if m[0] == ABORT:
        return AbortRequest(m[1])
    if m[0] == STOP:
        return Stop()
    raise CodecError(f"unknown command tag {m[0]!r}")


def encode_commands(commands: list[Command]) -> bytes:
    return _pack([COMMANDS, [_command(c) for c in commands]])


# -- engine -> worker --------------------------------------------------------------------


def _logprobs(lps: list[TokenLogprob] | None) -> list[Any] | None:
    if lps is None:
        return None
    return [[lp.token_id, lp.logprob, lp.top] for lp in lps]


def _output(o: RequestOutput) -> list[Any]:
    deltas = [
        [d.index, d.token_ids, _logprobs(d.logprobs), d.finish_reason, d.stop_token_id]
        for d in o.deltas
    ]
    return [o.request_id, deltas, o.finished, o.num_prompt_tokens, o.num_cached_tokens, o.embedding]


def _stats(s: EngineStats) -> list[Any]:
    values = [getattr(s, name) for name in STATS_FIELDS]
    spec = s.spec
    values[SPEC_AT] = [
        spec.num_drafts,
        spec.num_draft_tokens,
        spec.num_accepted_tokens,
        spec.accepted_per_pos,
    ]
    return values


def _stats_from(values: tuple[Any, ...]) -> EngineStats:
    stats = EngineStats(*values)
    drafts, draft_tokens, accepted, per_pos = values[SPEC_AT]
    stats.spec = SpecCounters(drafts, draft_tokens, accepted, list(per_pos))
    return stats


def _step(r: StepResult) -> list[Any]:
    return [
        [_output(o) for o in r.outputs],
        _stats(r.stats),
        r.admit_slots,
        r.adds_applied,
        r.step_time_s,
        r.rejected,
        r.fatal,
        r.kv_stored,
        r.kv_evicted,
    ]


def encode_step(r: StepResult) -> bytes:
    return _pack([STEP, _step(r)])


def encode_info(info: EngineInfo) -> bytes:
    facts = [getattr(info.facts, name) for name in FACTS_FIELDS]
    return _pack([INFO, info.max_model_len, info.block_size, facts, _step(info.snapshot)])


def _logprobs_from(m: tuple[Any, ...]) -> list[TokenLogprob]:
    return [TokenLogprob(t, lp, list(top)) for t, lp, top in m]


def _step_from(m: tuple[Any, ...]) -> StepResult:
    """The worker's hot path: one call per engine step, a few objects per running job."""
    outputs, stats, admit, adds, step_time, rejected, fatal, kv_stored, kv_evicted = m
    return StepResult(
        outputs=[
            RequestOutput(
                request_id,
                [
                    CompletionDelta(
                        index,
                        list(token_ids),
                        None if lps is None else _logprobs_from(lps),
                        reason,
                        stop_id,
                    )
                    for index, token_ids, lps, reason, stop_id in deltas
                ],
                finished,
                num_prompt,
                num_cached,
                None if embedding is None else list(embedding),
            )
            for request_id, deltas, finished, num_prompt, num_cached, embedding in outputs
        ],
        stats=_stats_from(stats),
        admit_slots=admit,
        adds_applied=adds,
        step_time_s=step_time,
        rejected=list(rejected),
        fatal=fatal,
        kv_stored=list(kv_stored),
        kv_evicted=list(kv_evicted),
    )


# -- either way --------------------------------------------------------------------------

Message = dict[str, Any] | list[Command] | EngineInfo | StepResult


def decode(data: bytes) -> Message:
    """Any message of the link: the init settings, a command batch, EngineInfo, a StepResult."""
    m = _unpack(data)
    try:
        tag = m[0]
        if tag == STEP:
            return _step_from(m[1])
        if tag == COMMANDS:
            return [_command_from(c) for c in m[1]]
        if tag == INFO:
            facts = ModelFacts(**dict(zip(FACTS_FIELDS, m[3], strict=True)))
            return EngineInfo(m[1], m[2], facts, _step_from(m[4]))
        if tag == INIT:  # once: lists where the settings have lists
            return dict(_unpack(data, use_list=True)[1])
    except (TypeError, ValueError, IndexError, KeyError) as e:
        raise CodecError(f"malformed engine link message: {type(e).__name__}: {e}") from e
    raise CodecError(f"unknown engine link message tag {m[0]!r}")
