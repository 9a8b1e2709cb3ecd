"""Usage metering for cost attribution: per API key and per request tag.

Each finished generation request (served locally or by the fallback) yields one
`UsageRecord`: tokens (prompt, completion, cached), queue seconds and GPU seconds as the
workers reported them. It goes to the per-key counters and to one structured log line
(`event=usage`), the line a billing pipeline filters on. The tag is the `X-Feature`
header, else the request's `user`; tag values are bounded in number per process so a
client cannot blow up the metrics' cardinality (the log line keeps the exact value).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import structlog

from services.api.gateway.metrics import GatewayMetrics

log = structlog.get_logger("jetserve.api.usage")

MAX_TAG_CHARS = 64
MAX_DISTINCT_TAGS = 200
_TAG_OK = re.compile(r"[^A-Za-z0-9_.:/-]")
ANONYMOUS = "anonymous"


def clean_tag(raw: str | None) -> str | None:
    if raw is None:
        return None
    tag = _TAG_OK.sub("_", raw.strip())[:MAX_TAG_CHARS]
    return tag or None


@dataclass
class UsageRecord:
    request_id: str
    model: str
    key_id: str
    key_name: str
    feature: str | None
    user: str | None
    route: str  # local | fallback
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    queue_time_s: float = 0.0
    gpu_time_s: float = 0.0
    fallback_reason: str | None = None

    @property
    def tag(self) -> str | None:
        # Only the caller's own X-Feature: an end-user id never becomes a metric label.
        return self.feature


@dataclass
class UsageMeter:
    metrics: GatewayMetrics
    _tags: set[str] = field(default_factory=set)

    def tag_label(self, tag: str | None) -> str:
        tag = clean_tag(tag)
        if tag is None:
            return ""
        if tag in self._tags:
            return tag
        if len(self._tags) >= MAX_DISTINCT_TAGS:
            return "other"
        self._tags.add(tag)
        return tag

    def record(self, usage: UsageRecord) -> None:
        m = self.metrics
        labels = (usage.key_id, self.tag_label(usage.tag))
        m.usage_requests.labels(*labels, usage.route).inc()
        m.usage_prompt_tokens.labels(*labels).inc(usage.prompt_tokens)
        m.usage_completion_tokens.labels(*labels).inc(usage.completion_tokens)
        m.usage_cached_tokens.labels(*labels).inc(usage.cached_tokens)
        m.usage_queue_time.labels(*labels).inc(max(0.0, usage.queue_time_s))
        m.usage_gpu_time.labels(*labels).inc(max(0.0, usage.gpu_time_s))
        fields = asdict(usage)
        fields["queue_time_s"] = round(usage.queue_time_s, 6)
        fields["gpu_time_s"] = round(usage.gpu_time_s, 6)
        log.info("usage", **fields)
