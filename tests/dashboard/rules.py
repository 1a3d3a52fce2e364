"""The shipped PrometheusRule, read for the tests: its rules and the series they query."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

RULE_FILE = Path(__file__).resolve().parents[2] / "manifests" / "monitoring" / "prometheusrule.yaml"
_PROMQL_WORDS = {
    "sum", "rate", "by", "le", "histogram_quantile", "without", "irate", "increase", "avg",
    "max", "min", "count", "on", "ignoring", "and", "or", "unless", "bool", "offset",
}  # fmt: skip


def load_rule() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(RULE_FILE.read_text())
    return document


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_rule()["spec"]["groups"] for rule in group["rules"]]


def rule_metric_names() -> set[str]:
    """Every series name the rule expressions select (``spillway_*`` identifiers)."""
    names: set[str] = set()
    for rule in rules():
        expr = re.sub(r"\{[^}]*\}", "", rule["expr"])  # label matchers
        expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
        for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
            if word.startswith("spillway_") and word not in _PROMQL_WORDS:
                names.add(word)
    return names
