"""Controller, agents and a real mosquitto as separate processes, as deployed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sim.broker import MosquittoBroker
from tests.integration.fleet import Fleet, wait_for

KEEPALIVE_S = 2


@pytest.fixture
def fleet(broker: MosquittoBroker, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(broker, tmp_path)
    f.start_controller()
    yield f
    f.close()


def test_sigkilled_agent_goes_offline_and_comes_back_with_its_identity(fleet: Fleet) -> None:
    agent = fleet.agent("edge-a", keepalive_s=KEEPALIVE_S)
    agent.start()
    wait_for(lambda: fleet.status("edge-a") == "online", 30, what="edge-a online")
    first = fleet.device("edge-a")
    assert first["hardware_class"] == "jetson-orin-nx"
    assert first["labels"] == {"site": "lab"}

    agent.kill()  # SIGKILL: no goodbye, only the broker's Last Will
    # The broker fires the Will at 1.5 x keepalive; allow a second for delivery and REST.
    wait_for(
        lambda: fleet.status("edge-a") == "offline",
        1.5 * KEEPALIVE_S + 1.0,
        what="edge-a offline after SIGKILL",
    )

    agent.start()
    wait_for(lambda: fleet.status("edge-a") == "online", 30, what="edge-a online again")
    again = fleet.device("edge-a")
    assert again["boot_epoch"] == first["boot_epoch"] + 1
    listed = fleet.http.get("/api/v1/devices").json()
    assert [d["id"] for d in listed["items"]] == ["edge-a"]  # same identity, no duplicate


def test_broker_restart_everyone_reconnects_and_desired_state_arrives(
    fleet: Fleet, broker: MosquittoBroker
) -> None:
    fleet.agent("edge-b", keepalive_s=KEEPALIVE_S).start()
    wait_for(lambda: fleet.status("edge-b") == "online", 30, what="edge-b online")
    gen1 = fleet.set_policy("edge-b", {"offload_slo_ms": 150})
    wait_for(lambda: fleet.observed_generation("edge-b") == gen1, 20, what="gen 1 applied")

    # The broker crashes and loses its store: retained messages and sessions are gone.
    broker.kill()
    (broker.data_dir / "mosquitto.db").unlink(missing_ok=True)
    gen2 = fleet.set_policy("edge-b", {"offload_slo_ms": 90})  # set while the broker is down
    assert gen2 == gen1 + 1
    broker.start()

    wait_for(lambda: fleet.http.get("/readyz").status_code == 200, 30, what="controller back")
    wait_for(lambda: fleet.observed_generation("edge-b") == gen2, 30, what="gen 2 applied")
    wait_for(lambda: fleet.status("edge-b") == "online", 30, what="edge-b online after restart")
    reported = fleet.device("edge-b")["reported"]
    assert reported["outcome"] == "applied"
    assert reported["policy"] == {"offload_slo_ms": 90}
