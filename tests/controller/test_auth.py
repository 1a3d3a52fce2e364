"""Authentication and roles on the real app and database (SQLite and PostgreSQL).

Every REST route needs a token; a viewer may read only, an operator may change the fleet
but not manage tokens; missing, unknown and revoked tokens get 401, too low a role 403.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from cloud_controller.audit import AuditEntry
from cloud_controller.auth import Role, tokens
from cloud_controller.cli import controller_app
from cloud_controller.database import make_engine
from tests.controller.helpers import TEST_ADMIN_TOKEN, Controller, bearer

UNAUTHENTICATED = {"/healthz", "/readyz", "/metrics"}
POSTED_READS = {("POST", "/api/v1/embed")}
"""Not GET, yet reads: the pool gateway changes no state, a viewer may embed."""


def _concrete(path: str) -> str:
    """A route's path with every parameter filled in (``{name:path}`` too)."""
    return re.sub(r"\{(\w+)(:\w+)?\}", lambda m: "1" if m.group(1).endswith("_id") else "x", path)


def _api_routes(controller: Controller) -> list[tuple[str, str]]:
    """(method, concrete path) of every REST operation of the app, whoever wrote it, as
    its OpenAPI document lists them."""
    found = []
    for path, operations in controller.app.openapi()["paths"].items():
        if path not in UNAUTHENTICATED:
            found.extend((method.upper(), _concrete(path)) for method in operations)
    return found


def test_every_api_route_needs_a_token(controller: Controller) -> None:
    anonymous = controller.client()
    routes = _api_routes(controller)
    assert len(routes) >= 19  # devices, results, models, alerts, embed, tokens, audit, me
    for method, path in routes:
        response = anonymous.request(method, path, json={})
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert "missing bearer token" in response.json()["detail"]
    for path in UNAUTHENTICATED:
        assert anonymous.get(path).status_code in (200, 503)


def test_unknown_and_malformed_tokens_get_401(controller: Controller) -> None:
    for headers in (
        bearer("spw_" + "x" * 43),
        bearer("y" * 5000),
        {"Authorization": f"Basic {TEST_ADMIN_TOKEN}"},
        {"Authorization": "Bearer"},
    ):
        response = controller.client().get("/api/v1/devices", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["detail"]


@pytest.mark.parametrize("role", list(Role))
def test_me_names_the_token(controller: Controller, role: Role) -> None:
    me = controller.client(role).get("/api/v1/auth/me")
    assert me.status_code == 200
    assert me.json() == {"name": f"test-{role.value}", "role": role.value}


def test_a_viewer_can_read_but_not_mutate_anything(controller: Controller) -> None:
    viewer = controller.client(Role.VIEWER)
    assert viewer.get("/api/v1/devices").status_code == 200
    assert viewer.get("/api/v1/models").status_code == 200
    assert viewer.post("/api/v1/embed", json={"texts": []}).status_code == 422  # past auth
    mutations = [r for r in _api_routes(controller) if r[0] != "GET" and r not in POSTED_READS]
    assert len(mutations) >= 6
    for method, path in mutations:
        response = viewer.request(method, path, json={})
        assert response.status_code == 403, (method, path, response.text)
        detail = response.json()["detail"]
        assert "needs the" in detail and "token 'test-viewer' has viewer" in detail, detail
    with Session(controller.app.state.runtime.engine) as session:
        denied = session.exec(
            select(AuditEntry).where(
                AuditEntry.actor == "test-viewer", AuditEntry.outcome == "denied"
            )
        ).all()
    assert sorted((e.detail["method"], e.object_id) for e in denied) == sorted(mutations)


def test_an_operator_changes_the_fleet_but_not_tokens(controller: Controller) -> None:
    operator = controller.client(Role.OPERATOR)
    # Past authorization: the device does not exist.
    put = operator.put("/api/v1/devices/ghost/desired", json={"policy": {}})
    assert put.status_code == 404
    for method, path in [
        ("GET", "/api/v1/tokens"),
        ("POST", "/api/v1/tokens"),
        ("DELETE", "/api/v1/tokens/1"),
        ("GET", "/api/v1/audit"),
    ]:
        response = operator.request(method, path, json={"name": "x", "role": "admin"})
        assert response.status_code == 403, (method, path)
        assert "needs the admin role" in response.json()["detail"]


def test_token_lifecycle_create_use_list_revoke(controller: Controller) -> None:
    created = controller.http.post("/api/v1/tokens", json={"name": "ci", "role": "operator"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert set(body) == {"id", "name", "role", "token"} and body["role"] == "operator"
    secret = body["token"]
    assert secret.startswith("spw_") and len(secret) >= 40

    ci = controller.client(token=secret)
    assert ci.get("/api/v1/auth/me").json() == {"name": "ci", "role": "operator"}

    listed = controller.http.get("/api/v1/tokens").json()
    assert secret not in str(listed) and tokens.digest(secret) not in str(listed)
    row = next(t for t in listed["items"] if t["id"] == body["id"])
    assert row["revoked_at"] is None and row["created_by"] == tokens.BOOTSTRAP_NAME
    assert row["last_used_at"] is not None  # the /auth/me above

    revoked = controller.http.delete(f"/api/v1/tokens/{body['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    refused = ci.get("/api/v1/auth/me")
    assert refused.status_code == 401 and "was revoked" in refused.json()["detail"]
    assert refused.headers["www-authenticate"] == "Bearer"

    again = controller.http.delete(f"/api/v1/tokens/{body['id']}")
    assert again.status_code == 409 and "already revoked" in again.json()["detail"]
    assert controller.http.delete("/api/v1/tokens/999999").status_code == 404
    # The row is still there, revoked: a revocation is a state change.
    active = controller.http.get("/api/v1/tokens", params={"include_revoked": False}).json()
    assert body["id"] not in [t["id"] for t in active["items"]]
    assert body["id"] in [t["id"] for t in controller.http.get("/api/v1/tokens").json()["items"]]


def test_the_last_admin_token_cannot_be_revoked(controller: Controller) -> None:
    me = controller.http.get("/api/v1/tokens").json()["items"]
    (bootstrap,) = [t for t in me if t["name"] == tokens.BOOTSTRAP_NAME]
    refused = controller.http.delete(f"/api/v1/tokens/{bootstrap['id']}")
    assert refused.status_code == 409 and "last active admin" in refused.json()["detail"]
    controller.token(Role.ADMIN, name="second-admin")
    assert controller.http.delete(f"/api/v1/tokens/{bootstrap['id']}").status_code == 200
    assert controller.http.get("/api/v1/auth/me").status_code == 401


def test_bootstrap_is_idempotent_and_a_revoked_one_stays_revoked(controller: Controller) -> None:
    engine = controller.app.state.runtime.engine
    first = tokens.ensure(
        engine, secret=TEST_ADMIN_TOKEN, role=Role.ADMIN, name="again", now=controller.clock()
    )
    assert first.name == tokens.BOOTSTRAP_NAME  # the lifespan made it; nothing new
    with Session(engine) as session:
        assert len(session.exec(select(tokens.ApiToken)).all()) == 1
        tokens.create(session, name="other", role=Role.ADMIN, now=controller.clock())
        session.commit()
        tokens.revoke(session, first.id or 0, now=controller.clock())
    again = tokens.ensure(
        engine, secret=TEST_ADMIN_TOKEN, role=Role.ADMIN, name="x", now=controller.clock()
    )
    assert again.id == first.id and again.revoked_at is not None


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/tokens", {"name": "a", "role": "viewer", "id": 7}, "id"),
        ("/api/v1/tokens", {"name": "a", "role": "viewer", "revoked_at": None}, "revoked_at"),
        ("/api/v1/tokens", {"name": "a", "role": "root"}, "role"),
        ("/api/v1/tokens", {"name": "a" * 65, "role": "viewer"}, "name"),
        ("/api/v1/tokens", {"name": "has space", "role": "viewer"}, "name"),
        ("/api/v1/embed", {"texts": ["a"], "id": "x"}, "id"),
    ],
)
def test_fields_the_client_may_not_set_are_rejected(
    controller: Controller, path: str, body: dict[str, object], field: str
) -> None:
    response = controller.http.post(path, json=body)
    assert response.status_code == 422, response.text
    assert field in [error["loc"][-1] for error in response.json()["detail"]]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/devices/d1/desired", {"policy": {}, "role": "admin"}, "role"),
        ("/api/v1/devices/d1/desired", {"policy": {}, "device_id": "d2"}, "device_id"),
        ("/api/v1/devices/d1/model", {"name": "m", "version": "1", "variant": "v", "id": 1}, "id"),
    ],
)
def test_device_bodies_forbid_extra_fields(
    controller: Controller, path: str, body: dict[str, object], field: str
) -> None:
    response = controller.http.put(path, json=body)
    assert response.status_code == 422, response.text
    assert field in [error["loc"][-1] for error in response.json()["detail"]]


def test_overlong_path_and_query_values_are_422(controller: Controller) -> None:
    assert controller.http.get("/api/v1/devices/" + "d" * 65).status_code == 422
    assert (
        controller.http.get("/api/v1/devices", params={"hardware_class": "h" * 65}).status_code
        == 422
    )
    assert controller.http.get("/api/v1/devices", params={"page": 10**7}).status_code == 422


def test_oversized_bodies_get_413_before_being_read(
    make_controller: Callable[..., Controller], database_url: str
) -> None:
    controller = make_controller(database_url, max_request_body_bytes=1000)
    policy = {"policy": {"blob": "x" * 2000}}
    declared = controller.http.put("/api/v1/devices/d1/desired", json=policy)
    assert declared.status_code == 413
    assert declared.json() == {
        "detail": f"request body of {declared.request.headers['content-length']} bytes "
        "exceeds the limit of 1000 bytes"
    }

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b"x" * 200

    streamed = controller.http.put(
        "/api/v1/devices/d1/desired", content=chunks(), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413
    assert streamed.json() == {"detail": "request body exceeds the limit of 1000 bytes"}
    # Anonymous callers are refused by size before anything else.
    assert controller.client().post("/api/v1/tokens", content=b"x" * 5000).status_code == 413
    # Uploads have their own, larger limit: this one gets past it and is judged on content.
    upload = controller.http.post(
        "/api/v1/models/m/versions",
        files={"manifest": ("manifest.json", b"{}"), "artifact": ("a", b"y" * 5000)},
    )
    assert upload.status_code in (400, 422), upload.text


def test_request_ids_are_echoed_or_made(controller: Controller) -> None:
    given = controller.http.get("/api/v1/devices", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = controller.http.get("/api/v1/devices")
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    unsafe = controller.http.get("/api/v1/devices", headers={"X-Request-ID": "a b\tc"})
    assert unsafe.headers["x-request-id"] != "a b\tc"
    assert controller.client().get("/api/v1/devices").headers["x-request-id"]  # 401 too


def test_cli_creates_a_token_in_the_database(database_url: str) -> None:
    result = CliRunner().invoke(
        controller_app,
        [
            "token",
            "create",
            "--name",
            "first-admin",
            "--role",
            "admin",
            "--database-url",
            database_url,
        ],
    )
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip()
    assert secret.startswith("spw_") and "\n" not in secret
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            row = tokens.lookup(session, secret)
            assert row is not None and row.name == "first-admin" and row.role == "admin"
            assert row.sha256 == tokens.digest(secret)  # the secret itself is not stored
    finally:
        engine.dispose()

    bad = CliRunner().invoke(
        controller_app,
        ["token", "create", "--name", "x", "--role", "root", "--database-url", database_url],
    )
    assert bad.exit_code == 2
    assert bad.stderr.strip().startswith("spillway controller: bad token: role")
