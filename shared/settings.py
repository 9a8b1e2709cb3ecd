"""Process settings from env vars, overridable by CLI flags (flags win).

Each service reads one dataclass; `from_env()` covers containers, `add_*_arguments` +
`from_args` cover the command line. Flags default to None so an unset flag never hides
an env var.
"""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Self

ENV_PREFIX = "JETSERVE_"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_DATA_DIR = ".jetserve"


def _env(name: str) -> str | None:
    value = os.environ.get(ENV_PREFIX + name)
    return value if value not in (None, "") else None


def _env_parsed(name: str, default: Any, parse: Callable[[str], Any], kind: str) -> Any:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return parse(raw)
    except ValueError as e:
        raise ValueError(f"{ENV_PREFIX}{name} must be {kind}, got {raw!r}") from e


def _env_int(name: str, default: int | None) -> int | None:
    return _env_parsed(name, default, int, "an integer")


def _env_float(name: str, default: float) -> float:
    return _env_parsed(name, default, float, "a number")


def _env_bool(name: str, default: bool) -> bool:
    raw = _env(name)
    if raw is None:
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on")


def _default_worker_id() -> str:
    """Unique per process and readable in the registry: host, pid, and a random tail."""
    host = "".join(c if c.isalnum() or c in "_-" else "-" for c in socket.gethostname())[:24]
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _override(settings: Any, args: argparse.Namespace) -> Any:
    """Replace fields whose CLI flag was given (not None)."""
    names = {f.name for f in fields(settings)}
    changes = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return replace(settings, **changes)


@dataclass
class BusSettings:
    """What every service needs to reach NATS and agree on stream limits."""

    nats_url: str = DEFAULT_NATS_URL
    log_level: str = "info"
    log_json: bool = True
    events_max_age_s: float = 3600.0  # how long deltas stay replayable in LLM_EVENTS
    jobs_duplicate_window_s: float = 120.0  # Nats-Msg-Id dedup window on LLM_JOBS
    worker_ttl_s: float = 10.0  # a registry entry without heartbeat expires after this
    ack_wait_s: float = 30.0  # a job without in-progress ack is redelivered after this
    max_deliver: int = 5  # runs a job gets before it is moved to LLM_DEAD
    stream_replicas: int = 1  # 3 on a 3-node cluster, so losing a node loses no job

    @classmethod
    def _bus_from_env(cls) -> dict[str, Any]:
        return dict(
            nats_url=_env("NATS_URL") or DEFAULT_NATS_URL,
            log_level=_env("LOG_LEVEL") or "info",
            log_json=_env_bool("LOG_JSON", True),
            events_max_age_s=_env_float("EVENTS_MAX_AGE", 3600.0),
            jobs_duplicate_window_s=_env_float("JOBS_DUPLICATE_WINDOW", 120.0),
            worker_ttl_s=_env_float("WORKER_TTL", 10.0),
            ack_wait_s=_env_float("ACK_WAIT", 30.0),
            max_deliver=_env_int("MAX_DELIVER", 5) or 5,
            stream_replicas=_env_int("STREAM_REPLICAS", 1) or 1,
        )

    @classmethod
    def from_env(cls) -> Self:
        return cls(**cls._bus_from_env())

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        return _override(cls.from_env(), args)


def add_bus_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats-url", help="NATS server URL [env JETSERVE_NATS_URL]")
    parser.add_argument("--log-level", help="debug, info, warning, error [env JETSERVE_LOG_LEVEL]")
    parser.add_argument(
        "--log-json",
        type=lambda s: s.lower() in ("1", "true", "yes", "on"),
        help="1 for JSON log lines, 0 for console [env JETSERVE_LOG_JSON]",
    )


@dataclass
class ApiSettings(BusSettings):
    """The stateless API service."""

    host: str = "0.0.0.0"
    port: int = 8000
    api_keys_file: str | None = None
    # SIGTERM: new requests get 503 while open streams finish, for at most this long.
    drain_timeout_s: float = 30.0
    # A streaming client that disconnects has its job cancelled after this many seconds
    # unless it re-attaches (Last-Event-ID) in the meantime, through any replica.
    reattach_grace_s: float = 0.0

    @classmethod
    def from_env(cls) -> Self:
        return cls(
            **cls._bus_from_env(),
            host=_env("API_HOST") or "0.0.0.0",
            port=_env_int("API_PORT", 8000) or 8000,
            api_keys_file=_env("API_KEYS_FILE"),
            drain_timeout_s=_env_float("API_DRAIN_TIMEOUT", 30.0),
            reattach_grace_s=_env_float("REATTACH_GRACE", 0.0),
        )


def add_api_arguments(parser: argparse.ArgumentParser) -> None:
    add_bus_arguments(parser)
    parser.add_argument("--host", help="bind address [env JETSERVE_API_HOST]")
    parser.add_argument("--port", type=int, help="HTTP port [env JETSERVE_API_PORT]")
    parser.add_argument(
        "--drain-timeout",
        dest="drain_timeout_s",
        type=float,
        help="on SIGTERM, seconds open streams get to finish while new requests get 503 "
        "[env JETSERVE_API_DRAIN_TIMEOUT]",
    )
    parser.add_argument(
        "--reattach-grace",
        dest="reattach_grace_s",
        type=float,
        help="seconds a disconnected stream's job keeps running for a re-attach before it "
        "is cancelled (default 0) [env JETSERVE_REATTACH_GRACE]",
    )


@dataclass
class WorkerSettings(BusSettings):
    """One engine worker on one model."""

    model: str = ""  # path of the HF folder
    model_name: str = ""  # served name; the folder name when empty
    worker_id: str = field(default_factory=_default_worker_id)
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 8001
    device: str = "auto"
    dtype: str = "auto"
    kv_cache_memory: int = 512 * 1024 * 1024
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    attention_backend: str = "auto"
    heartbeat_interval_s: float = 1.0
    cancel_memory_s: float = 600.0  # how long a cancelled id is remembered for queued jobs
    drain_timeout_s: float = 5.0  # on SIGTERM, running jobs get this long to finish

    @classmethod
    def from_env(cls) -> Self:
        return cls(
            **cls._bus_from_env(),
            model=_env("MODEL") or "",
            model_name=_env("MODEL_NAME") or "",
            metrics_port=_env_int("WORKER_METRICS_PORT", 8001) or 8001,
            device=_env("DEVICE") or "auto",
            dtype=_env("DTYPE") or "auto",
            kv_cache_memory=_env_int("KV_CACHE_MEMORY", 512 * 1024 * 1024) or 512 * 1024 * 1024,
            num_kv_blocks=_env_int("NUM_KV_BLOCKS", None),
            max_num_seqs=_env_int("MAX_NUM_SEQS", 64) or 64,
            max_num_batched_tokens=_env_int("MAX_NUM_BATCHED_TOKENS", 2048) or 2048,
            max_model_len=_env_int("MAX_MODEL_LEN", None),
            attention_backend=_env("ATTENTION_BACKEND") or "auto",
            drain_timeout_s=_env_float("DRAIN_TIMEOUT", 5.0),
        )

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.model).name

    def validate(self) -> None:
        if not self.model:
            raise ValueError("a worker needs a model folder: --model PATH or JETSERVE_MODEL")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.heartbeat_interval_s <= 0 or self.heartbeat_interval_s >= self.worker_ttl_s:
            raise ValueError("heartbeat_interval_s must be > 0 and below worker_ttl_s")
        if self.ack_wait_s <= 2:
            raise ValueError("ack_wait_s must be > 2 s (in-progress acks go every ack_wait/3)")


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    add_bus_arguments(parser)
    parser.add_argument("--model", help="HF model folder [env JETSERVE_MODEL]")
    parser.add_argument("--model-name", help="served model name [env JETSERVE_MODEL_NAME]")
    parser.add_argument("--worker-id", help="registry id (default host-pid-random)")
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="/metrics and /health port, 0 for any free port [env JETSERVE_WORKER_METRICS_PORT]",
    )
    parser.add_argument("--metrics-host", help="bind address of /metrics (default 0.0.0.0)")
    parser.add_argument("--device", help="auto, cpu, cuda [env JETSERVE_DEVICE]")
    parser.add_argument("--dtype", help="auto, float32, bfloat16, float16 [env JETSERVE_DTYPE]")
    parser.add_argument(
        "--kv-cache-memory", type=int, help="KV cache bytes [env JETSERVE_KV_CACHE_MEMORY]"
    )
    parser.add_argument("--num-kv-blocks", type=int, help="KV blocks (overrides memory)")
    parser.add_argument("--max-num-seqs", type=int, help="[env JETSERVE_MAX_NUM_SEQS]")
    parser.add_argument("--max-num-batched-tokens", type=int, help="token budget per step")
    parser.add_argument("--max-model-len", type=int, help="[env JETSERVE_MAX_MODEL_LEN]")
    parser.add_argument("--attention-backend", help="[env JETSERVE_ATTENTION_BACKEND]")
    parser.add_argument("--ack-wait", dest="ack_wait_s", type=float, help="seconds (default 30)")
    parser.add_argument(
        "--max-deliver",
        type=int,
        help="runs per job before LLM_DEAD (default 5) [env JETSERVE_MAX_DELIVER]",
    )
    parser.add_argument(
        "--drain-timeout",
        dest="drain_timeout_s",
        type=float,
        help="seconds running jobs get to finish on SIGTERM before they are handed back "
        "to the queue [env JETSERVE_DRAIN_TIMEOUT]",
    )


@dataclass
class LauncherSettings(BusSettings):
    """`jetserve up`: nats-server, one worker and the API on one machine."""

    model: str = ""  # empty: build and serve the demo model
    model_name: str = ""
    host: str = "0.0.0.0"
    port: int = 8000
    nats_port: int = 4222
    metrics_port: int = 8001
    data_dir: str = DEFAULT_DATA_DIR
    demo_model_dir: str = ""  # empty: <data_dir>/models/jetserve-demo
    device: str = "auto"
    dtype: str = "auto"
    kv_cache_memory: int | None = None

    @classmethod
    def from_env(cls) -> Self:
        return cls(
            **cls._bus_from_env(),
            model=_env("MODEL") or "",
            model_name=_env("MODEL_NAME") or "",
            host=_env("API_HOST") or "0.0.0.0",
            port=_env_int("API_PORT", 8000) or 8000,
            metrics_port=_env_int("WORKER_METRICS_PORT", 8001) or 8001,
            data_dir=_env("DATA_DIR") or DEFAULT_DATA_DIR,
            demo_model_dir=_env("DEMO_MODEL_DIR") or "",
            device=_env("DEVICE") or "auto",
            dtype=_env("DTYPE") or "auto",
            kv_cache_memory=_env_int("KV_CACHE_MEMORY", None),
        )

    @property
    def resolved_demo_model_dir(self) -> Path:
        return Path(self.demo_model_dir or Path(self.data_dir) / "models" / "jetserve-demo")


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", help="[env JETSERVE_LOG_LEVEL]")
    parser.add_argument("--model", help="HF model folder (default: the demo model)")
    parser.add_argument("--model-name", help="served model name")
    parser.add_argument("--host", help="API bind address")
    parser.add_argument("--port", type=int, help="API port (default 8000)")
    parser.add_argument("--nats-port", type=int, help="embedded nats-server port (default 4222)")
    parser.add_argument("--metrics-port", type=int, help="worker /metrics port (default 8001)")
    parser.add_argument("--data-dir", help="JetStream store and demo model [env JETSERVE_DATA_DIR]")
    parser.add_argument("--device", help="[env JETSERVE_DEVICE]")
    parser.add_argument("--dtype", help="[env JETSERVE_DTYPE]")
    parser.add_argument("--kv-cache-memory", type=int, help="[env JETSERVE_KV_CACHE_MEMORY]")
