"""The official `ollama` Python client against a real stack: nats-server + workers + API.

Two tiny models are served at once by their own workers through one API: a Llama with a
plain chat template, and a Qwen2 whose template renders tools and a think block. Greedy
outputs must equal the OpenAI routes' for the same prompt: both dialects queue the same Job.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.support.stack import Stack

# Llama 3.1's tool-call format (one JSON object, `parameters`), named in a comment so the
# template's family is detected; it renders tools and a think block.
TOOLS_TEMPLATE = (
    "{# llama3 json tool calls: <|python_tag|> #}"
    "{% if tools %}<|system|>Tools: {% for t in tools %}{{ t['function']['name'] }} "
    "{% endfor %}<|end|>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}"
    "{{ c['function']['name'] }} {{ c['function']['arguments'] | tojson }}"
    "{% endfor %}{% endif %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and enable_thinking %}<think>{% endif %}{% endif %}"
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Tell me about the paged cache."}]


@pytest.fixture(scope="module")
def tools_model(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2: Path) -> Path:
    """tiny_qwen2 under another name, with a template that knows tools and thinking."""
    path = tmp_path_factory.mktemp("models") / "tiny-tools"
    shutil.copytree(tiny_qwen2, path)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = TOOLS_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def ostack(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, tools_model: Path
) -> Iterator[Stack]:
    stack = Stack.create(tmp_path_factory.mktemp("ollama-stack"), tiny_llama)
    try:
        stack.start_worker("--model-name", "tiny")
        stack.start_worker(model_dir=tools_model)
        stack.start_api()
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def client(ostack: Stack) -> ollama.Client:
    return ollama.Client(host=ostack.api.url, timeout=60)


@pytest.fixture(scope="module")
def oai(ostack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{ostack.api.url}/v1", api_key="unused", max_retries=0)


GREEDY = {"temperature": 0, "num_predict": 12}


def test_root_and_version(ostack: Stack) -> None:
    resp = httpx.get(ostack.api.url + "/")
    assert resp.status_code == 200 and resp.text == "Ollama is running"
    assert httpx.get(ostack.api.url + "/api/version").json()["version"]


def test_both_dialects_list_both_models(client: ollama.Client, oai) -> None:
    """Two models, each served by its own worker on its own consumer, one API in front."""
    assert sorted(m.id for m in oai.models.list()) == ["tiny", "tiny-tools"]
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=MESSAGES)


def test_tags_list_both_models_with_details(client: ollama.Client) -> None:
    models = {m.model: m for m in client.list().models}
    assert set(models) == {"tiny:latest", "tiny-tools:latest"}
    tiny = models["tiny:latest"]
    assert tiny.details.family == "llama" and tiny.details.quantization_level == "F32"
    assert tiny.size > 0 and len(tiny.digest) == 64
    assert models["tiny-tools:latest"].details.family == "qwen2"


def test_generate_raw_equals_openai_completion(client, oai) -> None:
    got = client.generate(model="tiny", prompt=PROMPT, raw=True, options=GREEDY)
    ref = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert got.response == ref.choices[0].text
    assert got.done and got.done_reason == "length"
    assert got.eval_count == ref.usage.completion_tokens == 12
    assert got.prompt_eval_count == ref.usage.prompt_tokens
    assert got.total_duration >= got.eval_duration > 0
    assert len(got.context) == 12 + got.prompt_eval_count
    follow = client.generate(model="tiny", prompt=" and", context=got.context, options=GREEDY)
    assert follow.prompt_eval_count > len(got.context)


def test_generate_stream_concatenates_to_the_same_text(client) -> None:
    whole = client.generate(model="tiny:latest", prompt=PROMPT, raw=True, options=GREEDY)
    parts = list(
        client.generate(model="tiny", prompt=PROMPT, raw=True, options=GREEDY, stream=True)
    )
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.response for p in parts) == whole.response
    assert parts[-1].eval_count == whole.eval_count


def test_generate_templated_equals_openai_chat(client, oai) -> None:
    got = client.generate(model="tiny", prompt=MESSAGES[0]["content"], options=GREEDY)
    ref = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    assert got.response == ref.choices[0].message.content


def test_chat_equals_openai_chat_stream_and_not(client, oai) -> None:
    ref = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    got = client.chat(model="tiny", messages=MESSAGES, options=GREEDY)
    assert got.message.role == "assistant"
    assert got.message.content == ref.choices[0].message.content
    parts = list(client.chat(model="tiny", messages=MESSAGES, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == got.message.content
    assert parts[-1].done and parts[-1].done_reason == "length"


def test_options_are_honoured(client, oai) -> None:
    stop_ref = client.generate(model="tiny", prompt=PROMPT, raw=True, options=GREEDY).response
    stop = stop_ref[3:6]
    got = client.generate(model="tiny", prompt=PROMPT, raw=True, options={**GREEDY, "stop": [stop]})
    assert got.response == stop_ref[: stop_ref.index(stop)] and got.done_reason == "stop"
    seeded = {"temperature": 1.0, "top_k": 20, "top_p": 0.9, "seed": 7, "num_predict": 10}
    a = client.generate(model="tiny", prompt=PROMPT, raw=True, options=seeded).response
    b = client.generate(model="tiny", prompt=PROMPT, raw=True, options=seeded).response
    ref = oai.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=10, temperature=1.0, top_p=0.9, seed=7,
        extra_body={"top_k": 20},
    )  # fmt: skip
    assert a == b == ref.choices[0].text
    penalised = client.generate(
        model="tiny", prompt=PROMPT, raw=True, options={**GREEDY, "repeat_penalty": 1.5}
    ).response
    ref = oai.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
        extra_body={"repetition_penalty": 1.5},
    )  # fmt: skip
    assert penalised == ref.choices[0].text
    capped = client.generate(model="tiny", prompt=PROMPT, raw=True, options={"num_ctx": 12})
    assert capped.prompt_eval_count + capped.eval_count <= 12


def test_chat_with_tools_renders_them_and_accepts_tool_history(client) -> None:
    plain = client.chat(model="tiny-tools", messages=MESSAGES, options=GREEDY)
    with_tools = client.chat(
        model="tiny-tools", messages=MESSAGES, tools=[WEATHER_TOOL], options=GREEDY
    )
    assert with_tools.prompt_eval_count > plain.prompt_eval_count
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]
    got = client.chat(model="tiny-tools", messages=history, tools=[WEATHER_TOOL], options=GREEDY)
    assert got.done and got.eval_count == 12


def test_tool_call_comes_back_with_object_arguments(client) -> None:
    """A schema makes the random model write a call; it returns as tool_calls, not text."""
    call_schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "enum": ["get_weather"]},
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 6}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }
    kwargs = dict(
        model="tiny-tools",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],
        format=call_schema,
        options={"num_predict": 60, "temperature": 0},
    )
    got = client.chat(**kwargs)
    assert got.message.content == "" and got.done_reason == "stop"
    (call,) = got.message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(call.function.arguments, dict)
    assert isinstance(call.function.arguments["city"], str)
    parts = list(client.chat(**kwargs, stream=True))
    streamed = [c for p in parts for c in (p.message.tool_calls or [])]
    assert [c.function.arguments for c in streamed] == [call.function.arguments]
    assert "".join(p.message.content for p in parts) == ""


def test_tools_and_think_refused_where_the_template_lacks_them(client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="tiny", messages=MESSAGES, tools=[WEATHER_TOOL])
    assert e.value.status_code == 400 and "does not support tools" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="tiny", messages=MESSAGES, think=True)
    assert "does not support thinking" in e.value.error
    # The template opens <think> and a random model never closes it: all of it is thinking.
    got = client.chat(model="tiny-tools", messages=MESSAGES, think=True, options=GREEDY)
    assert got.message.thinking and got.message.content == "" and got.eval_count == 12


def test_format_json_and_schema_constrain_the_output(client) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 9}},
        "required": ["ok", "n"],
    }
    for stream in (False, True):
        got = client.generate(
            model="tiny", prompt=PROMPT, format=schema, options={"num_predict": 40}, stream=stream
        )
        text = got.response if not stream else "".join(p.response for p in got)
        value = json.loads(text)
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool)
    chat = client.chat(
        model="tiny", messages=MESSAGES, format=schema, options={"num_predict": 40, "seed": 3}
    )
    assert set(json.loads(chat.message.content)) == {"ok", "n"}
    free = client.generate(model="tiny", prompt=PROMPT, format="json", options={"num_predict": 60})
    if free.done_reason == "stop":  # a random model may still be inside a string at 60 tokens
        assert isinstance(json.loads(free.response), dict)
    else:
        assert free.response.startswith("{")


def test_show_and_ps(client) -> None:
    shown = client.show("tiny-tools")
    assert "tools" in shown.capabilities and "thinking" in shown.capabilities
    assert shown.template == TOOLS_TEMPLATE
    assert shown.modelinfo["general.architecture"] == "qwen2"
    assert shown.modelinfo["qwen2.context_length"] == 512
    assert "tools" not in client.show("tiny").capabilities
    running = {m.model: m for m in client.ps().models}
    assert set(running) == {"tiny:latest", "tiny-tools:latest"}
    assert running["tiny:latest"].context_length == 512


def test_pull_of_a_served_model_succeeds_and_delete_of_an_unstored_one_is_404(client) -> None:
    statuses = [s.status for s in client.pull("tiny", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("tiny")
    assert e.value.status_code == 404


def test_unknown_model_is_an_ollama_404(client) -> None:
    for call in (
        lambda: client.generate(model="nope", prompt="x"),
        lambda: client.chat(model="nope", messages=MESSAGES),
        lambda: client.show("nope"),
    ):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 404 and e.value.error == "model 'nope' not found"


def test_empty_prompt_loads_the_model(client) -> None:
    got = client.generate(model="tiny", prompt="")
    assert got.done and got.done_reason == "load" and got.response == ""


BAD_INPUTS = [
    ("POST", "/api/generate", b"{not json"),
    ("POST", "/api/generate", b""),
    ("POST", "/api/generate", {"prompt": "x"}),
    ("POST", "/api/generate", {"model": "tiny", "prompt": 3}),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "options": {"num_predict": "9"}}),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "options": {"num_predict": 0}}),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "options": {"temperature": -1}}),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "options": {"top_p": 0}}),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "options": {"num_ctx": 0}}),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "options": {"num_ctx": 2}}),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "options": {"seed": -1}}),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "options": {"stop": [""]}}),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "images": ["aGk="]}),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "template": "{{ .Prompt }}"}),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "suffix": "y"}),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "think": "very"}),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "context": [10**9]}),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "format": "yaml"}),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "format": {"type": 5}}),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "top_logprobs": 99}),
    ("POST", "/api/chat", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}),
    ("POST", "/api/chat", {"model": "tiny", "messages": [{"content": "x"}]}),
    ("POST", "/api/chat", {"model": "tiny", "messages": "hello"}),
    ("POST", "/api/chat", {"model": "tiny", "messages": [{"role": "user", "images": ["x"]}]}),
    ("POST", "/api/chat", {"model": "tiny", "messages": MESSAGES, "tools": [{"type": "f"}]}),
    ("POST", "/api/chat", {"model": "tiny", "messages": MESSAGES, "format": 3}),
    ("POST", "/api/embed", {"model": "tiny"}),
    ("POST", "/api/embed", {"model": "tiny", "input": []}),
    ("POST", "/api/embed", {"model": "tiny", "input": [""]}),
    ("POST", "/api/embed", {"model": "tiny", "input": 5}),
    ("POST", "/api/embed", {"model": "tiny", "input": "x", "dimensions": 0}),
    ("POST", "/api/embed", {"model": "tiny", "input": "x", "pooling": "max"}),
    ("POST", "/api/embed", {"model": "nope", "input": "x"}),
    ("POST", "/api/embeddings", {"model": "tiny", "prompt": ["x"]}),
    ("POST", "/api/pull", {}),
    ("POST", "/api/pull", {"model": "nope"}),
    ("DELETE", "/api/delete", {"model": 3}),
    ("DELETE", "/api/delete", {"model": "nope"}),
    ("POST", "/api/show", {}),
    ("POST", "/api/show", {"model": 5}),
    ("GET", "/api/generate", None),
    ("GET", "/api/nothing", None),
]


def test_bad_input_gets_an_ollama_4xx_and_the_service_keeps_serving(ostack, client) -> None:
    for method, path, body in BAD_INPUTS:
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        resp = httpx.request(method, ostack.api.url + path, timeout=30, **kwargs)
        assert 400 <= resp.status_code < 500, (path, body, resp.status_code, resp.text)
        error = resp.json()["error"]
        assert isinstance(error, str) and error, (path, body, resp.text)
    assert client.generate(model="tiny", prompt=PROMPT, raw=True, options=GREEDY).done


def hf_pooled(model_dir: Path, text: str, pooling: str, normalize: bool) -> list[float]:
    import torch
    from transformers import AutoModel

    from shared.tokenizer import load_tokenizer

    ids = load_tokenizer(model_dir).encode(text)
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(torch.tensor([ids])).last_hidden_state[0]
    vec = hidden[-1] if pooling == "last" else hidden.mean(dim=0)
    return (torch.nn.functional.normalize(vec, dim=0) if normalize else vec).tolist()


def close(a: list[float], b: list[float], tol: float = 1e-4) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def test_embed_equals_transformers_and_the_openai_route(client, oai, tiny_llama) -> None:
    texts = ["The quick brown fox", "A paged key value cache stores attention keys."]
    got = client.embed(model="tiny", input=texts)
    assert len(got.embeddings) == 2 and got.prompt_eval_count > 0
    for text, vec in zip(texts, got.embeddings, strict=True):
        assert close(vec, hf_pooled(tiny_llama, text, "last", True))
    mean = httpx.post(
        str(client._client.base_url) + "/api/embed",
        json={"model": "tiny", "input": texts[0], "pooling": "mean"},
    ).json()["embeddings"][0]
    assert close(mean, hf_pooled(tiny_llama, texts[0], "mean", True))
    legacy = client.embeddings(model="tiny", prompt=texts[0]).embedding
    assert close(legacy, hf_pooled(tiny_llama, texts[0], "last", False))
    ref = oai.embeddings.create(model="tiny", input=texts)  # the SDK asks for base64
    assert [d.index for d in ref.data] == [0, 1]
    assert all(close(d.embedding, v) for d, v in zip(ref.data, got.embeddings, strict=True))
    assert ref.usage.prompt_tokens == got.prompt_eval_count
    short = client.embed(model="tiny", input=texts[0], dimensions=8).embeddings[0]
    assert len(short) == 8 and abs(sum(v * v for v in short) - 1) < 1e-5


def test_embed_of_the_second_model_and_truncation(client, tools_model) -> None:
    vec = client.embed(model="tiny-tools", input="hello there").embeddings[0]
    assert close(vec, hf_pooled(tools_model, "hello there", "last", True))
    long_text = "fox " * 600
    assert len(client.embed(model="tiny", input=long_text).embeddings[0]) == 64
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="tiny", input=long_text, truncate=False)
    assert e.value.status_code == 400


def test_openai_embeddings_bad_input_is_an_openai_400(ostack: Stack, oai) -> None:
    url = ostack.api.url + "/v1/embeddings"
    for body in (
        {"model": "tiny"},
        {"model": "tiny", "input": []},
        {"model": "tiny", "input": [[]]},
        {"model": "tiny", "input": [10**9]},
        {"model": "tiny", "input": "x", "encoding_format": "hex"},
        {"model": "tiny", "input": "x", "pooling": "cls"},
        {"model": "tiny", "input": "fox " * 600},
    ):
        resp = httpx.post(url, json=body, timeout=30)
        assert resp.status_code == 400, (body, resp.text)
        assert resp.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(url, json={"model": "nope", "input": "x"}).status_code == 404
    assert len(oai.embeddings.create(model="tiny", input="ok", encoding_format="float").data) == 1
