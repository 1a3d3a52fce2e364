"""Policies over REST, on SQLite and PostgreSQL with a real broker: validation, versions,
targeting by labels and groups with the priority merge, and the signed push of each
device's effective policy (including to a device that registers later)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cloud_controller.auth.tokens import BOOTSTRAP_NAME
from models.signing import keyring, load_public_key, public_path
from protocol.codec import decode
from protocol.messages import DesiredState
from protocol.policy import POLICY_KEY
from protocol.signing import verify_desired
from sim.broker import MosquittoBroker
from tests.controller.helpers import Controller, Recorder, SimAgent, mqtt_client, wait_for


def policy_body(name: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "target": {"selector": {}}, "document": {}}
    body.update(fields)
    return body


def _register(controller: Controller, agents: Callable[..., SimAgent], **devices: Any) -> None:
    for device_id, (hardware_class, labels) in devices.items():
        agents(device_id).hello(hardware_class=hardware_class, labels=labels)
    for device_id in devices:
        assert wait_for(lambda d=device_id: controller.has_device(d, status="online"))


def _retained_desired(broker: MosquittoBroker, device_id: str, client_id: str) -> DesiredState:
    client = mqtt_client(broker, client_id)
    try:
        recorder = Recorder(client, f"spillway/v1/devices/{device_id}/desired")
        assert wait_for(lambda: bool(recorder.snapshot()), timeout_s=5)
        return decode(recorder.snapshot()[-1].payload, DesiredState)
    finally:
        client.stop()


def test_documents_are_validated_and_unknown_fields_named(controller: Controller) -> None:
    http = controller.http
    typo = http.post(
        "/api/v1/policies", json=policy_body("p", document={"batching": {"max_batch_sizee": 8}})
    )
    assert typo.status_code == 422
    assert "max_batch_sizee" in typo.text and "Extra inputs are not permitted" in typo.text
    out_of_range = http.post(
        "/api/v1/policies",
        json=policy_body("p", document={"offload": {"quality_sample_share": 2}}),
    )
    assert out_of_range.status_code == 422 and "quality_sample_share" in out_of_range.text
    negative = http.post(
        "/api/v1/policies", json=policy_body("p", document={"telemetry": {"interval_s": -1}})
    )
    assert negative.status_code == 422 and "interval_s" in negative.text
    no_target = http.post("/api/v1/policies", json=policy_body("p", target={}))
    assert no_target.status_code == 422 and "targets a label selector" in no_target.text
    extra = http.post("/api/v1/policies", json=policy_body("p", owner="me"))
    assert extra.status_code == 422 and "owner" in extra.text
    bad_name = http.post("/api/v1/policies", json=policy_body("no spaces"))
    assert bad_name.status_code == 422
    assert http.get("/api/v1/policies").json() == []  # nothing was stored

    assert http.post("/api/v1/policies", json=policy_body("p")).status_code == 201
    again = http.post("/api/v1/policies", json=policy_body("p"))
    assert again.status_code == 409 and again.json()["reason"] == "conflict"
    assert http.get("/api/v1/policies/nope").status_code == 404
    assert http.put("/api/v1/policies/nope", json=policy_body("x")).status_code == 422  # name
    spec = {"target": {"selector": {}}, "document": {}}
    assert http.put("/api/v1/policies/nope", json=spec).status_code == 404


def test_every_change_is_a_new_version_and_old_ones_stay_viewable(
    controller: Controller,
) -> None:
    http = controller.http
    created = http.post(
        "/api/v1/policies",
        json=policy_body(
            "fleet", document={"batching": {"max_batch_size": 8}}, description="first"
        ),
    )
    assert created.status_code == 201, created.text
    assert created.json()["current_version"] == 1
    updated = http.put(
        "/api/v1/policies/fleet",
        json={
            "priority": 5,
            "target": {"groups": ["canary"]},
            "document": {"batching": {"max_batch_size": 16}},
        },
    )
    assert updated.status_code == 200, updated.text
    deleted = http.delete("/api/v1/policies/fleet")
    assert deleted.json()["state"] == "deleted"

    detail = http.get("/api/v1/policies/fleet").json()
    assert detail["current_version"] == 3
    versions = detail["versions"]
    assert [v["version"] for v in versions] == [1, 2, 3]
    assert [v["state"] for v in versions] == ["active", "active", "deleted"]
    assert versions[0]["document"] == {"batching": {"max_batch_size": 8}}  # only what it set
    assert versions[0]["target"] == {"selector": {}, "groups": []}
    assert versions[1]["target"] == {"selector": None, "groups": ["canary"]}
    assert versions[2]["document"] == versions[1]["document"]
    assert {v["created_by"] for v in versions} == {BOOTSTRAP_NAME}  # the caller's token
    first = http.get("/api/v1/policies/fleet/versions/1").json()
    assert first["document"] == {"batching": {"max_batch_size": 8}}
    assert first["description"] == "first" and first["priority"] == 0
    assert http.get("/api/v1/policies/fleet/versions/9").status_code == 404

    assert http.get("/api/v1/policies").json() == []  # deleted ones are hidden...
    listed = http.get("/api/v1/policies", params={"include_deleted": True}).json()
    assert [p["name"] for p in listed] == ["fleet"]  # ...unless asked for
    back = http.put(
        "/api/v1/policies/fleet", json={"target": {"selector": {}}, "document": {}}
    ).json()
    assert back["state"] == "active" and back["current_version"] == 4


def test_targeting_priority_merge_and_signed_push(
    controller: Controller, broker: MosquittoBroker, agents: Callable[..., SimAgent]
) -> None:
    http = controller.http
    _register(
        controller,
        agents,
        **{
            "dev-a": ("jetson-orin-nano", {"site": "lab"}),
            "dev-b": ("jetson-agx-orin", {"site": "lab"}),
            "dev-c": ("jetson-orin-nx", {"site": "field"}),
        },
    )
    lab = http.post(
        "/api/v1/policies",
        json=policy_body(
            "lab",
            target={"selector": {"site": "lab"}},
            document={
                "batching": {"max_batch_size": 8},
                "variant_preference": {"jetson-agx-orin": ["fp16-onnx", "int8-onnx"]},
            },
        ),
    )
    assert lab.status_code == 201, lab.text
    assert lab.json()["devices_updated"] == ["dev-a", "dev-b"]
    group = http.post("/api/v1/groups", json={"name": "canary", "device_ids": ["dev-b"]})
    assert group.status_code == 201 and group.json()["devices_updated"] == []
    canary = http.post(
        "/api/v1/policies",
        json=policy_body(
            "canary",
            priority=10,
            target={"groups": ["canary"]},
            document={"batching": {"max_batch_size": 4}, "telemetry": {"interval_s": 2}},
        ),
    )
    assert canary.json()["devices_updated"] == ["dev-b"]

    effective = http.get("/api/v1/devices/dev-b/policy").json()
    assert effective["document"]["batching"]["max_batch_size"] == 4  # canary (10) wins
    assert effective["document"]["telemetry"]["interval_s"] == 2
    assert effective["document"]["variant_preference"] == {
        "jetson-agx-orin": ["fp16-onnx", "int8-onnx"]
    }
    assert [(s["name"], s["version"]) for s in effective["sources"]] == [
        ("lab", 1),
        ("canary", 1),
    ]
    assert effective["groups"] == ["canary"] and effective["pushed"] is True
    untouched = http.get("/api/v1/devices/dev-c/policy").json()
    assert untouched["sources"] == [] and untouched["desired_generation"] is None

    # What dev-b's topic holds is signed by the controller's key and carries the merge.
    desired = _retained_desired(broker, "dev-b", "peek-1")
    key = load_public_key(public_path(controller.settings.signing_key_path))
    verify_desired(desired, keyring([key]))
    section = desired.policy[POLICY_KEY]
    assert section["document"]["batching"]["max_batch_size"] == 4
    assert desired.generation == effective["desired_generation"] == 2  # lab, then canary

    # An operator label moves dev-c into the lab policy; the operator's value wins.
    labels = http.put("/api/v1/devices/dev-c/labels", json={"labels": {"site": "lab"}})
    assert labels.status_code == 200, labels.text
    assert labels.json()["effective"]["site"] == "lab"
    assert labels.json()["reported"]["site"] == "field"
    assert labels.json()["devices_updated"] == ["dev-c"]
    assert (
        http.get("/api/v1/devices/dev-c/policy").json()["document"]["batching"]["max_batch_size"]
        == 8
    )
    removed = http.put("/api/v1/devices/dev-c/labels", json={"labels": {"site": None}})
    assert removed.json()["effective"]["site"] == "field"
    # Losing its last policy pushes the defaults (it had a policy section before).
    assert removed.json()["devices_updated"] == ["dev-c"]
    assert http.get("/api/v1/devices/dev-c/policy").json()["pushed"] is True

    # Deleting the canary policy puts dev-b back on the lab policy alone.
    assert http.delete("/api/v1/policies/canary").json()["devices_updated"] == ["dev-b"]
    back = http.get("/api/v1/devices/dev-b/policy").json()
    assert back["document"]["batching"]["max_batch_size"] == 8
    assert [s["name"] for s in back["sources"]] == ["lab"]

    # A device that registers later gets its effective policy after its Hello.
    agents("dev-d").hello(hardware_class="jetson-orin-nano", labels={"site": "lab"})
    assert wait_for(
        lambda: (
            controller.has_device("dev-d")
            and controller.http.get("/api/v1/devices/dev-d/policy").json()["pushed"]
        )
    )
    assert controller.device("dev-d")["desired"]["policy"][POLICY_KEY]["sources"][0]["name"] == (
        "lab"
    )
    assert http.put("/api/v1/devices/ghost/labels", json={"labels": {}}).status_code == 404
    assert http.get("/api/v1/devices/ghost/policy").status_code == 404


def test_the_model_assignment_and_the_policy_share_the_desired_document(
    controller: Controller, agents: Callable[..., SimAgent]
) -> None:
    _register(controller, agents, **{"dev-1": ("jetson-orin-nano", {})})
    put = controller.http.put("/api/v1/devices/dev-1/desired", json={"policy": {"other": 1}})
    assert put.json()["generation"] == 1
    created = controller.http.post("/api/v1/policies", json=policy_body("all"))
    assert created.json()["devices_updated"] == ["dev-1"]
    desired = controller.device("dev-1")["desired"]
    assert desired["generation"] == 2
    assert desired["policy"]["other"] == 1 and POLICY_KEY in desired["policy"]
    # A change that leaves the device's effective policy as it is: no new generation.
    again = controller.http.put("/api/v1/devices/dev-1/labels", json={"labels": {"x": "y"}})
    assert again.json()["devices_updated"] == []
    assert controller.device("dev-1")["desired"]["generation"] == 2
    # A new version is a new source, so it is pushed even with the same document.
    bumped = controller.http.put(
        "/api/v1/policies/all", json={"target": {"selector": {}}, "document": {}}
    )
    assert bumped.json()["devices_updated"] == ["dev-1"]
