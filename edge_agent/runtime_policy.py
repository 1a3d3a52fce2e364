"""One mapping from the operating policy to the running components' values.

``local_policy`` is the policy an agent's own ``EdgeSettings`` describe (what it runs before,
or without, a pushed one); ``batcher_settings`` and ``runtime_offload`` turn a policy's
sections into the batcher's and the offload controller's values. The serving runtime starts
from them and the operating policy re-applies them whenever a pushed policy takes effect.
"""

from __future__ import annotations

from edge_agent.offload import OffloadPolicy as RuntimeOffload
from edge_agent.settings import EdgeSettings
from protocol.policy import BatchingPolicy, OffloadPolicy, Policy, TelemetryPolicy
from spillway.batching import BatcherSettings


def local_policy(settings: EdgeSettings) -> Policy:
    """The policy the agent's own settings describe (before, or without, a pushed one)."""
    return Policy(
        offload=OffloadPolicy(
            enabled=settings.offload_enabled,
            slo_ms=settings.slo_ms,
            enter_ratio=settings.offload_enter_ratio,
            exit_ratio=settings.offload_exit_ratio,
            rate_per_s=settings.offload_rate_per_s,
            burst_requests=settings.offload_burst,
            quality_sample_share=settings.offload_policy_fraction,
        ),
        batching=BatchingPolicy(
            max_batch_size=settings.max_batch_size,
            min_batch_size=settings.min_batch_size,
            max_queue_delay_ms=settings.max_queue_delay_ms,
            max_queue_items=settings.max_queue_items,
            latency_budget_ms=settings.latency_budget_ms,
        ),
        telemetry=TelemetryPolicy(interval_s=settings.telemetry_interval_s),
    )


def batcher_settings(policy: BatchingPolicy) -> BatcherSettings:
    return BatcherSettings(
        max_batch_size=policy.max_batch_size,
        min_batch_size=policy.min_batch_size,
        max_queue_delay_ms=policy.max_queue_delay_ms,
        max_queue_items=policy.max_queue_items,
        latency_budget_ms=policy.latency_budget_ms,
    )


def runtime_offload(policy: OffloadPolicy) -> RuntimeOffload:
    return RuntimeOffload(
        enabled=policy.enabled,
        slo_ms=policy.slo_ms,
        enter_ratio=policy.enter_ratio,
        exit_ratio=policy.exit_ratio,
        rate_per_s=policy.rate_per_s,
        burst=policy.burst_requests,
        policy_fraction=policy.quality_sample_share,
    )
