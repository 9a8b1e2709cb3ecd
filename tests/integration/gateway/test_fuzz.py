"""schemathesis against the running API's own OpenAPI document (GET /openapi.json).

Every operation gets schema-valid cases (positive) and schema-violating ones (negative),
sent with a valid key to a real API with a worker behind it. What must hold: no case
gets a 5xx, every negative case gets a 4xx, and afterwards the service still serves.
The key caps max_tokens, so valid generation cases stay short.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.support.gateway import auth, completion, gateway_env, write_keys_file
from tests.support.stack import Stack

# Cases per operation and mode; operations with a request body get more.
CASES = 12
BODY_CASES = 40


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("fuzz")
    keys = write_keys_file(root / "keys.json", {"fuzz": {"limits": {"max_tokens": 4}}})
    stack = Stack.create(root / "stack", tiny_llama)
    try:
        stack.start_worker()
        stack.start_api(env=gateway_env(keys))
        yield stack
    finally:
        stack.close()


def run_cases(operation, mode: GenerationMode, base_url: str, stats: Counter) -> None:
    headers = auth("fuzz")
    session = requests.Session()
    budget = BODY_CASES if "requestBody" in operation.definition.raw else CASES

    @settings(
        max_examples=budget,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case) -> None:
        # Negative cases may break the security scheme itself (a bad Authorization):
        # then their header is sent as generated; everything else carries the valid key.
        own_auth = mode is GenerationMode.NEGATIVE and "Authorization" in (case.headers or {})
        resp = case.call(
            base_url=base_url, headers=None if own_auth else headers, session=session, timeout=30
        )
        name = f"{case.method} {case.path}"
        stats[f"{mode.value} {resp.status_code // 100}xx"] += 1
        stats["cases"] += 1
        assert resp.status_code < 500, f"{name} {mode.value}: {resp.status_code} {resp.text[:300]}"
        if mode is GenerationMode.NEGATIVE:
            assert 400 <= resp.status_code < 500, (
                f"{name}: schema-violating input accepted ({resp.status_code}): "
                f"body={case.body!r:.300} query={case.query} path={case.path_parameters}"
            )

    try:
        check()
    except Unsatisfiable:
        stats[f"{mode.value} unsatisfiable"] += 1  # nothing in this operation to violate


def test_schemathesis_no_5xx_and_bad_input_is_4xx(fuzzed: Stack) -> None:
    api = fuzzed.api
    doc = httpx.get(api.url + "/openapi.json", headers=auth("fuzz"), timeout=10).json()
    # Valid cases name the served model (any other string is a plain 404).
    model = {"type": "string", "enum": [fuzzed.model_dir.name]}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        doc["components"]["schemas"][name]["properties"]["model"] = model
    schema = schemathesis.openapi.from_dict(doc)
    stats: Counter = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run_cases(operation, mode, api.url, stats)
    print(f"schemathesis: {len(operations)} operations, {dict(sorted(stats.items()))}")
    assert stats["cases"] >= 200
    assert stats["positive 2xx"] >= 30  # valid generation requests really ran
    # The service keeps serving: same process, ready, and answers a normal request.
    assert api.alive and fuzzed.worker.alive
    assert api.get("/ready").status_code == 200
    resp = completion(api, fuzzed.model_dir.name, auth("fuzz"), max_tokens=3)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
    assert not [e for e in api.log_events() if e.get("event") == "unhandled_error"]
