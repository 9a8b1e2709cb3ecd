"""shared/ in-process: settings (env, then flags), JSON logging, metrics registries.
Stream provisioning against a real nats-server: tests/integration/shared/test_jetstream.py."""

from __future__ import annotations

import argparse
import json
import logging

import pytest
import structlog

from shared.logging import configure_logging, get_logger
from shared.metrics import api_metrics, new_registry, render, worker_metrics
from shared.settings import ApiSettings, WorkerSettings, add_flags


def test_settings_env_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JETSERVE_NATS_URL", "nats://env:1")
    monkeypatch.setenv("JETSERVE_MODEL", "/models/tiny")
    monkeypatch.setenv("JETSERVE_MAX_NUM_SEQS", "8")
    monkeypatch.setenv("JETSERVE_LOG_JSON", "0")
    monkeypatch.setenv("JETSERVE_API_PORT", "9000")
    parser = argparse.ArgumentParser()
    add_flags(parser, WorkerSettings)
    w = WorkerSettings.from_args(parser.parse_args(["--max-num-seqs", "4"]))
    assert (w.nats_url, w.model, w.max_num_seqs, w.log_json) == (
        "nats://env:1",
        "/models/tiny",
        4,
        False,
    )
    assert w.served_name == "tiny"
    assert w.worker_id and w.worker_id != WorkerSettings().worker_id
    w.validate()
    parser = argparse.ArgumentParser()
    add_flags(parser, ApiSettings)
    a = ApiSettings.from_args(parser.parse_args(["--nats-url", "nats://flag:2"]))
    assert (a.nats_url, a.port, a.host) == ("nats://flag:2", 9000, "0.0.0.0")
    monkeypatch.setenv("JETSERVE_MAX_NUM_SEQS", "many")
    with pytest.raises(ValueError, match="JETSERVE_MAX_NUM_SEQS"):
        WorkerSettings.from_env()
    with pytest.raises(ValueError, match="--model"):
        WorkerSettings().validate()


def test_json_logs_carry_bound_job_id(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging("debug", json=True)
    structlog.contextvars.bind_contextvars(job_id="cmpl-42")
    try:
        get_logger("t").info("job_started", prompt_tokens=3)
        logging.getLogger("nats").warning("library line")
    finally:
        structlog.contextvars.clear_contextvars()
        # Put logging back: the handler writes to capsys's stream, closed after this test.
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        structlog.reset_defaults()
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert lines[0]["event"] == "job_started" and lines[0]["job_id"] == "cmpl-42"
    assert lines[0]["prompt_tokens"] == 3 and lines[0]["level"] == "info"
    assert lines[1]["event"] == "library line" and lines[1]["job_id"] == "cmpl-42"


def test_metrics_live_in_separate_registries() -> None:
    r1, r2 = new_registry(), new_registry()
    w1, w2 = worker_metrics(r1), worker_metrics(r2)
    a2 = api_metrics(new_registry())
    a2.time_to_first_token.labels(model_name="m").observe(0.02)
    w1.generation_tokens.labels(model_name="m").inc(5)
    w2.kv_cache_usage_perc.labels(model_name="m").set(0.25)
    text1, text2 = render(r1).decode(), render(r2).decode()
    assert 'jetserve:generation_tokens_total{model_name="m"} 5.0' in text1
    assert 'jetserve:kv_cache_usage_perc{model_name="m"} 0.25' in text2
    assert "generation_tokens_total{" not in text2  # r1's sample did not leak into r2
    assert "jetserve:num_requests_running" in text1 and "jetserve:num_free_kv_blocks" in text1
