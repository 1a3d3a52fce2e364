"""A real agent serving under load, cut off from the broker for minutes: afterwards every
result is in the controller's database exactly once, with no gap in ``seq``."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sim.broker import MosquittoBroker, free_port
from tests.integration.fleet import Fleet, wait_for

OUTAGE_S = float(os.environ.get("SPILLWAY_TEST_OUTAGE_S", "70"))
"""How long the broker stays down while the agent keeps serving (over a minute)."""


@pytest.fixture
def fleet(broker: MosquittoBroker, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(broker, tmp_path)
    f.start_controller()
    yield f
    f.close()


def _results(fleet: Fleet, device_id: str) -> list[dict[str, object]]:
    items: list[dict[str, object]] = []
    page = 1
    while True:
        body = fleet.http.get(
            "/api/v1/results", params={"device_id": device_id, "page": page, "page_size": 200}
        ).json()
        items += body["items"]
        if len(items) >= body["total"] or not body["items"]:
            return items
        page += 1


def test_minutes_offline_under_load_then_every_result_lands_once(
    fleet: Fleet, broker: MosquittoBroker, serving_models: Path
) -> None:
    port = free_port()
    agent = fleet.agent("edge-load", keepalive_s=5)
    agent.args += [
        "--model-dir", str(serving_models), "--variant", "int8-onnx", "--http-port", str(port),
    ]  # fmt: skip
    agent.start()
    wait_for(lambda: fleet.status("edge-load") == "online", 60, what="agent online")
    edge = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    wait_for(lambda: edge.get("/healthz").status_code == 200, 60, what="agent serving")

    served: list[str] = []
    stop = threading.Event()

    def load() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            answer = edge.post("/v1/embed", json={"texts": [f"sentence number {n}"]})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["tier"] == "edge"
            served.append(body["request_id"])
            time.sleep(0.05)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    time.sleep(2)
    broker.stop()  # the device is cut off; it keeps serving and its outbox grows
    offline_start = len(served)
    time.sleep(OUTAGE_S)
    assert len(served) > offline_start + 20, "the agent kept serving while offline"
    broker.start()
    time.sleep(2)
    stop.set()
    worker.join(timeout=30)

    wait_for(
        lambda: len(_results(fleet, "edge-load")) >= len(served),
        120,
        what=f"all {len(served)} results in the controller",
    )
    rows = _results(fleet, "edge-load")
    assert sorted(str(r["request_id"]) for r in rows) == sorted(served)  # each exactly once
    by_boot: dict[object, list[int]] = {}
    for r in rows:
        by_boot.setdefault(r["boot_epoch"], []).append(int(str(r["seq"])))
    for seqs in by_boot.values():
        assert sorted(seqs) == list(range(1, len(seqs) + 1))  # no gap, no duplicate
    metrics = fleet.http.get("/metrics").text
    assert "spillway_result_gaps 0.0" in metrics
