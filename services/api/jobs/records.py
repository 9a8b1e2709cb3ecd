"""What the jobs API remembers about a job: the request, so any replica can render it.

A Job on the bus carries token ids and sampling only; stop strings, the endpoint's
output format and logprob options live in the API. The jobs API stores the validated
request body per job id in a KV bucket whose TTL outlasts the job (queue age + deadline
+ event retention), so `GET /v1/jobs/{id}` and its event stream work on every replica
for as long as the job can run and its Deltas exist.

Every job a client could come back to (a single-prompt OpenAI request, a jobs-API job)
has a record naming its owner, the id of the key that submitted it: every job route and
every re-attach checks it (services/api/jobs/ownership.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from nats.js.errors import InvalidKeyError, KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

ENDPOINTS = ("completions", "chat.completions")


@dataclass
class JobRecord:
    id: str
    model: str
    endpoint: str  # one of ENDPOINTS
    created_at: float  # unix seconds
    body: dict[str, Any] = field(default_factory=dict)  # the request as the client sent it
    jobs_seq: int = 0  # its message in LLM_JOBS (0 until published)
    prompt_tokens: int = 0
    owner: str = ""  # id of the API key that submitted it ("anonymous" with auth off)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> JobRecord:
        m = json.loads(data)
        return cls(
            id=str(m["id"]),
            model=str(m["model"]),
            endpoint=str(m["endpoint"]),
            created_at=float(m["created_at"]),
            body=dict(m.get("body") or {}),
            jobs_seq=int(m.get("jobs_seq") or 0),
            prompt_tokens=int(m.get("prompt_tokens") or 0),
            owner=str(m.get("owner") or ""),
        )


async def put_record(kv: KeyValue, record: JobRecord) -> None:
    await kv.put(record.id, record.encode())


async def get_record(kv: KeyValue, job_id: str) -> JobRecord | None:
    try:
        entry = await kv.get(job_id)
    except (KeyNotFoundError, NotFoundError, InvalidKeyError):
        return None  # an id that cannot be a KV key was never a job: 404, not a 500
    if not entry.value:
        return None
    try:
        return JobRecord.decode(entry.value)
    except (ValueError, KeyError, TypeError):
        return None
