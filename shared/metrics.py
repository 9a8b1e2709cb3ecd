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
    m = ["model_name"]
    return WorkerMetrics(
        num_requests_running=Gauge(
            f"{PREFIX}num_requests_running",
            "Requests in the engine's running batch",
            m,
            registry=registry,
        ),
        num_requests_waiting=Gauge(
            f"{PREFIX}num_requests_waiting",
            "Requests admitted to the engine but not yet running",
            m,
            registry=registry,
        ),
        kv_cache_usage_perc=Gauge(
            f"{PREFIX}kv_cache_usage_perc",
            "Fraction of KV cache blocks in use (0..1)",
            m,
            registry=registry,
        ),
        prefix_cache_hit_rate=Gauge(
            f"{PREFIX}prefix_cache_hit_rate", "Prefix cache hit rate (0..1)", m, registry=registry
        ),
        num_free_blocks=Gauge(
            f"{PREFIX}num_free_kv_blocks", "Free KV cache blocks", m, registry=registry
        ),
        num_total_blocks=Gauge(
            f"{PREFIX}num_total_kv_blocks", "Total KV cache blocks", m, registry=registry
        ),
        num_preemptions=Gauge(
            f"{PREFIX}num_preemptions", "Preemptions since start", m, registry=registry
        ),
        prompt_tokens=Counter(
            f"{PREFIX}prompt_tokens", "Prefilled prompt tokens", m, registry=registry
        ),
        generation_tokens=Counter(
            f"{PREFIX}generation_tokens", "Generated tokens", m, registry=registry
        ),
        request_success=Counter(
            f"{PREFIX}request_success",
            "Finished requests",
            [*m, "finished_reason"],
            registry=registry,
        ),
        jobs_rejected=Counter(
            f"{PREFIX}jobs_rejected",
            "Jobs terminally acked as malformed or invalid",
            [*m, "reason"],
            registry=registry,
        ),
        jobs_resumed=Counter(
            f"{PREFIX}jobs_resumed",
            "Jobs taken over from the Deltas another worker had stored (redelivery, replay)",
            m,
            registry=registry,
        ),
        jobs_dead_lettered=Counter(
            f"{PREFIX}jobs_dead_lettered",
            "Jobs moved to LLM_DEAD after exhausting their deliveries",
            [*m, "source"],
            registry=registry,
        ),
        jobs_lost=Counter(
            f"{PREFIX}jobs_lost",
            "Jobs this worker stopped because another worker took them over",
            m,
            registry=registry,
        ),
        jobs_deferred=Counter(
            f"{PREFIX}jobs_deferred",
            "Job deliveries handed back (nak with a delay) because their wire version is "
            "newer than this worker reads: a newer API in a rolling upgrade",
            ["model_name", "wire_version"],
            registry=registry,
        ),
        spec_decode_num_drafts=Counter(
            f"{PREFIX}spec_decode_num_drafts",
            "Speculative drafts verified: one per sequence per step it speculated",
            m,
            registry=registry,
        ),
        spec_decode_num_draft_tokens=Counter(
            f"{PREFIX}spec_decode_num_draft_tokens", "Tokens proposed", m, registry=registry
        ),
        spec_decode_num_accepted_tokens=Counter(
            f"{PREFIX}spec_decode_num_accepted_tokens",
            "Proposed tokens the model accepted",
            m,
            registry=registry,
        ),
        spec_decode_num_accepted_tokens_per_pos=Counter(
            f"{PREFIX}spec_decode_num_accepted_tokens_per_pos",
            "Accepted proposed tokens by their position in the draft (0 first)",
            [*m, "position"],
            registry=registry,
        ),
        jobs_pulled=Counter(
            f"{PREFIX}jobs_pulled",
            "Job deliveries pulled, by queue: `routed` (this worker's own subject, prefix "
            "routing) or `shared` (the model's queue)",
            ["model_name", "queue"],
            registry=registry,
        ),
        routed_fallbacks=Counter(
            f"{PREFIX}routed_fallbacks",
            "Routed jobs this worker moved to the shared queue, by reason: `not_pulled` "
            "(waited past --route-fallback), `worker_gone`, `redelivered`, `stale`, `drain`",
            ["model_name", "reason"],
            registry=registry,
        ),
        kv_events_published=Counter(
            f"{PREFIX}kv_events_published",
            "KV block event messages published (one per engine step that changed the cache)",
            ["model_name"],
            registry=registry,
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
    m = ["model_name"]
    return ApiMetrics(
        time_to_first_token=Histogram(
            f"{PREFIX}time_to_first_token_seconds",
            "Time to first token",
            m,
            buckets=TTFT_BUCKETS,
            registry=registry,
        ),
        time_per_output_token=Histogram(
            f"{PREFIX}time_per_output_token_seconds",
            "Time per output token after the first",
            m,
            buckets=TPOT_BUCKETS,
            registry=registry,
        ),
        e2e_request_latency=Histogram(
            f"{PREFIX}e2e_request_latency_seconds",
            "End-to-end request latency",
            m,
            buckets=E2E_BUCKETS,
            registry=registry,
        ),
        queue_depth=Gauge(
            f"{PREFIX}queue_depth",
            "Jobs waiting in the model's consumer (num_pending)",
            m,
            registry=registry,
        ),
        workers=Gauge(f"{PREFIX}workers", "Live workers in the registry", m, registry=registry),
        prompt_tokens=Counter(
            f"{PREFIX}prompt_tokens", "Prompt tokens of finished requests", m, registry=registry
        ),
        generation_tokens=Counter(
            f"{PREFIX}generation_tokens", "Generated tokens", m, registry=registry
        ),
        request_success=Counter(
            f"{PREFIX}request_success",
            "Finished requests",
            [*m, "finished_reason"],
            registry=registry,
        ),
        api_requests=Counter(
            f"{PREFIX}api_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=registry,
        ),
        routing_decisions=Counter(
            f"{PREFIX}routing_decisions",
            "Where jobs were published: `routed` (a worker's own subject), `placed` (no worker "
            "holds a prefix, --routing-cold place: the least loaded worker's subject), `cold` "
            "(no worker holds a prefix: shared queue), `no_worker` (none routable: shared queue); none with "
            "--routing queue",
            ["model_name", "decision"],
            registry=registry,
        ),
        routing_prompt_tokens=Counter(
            f"{PREFIX}routing_prompt_tokens",
            "Prompt tokens of the jobs the router placed (any decision but `off`)",
            m,
            registry=registry,
        ),
        routing_cached_tokens=Counter(
            f"{PREFIX}routing_cached_tokens",
            "Prompt tokens the router predicted cached on the chosen worker",
            m,
            registry=registry,
        ),
        kv_index_snapshots=Counter(
            f"{PREFIX}kv_index_snapshots",
            "KV snapshots this replica asked workers for (a gap in their events), by outcome",
            ["outcome"],
            registry=registry,
        ),
        kv_index_blocks=Gauge(
            f"{PREFIX}kv_index_blocks",
            "Distinct KV block hashes in this replica's routing index, all workers",
            registry=registry,
        ),
    )
