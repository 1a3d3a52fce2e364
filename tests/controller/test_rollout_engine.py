"""The rollout engine on a real broker and database (SQLite and PostgreSQL), simulated
agents and the ManualClock: waves, gates, rollback, restart mid-wave, operators' commands."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.controller.helpers import Controller, ManualClock, SimAgent
from tests.controller.rollout_helpers import MODEL, Fleet, desired, engine, register

MakeController = Callable[..., Controller]
DEVICES = ("dev-a", "dev-b", "dev-c")
WAVES = {"canary_share": 0.3, "wave_size": 2, "interval_s": 60}


def start_fleet(controller: Controller, agents: Callable[..., SimAgent], models: Path) -> Fleet:
    register(controller, models, "1.0.0", "fp32-onnx")
    register(controller, models, "2.0.0", "fp32-onnx", "int8-onnx")
    made = {}
    for device_id in DEVICES:
        agent = agents(device_id)
        agent.hello(labels={"site": "lab"})
        made[device_id] = agent
    fleet = Fleet(controller, made)
    for device_id in DEVICES:
        assert _wait(lambda d=device_id: controller.has_device(d, status="online"))
        put = controller.http.put(
            f"/api/v1/devices/{device_id}/model",
            json={"name": MODEL, "version": "1.0.0", "variant": "fp32-onnx"},
        )
        assert put.status_code == 200, put.text
    fleet.respond()
    return fleet


def _wait(predicate: Callable[[], bool]) -> bool:
    from tests.controller.helpers import wait_for

    return wait_for(predicate)


@pytest.fixture
def rollout_controller(
    make_controller: MakeController, database_url: str, test_models: Path
) -> Controller:
    return make_controller(
        database_url,
        clock=ManualClock(datetime.now(UTC)),
        trusted_keys_dir=test_models / "keys",
        rollout_tick_s=3600,  # the test steps the engine itself
    )


def start(controller: Controller, **body: Any) -> dict[str, Any]:
    response = controller.http.post(
        "/api/v1/rollouts",
        json={"model": MODEL, "version": "2.0.0", "waves": WAVES, **body},
    )
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def get(controller: Controller, rollout_id: int) -> dict[str, Any]:
    response = controller.http.get(f"/api/v1/rollouts/{rollout_id}")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def by_device(rollout: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["device_id"]: d for d in rollout["devices"]}


def test_waves_advance_through_gates_to_completion(
    rollout_controller: Controller, agents: Callable[..., SimAgent], test_models: Path
) -> None:
    c = rollout_controller
    fleet = start_fleet(c, agents, test_models)
    v1 = {d: fleet.running_sha(d) for d in DEVICES}
    rollout = start(c)
    assert rollout["state"] == "pending" and rollout["waves_total"] == 2
    assert [w["devices"] for w in rollout["waves"]] == [1, 2]
    assert all(d["variant"] == "int8-onnx" for d in rollout["devices"])  # CPU: INT8 first
    canary = next(d["device_id"] for d in rollout["devices"] if d["wave"] == 0)
    rest = [d for d in DEVICES if d != canary]
    rid = rollout["id"]
    step = engine(c).step

    step()
    now = get(c, rid)
    assert now["state"] == "running" and now["current_wave"] == 0
    assert by_device(now)[canary]["state"] == "installing"
    assert desired(c, canary)["policy"]["quality_sample_share"] == pytest.approx(0.1)
    assert all(desired(c, d)["policy"]["model"]["version"] == "1.0.0" for d in rest)

    fleet.respond(canary)
    step()
    now = get(c, rid)
    assert by_device(now)[canary]["state"] == "active"
    assert now["waves"][0]["state"] == "observing"
    c.clock.advance(30)
    step()
    assert get(c, rid)["waves"][0]["gate_verdict"] is None  # interval not over
    c.clock.advance(31)
    step()
    now = get(c, rid)
    assert now["waves"][0]["gate_verdict"] == "pending"  # no telemetry since activation
    assert now["state"] == "running"

    fleet.telemetry(canary)
    step()
    assert get(c, rid)["waves"][0]["state"] == "passed"
    step()
    now = get(c, rid)
    assert now["current_wave"] == 1 and now["waves"][1]["state"] == "installing"
    assert all(by_device(now)[d]["state"] == "installing" for d in rest)

    fleet.respond(*rest)
    step()
    c.clock.advance(61)
    for device_id in rest:
        fleet.telemetry(device_id)
    step()
    step()
    done = get(c, rid)
    assert done["state"] == "completed" and done["devices_done"] == 3
    assert done["finished_at"] is not None
    assert all(fleet.running_sha(d) != v1[d] for d in DEVICES)
    assert all(d["previous_version"] == "1.0.0" for d in done["devices"])
    listed = c.http.get("/api/v1/rollouts", params={"state": "completed"}).json()
    assert [item["id"] for item in listed["items"]] == [rid]


def test_failing_quality_gate_rolls_every_updated_device_back(
    rollout_controller: Controller, agents: Callable[..., SimAgent], test_models: Path
) -> None:
    c = rollout_controller
    fleet = start_fleet(c, agents, test_models)
    v1 = {d: fleet.running_sha(d) for d in DEVICES}
    generations = {d: desired(c, d)["generation"] for d in DEVICES}
    rollout = start(c, waves={**WAVES, "canary_share": 0.5, "interval_s": 10})
    rid = rollout["id"]
    canaries = [d["device_id"] for d in rollout["devices"] if d["wave"] == 0]
    assert len(canaries) == 2
    step = engine(c).step
    step()
    fleet.respond(*canaries)
    step()
    c.clock.advance(11)
    fleet.telemetry(canaries[0])
    fleet.telemetry(canaries[1], quality_agreement_mean=0.80, quality_agreement_min=0.6)
    step()
    now = get(c, rid)
    assert now["state"] == "rolling_back"
    assert "quality_agreement" in now["reason"]
    results = {r["name"]: r for r in now["waves"][0]["gate_results"]}
    assert results["quality_agreement"]["verdict"] == "fail"
    assert results["error_rate"]["verdict"] == "pass"

    step()  # previous assignment re-published
    for device_id in canaries:
        section = desired(c, device_id)["policy"]["model"]
        assert section["version"] == "1.0.0" and section["artifact_sha256"] == v1[device_id]
        assert "quality_sample_share" not in desired(c, device_id)["policy"]
    fleet.respond(*canaries)
    step()
    done = get(c, rid)
    assert done["state"] == "rolled_back"
    assert all(by_device(done)[d]["state"] == "rolled_back" for d in canaries)
    assert all(fleet.running_sha(d) == v1[d] for d in DEVICES)
    untouched = [d for d in DEVICES if d not in canaries]
    assert all(desired(c, d)["generation"] == generations[d] for d in untouched)
    assert by_device(done)[untouched[0]]["state"] == "pending"


def test_install_failure_fails_the_wave_at_once_and_pause_option_holds_it(
    rollout_controller: Controller, agents: Callable[..., SimAgent], test_models: Path
) -> None:
    c = rollout_controller
    fleet = start_fleet(c, agents, test_models)
    rollout = start(c, on_gate_failure="pause")
    rid = rollout["id"]
    canary = next(d["device_id"] for d in rollout["devices"] if d["wave"] == 0)
    fleet.failing.add(canary)
    step = engine(c).step
    step()
    fleet.respond(canary)
    step()  # no observation time needed: installs already fail the gate
    now = get(c, rid)
    assert now["state"] == "paused" and "install_failures" in now["reason"]
    assert by_device(now)[canary]["state"] == "failed"
    assert "digest_mismatch" in by_device(now)[canary]["reason"]
    step()
    assert get(c, rid)["current_wave"] == 0  # paused: nothing moves

    resumed = c.http.post(f"/api/v1/rollouts/{rid}/resume")
    assert resumed.status_code == 200 and resumed.json()["state"] == "running"
    assert resumed.json()["waves"][0]["state"] == "overridden"
    step()
    assert get(c, rid)["current_wave"] == 1


def test_operators_pause_resume_and_abort_over_rest(
    rollout_controller: Controller, agents: Callable[..., SimAgent], test_models: Path
) -> None:
    c = rollout_controller
    fleet = start_fleet(c, agents, test_models)
    v1 = {d: fleet.running_sha(d) for d in DEVICES}
    rid = start(c)["id"]
    step = engine(c).step
    paused = c.http.post(f"/api/v1/rollouts/{rid}/pause")
    assert paused.status_code == 200 and paused.json()["state"] == "paused"
    again = c.http.post(f"/api/v1/rollouts/{rid}/pause")
    assert again.status_code == 409 and "paused" in again.json()["detail"]
    step()
    assert get(c, rid)["current_wave"] == -1  # nothing started while paused

    assert c.http.post(f"/api/v1/rollouts/{rid}/resume").json()["state"] == "running"
    step()
    canary = next(d["device_id"] for d in get(c, rid)["devices"] if d["wave"] == 0)
    fleet.respond(canary)
    step()
    busy = c.http.post("/api/v1/rollouts", json={"model": MODEL, "version": "2.0.0"})
    assert busy.status_code == 409 and "unfinished rollout" in busy.json()["detail"]

    aborted = c.http.post(f"/api/v1/rollouts/{rid}/abort")
    assert aborted.status_code == 200 and aborted.json()["state"] == "rolling_back"
    step()
    fleet.respond(canary)
    step()
    done = get(c, rid)
    assert done["state"] == "aborted" and done["reason"] == "aborted by an operator"
    assert fleet.running_sha(canary) == v1[canary]
    assert c.http.post(f"/api/v1/rollouts/{rid}/abort").status_code == 409
    assert c.http.post(f"/api/v1/rollouts/{rid}/resume").status_code == 409


def test_bad_requests_are_refused_with_a_reason(
    rollout_controller: Controller, agents: Callable[..., SimAgent], test_models: Path
) -> None:
    c = rollout_controller
    start_fleet(c, agents, test_models)
    post = c.http.post
    assert c.http.get("/api/v1/rollouts/999").status_code == 404
    assert post("/api/v1/rollouts/999/pause").status_code == 404
    unknown = post("/api/v1/rollouts", json={"model": MODEL, "version": "9.9.9"})
    assert unknown.status_code == 404
    nobody = post(
        "/api/v1/rollouts",
        json={"model": MODEL, "version": "2.0.0", "target": {"labels": {"site": "moon"}}},
    )
    assert nobody.status_code == 422 and "no registered device" in nobody.json()["detail"]
    ghost = post(
        "/api/v1/rollouts",
        json={"model": MODEL, "version": "2.0.0", "target": {"device_ids": ["ghost"]}},
    )
    assert ghost.status_code == 404
    pinned = post(
        "/api/v1/rollouts",
        json={"model": MODEL, "version": "2.0.0", "variants": {"jetson-orin-nano": "fp16-onnx"}},
    )
    assert pinned.status_code == 422 and "fp16-onnx" in pinned.json()["detail"]
    bad = post("/api/v1/rollouts", json={"model": MODEL, "version": "2.0.0", "gates": {"x": 1}})
    assert bad.status_code == 422
    targeted = post(
        "/api/v1/rollouts",
        json={
            "model": MODEL,
            "version": "2.0.0",
            "target": {"labels": {"site": "lab"}, "device_ids": ["dev-b"]},
        },
    )
    assert targeted.status_code == 201
    assert [d["device_id"] for d in targeted.json()["devices"]] == ["dev-b"]


def test_restarted_controller_resumes_the_rollout_mid_wave(
    make_controller: MakeController,
    database_url: str,
    test_models: Path,
    agents: Callable[..., SimAgent],
) -> None:
    clock = ManualClock(datetime.now(UTC))
    settings = {"trusted_keys_dir": test_models / "keys", "rollout_tick_s": 3600}
    first = make_controller(database_url, clock=clock, **settings)
    fleet = start_fleet(first, agents, test_models)
    rid = start(first)["id"]
    engine(first).step()
    before = get(first, rid)
    canary = next(d for d in before["devices"] if d["wave"] == 0)
    assert canary["state"] == "installing"
    first.http.__exit__(None, None, None)  # the controller stops mid-wave

    second = make_controller(
        database_url,
        clock=clock,
        artifact_dir=first.settings.artifact_dir,
        signing_key_path=first.settings.signing_key_path,
        **settings,
    )
    fleet.controller = second
    assert get(second, rid)["current_wave"] == 0
    fleet.respond(canary["device_id"])
    engine(second).step()
    now = get(second, rid)
    assert by_device(now)[canary["device_id"]]["state"] == "active"
    assert by_device(now)[canary["device_id"]]["generation"] == canary["generation"]
    clock.advance(61)
    fleet.telemetry(canary["device_id"])
    engine(second).step()
    engine(second).step()
    after = get(second, rid)
    assert after["waves"][0]["state"] == "passed" and after["current_wave"] == 1
