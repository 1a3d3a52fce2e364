"""The dashboard's aggregate API on a real broker and database: counts by status, hardware
class, variant and staleness; the searchable table; the throughput/latency/offload series."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cloud_controller.fleet import LATENCY_EDGES_MS, estimate_quantile
from protocol.inference import InferStatus, Tier
from protocol.messages import ApplyOutcome, DeviceStatus, ReportedState
from protocol.topics import DeviceChannel
from sim.broker import MosquittoBroker
from tests.controller.helpers import Controller, SimAgent, record, wait_for


def _agent(broker: MosquittoBroker, device_id: str, hardware_class: str) -> SimAgent:
    agent = SimAgent(broker, device_id)
    agent.hello(hardware_class=hardware_class)
    return agent


def _report_variant(agent: SimAgent, variant: str) -> None:
    agent.send(
        DeviceChannel.REPORTED,
        ReportedState(
            device_id=agent.device_id,
            observed_generation=0,
            outcome=ApplyOutcome.APPLIED,
            policy={"model": {"name": "m", "version": "1", "variant": variant}},
            boot_epoch=agent.boot_epoch,
        ),
    )


def test_summary_counts_and_table(
    make_controller: Callable[..., Controller], database_url: str, broker: MosquittoBroker
) -> None:
    c = make_controller(database_url)
    a = _agent(broker, "edge-a", "jetson-orin-nx")
    b = _agent(broker, "edge-b", "jetson-orin-nx")
    z = _agent(broker, "pi-z", "rpi5")
    _report_variant(a, "int8-onnx")
    _report_variant(b, "int8-onnx")
    assert wait_for(lambda: c.http.get("/api/v1/fleet/summary").json()["total"] == 3)
    assert wait_for(
        lambda: c.http.get("/api/v1/fleet/summary").json()["by_variant"].get("int8-onnx") == 2
    )
    z.send(DeviceChannel.STATUS, z.presence_message(DeviceStatus.OFFLINE, reason="shutdown"))
    assert wait_for(lambda: c.has_device("pi-z", status="offline"))
    c.clock.advance(20)

    summary = c.http.get("/api/v1/fleet/summary").json()
    assert summary["by_status"] == {"online": 2, "offline": 1}
    assert summary["by_hardware_class"] == {"jetson-orin-nx": 2, "rpi5": 1}
    assert summary["by_variant"] == {"int8-onnx": 2, "none": 1}
    assert summary["staleness_s"] == {"<10s": 0, "10-60s": 3, "1-10m": 0, ">10m": 0}
    assert summary["stale"] == 0
    c.clock.advance(60)  # past stale_after_s (30 s) for the two online devices
    summary = c.http.get("/api/v1/fleet/summary").json()
    assert summary["stale"] == 2
    assert summary["staleness_s"]["1-10m"] == 3

    page = c.http.get("/api/v1/fleet/devices", params={"search": "EDGE"}).json()
    assert [row["id"] for row in page["items"]] == ["edge-a", "edge-b"]
    assert page["items"][0]["variant"] == "int8-onnx"
    assert page["items"][0]["stale"] is True
    by_class = c.http.get("/api/v1/fleet/devices", params={"search": "rpi"}).json()
    assert [row["id"] for row in by_class["items"]] == ["pi-z"]
    assert by_class["items"][0]["variant"] is None
    offline = c.http.get("/api/v1/fleet/devices", params={"status": DeviceStatus.OFFLINE.value})
    assert [row["id"] for row in offline.json()["items"]] == ["pi-z"]
    paged = c.http.get("/api/v1/fleet/devices", params={"page": 2, "page_size": 2}).json()
    assert paged["total"] == 3
    assert [row["id"] for row in paged["items"]] == ["pi-z"]
    literal = c.http.get("/api/v1/fleet/devices", params={"search": "%"}).json()
    assert literal["total"] == 0  # LIKE wildcards in the search are matched literally
    for agent in (a, b, z):
        agent.stop()


def test_series_buckets_throughput_latency_and_offload(
    make_controller: Callable[..., Controller], database_url: str, broker: MosquittoBroker
) -> None:
    c = make_controller(database_url)
    agent = _agent(broker, "edge-s", "jetson-orin-nx")
    assert wait_for(lambda: c.has_device("edge-s"))
    # 10 results now: 8 edge at 20 ms, 2 cloud at 400 ms; telemetry with cpu 30 and 50.
    recs = [record(i, latency_ms=20.0) for i in range(1, 9)] + [
        record(i, latency_ms=400.0, tier=Tier.CLOUD) for i in (9, 10)
    ]
    agent.results(recs)
    agent.telemetry(cpu_percent=30.0)
    agent.telemetry(cpu_percent=50.0)
    assert wait_for(lambda: c.http.get("/api/v1/results").json()["total"] == 10)

    def latest() -> dict[str, object]:
        body = c.http.get("/api/v1/fleet/series", params={"window_s": 60, "step_s": 10}).json()
        assert body["step_s"] == 10
        assert len(body["points"]) == 6
        point: dict[str, object] = body["points"][-1]
        return point

    assert wait_for(lambda: latest()["telemetry_samples"] == 2)
    point = latest()
    assert point["results"] == 10
    assert point["throughput_rps"] == pytest.approx(1.0)
    assert point["offload_ratio"] == pytest.approx(0.2)
    assert point["cpu_percent_mean"] == pytest.approx(40.0)
    assert 10 <= point["p50_ms"] <= 25  # type: ignore[operator]
    assert 250 <= point["p99_ms"] <= 500  # type: ignore[operator]

    c.clock.advance(30)  # the bucket moves back three steps; the newest is empty
    body = c.http.get("/api/v1/fleet/series", params={"window_s": 60, "step_s": 10}).json()
    assert body["points"][-1]["results"] == 0
    assert body["points"][-1]["p99_ms"] is None
    assert [p["results"] for p in body["points"]].count(10) == 1

    failed = [record(11, latency_ms=5.0, status=InferStatus.ERROR)]
    agent.results(failed)
    assert wait_for(lambda: c.http.get("/api/v1/results").json()["total"] == 11)
    agent.stop()


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"window_s": 65, "step_s": 10}, "multiple"),
        ({"window_s": 86_400, "step_s": 1}, "at most"),
        ({"step_s": 0}, "greater than or equal"),
    ],
)
def test_series_refuses_bad_windows(
    make_controller: Callable[..., Controller],
    tmp_path: object,
    params: dict[str, int],
    problem: str,
) -> None:
    c = make_controller(f"sqlite:///{tmp_path}/s.db")
    response = c.http.get("/api/v1/fleet/series", params=params)
    assert response.status_code == 422
    assert problem in response.text


def test_quantile_estimate_interpolates_inside_the_bucket() -> None:
    # 100 values: 50 at <= 10 ms (edge index 3), 50 more at <= 25 ms.
    cumulative = [0, 0, 0, 50] + [100] * (len(LATENCY_EDGES_MS) - 4)
    assert estimate_quantile(cumulative, 100, 0.5) == pytest.approx(10.0)
    assert estimate_quantile(cumulative, 100, 0.75) == pytest.approx(17.5)
    assert estimate_quantile([0] * len(LATENCY_EDGES_MS), 0, 0.5) is None
    over = [0] * len(LATENCY_EDGES_MS)
    assert estimate_quantile(over, 5, 0.99) == LATENCY_EDGES_MS[-1]


def test_dashboard_files_are_served_with_validators(
    make_controller: Callable[..., Controller], tmp_path: object
) -> None:
    c = make_controller(f"sqlite:///{tmp_path}/d.db")
    root = c.http.get("/", follow_redirects=False)
    assert root.status_code == 307
    assert root.headers["location"] == "/dashboard/"
    index = c.http.get("/dashboard/")
    assert index.status_code == 200
    assert 'src="app.js"' in index.text
    assert index.headers["cache-control"] == "no-cache"
    assert "default-src 'self'" in index.headers["content-security-policy"]
    script = c.http.get("/dashboard/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    again = c.http.get("/dashboard/app.js", headers={"If-None-Match": script.headers["etag"]})
    assert again.status_code == 304
    assert c.http.get("/dashboard/secrets.txt").status_code == 404
    assert c.http.get("/dashboard/..%2Fapp.py").status_code == 404


def test_fleet_routes_need_a_viewer_token(
    make_controller: Callable[..., Controller], tmp_path: object
) -> None:
    c = make_controller(f"sqlite:///{tmp_path}/a.db")
    viewer, nobody = c.client("viewer"), c.client()
    for path in ("/api/v1/fleet/summary", "/api/v1/fleet/devices", "/api/v1/fleet/series"):
        assert nobody.get(path).status_code == 401, path
        assert viewer.get(path).status_code == 200, path
