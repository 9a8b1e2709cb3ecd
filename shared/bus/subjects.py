"""NATS subject, stream, consumer and bucket names: one place so both services agree."""

from __future__ import annotations

import re

JOBS_STREAM = "LLM_JOBS"
EVENTS_STREAM = "LLM_EVENTS"
DEAD_STREAM = "LLM_DEAD"
WORKERS_BUCKET = "llm_workers"
JOB_RECORDS_BUCKET = "llm_job_records"  # the jobs API's request per job id (any replica reads it)
MODELS_OBJECT_STORE = "llm_models"
CHECKPOINTS_OBJECT_STORE = "llm_checkpoints"  # whole model folders (`jetserve models push`)
API_KEYS_BUCKET = "llm_api_keys"  # the gateway's keys (services/api/gateway/key_store.py)
RATE_LIMITS_BUCKET = "llm_rate_limits"  # the gateway's shared token buckets

JOBS_PREFIX = "llm.jobs"
EVENTS_PREFIX = "llm.events"
CANCEL_PREFIX = "llm.cancel"
DEAD_PREFIX = "llm.dead"
ATTACH_PREFIX = "llm.attach"  # core: a client re-attached to a job; pending cancels are dropped
# core: LLM_EVENTS re-publishes each stored Delta here, so the API that asked for a job
# follows it with a plain subscription instead of a JetStream consumer per request.
TOKENS_PREFIX = "llm.tokens"
HANDOFF_PREFIX = "llm.handoff"  # core: a draining API hands a job's pending cancel to the others

JOBS_WILDCARD = f"{JOBS_PREFIX}.>"
EVENTS_WILDCARD = f"{EVENTS_PREFIX}.>"
CANCEL_WILDCARD = f"{CANCEL_PREFIX}.*"
DEAD_WILDCARD = f"{DEAD_PREFIX}.>"
ATTACH_WILDCARD = f"{ATTACH_PREFIX}.*"
TOKENS_WILDCARD = f"{TOKENS_PREFIX}.>"
HANDOFF_WILDCARD = f"{HANDOFF_PREFIX}.*"

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sanitize_model(name: str) -> str:
    """Map a served model name to one subject token: '.', '*', '>' and spaces would split or
    wildcard a subject, so everything outside [A-Za-z0-9_-] becomes '_'."""
    if not name:
        raise ValueError("model name must not be empty")
    return _UNSAFE.sub("_", name)


def _token(value: str, what: str) -> str:
    if not value or _UNSAFE.search(value):
        raise ValueError(f"{what} {value!r} must be non-empty and only contain [A-Za-z0-9_-]")
    return value


def jobs_subject(model: str) -> str:
    return f"{JOBS_PREFIX}.{sanitize_model(model)}"


def consumer_name(model: str) -> str:
    return f"workers-{sanitize_model(model)}"


def events_subject(job_id: str) -> str:
    return f"{EVENTS_PREFIX}.{_token(job_id, 'job id')}"


def tokens_subject(job_id: str) -> str:
    return f"{TOKENS_PREFIX}.{_token(job_id, 'job id')}"


def cancel_subject(job_id: str) -> str:
    return f"{CANCEL_PREFIX}.{_token(job_id, 'job id')}"


def attach_subject(job_id: str) -> str:
    return f"{ATTACH_PREFIX}.{_token(job_id, 'job id')}"


def handoff_subject(job_id: str) -> str:
    return f"{HANDOFF_PREFIX}.{_token(job_id, 'job id')}"


def dead_subject(model: str) -> str:
    return f"{DEAD_PREFIX}.{sanitize_model(model)}"


def job_id_from_subject(subject: str) -> str:
    """The last token of `llm.events.<id>` or `llm.cancel.<id>`."""
    return subject.rsplit(".", 1)[-1]


def worker_key(model: str, worker_id: str) -> str:
    """KV key in WORKERS_BUCKET; KV keys allow '.', so `<model>.<worker>` groups by model."""
    return f"{sanitize_model(model)}.{_token(worker_id, 'worker id')}"


def model_object_name(model: str, filename: str) -> str:
    """Object-store name of a tokenizer file, e.g. `tiny/tokenizer.json`."""
    return f"{sanitize_model(model)}/{filename}"
