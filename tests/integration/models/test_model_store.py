"""Models through NATS: `jetserve models push | list | rm`, a worker that fetches its model
by name into a cache, verified, after the pushing machine's copy is gone; a corrupted chunk
refused with a clear error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nats
import ollama
import pytest

from engine_worker.engine.llm import LLM
from shared.bus.model_store import ModelStoreError, checkpoint_store, fetch, object_name
from shared.bus.subjects import CHECKPOINTS_OBJECT_STORE
from shared.sampling_params import SamplingParams
from tests.support.stack import REPO_ROOT, Stack

PROMPT = "The quick brown fox"


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def models_cli(nats_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "models", *args, "--nats-url", nats_url],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def store_stack(tmp_path: Path, tiny_llama: Path):
    stack = Stack.create(tmp_path / "stack", tiny_llama)
    try:
        yield stack
    finally:
        stack.close()


async def corrupt_last_chunk(nats_url: str, model: str, path: str) -> None:
    """Replace the object's last chunk message by one with a flipped byte (same size)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await (await checkpoint_store(js)).get_info(object_name(model, path))
        stream, subject = (
            f"OBJ_{CHECKPOINTS_OBJECT_STORE}",
            f"$O.{CHECKPOINTS_OBJECT_STORE}.C.{info.nuid}",
        )
        last = await js.get_last_msg(stream, subject)
        await js.delete_msg(stream, last.seq)
        data = bytearray(last.data)
        data[len(data) // 2] ^= 0xFF
        await js.publish(subject, bytes(data))
    finally:
        await nc.close()


async def try_fetch(nats_url: str, model: str, cache: Path) -> Path:
    nc = await nats.connect(nats_url)
    try:
        return await fetch(nc.jetstream(), model, cache)
    finally:
        await nc.close()


async def test_pushed_model_is_served_by_name_after_the_local_copy_is_gone(
    store_stack: Stack, tiny_llama: Path, tmp_path: Path
) -> None:
    url = store_stack.nats_url
    local = tmp_path / "to-push"
    shutil.copytree(tiny_llama, local)
    pushed = models_cli(url, "push", str(local), "--name", "stored-tiny")
    assert pushed.returncode == 0, pushed.stderr
    assert "pushed stored-tiny" in pushed.stdout
    listed = [json.loads(line) for line in models_cli(url, "list", "--json").stdout.splitlines()]
    assert [m["name"] for m in listed] == ["stored-tiny"]
    size = sum(p.stat().st_size for p in local.iterdir() if p.is_file())
    assert listed[0]["bytes"] == size
    shutil.rmtree(local)  # the pushing machine's copy is gone

    cache = tmp_path / "cache"
    worker = store_stack.start_worker("--model-cache", str(cache), model_dir=Path("stored-tiny"))
    store_stack.start_api()
    client = ollama.Client(host=store_stack.api.url, timeout=60)
    assert [m.model for m in client.list().models] == ["stored-tiny:latest"]
    got = client.generate(
        model="stored-tiny", prompt=PROMPT, raw=True, options={"temperature": 0, "num_predict": 12}
    )
    ref = LLM(str(tiny_llama)).generate([PROMPT], SamplingParams(max_tokens=12, temperature=0))
    assert got.response == ref[0].outputs[0].text
    events = [e.get("event") for e in worker.log_events()]
    assert "model_fetch_started" in events and "model_ready" in events
    # A second worker on the same cache finds the verified copy: no download.
    second = store_stack.start_worker("--model-cache", str(cache), model_dir=Path("stored-tiny"))
    assert "model_fetch_started" not in [e.get("event") for e in second.log_events()]
    (copy,) = names(cache / "stored-tiny")
    assert names(cache / "stored-tiny" / copy) == names(tiny_llama)

    # Ollama's pull reports the stored files; tags also list stored models nobody serves.
    statuses = list(client.pull("stored-tiny", stream=True))
    assert statuses[0].status == "pulling manifest" and statuses[-1].status == "success"
    layers = [s for s in statuses if s.digest]
    assert sum(s.total for s in layers) == size and all(s.completed == s.total for s in layers)
    assert client.pull("stored-tiny:latest").status == "success"
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("not-anywhere")
    assert e.value.status_code == 404
    assert models_cli(url, "push", str(tiny_llama), "--name", "extra").returncode == 0
    tags = {m.model: m for m in client.list().models}
    assert set(tags) == {"stored-tiny:latest", "extra:latest"} and tags["extra:latest"].size == size
    assert client.delete("extra").status == "success"
    assert [m.model for m in client.list().models] == ["stored-tiny:latest"]
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("extra")
    assert e.value.status_code == 404

    removed = models_cli(url, "rm", "stored-tiny")
    assert removed.returncode == 0 and models_cli(url, "list").stdout == ""
    again = models_cli(url, "rm", "stored-tiny")
    assert again.returncode == 1 and "not in the object store" in again.stderr


async def test_a_corrupted_chunk_is_refused_with_a_clear_error(
    store_stack: Stack, tiny_llama: Path, tmp_path: Path
) -> None:
    url = store_stack.nats_url
    assert models_cli(url, "push", str(tiny_llama), "--name", "bad").returncode == 0
    await corrupt_last_chunk(url, "bad", "model.safetensors")
    cache = tmp_path / "cache"
    with pytest.raises(ModelStoreError, match=r"bad/model.safetensors: corrupted"):
        await try_fetch(url, "bad", cache)
    assert not any((cache / "bad").iterdir())  # nothing half-written left to load
    worker = store_stack.start_worker(
        "--model-cache", str(cache), model_dir=Path("bad"), wait=False
    )
    assert worker.proc.wait(120) == 1
    (line,) = [e for e in worker.log_events() if e.get("event") == "model_unavailable"]
    assert "corrupted" in line["error"] and "push the model again" in line["error"]
    with pytest.raises(ModelStoreError, match="neither a local folder nor in the object store"):
        await try_fetch(url, "never-pushed", cache)
    bad_push = models_cli(url, "push", str(tmp_path), "--name", "x")
    assert bad_push.returncode == 1 and "no config.json" in bad_push.stderr


def test_a_worker_fetches_its_model_as_its_own_identity(tmp_path: Path, tiny_llama: Path) -> None:
    """With NATS identities on (every deployment), the worker's fetch of a stored model
    connects as the worker, not anonymously (compose's `--model jetserve-demo` failed so)."""
    stack = Stack.create(tmp_path / "stack", tiny_llama, secured=True)
    try:
        env = {**stack.nats.identity_env("operator"), "JETSERVE_NATS_URL": stack.nats_url}
        pushed = subprocess.run(
            [sys.executable, "-m", "services.cli", "models", "push", str(tiny_llama),
             "--name", "stored-tiny"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("JETSERVE_")}, **env},
        )  # fmt: skip
        assert pushed.returncode == 0, pushed.stderr
        worker = stack.start_worker("--model-cache", str(tmp_path / "cache"), model_dir=Path("stored-tiny"))  # fmt: skip
        events = [e.get("event") for e in worker.log_events()]
        assert "model_ready" in events
        stack.start_api()
        client = ollama.Client(host=stack.api.url, timeout=60)
        got = client.generate(model="stored-tiny", prompt=PROMPT, raw=True,
                              options={"temperature": 0, "num_predict": 4})  # fmt: skip
        assert got.done
        violations = [line for line in stack.nats.log_path.read_text().splitlines()
                      if "Violation" in line or "Authorization Error" in line]  # fmt: skip
        assert not violations, violations[:3]
    finally:
        stack.close()
