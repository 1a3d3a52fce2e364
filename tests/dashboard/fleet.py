"""A real fleet for the browser tests: mosquitto, a ``spillway controller serve`` process with
a bootstrap admin token, a few real ``spillway agent run`` processes, and (cheaply, through
the real MQTT ingest path) a thousand more registered devices."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import httpx

from models.signing import load_or_create_signing_key, public_path
from protocol.codec import encode
from protocol.messages import DeviceStatus, Hello, Presence, RuntimeCapabilities
from protocol.mqtt import MqttClient, MqttSettings
from protocol.topics import DeviceChannel, QoS, Topics
from sim.broker import MosquittoBroker, free_port
from sim.processes import ChildProcess
from tests.controller.model_helpers import synthetic, upload
from tests.integration.fleet import wait_for

HARDWARE = ("jetson-orin-nx", "jetson-orin-nano", "rpi5")


class DashboardFleet:
    def __init__(self, work: Path, *, models: Path) -> None:
        self.work = work
        self.models = models
        self.broker = MosquittoBroker(work / "broker")
        self.admin_token = secrets.token_urlsafe(24)
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.controller: ChildProcess | None = None
        self.agents: list[ChildProcess] = []
        self.http = httpx.Client(
            base_url=self.url,
            timeout=10,
            headers={"Authorization": f"Bearer {self.admin_token}"},
        )

    def start(self, *, agents: int) -> None:
        key_path = self.work / "keys" / "signing.key"
        load_or_create_signing_key(key_path)  # agents trust its public half for desired state
        self.broker.start()
        self.controller = ChildProcess(
            "controller",
            [
                "controller",
                "serve",
                "--port",
                str(self.http_port),
                "--mqtt-port",
                str(self.broker.port),
                "--database-url",
                f"sqlite:///{self.work / 'controller.db'}",
            ],
            log_path=self.work / "controller.log",
            env={
                "SPILLWAY_ADMIN_TOKEN": self.admin_token,
                "SPILLWAY_TRUSTED_KEYS_DIR": str(self.models / "keys"),
                "SPILLWAY_ARTIFACT_DIR": str(self.work / "artifacts"),
                "SPILLWAY_SIGNING_KEY_PATH": str(key_path),
            },
        )
        self.controller.start()
        wait_for(lambda: self.http.get("/readyz").status_code == 200, 60, what="controller")
        for i in range(agents):
            device_id = f"live-edge-{i + 1:02d}"
            agent = ChildProcess(
                device_id,
                [
                    "agent",
                    "run",
                    "--device-id",
                    device_id,
                    "--hardware-class",
                    HARDWARE[i % len(HARDWARE)],
                    "--label",
                    "site=lab",
                    "--mqtt-port",
                    str(self.broker.port),
                    "--state-dir",
                    str(self.work / "agents" / device_id),
                    "--keepalive-s",
                    "2",
                    "--heartbeat-interval-s",
                    "1",
                ],
                log_path=self.work / f"{device_id}.log",
                env={
                    "SPILLWAY_EDGE_TELEMETRY_INTERVAL_S": "1",
                    "SPILLWAY_EDGE_DESIRED_KEY_FILES": json.dumps([str(public_path(key_path))]),
                },
            )
            agent.start()
            self.agents.append(agent)

    def register_many(self, count: int, *, prefix: str = "bulk") -> list[str]:
        """``count`` devices announced by one MQTT client (presence + hello, as an agent
        would), so they go through the controller's real ingest; returns their ids."""
        topics = Topics()
        client = MqttClient(MqttSettings(host="127.0.0.1", port=self.broker.port, client_id="bulk"))
        client.start()
        assert client.wait_connected(10)
        ids = [f"{prefix}-{i:04d}" for i in range(count)]
        try:
            for n, device_id in enumerate(ids):
                presence = Presence(
                    device_id=device_id,
                    status=DeviceStatus.ONLINE,
                    boot_epoch=1,
                    reason="connected",
                )
                hello = Hello(
                    device_id=device_id,
                    hardware_class=HARDWARE[n % len(HARDWARE)],
                    labels={"site": "bulk"},
                    agent_version="0.1.0",
                    capabilities=RuntimeCapabilities(
                        execution_providers=["CPUExecutionProvider"], memory_mb=4096, cpu_count=4
                    ),
                    boot_epoch=1,
                    keepalive_s=60,
                )
                status = DeviceChannel.STATUS.spec
                client.publish(
                    topics.device(device_id, DeviceChannel.STATUS),
                    encode(presence),
                    qos=status.qos,
                    retain=status.retain,
                )
                client.publish(
                    topics.device(device_id, DeviceChannel.HELLO),
                    encode(hello),
                    qos=QoS.AT_LEAST_ONCE,
                    wait_s=10 if n == count - 1 else None,
                )
        finally:
            client.stop()
        return ids

    def register_model(self, name: str, version: str) -> None:
        """A small signed (synthetic) version of ``name`` through the real upload API."""
        data = os.urandom(4096)
        manifest = synthetic(
            self.models,
            data,
            model_name=name,
            model_version=version,
            variant="fp32-onnx",
            precision="fp32",
        )
        tokenizer = (self.models / "fp32-onnx" / "tokenizer.json").read_bytes()
        response = upload(self.http, name, manifest, data, tokenizer=tokenizer)
        assert response.status_code == 201, response.text

    def token(self, name: str, role: str) -> str:
        response = self.http.post("/api/v1/tokens", json={"name": name, "role": role})
        response.raise_for_status()
        return str(response.json()["token"])

    def total(self) -> int:
        return int(self.http.get("/api/v1/fleet/summary").json()["total"])

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        if self.controller is not None:
            self.controller.stop()
        self.broker.stop()
        self.http.close()
