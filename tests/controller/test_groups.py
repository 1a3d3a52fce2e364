"""Device groups over REST, on SQLite and PostgreSQL: CRUD, members resolved from explicit
ids and label selectors (operator labels included), bad input refused."""

from __future__ import annotations

from collections.abc import Callable

from tests.controller.helpers import Controller, SimAgent, wait_for


def test_group_crud_and_members(controller: Controller, agents: Callable[..., SimAgent]) -> None:
    http = controller.http
    agents("dev-1").hello(hardware_class="jetson-orin-nano", labels={"site": "lab"})
    agents("dev-2").hello(hardware_class="jetson-agx-orin", labels={"site": "field"})
    assert wait_for(lambda: controller.has_device("dev-2") and controller.has_device("dev-1"))

    created = http.post(
        "/api/v1/groups",
        json={
            "name": "nanos",
            "description": "small boards",
            "device_ids": ["dev-2", "not-registered"],
            "selector": {"hardware_class": "jetson-orin-nano"},
        },
    )
    assert created.status_code == 201, created.text
    assert created.json()["members"] == ["dev-1", "dev-2"]
    assert http.post("/api/v1/groups", json={"name": "nanos"}).status_code == 409

    replaced = http.put("/api/v1/groups/nanos", json={"selector": {"site": "lab"}})
    assert replaced.status_code == 200 and replaced.json()["members"] == ["dev-1"]
    assert replaced.json()["description"] == "" and replaced.json()["device_ids"] == []
    http.put("/api/v1/devices/dev-2/labels", json={"labels": {"site": "lab"}})
    assert http.get("/api/v1/groups/nanos").json()["members"] == ["dev-1", "dev-2"]
    assert [g["name"] for g in http.get("/api/v1/groups").json()] == ["nanos"]

    assert http.delete("/api/v1/groups/nanos").status_code == 204
    assert http.get("/api/v1/groups/nanos").status_code == 404
    assert http.delete("/api/v1/groups/nanos").status_code == 404
    assert http.put("/api/v1/groups/nanos", json={}).status_code == 404


def test_bad_group_input_is_refused(controller: Controller) -> None:
    http = controller.http
    unknown = http.post("/api/v1/groups", json={"name": "g", "members": ["a"]})
    assert unknown.status_code == 422 and "members" in unknown.text
    twice = http.post("/api/v1/groups", json={"name": "g", "device_ids": ["a", "a"]})
    assert twice.status_code == 422 and "twice" in twice.text
    assert http.post("/api/v1/groups", json={"name": "bad name"}).status_code == 422
    assert http.get("/api/v1/groups").json() == []
