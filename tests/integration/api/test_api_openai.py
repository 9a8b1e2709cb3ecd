"""The official `openai` client against the real stack: nats-server + worker + API processes.

Outputs are checked against the in-process engine (engine_worker.engine.llm.LLM) on the same
checkpoint and seeds: the services must add nothing and lose nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest

from engine_worker.engine.llm import LLM
from shared.sampling_params import SamplingParams
from shared.tokenizer import load_tokenizer
from tests.support.stack import Stack

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Tell me about the paged cache."}]


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.api.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(stack: Stack) -> str:
    return stack.model_dir.name


@pytest.fixture(scope="module")
def llm(tiny_llama: Path) -> LLM:
    return LLM(str(tiny_llama))


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def chat_prompt_ids(model_dir: Path) -> list[int]:
    return load_tokenizer(model_dir).encode_chat(MESSAGES)


def stream_text(chunks, n: int = 1) -> tuple[list[str], list[str | None]]:
    texts, reasons = [""] * n, [None] * n
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.text
            reasons[c.index] = c.finish_reason or reasons[c.index]
    return texts, reasons


def test_models_lists_the_served_model(client: openai.OpenAI, model: str) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == [model]


def test_completion_equals_in_process_engine_greedy(client, model, llm) -> None:
    got = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0)
    ref = llm.generate([PROMPT], SamplingParams(max_tokens=24, temperature=0))[0]
    assert got.choices[0].text == ref.outputs[0].text
    assert got.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert got.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert got.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert got.id.startswith("cmpl-")


def test_seeded_sampling_n2_equals_engine_and_streaming(client, model, llm) -> None:
    kwargs = dict(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, n=2)
    got = client.completions.create(model=model, prompt=PROMPT, **kwargs)
    ref = llm.generate([PROMPT], SamplingParams(**kwargs))[0]
    assert sorted(c.index for c in got.choices) == [0, 1]
    by_index = {c.index: c.text for c in got.choices}
    assert by_index == {c.index: c.text for c in ref.outputs}
    # the two completions sample independently
    assert by_index[0] != by_index[1]
    texts, reasons = stream_text(
        client.completions.create(model=model, prompt=PROMPT, stream=True, **kwargs), n=2
    )
    assert texts == [by_index[0], by_index[1]]
    assert all(r is not None for r in reasons)


def test_seed_reproducibility(client, model) -> None:
    def sample(seed: int) -> str:
        out = client.completions.create(
            model=model, prompt=PROMPT, max_tokens=20, temperature=1.0, seed=seed
        )
        return out.choices[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_streamed_text_equals_non_streamed(client, model) -> None:
    kwargs = dict(model=model, prompt=PROMPT, max_tokens=40, temperature=0.7, seed=3)
    full = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, **kwargs))
    texts, reasons = stream_text(chunks)
    assert texts[0] == full
    assert reasons[0] in ("length", "stop")
    assert len(chunks) > 3  # really streamed, not one blob


def test_chat_equals_engine_on_the_chat_template(client, model, llm, tiny_llama) -> None:
    got = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=20, temperature=0
    )
    ids = chat_prompt_ids(tiny_llama)
    ref = llm.generate([ids], SamplingParams(max_tokens=20, temperature=0))[0]
    msg = got.choices[0].message
    assert msg.role == "assistant"
    assert msg.content == ref.outputs[0].text
    assert got.usage.prompt_tokens == len(ids)
    assert got.id.startswith("chatcmpl-")

    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_stop_string_cuts_output_and_stops_the_job(client, model, stack) -> None:
    base = client.completions.create(model=model, prompt=PROMPT, max_tokens=40, temperature=0)
    text = base.choices[0].text
    # a stop string from the middle of the greedy output
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop and stop.strip()
    expected = text[: text.find(stop)]
    # Room for far more tokens than the stop needs: the worker must still be generating
    # when the API's cancel arrives (a 40-token job on the tiny model can finish first).
    got = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=200, temperature=0, stop=[stop]
    )
    assert got.choices[0].text == expected
    assert got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens < base.usage.completion_tokens
    texts, reasons = stream_text(
        client.completions.create(
            model=model, prompt=PROMPT, max_tokens=200, temperature=0, stop=stop, stream=True
        )
    )
    assert texts == [expected]
    assert reasons == ["stop"]
    # the worker was told to abort the rest of the job
    job_id = got.id.removeprefix("cmpl-")
    wait_for(
        lambda: any(
            e.get("event") == "job_finished"
            and e.get("job_id") == job_id
            and e.get("finish_reasons") == ["abort"]
            for e in stack.worker.log_events()
        )
    )


def test_completion_logprobs(client, model) -> None:
    got = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3
    )
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == got.usage.completion_tokens
    assert all(x <= 0 for x in lp.token_logprobs)
    for token, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3
        # greedy: the chosen token is the most likely one
        assert max(top.values()) == pytest.approx(token_lp, abs=1e-5)
        assert top.get(token) == pytest.approx(token_lp, abs=1e-5)


def test_chat_logprobs_with_bytes(client, model) -> None:
    got = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    raw = b"".join(bytes(e.bytes) for e in content)
    assert raw.decode("utf-8", errors="replace") == got.choices[0].message.content

    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    )
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]  # fmt: skip
    assert [e.token for e in streamed] == [e.token for e in content]


def test_usage_reports_cached_prompt_tokens(client, model) -> None:
    prompt = "Continuous batching lets new requests join a running batch between steps. " * 3
    first = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens >= 32
    assert second.usage.prompt_tokens_details.cached_tokens >= 16
    assert second.usage.total_tokens == second.usage.prompt_tokens + 2


def test_token_id_prompts_and_batched_prompts(client, model, llm) -> None:
    ids = llm.tokenizer.encode(PROMPT)
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0)
    by_text = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(
        model=model, prompt=[PROMPT, "Olá! Ça va?"], max_tokens=8, temperature=0, n=2
    )
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    texts = {c.index: c.text for c in batch.choices}
    assert texts[0] == texts[1] == by_text.choices[0].text


def test_ignore_eos_gives_exact_output_length(client, model) -> None:
    got = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=30,
        temperature=1.0,
        seed=5,
        extra_body={"ignore_eos": True},
    )
    assert got.usage.completion_tokens == 30
    assert got.choices[0].finish_reason == "length"


def test_default_max_tokens_fills_the_context(client, model, stack) -> None:
    info = httpx.get(f"{stack.api.url}/v1/models").json()["data"][0]
    assert info["max_model_len"] == 512
    got = client.completions.create(
        model=model, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True}
    )
    assert got.usage.prompt_tokens + got.usage.completion_tokens == 512
