"""Hugging Face hub ids: the real huggingface_hub client against a hub on 127.0.0.1 that
serves tiny checkpoints in the hub's URL layout (HF_ENDPOINT): revision pinning, the token
from HF_TOKEN, the local cache, and a worker started with only the hub id."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import ollama
import pytest

from engine_worker.engine.llm import LLM
from shared.hub import HubError, download, is_hub_id
from shared.sampling_params import SamplingParams
from tests.support.fake_hub import FakeHub
from tests.support.stack import Stack

TOKEN = "hf_test_token_0123"


@pytest.fixture
def hub(tiny_llama: Path, tiny_qwen2: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    server = FakeHub(token=TOKEN).start()
    server.add("acme/tiny", "main", tiny_llama)
    server.add("acme/tiny", "v1", tiny_qwen2)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        yield server
    finally:
        server.stop()


def architecture(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["architectures"][0]


def resolves(hub: FakeHub) -> int:
    return sum(1 for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path)


def test_download_pins_revisions_sends_the_token_and_reuses_the_cache(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    main = download("acme/tiny", "", cache)
    assert architecture(main) == "LlamaForCausalLM"
    assert {p.name for p in main.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    }
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests)
    pinned = download("acme/tiny", "v1", cache)
    assert architecture(pinned) == "Qwen2ForCausalLM" and pinned != main
    by_commit = download("acme/tiny", hub.repos["acme/tiny"]["v1"].commit, cache)
    assert by_commit == pinned
    before = resolves(hub)
    assert download("acme/tiny", "", cache) == main
    assert resolves(hub) == before, "a cached snapshot is not downloaded again"
    with pytest.raises(HubError, match="acme/tiny@v9"):
        download("acme/tiny", "v9", cache)
    with pytest.raises(HubError, match="acme/nothing"):
        download("acme/nothing", "", tmp_path / "other")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(HubError):
        download("acme/tiny", "", tmp_path / "fresh")
    assert is_hub_id("Qwen/Qwen2.5-0.5B-Instruct") and not is_hub_id("tiny")
    assert not is_hub_id("../etc") and not is_hub_id("a/b/c")


def test_worker_serves_a_hub_id(hub: FakeHub, tiny_llama: Path, tmp_path: Path) -> None:
    stack = Stack.create(tmp_path / "stack", tiny_llama)
    try:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1"}
        worker = stack.start_worker(
            "--model-cache", str(tmp_path / "cache"), model_dir=Path("acme/tiny"), env=env
        )
        stack.start_api()
        client = ollama.Client(host=stack.api.url, timeout=60)
        assert [m.model for m in client.list().models] == ["acme/tiny:latest"]
        got = client.generate(
            model="acme/tiny",
            prompt="Hello",
            raw=True,
            options={"temperature": 0, "num_predict": 8},
        )
        ref = LLM(str(tiny_llama)).generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))
        assert got.response == ref[0].outputs[0].text
        ready = [e for e in worker.log_events() if e.get("event") == "model_ready"]
        assert ready and ready[0]["source"] == "hub"
    finally:
        stack.close()


def test_ollama_pull_of_a_hub_id_stores_it_for_any_worker(
    hub: FakeHub, tiny_llama: Path, tmp_path: Path
) -> None:
    """/api/pull downloads with huggingface_hub and pushes to NATS; a worker without hub
    access then serves the model by name from the object store."""
    stack = Stack.create(tmp_path / "stack", tiny_llama)
    try:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1"}
        api = stack.start_api(env=env, wait=False)
        api.wait_http("/health")
        client = ollama.Client(host=api.url, timeout=120)
        statuses = list(client.pull("acme/tiny", stream=True))
        assert statuses[0].status == "pulling manifest" and statuses[-1].status == "success"
        downloads = [s for s in statuses if s.status == "pulling acme/tiny"]
        total = sum(p.stat().st_size for p in tiny_llama.iterdir())
        assert downloads[-1].completed == downloads[-1].total == total
        assert any(s.status == "pushing to the model store" for s in statuses)
        assert sum(s.total for s in statuses if s.digest) == total
        assert [m.model for m in client.list().models] == ["acme/tiny:latest"]
        with pytest.raises(ollama.ResponseError) as e:
            client.pull("acme/missing")
        assert e.value.status_code == 404
        worker = stack.start_worker(
            "--model-cache", str(tmp_path / "cache"), model_dir=Path("acme/tiny"),
            env={"HF_ENDPOINT": "http://127.0.0.1:9"},  # the hub is not reachable from here
        )  # fmt: skip
        api.wait_http("/ready")
        got = client.generate(
            model="acme/tiny",
            prompt="Hello",
            raw=True,
            options={"temperature": 0, "num_predict": 8},
        )
        ref = LLM(str(tiny_llama)).generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))
        assert got.response == ref[0].outputs[0].text
        ready = [e for e in worker.log_events() if e.get("event") == "model_ready"]
        assert ready[0]["source"] == "nats"
    finally:
        stack.close()
