"""``spillway demo``: the whole story on embedded defaults, every part a real process.

1. **broker** - a real mosquitto on a free port.
2. **controller** - ``spillway controller serve`` (SQLite, a fresh database per run) with a
   bootstrap admin token; its URL, the dashboard's and an ``export SPILLWAY_URL=...
   SPILLWAY_TOKEN=...`` line are printed so ``spillway rollout status`` and the dashboard
   work against the demo.
3. **models** - ``models.build`` (FP32 and INT8 ONNX, content-hash cached under
   ``model_dir``; a reduced evaluation set for the quality gates) in a child process, then
   both variants of version 1.0.0 uploaded to the controller's registry over REST.
4. **pool** - ``spillway pool serve`` (1 replica, TP=1), checked through the controller's
   gateway (``POST /api/v1/embed``) until it answers.
5. **agents** - N ``spillway agent run`` processes with the device profiles in turn, each
   serving the FP32 variant on one intra-op thread and assigned FP32 1.0.0 (a no-op install:
   same digest), so the rollout has something to replace and to roll back to.
6. **rollout** - ``POST /api/v1/rollouts`` of the INT8 variant: a canary of one device,
   then the rest, each wave gated on errors, latency, offload and quality (a share of
   requests probed against the pool's FP32). Light traffic runs meanwhile, so the gates
   have something to read.
7. **traffic** - a seeded trace (``sim.traces.bursts``): steady Poisson, then a burst of
   the edge's capacity plus most of the pool's (both measured just before by short
   closed-loop probes, so the host's real speed sizes it), then steady again, replayed
   open loop against the agents' ``POST /v1/embed``; the overflow policy sends what the
   edge cannot serve in time to the pool.
8. **summary** - per device and fleet numbers as the clients saw them, the rollout's
   outcome; the JSON report.

Any failure raises ``DemoError`` naming the part and its log file; every child process is
stopped on the way out (and with ``keep_running``, only at Ctrl-C).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from models.checkpoint import MODEL_NAME, MODEL_VERSION
from models.signing import load_or_create_signing_key, public_path
from sim.broker import MosquittoBroker, free_port
from sim.demo_traffic import (
    TEXTS_PER_REQUEST,
    Served,
    edge_capacity,
    pool_capacity,
    replay,
    summarize,
    within,
)
from sim.processes import ADMIN_TOKEN_ENV, ChildProcess, bearer, new_admin_token
from sim.profiles import PROFILES, profile_for
from sim.registration import upload_variant
from sim.traces import bursts, poisson

logger = logging.getLogger(__name__)

FP32 = "fp32-onnx"
INT8 = "int8-onnx"
DEMO_EVAL_SENTENCES = 200
"""Held-out sentences of the demo build's quality gates (the tests use as many; a published
build uses >= 1000): keeps a cold build to a few minutes on a small host."""
TERMINAL_ROLLOUT_STATES = ("completed", "rolled_back", "aborted")


class DemoError(RuntimeError):
    """A part of the demo failed; the message names it and the log to read."""


@dataclass(frozen=True)
class DemoSettings:
    agents: int = 3
    duration_s: float = 20.0
    """Length of the traffic phase (steady, burst, steady)."""
    work_dir: Path = Path("var/demo")
    http_port: int | None = None
    """Controller port; None picks a free one."""
    model_dir: Path = Path("var/models")
    """Where the variants are built (cached by content hash: a second run is a no-op)."""
    eval_sentences: int = DEMO_EVAL_SENTENCES
    startup_timeout_s: float = 90.0
    rollout_timeout_s: float = 240.0
    keepalive_s: int = 5
    telemetry_interval_s: float = 2.0
    """Agents' telemetry period: the rollout gates read it, so short keeps waves short."""
    wave_interval_s: float = 3.0
    """Observation time of a rollout wave before its gates are evaluated."""
    quality_sample_share: float = 0.5
    burst_pool_share: float = 0.8
    """The burst is the edge's capacity plus this share of the cloud pool's (both measured
    just before by ``capacity_probe_s`` probes): more than the edge serves alone, no more than
    edge and cloud serve together, so overflow is what keeps it within its deadline."""
    min_burst_factor: float = 1.5
    """...but at least this multiple of the edge capacity, so the burst always overflows (on
    a host whose pool is small next to its edge, some of it then misses its deadline)."""
    capacity_probe_s: float = 2.0
    """Length of each closed-loop probe: 4 clients per agent through their HTTP ingress (the
    edge), then 4 clients through the controller's ``POST /api/v1/embed`` (the pool)."""
    base_factor: float = 0.4
    """Steady rate as a multiple of the fleet's measured edge capacity."""
    edge_slo_ms: float = 500.0
    """The agents' latency objective: their overflow policy offloads a request whose predicted
    local wait would miss it. Well above a steady-load wait (tens of ms), so only the burst
    overflows, and well below ``deadline_ms``, so it overflows before answers get late."""
    deadline_ms: float = 2000.0
    """Every traffic request's deadline; the rollout's p95 gate and the light traffic's
    deadlines are 1.5x it."""
    keep_running: bool = False
    """After the summary, keep everything up (with light traffic) until Ctrl-C."""
    split_cpus: bool = True
    """Pin the pool and the agents to separate halves of this host's CPUs (``split_cpus``)."""


@dataclass(frozen=True)
class CpuSplit:
    """Which CPUs the agents and the pool may use; None: any."""

    edge: frozenset[int] | None = None
    pool: frozenset[int] | None = None


def split_cpus(cpus: list[int]) -> CpuSplit:
    """The cloud pool gets the upper half of ``cpus``, the agents the lower half (the pool
    at least one). On one host the edge and the cloud would otherwise take each other's
    cores, which separate machines never do; a burst must find the cloud with room to
    spare. One CPU: no split."""
    if len(cpus) < 2:
        return CpuSplit()
    half = len(cpus) // 2
    return CpuSplit(edge=frozenset(cpus[:half]), pool=frozenset(cpus[half:]))


def _why(summary: dict[str, Any]) -> str:
    """`` (12 deadline_exceeded: answered at once, not computed)`` or nothing."""
    counts = summary.get("failed_by_status") or {}
    if not counts:
        return ""
    parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    if set(counts) == {"deadline_exceeded"}:
        parts += ": past their deadline, answered at once without computing"
    return f" ({parts})"


def _cpu_list(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


@dataclass
class DemoReport:
    controller_url: str
    dashboard_url: str = ""
    steps_s: dict[str, float] = field(default_factory=dict)
    """Wall seconds each step took."""
    models: dict[str, Any] = field(default_factory=dict)
    pool: dict[str, Any] = field(default_factory=dict)
    devices: list[dict[str, Any]] = field(default_factory=list)
    rollout: dict[str, Any] = field(default_factory=dict)
    traffic: dict[str, Any] = field(default_factory=dict)
    fleet: dict[str, Any] = field(default_factory=dict)
    """The controller's ``/api/v1/fleet/summary`` at the end."""
    started_at: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, Any]:
        return {
            "controller_url": self.controller_url,
            "dashboard_url": self.dashboard_url,
            "steps_s": self.steps_s,
            "models": self.models,
            "pool": self.pool,
            "devices": self.devices,
            "online": sum(1 for d in self.devices if d.get("status") == "online"),
            "rollout": self.rollout,
            "traffic": self.traffic,
            "fleet": self.fleet,
        }


# -- helpers ---------------------------------------------------------------------------------


def _check_children(children: list[ChildProcess], what: str) -> None:
    for child in children:
        code = child.exited()
        if code is not None:
            raise DemoError(
                f"{child.name} exited with {code} while {what} (see {child.log_path}): "
                f"{child.log_tail(1)}"
            )


def _poll(
    what: str,
    check: Callable[[], bool],
    timeout_s: float,
    children: list[ChildProcess],
    *,
    log: Path | None = None,
    period_s: float = 0.2,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _check_children(children, f"waiting for {what}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(period_s)
    where = f" (see {log})" if log is not None else ""
    raise DemoError(f"timed out after {timeout_s:.0f}s waiting for {what}{where}")


def _ok(response: httpx.Response, what: str, log: Path) -> Any:
    if response.status_code >= 400:
        raise DemoError(f"{what}: HTTP {response.status_code} {response.text[:300]} (see {log})")
    return response.json()


@contextmanager
def _part(name: str, log: Path) -> Iterator[None]:
    """Turn any unexpected failure inside a step into a one-line ``DemoError``."""
    try:
        yield
    except DemoError:
        raise
    except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
        raise DemoError(f"{name} failed: {type(exc).__name__}: {exc} (see {log})") from exc


def _devices(http: httpx.Client) -> list[dict[str, Any]]:
    response = http.get("/api/v1/devices", params={"page_size": 200})
    response.raise_for_status()
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def _model_section(device: dict[str, Any]) -> dict[str, Any]:
    section = ((device.get("reported") or {}).get("policy") or {}).get("model") or {}
    return section if isinstance(section, dict) else {}


# -- step 3: models ----------------------------------------------------------------------------


def _build_in_child(out: str, eval_sentences: int, log_path: str, result_path: str) -> None:
    """The build, in a spawned process: torch stays out of the demo's own memory."""
    import warnings

    from models.build import BuildOptions, build_all

    logging.basicConfig(filename=log_path, level=logging.INFO, force=True)
    warnings.filterwarnings("ignore")
    report = build_all(
        BuildOptions(out=Path(out), eval_sentences=eval_sentences, variants=(FP32, INT8)),
        progress=lambda variant, step: logging.info("%s: %s", variant, step),
    )
    Path(result_path).write_text(json.dumps({"built": report.built, "cached": report.cached}))


def build_models(model_dir: Path, eval_sentences: int, log: Path) -> dict[str, Any]:
    """Build (or find cached) the FP32 and INT8 variants; returns what was built and how long."""
    log.parent.mkdir(parents=True, exist_ok=True)
    result = log.with_suffix(".json")
    result.unlink(missing_ok=True)
    t0 = time.monotonic()
    proc = multiprocessing.get_context("spawn").Process(
        target=_build_in_child,
        args=(str(model_dir), eval_sentences, str(log), str(result)),
        name="spillway-demo-build",
    )
    proc.start()
    try:
        proc.join()
    except BaseException:
        proc.terminate()
        proc.join(10)
        raise
    if proc.exitcode != 0 or not result.is_file():
        raise DemoError(f"model build failed with exit code {proc.exitcode} (see {log})")
    body: dict[str, Any] = json.loads(result.read_text())
    body["seconds"] = round(time.monotonic() - t0, 1)
    return body


def _upload(http: httpx.Client, variant_dir: Path, log: Path) -> dict[str, Any]:
    manifest = (variant_dir / "manifest.json").read_bytes()
    response = upload_variant(http, variant_dir, manifest, model=MODEL_NAME)
    body: dict[str, Any] = _ok(response, f"registering {variant_dir.name}", log)
    return body


# -- the story ---------------------------------------------------------------------------------


class _Demo:
    def __init__(self, settings: DemoSettings, say: Callable[[str], None]) -> None:
        self.settings = settings
        self.say = say
        self.work = settings.work_dir.resolve()
        self.model_dir = settings.model_dir.resolve()
        self.children: list[ChildProcess] = []
        self.http_port = settings.http_port or free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.report = DemoReport(controller_url=self.url, dashboard_url=f"{self.url}/dashboard/")
        self.admin_token = new_admin_token()
        self.http = httpx.Client(base_url=self.url, timeout=10.0, headers=bearer(self.admin_token))
        self.targets: list[tuple[str, str]] = []
        self.ids: list[str] = []
        self.profiles: dict[str, str] = {}
        self.controller_log = self.work / "logs" / "controller.log"
        self.cpus = (
            split_cpus(sorted(os.sched_getaffinity(0))) if settings.split_cpus else CpuSplit()
        )

    def _timed(self, step: str, t0: float) -> float:
        took = round(time.monotonic() - t0, 1)
        self.report.steps_s[step] = took
        return took

    def _start(self, child: ChildProcess) -> ChildProcess:
        child.start()
        self.children.append(child)
        return child

    # 2
    def controller(self, broker: MosquittoBroker) -> None:
        t0 = time.monotonic()
        key_path = self.work / "keys" / "signing.key"
        load_or_create_signing_key(key_path)  # agents trust its public half for desired state
        self.desired_key = public_path(key_path)
        self._start(
            ChildProcess(
                "controller",
                [
                    "controller",
                    "serve",
                    "--port",
                    str(self.http_port),
                    "--mqtt-port",
                    str(broker.port),
                    "--database-url",
                    f"sqlite:///{self.work / 'controller.db'}",
                ],
                log_path=self.controller_log,
                env={
                    "SPILLWAY_SIGNING_KEY_PATH": str(key_path),
                    ADMIN_TOKEN_ENV: self.admin_token,
                    "SPILLWAY_ARTIFACT_DIR": str(self.work / "artifacts"),
                    # Manifests signed by the model build's key are accepted for upload.
                    "SPILLWAY_TRUSTED_KEYS_DIR": str(self.model_dir / "keys"),
                },
            )
        )
        _poll(
            "the controller to be ready",
            lambda: self.http.get("/readyz").status_code == 200,
            self.settings.startup_timeout_s,
            self.children,
            log=self.controller_log,
        )
        self._timed("controller", t0)
        self.say(f"controller  {self.url}  (REST /api/v1, /metrics; logs {self.controller_log})")
        self.say(f"dashboard   {self.report.dashboard_url}  (sign in with the admin token)")
        self.say(f"            export SPILLWAY_URL={self.url} SPILLWAY_TOKEN={self.admin_token}")

    # 3
    def models(self) -> None:
        t0 = time.monotonic()
        log = self.work / "logs" / "build.log"
        built = build_models(self.model_dir, self.settings.eval_sentences, log)
        how = (
            f"built {', '.join(built['built'])} in {built['seconds']:.0f}s (a cold build; "
            "cached from now on)"
            if built["built"]
            else f"cached ({built['seconds']:.1f}s to check)"
        )
        with _part("model registration", self.controller_log):
            versions = [
                _upload(self.http, self.model_dir / v, self.controller_log) for v in (FP32, INT8)
            ]
        variants = {
            v["variant"]: round(v["size_bytes"] / 2**20, 1) for v in versions[-1]["variants"]
        }
        self.report.models = {
            "name": MODEL_NAME,
            "version": versions[-1]["version"],
            "state": versions[-1]["state"],
            "variants_mib": variants,
            "build": built,
            "model_dir": str(self.model_dir),
        }
        self._timed("models", t0)
        self.say(f"models      {FP32} + {INT8}: {how}  ({self.model_dir})")
        sizes = ", ".join(f"{k} {mib} MiB" for k, mib in variants.items())
        self.say(
            f"registry    {MODEL_NAME} {versions[-1]['version']} {versions[-1]['state']}: {sizes}"
        )

    # 4
    def pool(self, broker: MosquittoBroker) -> None:
        t0 = time.monotonic()
        pool = self._start(
            ChildProcess(
                "pool",
                [
                    "pool",
                    "serve",
                    "--replicas",
                    "1",
                    "--tp",
                    "1",
                    "--no-autoscale",
                    "--mqtt-port",
                    str(broker.port),
                    "--state-dir",
                    str(self.work / "pool"),
                ],
                log_path=self.work / "logs" / "pool.log",
                env={},
                cpus=self.cpus.pool,
            )
        )
        answered: dict[str, Any] = {}

        def answers() -> bool:
            response = self.http.post(
                "/api/v1/embed",
                json={"texts": ["is the pool up?"], "deadline_ms": 5000},
                timeout=30,
            )
            if response.status_code == 200:
                answered.update(response.json())
            return response.status_code == 200

        _poll(
            "the cloud pool to answer through the gateway",
            answers,
            self.settings.startup_timeout_s,
            self.children,
            log=pool.log_path,
            period_s=1.0,
        )
        took = self._timed("pool", t0)
        self.report.pool = {"replicas": 1, "tp": 1, "ready_s": took}
        self.say(
            f"pool        1 replica, TP=1 (torch FP32), answering via {self.url}/api/v1/embed "
            f"after {took:.0f}s  (logs {pool.log_path})"
        )
        if self.cpus.pool:
            self.say(
                f"cpus        pool on CPU {_cpu_list(self.cpus.pool)}, agents on CPU "
                f"{_cpu_list(self.cpus.edge or frozenset())}: on one host, the cloud and the "
                "edge do not take each other's cores, as on separate machines"
            )

    # 5
    def agents(self, broker: MosquittoBroker) -> None:
        t0 = time.monotonic()
        self.ids = [f"demo-edge-{i + 1:02d}" for i in range(self.settings.agents)]
        ports: dict[str, int] = {}
        for i, device_id in enumerate(self.ids):
            profile = profile_for(i)
            self.profiles[device_id] = profile.hardware_class
            self._start(
                ChildProcess(
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
                        str(self.work / "agents" / device_id),
                        "--keepalive-s",
                        str(self.settings.keepalive_s),
                        "--telemetry-interval-s",
                        str(self.settings.telemetry_interval_s),
                        "--model-dir",
                        str(self.model_dir),
                        "--variant",
                        FP32,
                        "--http-port",
                        "0",  # any free port: the agent logs the one it bound
                        "--intra-op-threads",
                        "1",
                    ],
                    log_path=self.work / "logs" / f"{device_id}.log",
                    env={
                        "SPILLWAY_EDGE_DESIRED_KEY_FILES": json.dumps([str(self.desired_key)]),
                        "SPILLWAY_EDGE_SLO_MS": str(self.settings.edge_slo_ms),
                    },
                    cpus=self.cpus.edge,
                )
            )
        log = self.work / "logs"
        _poll(
            "the agents' HTTP ingress",
            lambda: self._bound_ports(ports),
            self.settings.startup_timeout_s,
            self.children,
            log=log,
        )
        self.targets = [(d, f"http://127.0.0.1:{ports[d]}") for d in self.ids]

        def all_online() -> bool:
            online = {d["id"] for d in _devices(self.http) if d["status"] == "online"}
            return online >= set(self.ids)

        def all_serving() -> bool:
            return all(
                httpx.get(f"{url}/healthz", timeout=2).status_code == 200 for _, url in self.targets
            )

        _poll(
            f"{len(self.ids)} agents online",
            all_online,
            self.settings.startup_timeout_s,
            self.children,
            log=log,
        )
        _poll(
            "the agents' HTTP ingress",
            all_serving,
            self.settings.startup_timeout_s,
            self.children,
            log=log,
        )

        # Assign FP32 1.0.0: the same digest the agents serve, so no download; it is what
        # the rollout records as each device's previous model (and would roll back to).
        generations: dict[str, int] = {}
        for device_id in self.ids:
            body = _ok(
                self.http.put(
                    f"/api/v1/devices/{device_id}/model",
                    json={"name": MODEL_NAME, "version": MODEL_VERSION, "variant": FP32},
                ),
                f"assigning {FP32} to {device_id}",
                self.controller_log,
            )
            generations[device_id] = int(body["generation"])

        def assigned() -> bool:
            by_id = {d["id"]: d for d in _devices(self.http)}
            return all(
                (by_id[i].get("reported") or {}).get("observed_generation") == generations[i]
                and _model_section(by_id[i]).get("state") == "active"
                for i in self.ids
            )

        _poll(
            "every agent to apply FP32 1.0.0",
            assigned,
            self.settings.startup_timeout_s,
            self.children,
            log=log,
        )
        self._timed("agents", t0)
        listed = ", ".join(f"{d} ({self.profiles[d].removeprefix('jetson-')})" for d in self.ids)
        self.say(f"agents      {len(self.ids)} online, serving {FP32} {MODEL_VERSION}: {listed}")

    def _bound_ports(self, ports: dict[str, int]) -> bool:
        """Read each agent's ``http ingress listening`` log line for the port it bound."""
        for child in self.children:
            if child.name not in self.ids or child.name in ports or not child.log_path.exists():
                continue
            for line in child.log_path.read_text(errors="replace").splitlines():
                if '"http ingress listening"' in line:
                    ports[child.name] = int(json.loads(line)["port"])
                    break
        return len(ports) == len(self.ids)

    # 6
    def rollout(self) -> None:
        t0 = time.monotonic()
        n = len(self.ids)
        body = {
            "model": MODEL_NAME,
            "version": MODEL_VERSION,
            "target": {"labels": {"site": "demo"}},
            "variants": {p.hardware_class: INT8 for p in PROFILES},
            "waves": {
                "canary_share": 1 / n if n > 1 else 0.0,
                "canary_min_devices": 1,
                "wave_size": max(1, n - 1),
                "interval_s": self.settings.wave_interval_s,
                "install_timeout_s": 120,
                "gate_timeout_s": 90,
            },
            "gates": {
                "max_error_rate": 0.02,
                "min_requests": 3,
                "max_p95_latency_ms": 1.5 * self.settings.deadline_ms,
                # Off: agents report offload_ratio since their start, not since the new
                # version went active, so overflow before the rollout would count against it.
                "max_offload_rate": None,
                "max_install_failure_rate": 0.0,
                "min_quality_agreement": 0.99,
                "min_quality_agreement_floor": 0.95,
                "min_quality_samples": 3,
            },
            "on_gate_failure": "rollback",
            "quality_sample_share": self.settings.quality_sample_share,
        }
        created = _ok(
            self.http.post("/api/v1/rollouts", json=body),
            "starting the rollout",
            self.controller_log,
        )
        rollout_id = created["id"]
        waves = created["waves"]
        members: dict[int, list[str]] = {}
        for device in created["devices"]:
            members.setdefault(device["wave"], []).append(device["device_id"])
        self.say(
            f"rollout     #{rollout_id}: {INT8} {MODEL_VERSION} to {n} devices in {len(waves)} "
            f"waves (canary first), gates: install, errors, p95, quality vs the pool's FP32 "
            f"({self.settings.quality_sample_share:.0%} of requests probed)"
        )
        # Light traffic meanwhile: the gates need requests and quality samples to read.
        stop = threading.Event()
        trickle: list[Served] = []
        rate = 1.0 * n
        trace = poisson(
            rate,
            duration_s=self.settings.rollout_timeout_s,
            slo_ms=1.5 * self.settings.deadline_ms,
            seed=7,
        )
        thread = threading.Thread(
            target=lambda: trickle.extend(
                replay(trace, self.targets, stop=stop, first_index=10**6)
            ),
            name="demo-rollout-traffic",
            daemon=True,
        )
        thread.start()
        seen: dict[int, str] = {}
        final: dict[str, Any] = {}
        try:
            deadline = time.monotonic() + self.settings.rollout_timeout_s
            while time.monotonic() < deadline:
                _check_children(self.children, "the rollout ran")
                current = _ok(
                    self.http.get(f"/api/v1/rollouts/{rollout_id}"),
                    "rollout status",
                    self.controller_log,
                )
                for wave in current["waves"]:
                    if seen.get(wave["index"]) != wave["state"] and wave["state"] != "pending":
                        seen[wave["index"]] = wave["state"]
                        kind = "canary" if wave["canary"] else "wave"
                        who = ", ".join(members.get(wave["index"], []))
                        gates = _gate_line(wave.get("gate_results") or [])
                        self.say(
                            f"rollout     {kind} {wave['index'] + 1}/{len(waves)} ({who}): "
                            f"{wave['state']}{'  ' + gates if gates else ''}"
                        )
                if current["state"] in TERMINAL_ROLLOUT_STATES or current["state"] == "paused":
                    final = current
                    break
                time.sleep(0.5)
        finally:
            stop.set()
            thread.join(timeout=60)
        took = self._timed("rollout", t0)
        if not final:
            raise DemoError(
                f"rollout #{rollout_id} did not finish in {self.settings.rollout_timeout_s:.0f}s "
                f"(see {self.controller_log}; `spillway rollout status {rollout_id}`)"
            )
        self.report.rollout = {
            "id": rollout_id,
            "state": final["state"],
            "reason": final.get("reason"),
            "duration_s": took,
            "waves": [
                {
                    "index": w["index"],
                    "canary": w["canary"],
                    "state": w["state"],
                    "devices": members.get(w["index"], []),
                    "gates": w.get("gate_results") or [],
                }
                for w in final["waves"]
            ],
            "devices": {d["device_id"]: d["state"] for d in final["devices"]},
        }
        if final["state"] != "completed":
            raise DemoError(
                f"rollout #{rollout_id} ended {final['state']}: {final.get('reason')} "
                f"(see {self.controller_log})"
            )
        light = summarize(trickle, window_s=took)
        self.say(
            f"rollout     #{rollout_id} completed in {took:.0f}s: every device serves {INT8} "
            f"(light traffic meanwhile: {light['ok']} answers, {light['cloud']} from the cloud)"
        )

    # 7
    def traffic(self) -> list[Served]:
        t0 = time.monotonic()
        probe_s = self.settings.capacity_probe_s
        capacity = edge_capacity(self.targets, seconds=probe_s)
        if capacity <= 0:
            raise DemoError(
                "traffic: the edge answered nothing in the capacity probe "
                f"(see {self.work / 'logs'})"
            )
        cloud = pool_capacity(self.url, self.admin_token, seconds=probe_s)
        d = self.settings.duration_s
        burst_s = max(3.0, 0.3 * d)
        first_burst_s = 0.4 * d
        base = max(1.0, self.settings.base_factor * capacity)
        burst = max(
            base * 2,
            capacity + self.settings.burst_pool_share * cloud,
            self.settings.min_burst_factor * capacity,
        )
        trace = bursts(
            base_rate_per_s=base,
            burst_rate_per_s=burst,
            burst_s=burst_s,
            period_s=max(d, burst_s),
            duration_s=d,
            slo_ms=self.settings.deadline_ms,
            first_burst_s=first_burst_s,
            seed=11,
        )
        self.say(
            f"traffic     {d:.0f}s: steady {base:.0f} req/s (Poisson), burst {burst:.0f} req/s "
            f"from t={first_burst_s:.0f}s for {burst_s:.0f}s ({burst / capacity:.1f}x the edge "
            f"capacity of {capacity:.0f} req/s; the pool serves {cloud:.0f} req/s; both measured "
            f"just before by {probe_s:g}s closed-loop probes; {TEXTS_PER_REQUEST} texts a request)"
        )
        served = replay(trace, self.targets)
        _check_children(self.children, "traffic ran")
        self._timed("traffic", t0)
        steady = within(served, 0, first_burst_s) + within(served, first_burst_s + burst_s, d)
        in_burst = within(served, first_burst_s, first_burst_s + burst_s)
        totals = summarize(served, window_s=d)
        self.report.traffic = {
            "duration_s": d,
            "texts_per_request": TEXTS_PER_REQUEST,
            "edge_capacity_rps": round(capacity, 1),
            "pool_capacity_rps": round(cloud, 1),
            "base_rps": round(base, 1),
            "burst_rps": round(burst, 1),
            "burst_window_s": [round(first_burst_s, 1), round(first_burst_s + burst_s, 1)],
            "totals": totals,
            "steady": summarize(steady, window_s=d - burst_s),
            "burst": summarize(in_burst, window_s=burst_s),
        }
        b = self.report.traffic["burst"]
        s = self.report.traffic["steady"]
        self.say(
            f"traffic     {totals['requests']} requests: {totals['edge']} at the edge, "
            f"{totals['cloud']} overflowed to the cloud (burst {b['offload_ratio']:.0%}, "
            f"steady {s['offload_ratio']:.0%}), {totals['failed']} not served{_why(totals)}"
        )
        return served

    def finish(self, served: list[Served]) -> None:
        by_id = {d["id"]: d for d in _devices(self.http)}
        d = self.settings.duration_s
        for device_id in self.ids:
            device = by_id.get(device_id, {})
            section = _model_section(device)
            self.report.devices.append(
                {
                    "id": device_id,
                    "profile": self.profiles[device_id],
                    "status": device.get("status"),
                    "variant": section.get("variant"),
                    "model_state": section.get("state"),
                    "traffic": summarize(
                        [s for s in served if s.device_id == device_id], window_s=d
                    ),
                }
            )
        response = self.http.get("/api/v1/fleet/summary")
        if response.status_code == 200:
            self.report.fleet = response.json()

    def keep_running(self) -> None:
        self.say(
            f"running     until Ctrl-C, with light traffic: {self.report.dashboard_url}  "
            f"(spillway rollout status {self.report.rollout.get('id', '')})"
        )
        stop = threading.Event()
        trace = poisson(
            1.0 * len(self.ids),
            duration_s=7 * 24 * 3600.0,
            slo_ms=1.5 * self.settings.deadline_ms,
            seed=13,
        )
        thread = threading.Thread(
            target=lambda: replay(trace, self.targets, stop=stop, first_index=2 * 10**6),
            name="demo-idle-traffic",
            daemon=True,
        )
        thread.start()
        try:
            while True:
                _check_children(self.children, "the demo kept running")
                time.sleep(0.5)
        finally:
            stop.set()

    def close(self) -> None:
        self.http.close()
        for child in reversed(self.children):
            child.stop()


def _gate_line(results: list[dict[str, Any]]) -> str:
    """``quality pass (0.9968)`` and friends, for the waves' progress lines."""
    parts = []
    for gate in results:
        name = str(gate.get("gate", gate.get("name", "?")))
        verdict = str(gate.get("verdict", "?"))
        value = gate.get("value", gate.get("observed"))
        shown = f" {value:.4g}" if isinstance(value, int | float) else ""
        parts.append(f"{name} {verdict}{shown}")
    return "gates: " + ", ".join(parts) if parts else ""


def _fresh(work: Path) -> None:
    """Every demo starts with a fresh fleet: database, broker store (its retained desired
    states would reach the new agents), agents' state, stored artifacts, logs."""
    (work / "controller.db").unlink(missing_ok=True)
    for part in ("broker", "agents", "artifacts", "pool", "logs"):
        shutil.rmtree(work / part, ignore_errors=True)


def run_demo(
    settings: DemoSettings,
    *,
    say: Callable[[str], None],
    summary: Callable[[DemoReport], None] | None = None,
) -> DemoReport:
    """The whole story (module docstring); ``summary`` is called with the report before the
    fleet is stopped (or kept running)."""
    demo = _Demo(settings, say)
    demo.work.mkdir(parents=True, exist_ok=True)
    _fresh(demo.work)
    broker = MosquittoBroker(demo.work / "broker")
    broker.start()
    say(f"broker      mqtt://127.0.0.1:{broker.port}  (mosquitto, {demo.work / 'broker'})")
    try:
        with _part("controller", demo.controller_log):
            demo.controller(broker)
        demo.models()
        with _part("pool", demo.work / "logs" / "pool.log"):
            demo.pool(broker)
        with _part("agents", demo.work / "logs"):
            demo.agents(broker)
        with _part("rollout", demo.controller_log):
            demo.rollout()
        with _part("traffic", demo.work / "logs"):
            served = demo.traffic()
            demo.finish(served)
        if summary is not None:
            summary(demo.report)
        if settings.keep_running:
            demo.keep_running()
        return demo.report
    finally:
        demo.close()
        broker.stop()


def write_report(report: DemoReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.as_json(), indent=2, default=str) + "\n")
