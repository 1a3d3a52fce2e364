"""A policy made over the controller's REST API reaches a real agent through a real broker,
signed, and changes what the agent does; a rogue client's forged policy on the device's
desired topic does not. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cloud_controller.app import create_app
from cloud_controller.settings import CloudSettings
from edge_agent.agent import Agent
from models.signing import SigningKey, public_path
from protocol.messages import Telemetry
from protocol.policy import POLICY_KEY
from protocol.topics import DeviceChannel
from sim.broker import MosquittoBroker
from tests.agent.helpers import Cloud, edge_settings, wait_for
from tests.controller.helpers import TEST_ADMIN_TOKEN


@pytest.fixture
def controller(
    broker: MosquittoBroker, tmp_path: Path, database_url: str
) -> Iterator[tuple[TestClient, CloudSettings]]:
    settings = CloudSettings(
        database_url=database_url,
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        mqtt_reconnect_backoff_max_s=0.5,
        artifact_dir=tmp_path / "artifacts",
        signing_key_path=tmp_path / "controller" / "signing.key",
        admin_token=TEST_ADMIN_TOKEN,
    )
    headers = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
    with TestClient(create_app(settings), headers=headers) as http:
        assert http.app.state.runtime.bridge.wait_connected(10)  # type: ignore[attr-defined]
        yield http, settings


def test_effective_policy_reaches_the_agent_and_a_forged_one_does_not(
    controller: tuple[TestClient, CloudSettings],
    broker: MosquittoBroker,
    cloud: Cloud,
    tmp_path: Path,
) -> None:
    http, settings = controller
    agent = Agent(
        edge_settings(
            broker,
            tmp_path / "agent",
            device_id="edge-7",
            hardware_class="jetson-orin-nx",
            labels={"site": "dock"},
            telemetry_interval_s=60.0,
            desired_key_files=(public_path(settings.signing_key_path),),
        )
    )
    agent.start()
    try:
        wait_for(
            lambda: http.get("/api/v1/devices/edge-7").status_code == 200, 15, what="registered"
        )
        created = http.post(
            "/api/v1/policies",
            json={
                "name": "dock-fast-telemetry",
                "target": {"selector": {"site": "dock", "hardware_class": "jetson-orin-nx"}},
                "document": {"telemetry": {"interval_s": 0.25}, "offload": {"slo_ms": 120}},
            },
        )
        assert created.status_code == 201, created.text
        assert created.json()["devices_updated"] == ["edge-7"]
        wait_for(lambda: agent.applied_generations == [1], 15, what="policy applied")
        assert agent.operating_policy.current.telemetry.interval_s == 0.25
        assert agent.operating_policy.sources == ["dock-fast-telemetry@1"]

        # The behaviour changed: telemetry now arrives every 0.25 s instead of every 60 s.
        seen = len(cloud.seen("edge-7", DeviceChannel.TELEMETRY))
        wait_for(
            lambda: len(cloud.seen("edge-7", DeviceChannel.TELEMETRY)) >= seen + 4,
            10,
            what="faster telemetry",
        )
        sample: Telemetry = cloud.seen("edge-7", DeviceChannel.TELEMETRY)[-1]
        assert sample.metrics["telemetry_interval_s"] == 0.25

        # The controller sees what the agent applied.
        def reported_section() -> dict[str, object]:
            reported = http.get("/api/v1/devices/edge-7").json().get("reported") or {}
            section: dict[str, object] = (reported.get("policy") or {}).get(POLICY_KEY) or {}
            return section

        wait_for(lambda: bool(reported_section()), 10, what="policy reported")

        # A rogue client publishes a policy for generation 2 on the device's topic.
        rogue = SigningKey.generate()
        forged = {
            POLICY_KEY: {
                "document": {"telemetry": {"interval_s": 3600}, "offload": {"enabled": False}},
                "sources": [],
            }
        }
        cloud.publish_desired("edge-7", 2, forged, signer=rogue)
        wait_for(
            lambda: agent.counters().get("desired_rejected_unknown_key") == 1, 10, what="rejected"
        )
        assert agent.applied_generations == [1]
        assert agent.operating_policy.current.telemetry.interval_s == 0.25
        assert agent.operating_policy.current.offload.enabled is True

        def rejection() -> dict[str, object]:
            reported = http.get("/api/v1/devices/edge-7").json().get("reported") or {}
            found: dict[str, object] = (reported.get("policy") or {}).get("desired_rejected") or {}
            return found

        wait_for(lambda: rejection().get("reason") == "unknown_key", 10, what="reported")

        # The controller's next generation is still taken (the forgery consumed nothing).
        updated = http.put(
            "/api/v1/policies/dock-fast-telemetry",
            json={
                "target": {"selector": {"site": "dock"}},
                "document": {"telemetry": {"interval_s": 0.5}},
            },
        )
        assert updated.json()["devices_updated"] == ["edge-7"]
        wait_for(lambda: agent.applied_generations == [1, 2], 15, what="generation 2")
        assert agent.operating_policy.current.telemetry.interval_s == 0.5
        assert agent.operating_policy.current.offload.slo_ms == 250  # back to the default
    finally:
        agent.stop()
