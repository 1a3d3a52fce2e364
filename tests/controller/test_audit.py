"""The audit log: mutations and denials append rows; the database refuses to rewrite them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

import cloud_controller
from cloud_controller.auth import Role
from cloud_controller.database import make_engine, migrate
from tests.controller.helpers import Controller, SimAgent, wait_for


def _entries(controller: Controller, **params: object) -> list[dict[str, object]]:
    response = controller.http.get("/api/v1/audit", params=params)
    assert response.status_code == 200, response.text
    items: list[dict[str, object]] = response.json()["items"]
    return items


def test_mutations_and_denials_are_appended(controller: Controller) -> None:
    created = controller.http.post(
        "/api/v1/tokens",
        json={"name": "ops", "role": "operator"},
        headers={"X-Request-ID": "req-create-1"},
    )
    assert created.status_code == 201
    ops = controller.client(token=created.json()["token"])
    missing = ops.put("/api/v1/devices/ghost/desired", json={"policy": {"a": 1}})
    assert missing.status_code == 404
    viewer = controller.client(Role.VIEWER)
    assert viewer.delete(f"/api/v1/tokens/{created.json()['id']}").status_code == 403
    assert controller.client().put("/api/v1/devices/x/model", json={}).status_code == 401
    assert viewer.get("/api/v1/devices").status_code == 200  # reads are not audited

    (create,) = _entries(controller, action="token.create")
    assert create["actor"] == "bootstrap-admin" and create["outcome"] == "success"
    assert create["object_type"] == "token" and create["object_id"] == str(created.json()["id"])
    assert create["request_id"] == "req-create-1"
    assert create["detail"] == {"name": "ops", "role": "operator"}
    assert created.json()["token"] not in str(_entries(controller))

    (failed,) = _entries(controller, actor="ops")
    assert failed["action"] == "device.set_desired" and failed["outcome"] == "failed"
    assert failed["object_id"] == "ghost" and "not found" in failed["detail"]["error"]
    assert failed["request_id"] == missing.headers["x-request-id"]

    (denied,) = _entries(controller, actor="test-viewer")
    assert denied["outcome"] == "denied" and denied["action"] == "token.revoke"
    assert denied["detail"]["status"] == 403 and denied["detail"]["needed"] == "admin"
    (anonymous,) = _entries(controller, actor="anonymous")
    assert anonymous["action"] == "device.assign_model"
    assert anonymous["outcome"] == "denied" and anonymous["detail"]["status"] == 401

    newest_first = _entries(controller)
    assert [e["id"] for e in newest_first] == sorted((e["id"] for e in newest_first), reverse=True)
    page = controller.http.get("/api/v1/audit", params={"page_size": 1, "page": 2}).json()
    assert page["total"] == len(newest_first) and page["items"][0]["id"] == newest_first[1]["id"]
    assert _entries(controller, outcome="denied", actor="ops") == []


def test_a_successful_desired_change_is_audited(
    controller: Controller, agents: Callable[..., SimAgent]
) -> None:
    agents("edge-a").hello()
    assert wait_for(lambda: controller.has_device("edge-a"))
    put = controller.http.put("/api/v1/devices/edge-a/desired", json={"policy": {"k": 2}})
    assert put.status_code == 200
    (entry,) = _entries(controller, object_type="device", object_id="edge-a")
    assert entry["outcome"] == "success" and entry["detail"]["generation"] == 1
    assert entry["detail"]["policy"] == {"k": 2}


def test_audit_rows_cannot_be_updated_or_deleted(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        migrate(engine)
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO audit_log (at, actor, action, object_type, object_id, outcome,"
                    " detail) VALUES (CURRENT_TIMESTAMP, 'a', 'x.y', 't', '1', 'success', '{}')"
                )
            )
        statements = [
            "UPDATE audit_log SET actor = 'someone-else'",
            "DELETE FROM audit_log",
        ]
        if engine.dialect.name == "postgresql":
            statements.append("TRUNCATE audit_log")
        for statement in statements:
            with pytest.raises(DBAPIError, match="append-only"), engine.begin() as connection:
                connection.execute(sa.text(statement))
        with engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT actor FROM audit_log")).all()
        assert [tuple(row) for row in rows] == [("a",)]
    finally:
        engine.dispose()


def test_there_is_no_code_path_that_rewrites_audit_rows() -> None:
    """Only ``session.add`` of new entries: no UPDATE/DELETE of the table anywhere."""
    root = Path(cloud_controller.__file__).parent
    for path in root.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        text = path.read_text()
        for needle in (
            "update(AuditEntry",
            "delete(AuditEntry",
            "UPDATE audit_log",
            "DELETE FROM audit_log",
        ):
            assert needle not in text, f"{path} rewrites audit rows ({needle})"
