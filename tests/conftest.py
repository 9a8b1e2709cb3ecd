"""Fixtures shared by every test, and the markers every test gets from its folder.

Layout (tests/README.md): tests/unit/<source path>/ needs no nats-server and no
subprocess; tests/integration/<area>/ runs real processes; tests/faults/ injects
faults into them; tests/deploy/ checks the deployment files. A test's first folder is
its marker, so `pytest -m unit` is the quick loop.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.support.model_factory import build_tiny_checkpoint
from tests.support.nats_process import NatsServer
from tests.support.stack import BusClient, Stack

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS_DIR = Path(__file__).resolve().parent
MARKER_DIRS = ("unit", "integration", "faults", "deploy")
# Fixtures that start a nats-server or service processes: never in a unit test.
PROCESS_FIXTURES = frozenset({"nats_server", "bus_stack", "stack", "bus"})


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With `-m <one folder's marker>` (e.g. `-m unit`) only that folder can match, so the
    others are not even imported: the quick loop does not pay for the integration tests'
    imports."""
    wanted = (config.option.markexpr or "").strip()
    if wanted not in MARKER_DIRS:
        return None
    try:
        parts = collection_path.resolve().relative_to(TESTS_DIR).parts
    except ValueError:
        return None
    if parts and parts[0] in MARKER_DIRS and parts[0] != wanted:
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test by its top folder under tests/; refuse tests outside those folders
    and unit tests that ask for a process fixture."""
    misplaced = []
    for item in items:
        try:
            top = item.path.resolve().relative_to(TESTS_DIR).parts[0]
        except ValueError:
            continue  # a test file outside tests/, given on the command line
        if top not in MARKER_DIRS:
            misplaced.append(f"{item.nodeid}: put it under tests/{{{','.join(MARKER_DIRS)}}}/")
            continue
        item.add_marker(getattr(pytest.mark, top))
        if top == "unit" and PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            misplaced.append(f"{item.nodeid}: starts processes, so it belongs in integration/")
    if misplaced:
        raise pytest.UsageError("tests in the wrong folder:\n" + "\n".join(misplaced))


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream on a free port, its store in tmp_path."""
    server = NatsServer(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2", seed=1)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen3"), arch="qwen3", seed=2)


@pytest.fixture(scope="session")
def tiny_llama_long(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like tiny_llama but with a 4096-token context, for jobs that run for seconds."""
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-llama-long"),
        arch="llama",
        seed=3,
        max_position_embeddings=4096,
    )


@pytest.fixture
def bus_stack(tmp_path: Path, tiny_llama: Path) -> Iterator[Stack]:
    """nats-server only; the test starts the workers (and APIs) it needs."""
    stack = Stack.create(tmp_path / "stack", tiny_llama)
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Stack]:
    """nats-server + one worker + one API on tiny_llama, shared by a test module."""
    stack = Stack.create(tmp_path_factory.mktemp("stack"), tiny_llama)
    try:
        stack.start_worker()
        stack.start_api()
        yield stack
    finally:
        stack.close()


@pytest_asyncio.fixture
async def bus(bus_stack: Stack) -> AsyncIterator[BusClient]:
    """A connected BusClient (the API's side of the bus) on bus_stack's nats-server."""
    client = await BusClient.connect(bus_stack.nats_url, bus_stack.model_dir.name)
    try:
        yield client
    finally:
        await client.close()
