"""Prometheus metrics of both services, named like vLLM's where they mean the same.

Each process (and each test instance) builds its own CollectorRegistry through these
helpers, never the global default one, so several services can live in one process.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

PREFIX = "jetserve:"
CONTENT_TYPE = CONTENT_TYPE_LATEST

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TPOT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)
E2E_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
)


def new_registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition for GET /metrics (serve with CONTENT_TYPE)."""
    return generate_latest(registry)


MODEL = ("model_name",)  # the label nearly every series has


@dataclass(frozen=True)
class _Series:
    """Builds series named `PREFIX + name` in one registry, labelled by model_name unless
    told otherwise: each metric below then states only what is its own."""

    registry: CollectorRegistry

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = MODEL) -> Counter:
        return Counter(f"{PREFIX}{name}", doc, labels, registry=self.registry)

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = MODEL) -> Gauge:
        return Gauge(f"{PREFIX}{name}", doc, labels, registry=self.registry)

    def histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(f"{PREFIX}{name}", doc, MODEL, buckets=buckets, registry=self.registry)


def _request_series(s: _Series, prompt_doc: str) -> dict[str, Counter]:
    """The per-request counters both services expose under vLLM's names; `prompt_doc`
    says which prompt tokens the service counts."""
    return {
        "prompt_tokens": s.counter("prompt_tokens", prompt_doc),
        "generation_tokens": s.counter("generation_tokens", "Generated tokens"),
        "request_success": s.counter(
            "request_success", "Finished requests", ("model_name", "finished_reason")
        ),
    }


@dataclass
class WorkerMetrics:
    """Engine-side state, labelled by model_name, refreshed after engine steps."""

    num_requests_running: Gauge
    num_requests_waiting: Gauge
    kv_cache_usage_perc: Gauge
    prefix_cache_hit_rate: Gauge
    num_free_blocks: Gauge
    num_total_blocks: Gauge
    num_preemptions: Gauge
    prompt_tokens: Counter
    generation_tokens: Counter
    request_success: Counter
    jobs_rejected: Counter
    jobs_resumed: Counter
    jobs_dead_lettered: Counter
    jobs_lost: Counter
    jobs_deferred: Counter
    spec_decode_num_drafts: Counter
    spec_decode_num_draft_tokens: Counter
    spec_decode_num_accepted_tokens: Counter
    spec_decode_num_accepted_tokens_per_pos: Counter
    jobs_pulled: Counter
    routed_fallbacks: Counter
    kv_events_published: Counter


def worker_metrics(registry: CollectorRegistry) -> WorkerMetrics:
    s = _Series(registry)
    return WorkerMetrics(
        num_requests_running=s.gauge(
            "num_requests_running", "Requests in the engine's running batch"
        ),
        num_requests_waiting=s.gauge(
            "num_requests_waiting", "Requests admitted to the engine but not yet running"
        ),
        kv_cache_usage_perc=s.gauge(
            "kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1)"
        ),
        prefix_cache_hit_rate=s.gauge("prefix_cache_hit_rate", "Prefix cache hit rate (0..1)"),
        num_free_blocks=s.gauge("num_free_kv_blocks", "Free KV cache blocks"),
        num_total_blocks=s.gauge("num_total_kv_blocks", "Total KV cache blocks"),
        num_preemptions=s.gauge("num_preemptions", "Preemptions since start"),
        **_request_series(s, "Prefilled prompt tokens"),
        jobs_rejected=s.counter(
            "jobs_rejected",
            "Jobs terminally acked as malformed or invalid",
            ("model_name", "reason"),
        ),
        jobs_resumed=s.counter(
            "jobs_resumed",
            "Jobs taken over from the Deltas another worker had stored (redelivery, replay)",
        ),
        jobs_dead_lettered=s.counter(
            "jobs_dead_lettered",
            "Jobs moved to LLM_DEAD after exhausting their deliveries",
            ("model_name", "source"),
        ),
        jobs_lost=s.counter(
            "jobs_lost", "Jobs this worker stopped because another worker took them over"
        ),
        jobs_deferred=s.counter(
            "jobs_deferred",
            "Job deliveries handed back (nak with a delay) because their wire version is "
            "newer than this worker reads: a newer API in a rolling upgrade",
            ("model_name", "wire_version"),
        ),
        spec_decode_num_drafts=s.counter(
            "spec_decode_num_drafts",
            "Speculative drafts verified: one per sequence per step it speculated",
        ),
        spec_decode_num_draft_tokens=s.counter("spec_decode_num_draft_tokens", "Tokens proposed"),
        spec_decode_num_accepted_tokens=s.counter(
            "spec_decode_num_accepted_tokens", "Proposed tokens the model accepted"
        ),
        spec_decode_num_accepted_tokens_per_pos=s.counter(
            "spec_decode_num_accepted_tokens_per_pos",
            "Accepted proposed tokens by their position in the draft (0 first)",
            ("model_name", "position"),
        ),
        jobs_pulled=s.counter(
            "jobs_pulled",
            "Job deliveries pulled, by queue: `routed` (this worker's own subject, prefix "
            "routing) or `shared` (the model's queue)",
            ("model_name", "queue"),
        ),
        routed_fallbacks=s.counter(
            "routed_fallbacks",
            "Routed jobs this worker moved to the shared queue, by reason: `not_pulled` "
            "(waited past --route-fallback), `worker_gone`, `redelivered`, `stale`, `drain`",
            ("model_name", "reason"),
        ),
        kv_events_published=s.counter(
            "kv_events_published",
            "KV block event messages published (one per engine step that changed the cache)",
        ),
    )


@dataclass
class ApiMetrics:
    """Client-side latencies and queue depth, labelled by model_name."""

    time_to_first_token: Histogram
    time_per_output_token: Histogram
    e2e_request_latency: Histogram
    queue_depth: Gauge
    workers: Gauge
    prompt_tokens: Counter
    generation_tokens: Counter
    request_success: Counter
    api_requests: Counter
    routing_decisions: Counter
    routing_prompt_tokens: Counter
    routing_cached_tokens: Counter
    kv_index_snapshots: Counter
    kv_index_blocks: Gauge


def api_metrics(registry: CollectorRegistry) -> ApiMetrics:
    s = _Series(registry)
    return ApiMetrics(
        time_to_first_token=s.histogram(
            "time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS
        ),
        time_per_output_token=s.histogram(
            "time_per_output_token_seconds", "Time per output token after the first", TPOT_BUCKETS
        ),
        e2e_request_latency=s.histogram(
            "e2e_request_latency_seconds", "End-to-end request latency", E2E_BUCKETS
        ),
        queue_depth=s.gauge("queue_depth", "Jobs waiting in the model's consumer (num_pending)"),
        workers=s.gauge("workers", "Live workers in the registry"),
        **_request_series(s, "Prompt tokens of finished requests"),
        api_requests=s.counter(
            "api_requests", "HTTP requests by endpoint and status", ("endpoint", "status")
        ),
        routing_decisions=s.counter(
            "routing_decisions",
            "Where jobs were published: `routed` (a worker's own subject), `placed` (no worker "
            "holds a prefix, --routing-cold place: the least loaded worker's subject), `cold` "
            "(no worker holds a prefix: shared queue), `no_worker` (none routable: shared queue); none with "
            "--routing queue",
            ("model_name", "decision"),
        ),
        routing_prompt_tokens=s.counter(
            "routing_prompt_tokens",
            "Prompt tokens of the jobs the router placed (any decision but `off`)",
        ),
        routing_cached_tokens=s.counter(
            "routing_cached_tokens",
            "Prompt tokens the router predicted cached on the chosen worker",
        ),
        kv_index_snapshots=s.counter(
            "kv_index_snapshots",
            "KV snapshots this replica asked workers for (a gap in their events), by outcome",
            ("outcome",),
        ),
        kv_index_blocks=s.gauge(
            "kv_index_blocks",
            "Distinct KV block hashes in this replica's routing index, all workers",
            (),
        ),
    )
