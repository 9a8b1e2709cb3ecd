"""Prometheus metrics of the gateway layer: per-key usage, auth failures, rate limiting,
fallback traffic and the queue wait that drives it.

Series labelled by API key (usage, rate limiting) live in a registry of their own, the
tenant registry: `/metrics` shows them only to an operator key (or with auth off), so an
anonymous scrape learns nothing about who uses the service. No series carries the
end-user `user` value (it is in the usage log line only).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from shared.metrics import PREFIX


@dataclass
class GatewayMetrics:
    usage_requests: Counter
    usage_prompt_tokens: Counter
    usage_completion_tokens: Counter
    usage_cached_tokens: Counter
    usage_queue_time: Counter
    usage_gpu_time: Counter
    auth_failures: Counter
    rate_limited: Counter
    fallback_requests: Counter
    queue_head_wait: Gauge
    api_keys: Gauge
    open_streams: Gauge


def gateway_metrics(
    registry: CollectorRegistry, tenants: CollectorRegistry | None = None
) -> GatewayMetrics:
    """`tenants`: where the per-key series go (the app passes its own; default: `registry`)."""
    usage = ["key_id", "tag"]
    tenants = registry if tenants is None else tenants

    def counter(name: str, doc: str, labels: list[str]) -> Counter:
        target = tenants if "key_id" in labels else registry
        return Counter(f"{PREFIX}{name}", doc, labels, registry=target)

    return GatewayMetrics(
        usage_requests=counter(
            "usage_requests",
            "Generation requests by API key, tag (X-Feature) and route (local, fallback, "
            "reattach, job_events)",
            [*usage, "route"],
        ),
        usage_prompt_tokens=counter("usage_prompt_tokens", "Prompt tokens by key and tag", usage),
        usage_completion_tokens=counter(
            "usage_completion_tokens", "Completion tokens by key and tag", usage
        ),
        usage_cached_tokens=counter(
            "usage_cached_tokens", "Prompt tokens served from the prefix cache", usage
        ),
        usage_queue_time=counter(
            "usage_queue_time_seconds", "Seconds jobs waited in the queue, by key and tag", usage
        ),
        usage_gpu_time=counter(
            "usage_gpu_seconds", "Engine step seconds attributed to the requests", usage
        ),
        auth_failures=counter(
            "auth_failures", "Requests refused for a missing, unknown or revoked key", ["reason"]
        ),
        rate_limited=counter(
            "rate_limited_requests", "Requests refused by a per-key limit", ["key_id", "limit"]
        ),
        fallback_requests=counter(
            "fallback_requests",
            "Requests proxied to the fallback upstream (reason: no_worker, queue_wait)",
            ["model_name", "reason", "outcome"],
        ),
        queue_head_wait=Gauge(
            f"{PREFIX}queue_head_wait_seconds",
            "Age of the oldest job not yet pulled by any worker",
            ["model_name"],
            registry=registry,
        ),
        open_streams=Gauge(
            f"{PREFIX}open_streams",
            "Jobs this replica follows now (streams, re-attaches, job event streams)",
            registry=registry,
        ),
        api_keys=Gauge(
            f"{PREFIX}api_keys", "Active (not revoked) API keys known", registry=registry
        ),
    )
