"""docs/models.md followed on a tiny checkpoint: a folder laid out as the page says
(sharded bfloat16 safetensors, tokenizer.json, the chat template in chat_template.jinja
as transformers' save_pretrained writes it now), served by `jetserve worker` and
`jetserve api` started as the page starts them, answers chat and completions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.model_factory import CHAT_TEMPLATE, build_tiny_checkpoint, train_tokenizer
from tests.support.nats_process import NatsServer, free_port

REPO_ROOT = Path(__file__).resolve().parents[3]
START_TIMEOUT_S = 120.0


def _hf_folder(root: Path) -> Path:
    """What `save_pretrained` of a model and its tokenizer leaves: no hand-written files."""
    from transformers import PreTrainedTokenizerFast

    folder = build_tiny_checkpoint(
        root / "Tiny-Qwen2-Instruct", arch="qwen2", dtype="bfloat16", max_shard_size="100KB"
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(), bos_token="<s>", eos_token="</s>"
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return folder


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli", *args],
            env=env, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, model: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == 200 and model in r.json().get("models", []):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(log.read_text()[-3000:])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("models-page")
    folder = _hf_folder(root)
    nats_server = NatsServer(root / "nats")
    nats_server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETSERVE_")}
    env["OMP_NUM_THREADS"] = "1"
    port = free_port()
    procs = [
        _spawn(["worker", "--model", str(folder), "--nats-url", nats_server.url,
                "--metrics-port", "0"], env, root / "worker.log"),
        _spawn(["api", "--nats-url", nats_server.url, "--no-auth", "--host", "127.0.0.1",
                "--port", str(port)], env, root / "api.log"),
    ]  # fmt: skip
    try:
        _wait_ready(f"http://127.0.0.1:{port}/ready", procs[1], root / "api.log", folder.name)
        yield f"http://127.0.0.1:{port}", folder
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        nats_server.stop()


def test_the_folder_has_the_layout_the_page_describes(served: tuple[str, Path]) -> None:
    _, folder = served
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "tokenizer.json", "chat_template.jinja"} <= names
    assert "model.safetensors.index.json" in names  # sharded
    assert len([n for n in names if n.endswith(".safetensors")]) > 1
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())


def test_served_under_the_folder_name_with_its_context(served: tuple[str, Path]) -> None:
    url, folder = served
    cards = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    assert [(c["id"], c["max_model_len"]) for c in cards] == [(folder.name, 512)]


def test_chat_and_completions_answer(served: tuple[str, Path]) -> None:
    url, folder = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(
        model=folder.name,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
    )
    assert chat.usage.completion_tokens >= 1
    # The template from chat_template.jinja rendered the prompt: <|user|>Hi<|end|><|assistant|>
    assert chat.usage.prompt_tokens >= 4
    text = client.completions.create(model=folder.name, prompt="Hello", max_tokens=3)
    assert text.usage.completion_tokens == 3
