"""A worker started with --speculative-method serves the same greedy text through the
OpenAI API, honours the per-request opt-out, and counts its drafts on /metrics."""

from __future__ import annotations

import re

import httpx

from tests.support.stack import Stack

PROMPT = [0, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_worker_speculates_and_honours_the_opt_out(bus_stack: Stack) -> None:
    worker = bus_stack.start_worker("--speculative-method", "ngram", "--num-kv-blocks", "256")
    api = bus_stack.start_api()
    model = httpx.get(f"{api.url}/v1/models").json()["data"][0]["id"]
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": 24,
        "temperature": 0,
        "ignore_eos": True,
    }
    texts = []
    for extra in ({}, {"speculative_decoding": False}):
        r = httpx.post(f"{api.url}/v1/completions", json={**body, **extra}, timeout=120)
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
        metrics = httpx.get(f"{worker.url}/metrics").text
        drafts = _metric(metrics, "jetserve:spec_decode_num_drafts_total")
        if not extra:
            assert drafts > 0  # the repeated prompt gives prompt lookup matches
            after_first = drafts
        else:
            assert drafts == after_first  # the opted-out request never speculated
    assert texts[0] == texts[1]
    accepted = _metric(metrics, "jetserve:spec_decode_num_accepted_tokens_total")
    proposed = _metric(metrics, "jetserve:spec_decode_num_draft_tokens_total")
    assert 0 <= accepted <= proposed and proposed > 0
    bad = httpx.post(
        f"{api.url}/v1/completions", json={**body, "speculative_decoding": "maybe"}, timeout=30
    )
    assert bad.status_code == 400
