"""NATS identities with least-privilege permissions, and the server config that holds them.

Three identities, each allowed only the subjects, streams and buckets its work needs
(docs/security.md has the table):

- `api`: queues jobs, reads their Deltas, cancels; reads the worker registry and the
  tokenizers; owns API keys, rate limits and job records. It cannot write the registry
  (no impersonating a worker), pull jobs or ack them.
- `worker`: pulls and acks jobs, writes Deltas and dead letters, its registry entry and
  tokenizers. It cannot read or write API keys, job records or rate limits.
- `operator`: the CLIs (`jetserve keys`, `jetserve dead`, `jetserve models`): everything.

No identity for monitoring: what scrapes NATS (prometheus-nats-exporter, KEDA's scaler)
reads nats-server's HTTP monitoring port, which takes no NATS identity; it is kept off
the host and, in Kubernetes, behind a NetworkPolicy (docs/security.md).

Every identity gets its own reply-inbox prefix (`_INBOX.<user>.>`), so no client can
read the replies to another identity's requests. Users live in the global account, where
JetStream is enabled. Passwords are random 32-byte secrets; the file holding them is the
secret (mode 0600, a Docker or Kubernetes secret).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from shared.bus.subjects import (
    API_KEYS_BUCKET,
    ATTACH_WILDCARD,
    CANCEL_WILDCARD,
    CHECKPOINTS_OBJECT_STORE,
    DEAD_STREAM,
    DEAD_WILDCARD,
    EVENTS_STREAM,
    EVENTS_WILDCARD,
    HANDOFF_WILDCARD,
    JOB_RECORDS_BUCKET,
    JOBS_STREAM,
    JOBS_WILDCARD,
    KV_EVENTS_WILDCARD,
    KV_SNAPSHOT_WILDCARD,
    MODELS_OBJECT_STORE,
    RATE_LIMITS_BUCKET,
    SHARED_JOBS_WILDCARD,
    STEPS_WILDCARD,
    TOKENS_WILDCARD,
    WORKERS_BUCKET,
)

KEYS_BUCKET, RATE_BUCKET = API_KEYS_BUCKET, RATE_LIMITS_BUCKET

ROLES = ("api", "worker", "operator")
JS = "$JS.API"


def inbox_prefix(user: str) -> str:
    return f"_INBOX.{user}"


def _kv(bucket: str) -> str:
    return f"KV_{bucket}"


def _obj(store: str) -> str:
    return f"OBJ_{store}"


def _manage(streams: list[str]) -> list[str]:
    """Create (idempotently at start-up), update and inspect these streams."""
    return [f"{JS}.STREAM.{op}.{s}" for s in streams for op in ("CREATE", "UPDATE")]


def _read(streams: list[str]) -> list[str]:
    """Read messages: by sequence/subject (direct or not) and with ordered consumers."""
    out = []
    for s in streams:
        out += [f"{JS}.STREAM.MSG.GET.{s}", f"{JS}.DIRECT.GET.{s}", f"{JS}.DIRECT.GET.{s}.>"]
        out += [f"{JS}.CONSUMER.CREATE.{s}", f"{JS}.CONSUMER.CREATE.{s}.>"]
        out += [f"{JS}.CONSUMER.DELETE.{s}.>", f"{JS}.CONSUMER.INFO.{s}.>"]
    return out


def _kv_write(bucket: str) -> list[str]:
    return [f"$KV.{bucket}.>"]


COMMON_PUBLISH = [f"{JS}.INFO", f"{JS}.STREAM.INFO.*", f"{JS}.STREAM.NAMES", "$JS.FC.>"]


def permissions(role: str, user: str | None = None) -> dict:
    """nats-server `permissions` block of one identity."""
    user = user or role
    inbox = [f"{inbox_prefix(user)}.>"]
    if role == "operator":
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    shared_streams = [
        JOBS_STREAM, EVENTS_STREAM, DEAD_STREAM, _kv(WORKERS_BUCKET), _kv(JOB_RECORDS_BUCKET),
        _obj(MODELS_OBJECT_STORE),
    ]  # fmt: skip
    checkpoints = _obj(CHECKPOINTS_OBJECT_STORE)  # model folders (`jetserve models push`)
    if role == "api":
        own = [_kv(KEYS_BUCKET), _kv(RATE_BUCKET)]
        publish = [
            *COMMON_PUBLISH,
            JOBS_WILDCARD,
            EVENTS_WILDCARD,  # DELETE of a queued job closes its log with an abort Delta
            CANCEL_WILDCARD,
            ATTACH_WILDCARD,
            HANDOFF_WILDCARD,
            KV_SNAPSHOT_WILDCARD,  # prefix routing: ask a worker for its KV block hashes
            *_manage(shared_streams + own),
            *_read([EVENTS_STREAM, _kv(WORKERS_BUCKET), _obj(MODELS_OBJECT_STORE)]),
            *_read([_kv(JOB_RECORDS_BUCKET), *own, checkpoints]),
            *_manage([checkpoints]),
            f"$O.{CHECKPOINTS_OBJECT_STORE}.>",  # Ollama's /api/delete of a stored model
            f"{JS}.STREAM.PURGE.{checkpoints}",
            f"{JS}.STREAM.MSG.DELETE.{JOBS_STREAM}",  # cancel a queued job
            f"{JS}.CONSUMER.INFO.{JOBS_STREAM}.>",  # queue depth
            f"{JS}.STREAM.MSG.GET.{JOBS_STREAM}",  # age of the queue's head (fallback)
            *_kv_write(JOB_RECORDS_BUCKET),
            *_kv_write(KEYS_BUCKET),  # keys seeded from JETSERVE_API_KEYS(_FILE)
            *_kv_write(RATE_BUCKET),
        ]
        # llm.tokens.<job>: the Deltas LLM_EVENTS re-publishes to the API that asked;
        # llm.steps.<replica>: a worker's stored Deltas of a step, for this replica's jobs.
        subscribe = [*inbox, ATTACH_WILDCARD, HANDOFF_WILDCARD, TOKENS_WILDCARD, STEPS_WILDCARD]
        subscribe.append(KV_EVENTS_WILDCARD)  # prefix routing: workers' KV block events
        return {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}
    if role == "worker":
        publish = [
            *COMMON_PUBLISH,
            EVENTS_WILDCARD,
            DEAD_WILDCARD,
            KV_EVENTS_WILDCARD,  # the KV blocks it holds, for prefix routing
            # A routed job its worker did not run moves to the model's shared queue
            # (`llm.jobs.<model>` only: no worker can route jobs to another).
            SHARED_JOBS_WILDCARD,
            STEPS_WILDCARD,  # each step's stored Deltas to the API replicas that follow them
            *_manage(shared_streams),
            f"{JS}.CONSUMER.CREATE.{JOBS_STREAM}.>",
            f"{JS}.CONSUMER.DURABLE.CREATE.{JOBS_STREAM}.>",
            f"{JS}.CONSUMER.INFO.{JOBS_STREAM}.>",
            f"{JS}.CONSUMER.MSG.NEXT.{JOBS_STREAM}.>",
            f"$JS.ACK.{JOBS_STREAM}.>",
            f"{JS}.STREAM.MSG.GET.{JOBS_STREAM}",
            f"{JS}.STREAM.MSG.DELETE.{JOBS_STREAM}",  # the janitor's dead-letter move
            *_read([EVENTS_STREAM, DEAD_STREAM, _kv(WORKERS_BUCKET), _obj(MODELS_OBJECT_STORE)]),
            *_read([checkpoints]),  # a model pushed to NATS, fetched by the worker
            *_manage([checkpoints]),
            *_kv_write(WORKERS_BUCKET),
            f"$O.{MODELS_OBJECT_STORE}.>",
            f"{JS}.STREAM.PURGE.{_obj(MODELS_OBJECT_STORE)}",  # replacing a tokenizer file
        ]
        subscribe = [
            *inbox,
            CANCEL_WILDCARD,
            f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{JOBS_STREAM}.>",
            KV_SNAPSHOT_WILDCARD,  # snapshot requests, answered to the asker's inbox
        ]
        return {
            "publish": {"allow": publish},
            "subscribe": {"allow": subscribe},
            # Replies to requests it received (KV snapshots), and nothing else of others'.
            "allow_responses": {"max": 256, "expires": "10s"},
        }
    raise ValueError(f"unknown NATS role {role!r}; one of {ROLES}")


def new_password() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a server: its certificate and key, and the CA that signs its peers."""

    cert: str
    key: str
    ca: str


def authorization_block(passwords: dict[str, str]) -> str:
    """The `authorization { users = [...] }` block (JSON values are valid NATS config)."""
    users = [
        {"user": role, "password": password, "permissions": permissions(role)}
        for role, password in passwords.items()
    ]
    return "authorization {\n  users = " + json.dumps(users, indent=2) + "\n}\n"


def tls_block(tls: TlsFiles) -> str:
    """Client connections: TLS required; clients verify the server against the CA."""
    body = {"cert_file": tls.cert, "key_file": tls.key, "ca_file": tls.ca, "timeout": 5}
    return "tls " + json.dumps(body) + "\n"


def cluster_tls_block(tls: TlsFiles) -> str:
    """Routes (included inside `cluster {}`): mutual TLS, a peer without a certificate of
    the same CA cannot join the cluster."""
    body = {"cert_file": tls.cert, "key_file": tls.key, "ca_file": tls.ca, "verify": True}
    return "tls " + json.dumps(body) + "\n"


def write_credentials(
    directory: Path, roles: tuple[str, ...] = ROLES, password_mode: int = 0o600
) -> dict[str, str]:
    """Random passwords, one file per identity (`<role>.password`), plus `auth.conf`, the
    block nats-server includes (mode 0600); existing passwords are kept. The directory is
    0700: it keeps the files private on the host even where `password_mode` lets a
    container's user (another uid) read its bind-mounted password."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    passwords = {}
    for role in roles:
        path = directory / f"{role}.password"
        if path.exists():
            passwords[role] = path.read_text().strip()
        else:
            passwords[role] = new_password()
            _write_secret(path, passwords[role] + "\n", password_mode)
        path.chmod(password_mode)
    _write_secret(directory / "auth.conf", authorization_block(passwords))
    return passwords


def _write_secret(path: Path, text: str, mode: int = 0o600) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text)
    path.chmod(mode)
