"""The monitoring manifests: the PrometheusRule's structure (a CRD, so checked here against
the operator's schema essentials rather than by kubernetes-validate), its two seed alerts,
valid PromQL shapes, and series names the code really exports."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cloud_controller.metrics import ControllerMetrics
from cloud_controller.pool.metrics import PoolMetrics
from edge_agent.metrics import ServingMetrics
from tests.dashboard.rules import RULE_FILE, load_rule, rule_metric_names, rules
from tests.deploy.kustomize import render

DURATION = re.compile(
    r"^((([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?|0)$"
)
"""The operator's ``Duration`` pattern (monitoring.coreos.com/v1)."""
ALERT_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(float(n) * units[u] for n, u in re.findall(r"([0-9]+)(ms|[smhdwy])", duration))


def test_rule_has_the_operator_shape() -> None:
    doc = load_rule()
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PrometheusRule"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(doc["spec"]) == {"groups"}
    group_names = [g["name"] for g in doc["spec"]["groups"]]
    assert len(group_names) == len(set(group_names)), "group names must be unique"
    for group in doc["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit", "partial_response_strategy"}
        assert group["rules"], f"group {group['name']} is empty"
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations"}
            assert ("alert" in rule) != ("record" in rule)
            assert ALERT_NAME.match(rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert rule["expr"].count("(") == rule["expr"].count(")")
            if "for" in rule:
                assert DURATION.match(rule["for"]), rule["for"]
            assert all(isinstance(v, str) for v in rule.get("labels", {}).values())
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert {"summary", "description"} <= set(rule["annotations"])


def _by_name() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in rules()}


def test_the_seed_alerts_are_there() -> None:
    """p99 latency > 500 ms for 1 minute, from the histogram; error rate > 10/s."""
    latency = _by_name()["SpillwayEdgeP99LatencyHigh"]
    assert re.search(
        r"histogram_quantile\(0\.99,\s*sum by \(le\) \(rate\("
        r"spillway_agent_request_latency_seconds_bucket\[1m\]\)\)\)\s*>\s*0\.5\s*$",
        latency["expr"],
    )
    assert timedelta(seconds=_seconds(latency["for"])) == timedelta(minutes=1)
    errors = _by_name()["SpillwayErrorRateHigh"]
    assert re.search(
        r'sum\(rate\(spillway_agent_requests_total\{status!="ok"\}\[1m\]\)\)\s*>\s*10\s*$',
        errors["expr"],
    )
    pool = _by_name()["SpillwayPoolP99LatencyHigh"]
    assert "spillway_pool_request_latency_seconds_bucket" in pool["expr"]


def _exported_sample_names() -> set[str]:
    """What the three ``/metrics`` renderers emit once each histogram/counter has a sample
    (the same ``generate_latest`` text the endpoints serve)."""
    agent = ServingMetrics()
    agent.observe_request(status="ok", tier="edge", latency_s=0.01)
    agent.observe_request(status="overloaded", tier="edge", latency_s=0.01)
    pool = PoolMetrics()
    pool.observe(status="ok", latency_s=0.02)
    controller = ControllerMetrics()
    names: set[str] = set()
    for text in (agent.scrape(), generate_latest(pool.registry), controller.render()):
        for family in text_string_to_metric_families(text.decode()):
            names |= {sample.name for sample in family.samples}
    return names


def test_every_series_the_rules_query_is_exported() -> None:
    queried = rule_metric_names()
    assert queried >= {
        "spillway_agent_request_latency_seconds_bucket",
        "spillway_agent_requests_total",
    }
    assert queried <= _exported_sample_names()


def test_monitoring_kustomization_renders_the_rule_and_monitors() -> None:
    objects = render(RULE_FILE.parent)
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert kinds == [
        ("PodMonitor", "spillway-edge-agent"),
        ("PodMonitor", "spillway-pool"),
        ("PrometheusRule", "spillway-alerts"),
        ("ServiceMonitor", "spillway-controller"),
    ]
    for obj in objects:
        assert obj["metadata"]["namespace"] == "spillway"
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "spillway"
