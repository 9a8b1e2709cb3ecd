"""One engine worker on one model (`jetserve worker`): the bus, the engine, and its own."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import ClassVar

from shared.settings.bus import BusSettings
from shared.settings.engine import EngineSettings
from shared.settings.fields import SettingsError, setting

DEFAULT_METRICS_PORT = 8001


def default_worker_id() -> str:
    """Unique per process and readable in the registry: host, pid, and a random tail."""
    host = "".join(c if c.isalnum() or c in "_-" else "-" for c in socket.gethostname())[:24]
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class WorkerSettings(EngineSettings, BusSettings):
    section: ClassVar[str] = "worker"

    model: str = setting(
        "",
        help="Hugging Face model folder to serve, or the name of a model pushed to NATS "
        "(`jetserve models push`), fetched into --model-cache when not there yet",
        shown_default="none, one is required",
    )
    model_name: str = setting(
        "", help="name clients use for the model; empty: the folder's (or stored model's) name"
    )
    model_revision: str = setting(
        "",
        help="with a Hugging Face hub id as --model: the branch, tag or commit to download "
        "(empty: main); the token comes from HF_TOKEN",
    )
    model_cache: str = setting(
        "~/.cache/jetserve/models",
        help="where models fetched from NATS are kept, verified, between worker starts",
    )
    worker_id: str = setting(
        default_factory=default_worker_id,
        help="this worker's id in the registry",
        shown_default="host-pid-random",
    )
    metrics_host: str = setting(
        "0.0.0.0", env="WORKER_METRICS_HOST", help="bind address of /metrics and /health"
    )
    metrics_port: int = setting(
        DEFAULT_METRICS_PORT,
        ge=0,
        le=65535,
        env="WORKER_METRICS_PORT",
        help="port of /metrics and /health; 0 takes any free port. Left at the default, a "
        "busy port falls back to a free one (several workers on one host); set, a busy "
        "port is an error",
    )
    heartbeat_interval_s: float = setting(
        1.0, gt=0, help="registry heartbeat period; must stay below --worker-ttl"
    )
    cancel_memory_s: float = setting(
        600.0, gt=0, help="how long a cancelled job id is remembered, for jobs still queued"
    )
    engine_process: bool = setting(
        False,
        help="run the engine (model, scheduler, KV cache) in a child process of the worker, "
        "so its Python work and the worker's NATS work do not share one GIL; it sends each "
        "engine step's outputs as one message. Off: the engine runs in a thread of the "
        "worker (docs/token_plane.md has both measured)",
    )
    engine_threads: int | None = setting(
        None,
        ge=1,
        help="torch threads of the engine; unset: torch's default (OMP_NUM_THREADS, else "
        "the machine's cores). With --engine-process the worker process itself runs no torch",
        shown_default="torch's default",
    )
    stream_interval: int = setting(
        1,
        ge=1,
        le=64,
        help="tokens a job's stream carries per Delta: 1 sends every token as the engine "
        "makes it; N holds a job's tokens until a completion has N unsent ones (the first "
        "and the last go at once), so the worker, NATS and the API handle N times fewer "
        "messages at GPU rates, for output that arrives in bursts of N (vLLM's "
        "--stream-interval; docs/token_plane.md)",
    )
    drain_timeout_s: float = setting(
        5.0,
        ge=0,
        help="on SIGTERM, running jobs get this long to finish before they are handed back "
        "to the queue",
    )

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.model).name

    def validate(self) -> None:  # type: ignore[override]
        """What a running worker needs beyond each field's own bounds."""
        if not self.model:
            raise SettingsError("a worker needs a model folder: --model PATH or JETSERVE_MODEL")
        if self.heartbeat_interval_s >= self.worker_ttl_s:
            raise SettingsError(
                f"--heartbeat-interval ({self.heartbeat_interval_s:g}) must be below "
                f"--worker-ttl ({self.worker_ttl_s:g})"
            )
        if self.ack_wait_s <= 2:
            raise SettingsError(
                f"--ack-wait / JETSERVE_ACK_WAIT must be > 2 s (in-progress acks go every "
                f"ack_wait/3), got {self.ack_wait_s:g}"
            )
