"""``spillway bench fleet``: the control plane under a fleet of simulated agents.

One real mosquitto, one real controller (``spillway controller serve``, a child process,
SQLite in the run's directory unless ``--database-url`` says otherwise), and N simulated
agents (``sim.fleet``: real MQTT connections and ``protocol`` messages, Last Will, hello,
presence, 1 Hz heartbeat + telemetry, answers to desired state; no model) in a few worker
processes. Measured, side by side in one run:

* **ingest** - for ``--duration`` seconds at full load: the controller's
  ``spillway_ingest_pending`` (accepted messages waiting for the database) sampled every
  second, heartbeats + telemetry applied per second (``spillway_mqtt_messages_total``) vs
  sent per second, and the backlog's slope over the second half. Holds when the backlog
  does not grow (a slope above 1 msg/s and above twice its standard error) and its
  second-half mean stays under max(100, a tenth of a second's messages).
* **REST under load** - a client calling ``GET /api/v1/devices?page_size=50`` back to back
  during the same seconds: p50 / p99. Target p99 < 100 ms.
* **convergence** - for 10 / 100 / N agents: with the INT8 variant built (``--model-dir``),
  a real rollout of it (``POST /api/v1/rollouts``, one wave, gates other than install off)
  until the rollout completes, every device having reported the model active; without it,
  ``PUT /api/v1/devices/{id}/desired`` to each device and polling until every one reports
  that generation. Seconds from the request.
"""

from __future__ import annotations

import re
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import typer

from models.signing import load_or_create_signing_key
from sim.broker import BrokerError, MosquittoBroker, free_port
from sim.fleet import FleetProcesses, controller_http
from sim.processes import ADMIN_TOKEN_ENV, ChildProcess, new_admin_token
from sim.registration import MINILM, register_variant
from sim.report import BenchReport, progress

REST_P99_TARGET_MS = 100.0
_METRIC = re.compile(r"^(\w+)(?:\{([^}]*)\})?\s+([0-9.eE+-]+)$")


class FleetBenchError(RuntimeError):
    """The benchmark cannot run or the fleet never came up; the message says why."""


@dataclass(frozen=True)
class FleetOptions:
    agents: int = 1000
    workers: int = 4
    duration_s: float = 30.0
    rollout_sizes: tuple[int, ...] = (10, 100, 1000)
    database_url: str | None = None
    startup_timeout_s: float = 180.0
    rollout_timeout_s: float = 60.0
    model_dir: Path | None = None
    """Built variants: with ``int8-onnx`` there, convergence is measured with real rollouts
    (``POST /api/v1/rollouts``) of it; without, with one desired-state PUT per device."""


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> ``{"name{labels}": value}`` (pure: unit-tested)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _METRIC.match(line.strip())
        if match:
            name, labels, value = match.groups()
            out[f"{name}{{{labels}}}" if labels else name] = float(value)
    return out


def backlog_slope(times_s: list[float], pending: list[float]) -> float:
    """Least-squares slope of the backlog, messages per second (pure)."""
    return backlog_trend(times_s, pending)[0]


def backlog_trend(times_s: list[float], pending: list[float]) -> tuple[float, float]:
    """(slope, its standard error), messages per second (pure). The error is 0 with fewer
    than three samples."""
    if len(times_s) < 2:
        return 0.0, 0.0
    t, y = np.asarray(times_s, dtype=float), np.asarray(pending, dtype=float)
    slope, intercept = np.polyfit(t, y, 1)
    if len(t) < 3:
        return float(slope), 0.0
    residuals = y - (slope * t + intercept)
    spread = float(np.sum((t - t.mean()) ** 2))
    error = float(np.sqrt(np.sum(residuals**2) / (len(t) - 2) / spread)) if spread else 0.0
    return float(slope), error


def backlog_grows(slope: float, error: float) -> bool:
    """Growing: a slope above 1 message/s that is also more than twice its standard error
    (a backlog that only wobbles around a level is not growing)."""
    return slope > max(1.0, 2.0 * error)


def _received(metrics: dict[str, float]) -> float:
    """Heartbeats + telemetry the controller decoded and queued (before the database)."""
    return sum(
        metrics.get(f'spillway_ingest_received_total{{channel="{c}"}}', 0.0)
        for c in ("heartbeat", "telemetry")
    )


def _coalesced(metrics: dict[str, float]) -> float:
    return metrics.get('spillway_ingest_coalesced_total{channel="heartbeat"}', 0.0)


def _batches(metrics: dict[str, float]) -> tuple[float, float]:
    """(transactions of two or more messages, messages in them) so far."""
    return (
        metrics.get("spillway_ingest_batch_messages_count", 0.0),
        metrics.get("spillway_ingest_batch_messages_sum", 0.0),
    )


def _applied(metrics: dict[str, float]) -> float:
    return sum(
        metrics.get(f'spillway_mqtt_messages_total{{channel="{c}"}}', 0.0)
        for c in ("heartbeat", "telemetry")
    )


class _Controller:
    def __init__(self, broker: MosquittoBroker, work: Path, options: FleetOptions) -> None:
        self.port = free_port()
        url = options.database_url or f"sqlite:///{work / 'controller.db'}"
        self.token = new_admin_token()
        """The controller's bootstrap admin token: every REST call of the bench sends it."""
        self.proc = ChildProcess(
            "controller",
            [
                "controller",
                "serve",
                "--port",
                str(self.port),
                "--mqtt-port",
                str(broker.port),
                "--database-url",
                url,
            ],
            log_path=work / "controller.log",
            env={
                "SPILLWAY_LOG_LEVEL": "WARNING",
                "SPILLWAY_MODEL_WATCH_VARIANTS": "[]",
                "SPILLWAY_ARTIFACT_DIR": str(work / "artifacts"),
                "SPILLWAY_SIGNING_KEY_PATH": str(work / "keys" / "signing.key"),
                "SPILLWAY_INGEST_QUEUE_MAX": str(max(10_000, options.agents * 20)),
                "SPILLWAY_MAX_PAGE_SIZE": "500",
                ADMIN_TOKEN_ENV: self.token,
            },
        )
        self.http = controller_http(f"http://127.0.0.1:{self.port}", token=self.token)
        self.database = "PostgreSQL" if url.startswith("postgresql") else "SQLite"
        self.signing_key = load_or_create_signing_key(work / "keys" / "signing.key")
        """The key the controller signs with and trusts uploads from (made before it starts)."""

    def start(self, timeout_s: float) -> None:
        self.proc.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.exited() is not None:
                raise FleetBenchError(f"controller exited: {self.proc.log_tail(5)}")
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise FleetBenchError(f"controller not ready in {timeout_s}s: {self.proc.log_tail(5)}")

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.http.get("/metrics").text)

    def total_devices(self) -> int:
        response = self.http.get("/api/v1/devices", params={"page_size": 1})
        response.raise_for_status()
        return int(response.json()["total"])

    def generations(self, device_ids: set[str]) -> dict[str, int]:
        """Observed generation of every device listed, page by page."""
        out: dict[str, int] = {}
        page = 1
        while True:
            response = self.http.get("/api/v1/devices", params={"page": page, "page_size": 500})
            response.raise_for_status()
            body = response.json()
            for item in body["items"]:
                if item["id"] in device_ids:
                    out[item["id"]] = int(
                        (item.get("reported") or {}).get("observed_generation") or 0
                    )
            if page * 500 >= body["total"]:
                return out
            page += 1

    def stop(self) -> None:
        self.http.close()
        self.proc.stop()


def _probe_rest(http: httpx.Client, stop: threading.Event, latencies: list[float]) -> None:
    while not stop.is_set():
        began = time.perf_counter()
        response = http.get("/api/v1/devices", params={"page_size": 50})
        latencies.append((time.perf_counter() - began) * 1000.0)
        response.raise_for_status()


def _converge(
    controller: _Controller, device_ids: list[str], round_no: int, timeout_s: float
) -> tuple[float, float | None, int]:
    """(seconds to PUT every desired state, seconds until all report it from the first PUT
    or None after ``timeout_s``, how many had converged)."""
    began = time.perf_counter()
    wanted: dict[str, int] = {}
    for device_id in device_ids:
        response = controller.http.put(
            f"/api/v1/devices/{device_id}/desired",
            json={"policy": {"bench_round": round_no, "slo_ms": 250}},
        )
        response.raise_for_status()
        wanted[device_id] = int(response.json()["generation"])
    put_s = time.perf_counter() - began
    ids = set(device_ids)
    deadline = time.monotonic() + timeout_s
    done = 0
    while time.monotonic() < deadline:
        seen = controller.generations(ids)
        done = sum(seen.get(d, 0) >= g for d, g in wanted.items())
        if done == len(wanted):
            return put_s, time.perf_counter() - began, done
        time.sleep(0.2)
    return put_s, None, done


_GATES_OFF = {
    "max_error_rate": None,
    "max_p95_latency_ms": None,
    "max_offload_rate": None,
    "min_quality_agreement": None,
    "min_quality_agreement_floor": None,
}
"""Simulated agents serve nothing: only the install gate (every device active) is kept."""


def _roll_out(
    controller: _Controller, device_ids: list[str], version: str, timeout_s: float
) -> tuple[float, float | None, int]:
    """One rollout of ``version`` to ``device_ids`` in a single wave with no observation time:
    (seconds for the POST, seconds from it until the rollout completed or None after
    ``timeout_s``, devices active)."""
    began = time.perf_counter()
    response = controller.http.post(
        "/api/v1/rollouts",
        json={
            "model": MINILM,
            "version": version,
            "target": {"device_ids": device_ids},
            "waves": {"canary_share": 0.0, "wave_size": len(device_ids), "interval_s": 0.0},
            "gates": _GATES_OFF,
            "quality_sample_share": 0.0,
        },
    )
    response.raise_for_status()
    rollout_id = response.json()["id"]
    post_s = time.perf_counter() - began
    deadline = time.monotonic() + timeout_s
    active = 0
    while time.monotonic() < deadline:
        body = controller.http.get(f"/api/v1/rollouts/{rollout_id}").json()
        active = sum(d["state"] == "active" for d in body["devices"])
        if body["state"] == "completed":
            return post_s, time.perf_counter() - began, active
        if body["state"] in ("aborted", "rolled_back", "failed"):
            raise FleetBenchError(
                f"rollout {rollout_id} ended {body['state']}: {body.get('reason')}"
            )
        time.sleep(0.2)
    return post_s, None, active


def run_fleet_bench(
    options: FleetOptions, *, step: Callable[[str], None] | None = None
) -> BenchReport:
    notify = step or (lambda what: None)
    report = BenchReport("fleet", f"Fleet: control plane under {options.agents} simulated agents")
    sizes = sorted({min(n, options.agents) for n in options.rollout_sizes})
    with tempfile.TemporaryDirectory(prefix="spillway-bench-fleet-") as tmp:
        work = Path(tmp)
        broker = MosquittoBroker(work / "broker")
        broker.start()
        controller = _Controller(broker, work, options)
        fleet: FleetProcesses | None = None
        try:
            controller.start(options.startup_timeout_s)
            version = None
            int8 = None if options.model_dir is None else options.model_dir / "int8-onnx"
            if int8 is not None and (int8 / "manifest.json").is_file():
                version = register_variant(controller.http, int8, controller.signing_key)
            notify("controller ready")
            fleet = FleetProcesses(
                host=broker.host,
                port=broker.port,
                agents=options.agents,
                workers=max(1, min(options.workers, options.agents)),
            )
            ramp_began = time.perf_counter()
            fleet.start()
            deadline = time.monotonic() + options.startup_timeout_s
            while True:
                totals = fleet.totals()
                registered = controller.total_devices()
                if totals["connected"] >= options.agents and registered >= options.agents:
                    break
                if time.monotonic() > deadline:
                    raise FleetBenchError(
                        f"only {int(totals['connected'])} agents connected and {registered} "
                        f"registered of {options.agents} in {options.startup_timeout_s}s; "
                        f"{fleet.errors[:3]}"
                    )
                time.sleep(0.5)
            ramp_s = time.perf_counter() - ramp_began
            notify(f"{options.agents} agents registered in {ramp_s:.1f} s")

            # -- ingest + REST under load --------------------------------------------------
            samples: list[dict[str, float]] = []
            latencies: list[float] = []
            stop = threading.Event()
            probe_http = controller_http(
                f"http://127.0.0.1:{controller.port}", token=controller.token
            )
            probe = threading.Thread(
                target=_probe_rest, args=(probe_http, stop, latencies), daemon=True
            )
            t0 = time.perf_counter()
            first = controller.metrics()
            sent0 = fleet.totals()
            probe.start()
            try:
                while (elapsed := time.perf_counter() - t0) < options.duration_s:
                    time.sleep(1.0)
                    m = controller.metrics()
                    sent = fleet.totals()
                    samples.append(
                        {
                            "t_s": time.perf_counter() - t0,
                            "pending": m.get("spillway_ingest_pending", float("nan")),
                            "received": _received(m) - _received(first),
                            "applied": _applied(m) - _applied(first),
                            "coalesced": _coalesced(m) - _coalesced(first),
                            "batches": _batches(m)[0] - _batches(first)[0],
                            "batched": _batches(m)[1] - _batches(first)[1],
                            "sent": sent["heartbeats"]
                            + sent["telemetry"]
                            - sent0["heartbeats"]
                            - sent0["telemetry"],
                            "tick_lag_s": sent["max_tick_lag_s"],
                            "rejected": sum(
                                v
                                for k, v in m.items()
                                if k.startswith("spillway_mqtt_rejected_total")
                            ),
                        }
                    )
                del elapsed
            finally:
                stop.set()
                probe.join(timeout=30)
                probe_http.close()
            notify("load phase measured")

            # -- convergence ---------------------------------------------------------------
            convergence: list[dict[str, Any]] = []
            for round_no, n in enumerate(sizes, start=1):
                if version is not None:
                    put_s, converged_s, done = _roll_out(
                        controller, fleet.device_ids[:n], version, options.rollout_timeout_s
                    )
                else:
                    put_s, converged_s, done = _converge(
                        controller, fleet.device_ids[:n], round_no, options.rollout_timeout_s
                    )
                convergence.append(
                    {
                        "agents": n,
                        "request s": put_s,
                        "converged s": converged_s,
                        "after the request s": None if converged_s is None else converged_s - put_s,
                        "converged": f"{done}/{n}"
                        + (
                            ""
                            if converged_s is not None
                            else f" in {options.rollout_timeout_s:g} s"
                        ),
                    }
                )
                notify(f"{n} agents: {done}/{n} converged")
                if converged_s is None:
                    break  # a larger rollout cannot converge sooner
            final = fleet.totals()
        finally:
            if fleet is not None:
                fleet.stop()
            controller.stop()
            broker.stop()
    if version is not None:
        how = (
            f"Rollout convergence: POST /api/v1/rollouts of int8-onnx {version}, one wave, no "
            "observation time, gates other than install off (simulated agents serve nothing and "
            "report an assigned model active at once)"
        )
    else:
        how = "Desired-state convergence (one PUT per device, all PUTs timed as the request)"
    _fill(report, options, controller.database, ramp_s, samples, latencies, final)
    _fill_convergence(report, how, convergence)
    return report


def _fill(
    report: BenchReport,
    options: FleetOptions,
    database: str,
    ramp_s: float,
    samples: list[dict[str, float]],
    latencies: list[float],
    final: dict[str, float],
) -> None:
    times = [s["t_s"] for s in samples]
    pending = [s["pending"] for s in samples]
    span = times[-1] if times else 1.0
    sent_rate = samples[-1]["sent"] / span if samples else 0.0
    applied_rate = samples[-1]["applied"] / span if samples else 0.0
    received_rate = samples[-1]["received"] / span if samples else 0.0
    coalesced_rate = samples[-1]["coalesced"] / span if samples else 0.0
    batches = samples[-1]["batches"] if samples else 0.0
    mean_batch = samples[-1]["batched"] / batches if batches else float("nan")
    half = len(samples) // 2
    slope, slope_error = backlog_trend(times[half:], pending[half:])
    p50 = statistics.median(latencies) if latencies else float("nan")
    p99 = float(np.percentile(latencies, 99)) if latencies else float("nan")
    # One sample catches the backlog at any point of a batch: judge the 2nd half's mean.
    settled = statistics.fmean(pending[half:]) if pending[half:] else float("nan")
    holds = (
        bool(samples)
        and not backlog_grows(slope, slope_error)
        and settled <= max(100.0, 0.1 * sent_rate)
    )
    report.table(
        f"Load: {options.agents} simulated agents at 1 Hz heartbeat + telemetry for "
        f"{span:.0f} s ({database}, {options.workers} simulator processes)",
        ["measure", "value"],
        [
            {"measure": "agents connected and registered (ramp s)", "value": ramp_s},
            {"measure": "heartbeat + telemetry sent /s", "value": sent_rate},
            {"measure": "received and queued by the controller /s", "value": received_rate},
            {"measure": "applied by the controller /s", "value": applied_rate},
            {"measure": "  of which heartbeats coalesced /s", "value": coalesced_rate},
            {"measure": "messages per transaction (batches of 2+), mean", "value": mean_batch},
            {"measure": "ingest pending, max", "value": max(pending, default=float("nan"))},
            {"measure": "ingest pending, last", "value": pending[-1] if pending else float("nan")},
            {"measure": "ingest pending, 2nd-half mean", "value": settled},
            {"measure": "backlog slope, 2nd half (msgs/s)", "value": slope},
            {"measure": "  its standard error (msgs/s)", "value": slope_error},
            {"measure": "backlog does not grow", "value": holds},
            {"measure": "GET /api/v1/devices?page_size=50: requests", "value": len(latencies)},
            {"measure": "  p50 ms", "value": p50},
            {"measure": "  p99 ms", "value": p99},
            {
                "measure": "simulator worst tick lag s",
                "value": max((s["tick_lag_s"] for s in samples), default=0.0),
            },
        ],
    )
    report.ratio("REST p99 ms under load", p99, target=REST_P99_TARGET_MS, higher_is_better=False)
    report.ratio("applied / sent", applied_rate / sent_rate if sent_rate else 0.0, target=0.95)
    report.series(
        "ingest backlog", "spillway_ingest_pending", times, pending, xlabel="s", ylabel="messages"
    )
    if len(samples) > 1:
        rates_t = times[1:]
        report.series(
            "messages per second",
            "sent",
            rates_t,
            list(np.diff([s["sent"] for s in samples]) / np.diff(times)),
            xlabel="s",
            ylabel="/s",
        )
        report.series(
            "messages per second",
            "applied",
            rates_t,
            list(np.diff([s["applied"] for s in samples]) / np.diff(times)),
            xlabel="s",
            ylabel="/s",
        )
    if latencies:
        report.series(
            "REST latency (GET /api/v1/devices)",
            "ms",
            list(range(len(latencies))),
            latencies,
            xlabel="request",
            ylabel="ms",
            kind="scatter",
        )
    report.note(
        "Agents are **simulated** (sim.fleet): real MQTT v5 connections and protocol messages "
        "(Last Will, hello, retained presence, heartbeat, telemetry, reported state), synthetic "
        "telemetry values, no model; several hundred per process on paho's manual loop. The "
        "simulator, mosquitto and the controller share this host's CPUs."
    )
    report.note("The REST probe runs back to back (one request in flight) during the load phase.")
    report.data.update(
        {
            "options": {k: str(v) for k, v in options.__dict__.items()},
            "samples": samples,
            "rest_latencies_ms": latencies,
            "fleet_totals": final,
        }
    )


def _fill_convergence(report: BenchReport, how: str, convergence: list[dict[str, Any]]) -> None:
    report.table(
        how, ["agents", "request s", "converged s", "after the request s", "converged"], convergence
    )
    report.data.update({"convergence": convergence, "convergence_by": how})


def bench_fleet(
    out: Path = typer.Option(Path("var/bench"), "--out", help="Where the reports go."),
    agents: int = typer.Option(1000, "--agents", min=1, max=20000, help="Simulated agents."),
    workers: int = typer.Option(4, "--workers", min=1, max=64, help="Simulator processes."),
    duration: float = typer.Option(30.0, "--duration", min=2.0, help="Seconds of load."),
    rollout: list[int] = typer.Option(
        [10, 100, 1000], "--rollout", help="Convergence sizes (repeat)."
    ),
    database_url: str | None = typer.Option(
        None, "--database-url", help="Controller database (default: SQLite in the run dir)."
    ),
    model_dir: Path = typer.Option(
        Path("var/models"),
        "--model-dir",
        help="Built variants; with int8-onnx there, convergence is timed with real rollouts.",
    ),
) -> None:
    """1 Hz heartbeat + telemetry from N simulated agents: ingest backlog, REST p99, rollouts."""
    options = FleetOptions(
        agents=agents,
        workers=workers,
        duration_s=duration,
        rollout_sizes=tuple(rollout),
        database_url=database_url,
        model_dir=model_dir,
    )
    sizes = len({min(n, agents) for n in rollout})
    try:
        with progress(3 + sizes, "bench fleet") as step:
            report = run_fleet_bench(options, step=step)
    except (FleetBenchError, BrokerError, httpx.HTTPError) as exc:
        typer.echo(f"spillway bench fleet: {exc}", err=True)
        raise typer.Exit(1) from exc
    paths = report.write(out)
    typer.echo(report.markdown())
    typer.echo(f"reports     {paths['json']} {paths['md']} {paths['png']}")
