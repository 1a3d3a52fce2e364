"""EdgeSettings: env prefix, defaults, validation; the package's public surface."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import ValidationError

import edge_agent
from edge_agent.settings import EdgeSettings


def test_defaults_and_derived_state_dir() -> None:
    s = EdgeSettings(device_id="dev-1")
    assert s.state_dir == Path("var/agent/dev-1")
    assert (s.mqtt_port, s.keepalive_s, s.heartbeat_interval_s) == (1883, 10, 5.0)
    assert s.hardware_class == "jetson-orin-nano"
    mqtt = s.mqtt()
    assert mqtt.client_id == "dev-1" and mqtt.keepalive_s == 10


def test_environment_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPILLWAY_EDGE_DEVICE_ID", "env-dev")
    monkeypatch.setenv("SPILLWAY_EDGE_LABELS", '{"zone": "a"}')
    monkeypatch.setenv("SPILLWAY_EDGE_MQTT_PORT", "1999")
    s = EdgeSettings()
    assert (s.device_id, s.labels, s.mqtt_port) == ("env-dev", {"zone": "a"}, 1999)
    assert s.state_dir == Path("var/agent/env-dev")
    assert EdgeSettings(mqtt_port=2000).mqtt_port == 2000  # keyword arguments win


@pytest.mark.parametrize(
    "bad",
    [
        {"device_id": "has space"},
        {"device_id": "a/b"},
        {"device_id": "d", "keepalive_s": 0},
        {"device_id": "d", "heartbeat_interval_s": 0},
        {"device_id": "d", "labels": {str(i): "v" for i in range(65)}},
        {"device_id": "d", "unknown": 1},
    ],
)
def test_invalid_settings(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        EdgeSettings(**bad)  # type: ignore[arg-type]


def test_public_api_is_exactly_all() -> None:
    for name in edge_agent.__all__:
        assert getattr(edge_agent, name) is not None
    public = {
        name
        for name in dir(edge_agent)
        if not name.startswith("_") and not isinstance(getattr(edge_agent, name), ModuleType)
    }
    assert public - {"TYPE_CHECKING", "Any", "annotations"} == set(edge_agent.__all__)


def test_agent_imports_stay_light_and_one_sided() -> None:
    code = (
        "import sys, edge_agent.cli, edge_agent.agent;"
        "bad = [m for m in ('cloud_controller', 'sim', 'spillway.cli', 'torch', 'sqlmodel',"
        " 'fastapi', 'onnxruntime') if m in sys.modules];"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
