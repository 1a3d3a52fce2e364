"""A real fleet for end-to-end tests: controller and agents as ``spillway`` processes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from models.signing import load_or_create_signing_key, public_path
from sim.broker import MosquittoBroker, free_port
from sim.processes import ADMIN_TOKEN_ENV, ChildProcess, bearer, new_admin_token


def wait_for(predicate: Callable[[], bool], timeout_s: float, *, what: str) -> float:
    """Poll until ``predicate`` holds; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if predicate():
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class Fleet:
    def __init__(self, broker: MosquittoBroker, work: Path) -> None:
        self.broker = broker
        self.work = work
        self.http_port = free_port()
        self.key_path = work / "keys" / "signing.key"
        load_or_create_signing_key(self.key_path)  # agents must trust it before it signs
        self.controller = ChildProcess(
            "controller",
            [
                "controller",
                "serve",
                "--port",
                str(self.http_port),
                "--mqtt-port",
                str(broker.port),
                "--database-url",
                f"sqlite:///{work / 'controller.db'}",
            ],
            log_path=work / "controller.log",
            env={"SPILLWAY_SIGNING_KEY_PATH": str(self.key_path)},
        )
        self.agents: dict[str, ChildProcess] = {}
        self.admin_token = new_admin_token()
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{self.http_port}",
            timeout=5,
            headers=bearer(self.admin_token),
        )

    def start_controller(self) -> None:
        # Also when a subclass replaced ``self.controller``: the REST client is admin.
        self.controller.env.setdefault(ADMIN_TOKEN_ENV, self.admin_token)
        self.controller.start()
        wait_for(lambda: self.http.get("/readyz").status_code == 200, 60, what="controller ready")

    def agent(
        self, device_id: str, *, keepalive_s: int = 2, labels: str = "site=lab"
    ) -> ChildProcess:
        proc = ChildProcess(
            device_id,
            [
                "agent",
                "run",
                "--device-id",
                device_id,
                "--hardware-class",
                "jetson-orin-nx",
                "--label",
                labels,
                "--mqtt-port",
                str(self.broker.port),
                "--state-dir",
                str(self.work / "agents" / device_id),
                "--keepalive-s",
                str(keepalive_s),
                "--heartbeat-interval-s",
                "1",
            ],
            log_path=self.work / f"{device_id}.log",
            env={"SPILLWAY_EDGE_DESIRED_KEY_FILES": json.dumps([str(self.desired_key_file)])},
        )
        self.agents[device_id] = proc
        return proc

    @property
    def desired_key_file(self) -> Path:
        """The controller's public key, which agents verify desired state with."""
        return public_path(self.key_path)

    def device(self, device_id: str) -> dict[str, Any]:
        response = self.http.get(f"/api/v1/devices/{device_id}")
        if response.status_code == 404:
            return {}
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def status(self, device_id: str) -> str | None:
        return self.device(device_id).get("status")

    def observed_generation(self, device_id: str) -> int | None:
        reported = self.device(device_id).get("reported") or {}
        return reported.get("observed_generation")

    def set_policy(self, device_id: str, policy: dict[str, Any]) -> int:
        response = self.http.put(f"/api/v1/devices/{device_id}/desired", json={"policy": policy})
        response.raise_for_status()
        return int(response.json()["generation"])

    def close(self) -> None:
        for proc in self.agents.values():
            proc.stop()
        self.controller.stop()
        self.http.close()
