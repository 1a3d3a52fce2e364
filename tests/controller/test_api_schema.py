"""The OpenAPI document covers every endpoint with its security, and schemathesis, run over
the whole schema against the real app (real database, real broker) as admin, finds no
server error and no response that contradicts the schema."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance
from starlette.types import Receive, Scope, Send

from protocol.codec import encode
from protocol.inference import PoolStatus
from protocol.topics import QoS, Topics
from sim.broker import MosquittoBroker
from tests.controller.helpers import TEST_ADMIN_TOKEN, Controller, bearer, mqtt_client, wait_for

UNAUTHENTICATED = {"/healthz", "/readyz", "/metrics"}
EXAMPLES_PER_OPERATION = 15
"""Per operation and generation mode (valid, then invalid): ~25 s per database."""


def test_every_api_operation_declares_the_bearer_scheme(controller: Controller) -> None:
    document = controller.app.openapi()
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["bearer"]["description"],
    }
    operations = 0
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            operations += 1
            if path in UNAUTHENTICATED:
                assert "security" not in operation, (method, path)
            else:
                assert operation["security"] == [{"bearer": []}], (method, path)
    assert operations >= 19


def _http_only(app: Callable[[Scope, Receive, Send], Any]) -> Callable[..., Any]:
    """The app without its lifespan: the fixture already started it (bridge, engine), and
    schemathesis would start a second one."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        await app(scope, receive, send)

    return wrapped


def _pool_not_accepting(broker: MosquittoBroker, controller: Controller) -> None:
    """No pool runs here: say so the way a pool would (retained status), so that
    ``/api/v1/embed`` answers 429 at once instead of waiting for a timeout."""
    client = mqtt_client(broker, "schema-pool-status")
    try:
        status = PoolStatus(
            device_id="pool", accepting=False, queue_depth=0, est_wait_ms=0, replicas=0
        )
        topic = Topics(controller.settings.topic_root).pool_status()
        client.publish(topic, encode(status), qos=QoS.AT_LEAST_ONCE, retain=True, wait_s=5)
    finally:
        client.stop()
    pool = controller.app.state.pool_client
    assert wait_for(lambda: pool.status is not None, timeout_s=10)


def _exercise(operation: Any, headers: dict[str, str], mode: GenerationMode) -> list[int]:
    """Up to ``EXAMPLES_PER_OPERATION`` generated requests; the statuses they got."""
    seen: list[int] = []

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        case = data.draw(operation.as_strategy(generation_mode=mode))
        response = case.call_and_validate(
            headers=headers, checks=[not_a_server_error, response_schema_conformance]
        )
        seen.append(response.status_code)

    try:
        run()
    except Unsatisfiable:
        # Nothing to make invalid (an operation without parameters nor body).
        assert mode == GenerationMode.NEGATIVE and not operation.definition.raw.get("parameters")
    return seen


def test_schemathesis_finds_no_server_error(
    controller: Controller, broker: MosquittoBroker
) -> None:
    _pool_not_accepting(broker, controller)
    schema = schemathesis.openapi.from_asgi("/openapi.json", _http_only(controller.app))
    operations = [result.ok() for result in schema.get_all_operations()]
    # Revocations last: a revoked admin token would turn the rest into 401s.
    operations.sort(key=lambda op: op.method.upper() == "DELETE")
    headers = bearer(TEST_ADMIN_TOKEN)
    calls: dict[str, int] = {}
    statuses: dict[str, set[int]] = {}

    started = time.monotonic()
    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"
        # Valid requests, then invalid ones (wrong types, missing fields, out of range).
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            seen = _exercise(operation, headers, mode)
            statuses.setdefault(label, set()).update(seen)
            calls[label] = calls.get(label, 0) + len(seen)
    elapsed = time.monotonic() - started
    assert set(calls) == {
        f"{m.upper()} {p}" for p, ms in controller.app.openapi()["paths"].items() for m in ms
    }
    # Authenticated as admin throughout: some request of every protected operation got
    # past authentication.
    for label, seen in statuses.items():
        if label.split()[1] not in UNAUTHENTICATED and not label.startswith("DELETE"):
            assert seen - {401, 403}, (label, seen)
    print(f"schemathesis: {sum(calls.values())} requests, {len(calls)} operations, {elapsed:.1f}s")
    for label in sorted(statuses):
        print(f"  {label}: {sorted(statuses[label])}")
