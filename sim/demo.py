"""``spillway demo``: the whole story on embedded defaults.

Starts a real mosquitto, the controller (SQLite) and N agents as separate processes,
waits for the fleet to come online, pushes a desired policy to every device and waits
until each has applied it, keeps the fleet running for ``duration_s``, then writes the
report and stops everything cleanly. Later capabilities (rollouts, traffic, overflow,
dashboard) grow this same story.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from models.signing import load_or_create_signing_key, public_path
from sim.broker import MosquittoBroker, free_port
from sim.processes import ADMIN_TOKEN_ENV, ChildProcess, bearer, new_admin_token
from sim.profiles import profile_for

logger = logging.getLogger(__name__)


class DemoError(RuntimeError):
    """The demo could not bring its fleet up; the message says which part failed."""


@dataclass(frozen=True)
class DemoSettings:
    agents: int = 3
    duration_s: float = 20.0
    """How long the fleet runs after it is up, before the demo stops it."""
    work_dir: Path = Path("var/demo")
    http_port: int | None = None
    """Controller port; None picks a free one."""
    startup_timeout_s: float = 60.0
    keepalive_s: int = 5


@dataclass
class DemoReport:
    controller_url: str
    devices: list[dict[str, Any]] = field(default_factory=list)
    policy_generation: int | None = None
    converged_s: float | None = None
    started_at: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, Any]:
        return {
            "controller_url": self.controller_url,
            "devices": self.devices,
            "policy": {"generation": self.policy_generation, "converged_s": self.converged_s},
            "online": sum(1 for d in self.devices if d.get("status") == "online"),
        }


def _poll(
    what: str, check: Callable[[], bool], timeout_s: float, children: list[ChildProcess]
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in children:
            code = child.exited()
            if code is not None:
                raise DemoError(
                    f"{child.name} exited with {code} while waiting for {what}: {child.log_tail(1)}"
                )
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise DemoError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _devices(http: httpx.Client) -> list[dict[str, Any]]:
    response = http.get("/api/v1/devices", params={"page_size": 200})
    response.raise_for_status()
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def run_demo(settings: DemoSettings, *, say: Callable[[str], None]) -> DemoReport:
    work = settings.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    broker = MosquittoBroker(work / "broker")
    http_port = settings.http_port or free_port()
    url = f"http://127.0.0.1:{http_port}"
    report = DemoReport(controller_url=url)
    children: list[ChildProcess] = []
    broker.start()
    say(f"broker      mqtt://127.0.0.1:{broker.port}  (mosquitto, {work / 'broker'})")
    try:
        db = work / "controller.db"
        db.unlink(missing_ok=True)  # every demo starts with a fresh fleet
        key_path = work / "keys" / "signing.key"
        load_or_create_signing_key(key_path)  # agents trust its public half for desired state
        admin_token = new_admin_token()
        controller = ChildProcess(
            "controller",
            [
                "controller",
                "serve",
                "--port",
                str(http_port),
                "--mqtt-port",
                str(broker.port),
                "--database-url",
                f"sqlite:///{db}",
            ],
            log_path=work / "logs" / "controller.log",
            env={"SPILLWAY_SIGNING_KEY_PATH": str(key_path), ADMIN_TOKEN_ENV: admin_token},
        )
        controller.start()
        children.append(controller)
        http = httpx.Client(base_url=url, timeout=5.0, headers=bearer(admin_token))
        _poll(
            "the controller to be ready",
            lambda: http.get("/readyz").status_code == 200,
            settings.startup_timeout_s,
            children,
        )
        say(f"controller  {url}  (REST /api/v1, /metrics; logs {controller.log_path})")

        ids = [f"demo-edge-{i + 1:02d}" for i in range(settings.agents)]
        for i, device_id in enumerate(ids):
            profile = profile_for(i)
            agent = ChildProcess(
                device_id,
                [
                    "agent",
                    "run",
                    "--device-id",
                    device_id,
                    "--hardware-class",
                    profile.hardware_class,
                    "--label",
                    "site=demo",
                    "--mqtt-port",
                    str(broker.port),
                    "--state-dir",
                    str(work / "agents" / device_id),
                    "--keepalive-s",
                    str(settings.keepalive_s),
                ],
                log_path=work / "logs" / f"{device_id}.log",
                env={"SPILLWAY_EDGE_DESIRED_KEY_FILES": json.dumps([str(public_path(key_path))])},
            )
            agent.start()
            children.append(agent)

        def all_online() -> bool:
            online = {d["id"] for d in _devices(http) if d["status"] == "online"}
            return online >= set(ids)

        _poll(f"{len(ids)} agents online", all_online, settings.startup_timeout_s, children)
        say(f"fleet       {len(ids)} agents online: {', '.join(ids)}")

        t0 = time.monotonic()
        generations = {}
        for device_id in ids:
            response = http.put(
                f"/api/v1/devices/{device_id}/desired",
                json={"policy": {"telemetry_interval_s": 10, "offload_slo_ms": 200}},
            )
            response.raise_for_status()
            generations[device_id] = response.json()["generation"]

        def converged() -> bool:
            by_id = {d["id"]: d for d in _devices(http)}
            return all(
                (by_id[i].get("reported") or {}).get("observed_generation") == generations[i]
                for i in ids
            )

        _poll("every agent to apply its policy", converged, settings.startup_timeout_s, children)
        report.policy_generation = max(generations.values())
        report.converged_s = round(time.monotonic() - t0, 3)
        say(f"policy      applied on every device in {report.converged_s:.2f}s")

        say(f"running     for {settings.duration_s:.0f}s — open {url}/api/v1/devices")
        end = time.monotonic() + settings.duration_s
        while time.monotonic() < end:
            for child in children:
                if child.exited() is not None:
                    raise DemoError(f"{child.name} exited early: {child.log_tail(1)}")
            time.sleep(0.5)
        report.devices = _devices(http)
        http.close()
        return report
    finally:
        for child in reversed(children):
            child.stop()
        broker.stop()


def write_report(report: DemoReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.as_json(), indent=2, default=str) + "\n")
