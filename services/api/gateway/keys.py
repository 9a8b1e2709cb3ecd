"""API key records: how a key, its limits and its priority class are stored.

A key's secret is never stored: the KV bucket `llm_api_keys` holds, under the SHA-256 hex
of the secret, a JSON record with the key's id, name, limits, priority class and revoked
flag. A plain SHA-256 is enough because secrets are 32 random bytes (256 bits of
entropy): nobody can search that space, so the work factor of a password hash (bcrypt,
argon2), which exists to protect low-entropy human passwords, would buy nothing and cost
latency on every request.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from shared.bus.subjects import API_KEYS_BUCKET

KEYS_BUCKET = API_KEYS_BUCKET
SECRET_PREFIX = "sk-js-"
# Lower runs first in the engine scheduler (Job.priority). A key's class is the floor of
# the priority its requests get; a request may only ask for less urgency than that.
PRIORITY_CLASSES = {"interactive": 0, "batch": 100}
MAX_LIMIT = 10**12


class KeyRecordError(ValueError):
    """A key record or a seed entry that does not validate."""


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_key_id() -> str:
    return "key_" + secrets.token_hex(6)


@dataclass(frozen=True)
class KeyLimits:
    """Per-key limits; None means unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # prompt + completion tokens
    max_tokens: int | None = None  # cap on a request's completion tokens
    max_prompt_tokens: int | None = None
    max_concurrent: int | None = None  # open requests (streams included) per API replica

    @classmethod
    def from_dict(cls, data: Any) -> KeyLimits:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise KeyRecordError("limits must be an object")
        names = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - names
        if unknown:
            raise KeyRecordError(f"unknown limits: {sorted(unknown)}")
        values = {}
        for name, value in data.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
                raise KeyRecordError(f"limit {name} must be a positive integer, got {value!r}")
            values[name] = value
        return cls(**values)


@dataclass(frozen=True)
class ApiKeyRecord:
    id: str
    name: str
    secret_sha256: str
    limits: KeyLimits = field(default_factory=KeyLimits)
    priority_class: str = "interactive"
    revoked: bool = False
    created_at: float = 0.0
    revoked_at: float | None = None
    # Operator scope: sees and cancels every key's jobs (GET/DELETE /v1/jobs, re-attach).
    operator: bool = False

    @property
    def priority_floor(self) -> int:
        return PRIORITY_CLASSES[self.priority_class]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ApiKeyRecord:
        try:
            obj = json.loads(data)
        except ValueError as e:
            raise KeyRecordError(f"not JSON: {e}") from e
        if not isinstance(obj, dict):
            raise KeyRecordError("a key record must be an object")
        try:
            record = cls(
                id=_str(obj, "id"),
                name=_str(obj, "name"),
                secret_sha256=_str(obj, "secret_sha256"),
                limits=KeyLimits.from_dict(obj.get("limits")),
                priority_class=_str(obj, "priority_class", "interactive"),
                revoked=bool(obj.get("revoked", False)),
                created_at=float(obj.get("created_at") or 0.0),
                revoked_at=None if obj.get("revoked_at") is None else float(obj["revoked_at"]),
                operator=obj.get("operator", False) is True,
            )
        except (TypeError, ValueError) as e:
            raise KeyRecordError(str(e)) from e
        return record.validated()

    def validated(self) -> ApiKeyRecord:
        if self.priority_class not in PRIORITY_CLASSES:
            raise KeyRecordError(
                f"priority_class must be one of {sorted(PRIORITY_CLASSES)}, "
                f"got {self.priority_class!r}"
            )
        if len(self.secret_sha256) != 64 or any(
            c not in "0123456789abcdef" for c in self.secret_sha256
        ):
            raise KeyRecordError("secret_sha256 must be 64 lowercase hex digits")
        if not self.id:
            raise KeyRecordError("a key needs an id")
        return self

    def revoke(self) -> ApiKeyRecord:
        return replace(self, revoked=True, revoked_at=time.time())


def _str(obj: dict, name: str, default: str | None = None) -> str:
    value = obj.get(name, default)
    if not isinstance(value, str):
        raise KeyRecordError(f"{name} must be a string")
    return value


def new_record(
    name: str, limits: KeyLimits, priority_class: str = "interactive", operator: bool = False
) -> tuple[str, ApiKeyRecord]:
    """A fresh secret (shown once) and the record that stores only its hash."""
    secret = new_secret()
    record = ApiKeyRecord(
        id=new_key_id(),
        name=name,
        secret_sha256=hash_secret(secret),
        limits=limits,
        priority_class=priority_class,
        created_at=time.time(),
        operator=operator,
    )
    return secret, record.validated()


def seed_record(entry: Any, index: int) -> ApiKeyRecord:
    """A key from the keys file or env: {key | sha256, name?, id?, limits?, priority_class?}.

    A plaintext `key` is hashed here and forgotten; `sha256` lets a file hold no secret at
    all. Seeded ids derive from the hash so every API replica seeds the same record.
    """
    if isinstance(entry, str):
        entry = {"key": entry}
    if not isinstance(entry, dict):
        raise KeyRecordError(f"key entry {index} must be a string or an object")
    allowed = {"key", "sha256", "name", "id", "limits", "priority_class", "operator"}
    unknown = set(entry) - allowed
    if unknown:
        raise KeyRecordError(f"key entry {index}: unknown fields {sorted(unknown)}")
    if "key" in entry:
        secret = entry["key"]
        if not isinstance(secret, str) or len(secret) < 16:
            raise KeyRecordError(f"key entry {index}: key must be a string of >= 16 characters")
        digest = hash_secret(secret)
    elif isinstance(entry.get("sha256"), str):
        digest = entry["sha256"].lower()
    else:
        raise KeyRecordError(f"key entry {index} needs `key` or `sha256`")
    record = ApiKeyRecord(
        id=str(entry.get("id") or "key_" + digest[:12]),
        name=str(entry.get("name") or f"seed-{index}"),
        secret_sha256=digest,
        limits=KeyLimits.from_dict(entry.get("limits")),
        priority_class=str(entry.get("priority_class", "interactive")),
        created_at=time.time(),
        operator=entry.get("operator", False) is True,
    )
    return record.validated()


def parse_keys_file(path: str | Path) -> list[ApiKeyRecord]:
    """JSON or YAML (a list, or {keys: [...]})."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise KeyRecordError(f"{path} is neither JSON nor YAML: {e}") from None
    if isinstance(data, dict):
        data = data.get("keys")
    if not isinstance(data, list):
        raise KeyRecordError(f"{path}: expected a list of keys")
    return [seed_record(entry, i) for i, entry in enumerate(data)]


def parse_keys_env(raw: str) -> list[ApiKeyRecord]:
    """`secret1,secret2` or `name=secret,...`."""
    records = []
    for i, part in enumerate(p.strip() for p in raw.split(",")):
        if not part:
            continue
        name, sep, secret = part.partition("=")
        entry = {"key": secret, "name": name} if sep else {"key": part, "name": f"env-{i}"}
        records.append(seed_record(entry, i))
    return records
