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
# core: a worker sends each API replica the Deltas of one engine step it just stored for
# the jobs that replica follows live, as one message (the Job's reply_to names it).
STEPS_PREFIX = "llm.steps"
HANDOFF_PREFIX = "llm.handoff"  # core: a draining API hands a job's pending cancel to the others
KV_EVENTS_PREFIX = "llm.kv"  # core: a worker's KV block hashes stored/evicted (kv_events.py)
KV_SNAPSHOT_PREFIX = "llm.kvsnap"  # core request/reply: every hash a worker holds
ROUTED_TOKEN = "w"  # llm.jobs.<model>.w.<worker>: a job routed to one worker (docs/routing.md)

JOBS_WILDCARD = f"{JOBS_PREFIX}.>"
EVENTS_WILDCARD = f"{EVENTS_PREFIX}.>"
CANCEL_WILDCARD = f"{CANCEL_PREFIX}.*"
DEAD_WILDCARD = f"{DEAD_PREFIX}.>"
ATTACH_WILDCARD = f"{ATTACH_PREFIX}.*"
TOKENS_WILDCARD = f"{TOKENS_PREFIX}.>"
HANDOFF_WILDCARD = f"{HANDOFF_PREFIX}.*"
KV_EVENTS_WILDCARD = f"{KV_EVENTS_PREFIX}.>"
KV_SNAPSHOT_WILDCARD = f"{KV_SNAPSHOT_PREFIX}.>"
SHARED_JOBS_WILDCARD = f"{JOBS_PREFIX}.*"  # the shared queues only, no routed subject
STEPS_WILDCARD = f"{STEPS_PREFIX}.*"

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


def routed_jobs_subject(model: str, worker_id: str) -> str:
    """The subject of jobs routed to one worker; only that worker's consumer reads it."""
    return f"{JOBS_PREFIX}.{sanitize_model(model)}.{ROUTED_TOKEN}.{_token(worker_id, 'worker id')}"


def routed_jobs_wildcard(model: str) -> str:
    return f"{JOBS_PREFIX}.{sanitize_model(model)}.{ROUTED_TOKEN}.*"


def routed_consumer_name(model: str, worker_id: str) -> str:
    return f"routed-{sanitize_model(model)}-{_token(worker_id, 'worker id')}"


def worker_of_routed_subject(subject: str) -> str:
    """The worker id, last token of `llm.jobs.<model>.w.<worker>`."""
    return subject.rsplit(".", 1)[-1]


def kv_events_subject(model: str, worker_id: str) -> str:
    return f"{KV_EVENTS_PREFIX}.{sanitize_model(model)}.{_token(worker_id, 'worker id')}"


def kv_snapshot_subject(model: str, worker_id: str) -> str:
    return f"{KV_SNAPSHOT_PREFIX}.{sanitize_model(model)}.{_token(worker_id, 'worker id')}"


def events_subject(job_id: str) -> str:
    return f"{EVENTS_PREFIX}.{_token(job_id, 'job id')}"


def tokens_subject(job_id: str) -> str:
    return f"{TOKENS_PREFIX}.{_token(job_id, 'job id')}"


def steps_subject(replica_id: str) -> str:
    return f"{STEPS_PREFIX}.{_token(replica_id, 'replica id')}"


def is_steps_subject(subject: str) -> bool:
    """Whether a Job's reply_to is an API replica's step subject (else nobody follows it
    live: the jobs API, an older API that reads the re-published Deltas)."""
    prefix, dot, replica = subject.rpartition(".")
    return prefix == STEPS_PREFIX and dot == "." and not _UNSAFE.search(replica) and bool(replica)


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
