"""What every service needs: logging, and how to reach NATS and agree on stream limits."""

from __future__ import annotations

from typing import ClassVar, Literal

from shared.settings.fields import Settings, setting

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


class LogSettings(Settings):
    section: ClassVar[str] = "logging"

    log_level: Literal["debug", "info", "warning", "error", "critical"] = setting(
        "info", help="least severe log level written to stderr"
    )
    log_json: bool | None = setting(
        None,
        shown_default="auto",
        help="one JSON object per log line; unset: readable console lines when stderr is a "
        "terminal, JSON otherwise (pipes, files, containers)",
    )


class BusSettings(LogSettings):
    """NATS and the JetStream limits every service must agree on."""

    section: ClassVar[str] = "NATS and streams"

    nats_url: str = setting(DEFAULT_NATS_URL, help="NATS server URL")
    nats_user: str | None = setting(
        None, help="NATS identity (api, worker, operator; docs/security.md)"
    )
    nats_password: str | None = setting(
        None, flag=None, help="NATS password; env only, so it shows in no process list"
    )
    nats_password_file: str | None = setting(
        None, help="file holding the NATS password (a Docker or Kubernetes secret)"
    )
    nats_tls_ca: str | None = setting(
        None, help="CA file that signed the NATS server's certificate (turns TLS on)"
    )
    nats_tls_cert: str | None = setting(
        None, help="client certificate, when the NATS server asks for one"
    )
    nats_tls_key: str | None = setting(None, help="key of the client certificate")
    nats_connect_timeout_s: float = setting(
        60.0,
        gt=0,
        help="at start, how long to wait for NATS to answer before exiting with an error",
    )
    events_max_age_s: float = setting(
        3600.0, gt=0, help="how long a job's deltas stay replayable in LLM_EVENTS (re-attach)"
    )
    jobs_duplicate_window_s: float = setting(
        120.0, gt=0, help="Nats-Msg-Id de-duplication window of LLM_JOBS (a re-sent job is dropped)"
    )
    worker_ttl_s: float = setting(
        10.0, gt=0, help="a worker's registry entry expires this long after its last heartbeat"
    )
    ack_wait_s: float = setting(
        30.0,
        gt=0,
        help="a job whose worker sends no in-progress ack for this long is redelivered "
        "(workers ack every third of it; a worker needs more than 2 s)",
    )
    route_fallback_s: float = setting(
        1.0,
        gt=0,
        le=60,
        help="a job routed to one worker (--routing prefix) that it has not pulled after this "
        "long moves to the model's shared queue (workers check twice per period)",
    )
    max_deliver: int = setting(
        5,
        ge=0,
        help="a job delivered more often than this (each worker crash costs one) goes to LLM_DEAD",
    )
    stream_replicas: int = setting(
        1, ge=1, le=5, help="replicas of each stream and bucket (3 on a 3-node NATS cluster)"
    )
    # The jobs queue is bounded: a full queue answers 429 + Retry-After instead of growing
    # without end (jobs per model; bytes for all models; each job at most max_payload).
    queue_max_jobs: int = setting(
        10_000, ge=1, help="jobs LLM_JOBS holds per model; a submit beyond it gets a 429"
    )
    queue_max_bytes: int = setting(
        1024**3, ge=1, help="bytes LLM_JOBS holds, all models together; beyond it a 429"
    )
    queue_max_age_s: float = setting(
        3600.0,
        ge=0,
        help="a job no worker pulled for this long leaves the queue (its status: expired); 0: "
        "no limit",
    )
    job_deadline_s: float = setting(
        3600.0,
        ge=0,
        help="every job's deadline, from its submission (queue time included): the worker "
        "aborts it past this; 0: none",
    )

    @property
    def job_records_ttl_s(self) -> float:
        """A job's record outlives the job: it may wait in the queue or run until its
        deadline, then its Deltas stay readable for the event retention."""
        longest_job = max(self.job_deadline_s, self.queue_max_age_s)
        return longest_job + self.events_max_age_s
