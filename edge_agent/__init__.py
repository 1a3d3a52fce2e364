"""Spillway's edge agent: runs on a device, keeps it in the state the cloud desires.

It talks to the cloud only through ``protocol`` (topics, messages, the MQTT adapter) and
never imports ``cloud_controller``, ``sim`` or ``spillway.cli``. Imports stay light
(no torch, no web framework): it runs on small boards.

The public names below are loaded on first use, so ``python -m edge_agent`` can check for
missing packages (``preflight``) before anything imports paho or pydantic.

Modules: ``settings`` (EdgeSettings), ``agent`` (wiring and lifecycle), ``reconcile``
(desired -> applied), ``state`` (what survives restarts), ``presence`` (Hello, Presence,
Will), ``telemetry`` (heartbeats, samples), ``periodic`` (clocked loops), ``probe`` (the
host), ``clock``, ``preflight`` (start-up checks) and ``cli`` (``spillway agent run``).

Model delivery: ``install`` (the pipeline behind ``policy["model"]``, status, revert),
``download`` (resumable chunk pulls over MQTT), ``installed`` (release counters and
installed folders, persisted) and ``hotswap`` (active and previous model, atomic swap).

Local serving (only with a model dir): ``stack`` (assembly), ``serving`` (the runtime and
model loading), ``padding`` (length-grouped batches), ``offload`` (the pure overflow
policy), ``cloud`` (the pool over MQTT), ``results`` (group commit into the outbox),
``outbox`` (durable SQLite), ``uplink`` (outbox -> controller, acks), ``metrics``
(prometheus and telemetry numbers), ``eventloop`` (the serving loop's thread),
``ingress_http`` (``POST /v1/embed``, ``/metrics``, ``/healthz``) and ``ingress_mqtt``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_agent.agent import Agent, AgentStateError, ServingStartError
    from edge_agent.clock import Clock, SystemClock
    from edge_agent.reconcile import (
        AlreadyApplied,
        Apply,
        Decision,
        JsonPolicyApplier,
        PolicyApplier,
        PolicyError,
        Stale,
        decide,
    )
    from edge_agent.settings import EdgeSettings
    from edge_agent.state import AppliedState, CorruptState, StateError, StateStore

_HOMES = {
    "Agent": "edge_agent.agent",
    "AgentStateError": "edge_agent.agent",
    "AlreadyApplied": "edge_agent.reconcile",
    "AppliedState": "edge_agent.state",
    "Apply": "edge_agent.reconcile",
    "Clock": "edge_agent.clock",
    "CorruptState": "edge_agent.state",
    "Decision": "edge_agent.reconcile",
    "EdgeSettings": "edge_agent.settings",
    "JsonPolicyApplier": "edge_agent.reconcile",
    "PolicyApplier": "edge_agent.reconcile",
    "PolicyError": "edge_agent.reconcile",
    "Stale": "edge_agent.reconcile",
    "StateError": "edge_agent.state",
    "StateStore": "edge_agent.state",
    "ServingStartError": "edge_agent.agent",
    "SystemClock": "edge_agent.clock",
    "decide": "edge_agent.reconcile",
}

__all__ = [
    "Agent",
    "AgentStateError",
    "AlreadyApplied",
    "AppliedState",
    "Apply",
    "Clock",
    "CorruptState",
    "Decision",
    "EdgeSettings",
    "JsonPolicyApplier",
    "PolicyApplier",
    "PolicyError",
    "ServingStartError",
    "Stale",
    "StateError",
    "StateStore",
    "SystemClock",
    "decide",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'edge_agent' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
