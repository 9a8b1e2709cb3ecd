"""Constrained decoding in the engine: per sequence, in mixed batches, across preemption
and resume, on a tiny random Llama (random weights: only the grammar makes it valid)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from engine_worker.engine.llm import LLM
from shared.sampling_params import SamplingParams
from shared.structured_output import StructuredOutput, choice_output, json_schema_output

pytest.importorskip("xgrammar")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), block_size=4, num_kv_blocks=512, max_num_batched_tokens=64)


def constrained(seed: int, out: StructuredOutput, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=120, temperature=1.0, seed=seed, structured=out, **kw)


def test_mixed_batch_constrained_rows_validate_and_free_rows_are_untouched(llm: LLM) -> None:
    free = [SamplingParams(max_tokens=24, temperature=0.8, seed=100 + i) for i in range(3)]
    alone = llm.generate([PROMPT] * 3, free)
    schema = json_schema_output(PERSON)
    params = [constrained(i, schema) for i in range(5)] + free
    mixed = llm.generate([PROMPT] * 8, params)
    for res in mixed[:5]:
        comp = res.outputs[0]
        assert comp.finish_reason == "stop", comp.text
        jsonschema.validate(json.loads(comp.text), PERSON)
    # The grammar rows share the step with free rows: those sample exactly as alone.
    assert [r.outputs[0].token_ids for r in mixed[5:]] == [r.outputs[0].token_ids for r in alone]
    stats = llm.engine.grammars.stats
    assert stats.compiles >= 1 and stats.hits >= 4  # one compile per distinct schema
    assert llm.engine.masks.times.rows > 0


def test_regex_choice_and_grammar_kinds(llm: LLM) -> None:
    outs = {
        "regex": StructuredOutput("regex", r"[a-z]{3}-[0-9]{2}"),
        "choice": choice_output(["yes", "no", "maybe so"]),
        "grammar": StructuredOutput("grammar", 'root ::= "(" [0-9]+ (" + " [0-9]+)? ")"'),
    }
    got = llm.generate([PROMPT] * 3, [constrained(7, o, n=2) for o in outs.values()])
    texts = {k: [c.text for c in r.outputs] for k, r in zip(outs, got, strict=True)}
    import re

    assert all(re.fullmatch(r"[a-z]{3}-[0-9]{2}", t) for t in texts["regex"]), texts
    assert all(t in ("yes", "no", "maybe so") for t in texts["choice"]), texts
    assert all(re.fullmatch(r"\(\d+( \+ \d+)?\)", t) for t in texts["grammar"]), texts


def test_greedy_constrained_with_ignore_eos_still_ends_when_the_grammar_does(llm: LLM) -> None:
    out = llm.generate([PROMPT], [constrained(1, choice_output(["alpha"]), ignore_eos=True)])
    assert out[0].outputs[0].text == "alpha"
    assert out[0].outputs[0].finish_reason == "stop"


def test_invalid_grammar_is_a_value_error_and_the_engine_keeps_serving(llm: LLM) -> None:
    with pytest.raises(ValueError, match="invalid json_schema"):
        llm.engine.add_request(
            "bad", [0, 5, 6], constrained(0, StructuredOutput("json_schema", '{"type":"nope"}'))
        )
    assert "bad" not in llm.engine.requests
    res = llm.generate([PROMPT], [constrained(2, json_schema_output(PERSON))])
    jsonschema.validate(json.loads(res[0].outputs[0].text), PERSON)


def test_preempted_constrained_sequences_resume_the_same_grammar_state(tiny_llama) -> None:
    """Few blocks: decodes run out of KV and sequences are preempted by recompute; the
    seeded output equals a roomy run and every constrained text validates."""
    schema = json_schema_output(PERSON)
    params = [constrained(i, schema) for i in range(6)] + [
        SamplingParams(max_tokens=60, temperature=1.0, seed=50 + i, ignore_eos=True)
        for i in range(2)
    ]
    roomy = LLM(str(tiny_llama), block_size=4, num_kv_blocks=512)
    tight = LLM(str(tiny_llama), block_size=4, num_kv_blocks=48, max_num_batched_tokens=32)
    want = roomy.generate([PROMPT] * 8, params)
    got = tight.generate([PROMPT] * 8, params)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [r.outputs[0].token_ids for r in got] == [r.outputs[0].token_ids for r in want]
    for res in got[:6]:
        jsonschema.validate(json.loads(res.outputs[0].text), PERSON)


@pytest.mark.parametrize("cut", [1, 5, 12])
def test_resumed_request_replays_its_tokens_through_the_grammar(llm: LLM, cut: int) -> None:
    """What a worker does on takeover: the tokens already produced are replayed through a
    fresh matcher, and the seeded continuation equals the uninterrupted run."""
    engine = llm.engine
    prompt = llm.encode(PROMPT)
    params = constrained(11, json_schema_output(PERSON))
    full = llm.generate([prompt], [params])[0].outputs[0].token_ids
    assert len(full) > cut
    engine.add_request("resumed", prompt, params, resume_token_ids=[full[:cut]])
    tail: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            for d in out.deltas:
                tail.extend(d.token_ids)
    assert full[:cut] + tail == full
    jsonschema.validate(json.loads(llm.tokenizer.decode(full)), PERSON)


def test_resumed_tokens_that_break_the_grammar_are_refused(llm: LLM) -> None:
    prompt = llm.encode(PROMPT)
    bad = llm.tokenizer.encode("zz", add_special_tokens=False)
    with pytest.raises(ValueError, match="does not fit the output constraint"):
        llm.engine.add_request(
            "bad-resume", prompt, constrained(0, json_schema_output(PERSON)), resume_token_ids=[bad]
        )
