"""Results: stored once however often they arrive, acknowledged only after the commit,
gaps followed per (device, boot epoch), old ones deleted, and served over REST."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session

from cloud_controller import ingest
from cloud_controller.database import make_engine, migrate
from cloud_controller.gaps import GapTracker
from protocol.codec import encode
from protocol.inference import ResultBatch
from protocol.topics import DeviceChannel, QoS
from tests.controller.helpers import (
    SERVED_AT,
    Controller,
    Recorder,
    SimAgent,
    acks,
    record,
    records,
    wait_for,
)


def _acks_of(agent: SimAgent) -> Recorder:
    return Recorder(agent.client, agent.topic(DeviceChannel.ACKS))


def _engine(controller: Controller) -> Engine:
    engine: Engine = controller.app.state.runtime.engine
    return engine


def _stored(controller: Controller, device_id: str) -> list[tuple[int, int]]:
    """(boot_epoch, seq) of every stored result of the device, straight from the table."""
    with _engine(controller).connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT boot_epoch, seq FROM results WHERE device_id = :d ORDER BY boot_epoch, seq"
            ),
            {"d": device_id},
        ).all()
    return [(int(epoch), int(seq)) for epoch, seq in rows]


def _ingested(controller: Controller) -> float:
    return controller.metric("spillway_results_ingested_total")


# -- ingest and acks ----------------------------------------------------------------------


def test_a_redelivered_batch_is_stored_once_and_acked_twice(
    controller: Controller, agents: Callable[..., SimAgent]
) -> None:
    agent = agents("dev-a", boot_epoch=3)
    recorder = _acks_of(agent)
    batch = [record(1, embeddings=[[0.5, -1.25], [2.0, 0.0]]), *records([2, 3])]

    agent.results(batch)
    assert wait_for(lambda: len(acks(recorder)) == 1)
    agent.results(batch)  # the agent did not see the ack in time and sends again
    assert wait_for(lambda: len(acks(recorder)) == 2)

    for ack in acks(recorder):
        assert (ack.device_id, ack.boot_epoch, ack.seqs) == ("dev-a", 3, [1, 2, 3])
    assert _stored(controller, "dev-a") == [(3, 1), (3, 2), (3, 3)]
    assert controller.metric("spillway_results_ingested_total") == 3
    assert controller.metric("spillway_results_duplicates_total") == 3
    assert controller.metric("spillway_result_acks_total") == 2
    assert controller.metric("spillway_mqtt_messages_total", channel="results") == 2
    assert controller.metric("spillway_result_gaps") == 0

    body = controller.http.get("/api/v1/results/req-1").json()
    assert body["embeddings"] == [[0.5, -1.25], [2.0, 0.0]]
    assert (body["device_id"], body["boot_epoch"], body["seq"]) == ("dev-a", 3, 1)


def test_results_of_an_unregistered_device_and_an_older_boot_are_kept(
    controller: Controller, agents: Callable[..., SimAgent]
) -> None:
    """A restarted agent resends its previous boot's outbox: nothing of it may be dropped."""
    agent = agents("dev-a", boot_epoch=2)
    recorder = _acks_of(agent)
    agent.hello()
    assert wait_for(lambda: controller.has_device("dev-a", boot_epoch=2))
    agent.results(records([7, 8]), boot_epoch=1)
    agents("never-said-hello").results(records([1]))
    assert wait_for(lambda: len(acks(recorder)) == 1)
    assert acks(recorder)[0].boot_epoch == 1
    assert wait_for(lambda: _ingested(controller) == 3)
    assert _stored(controller, "dev-a") == [(1, 7), (1, 8)]
    assert _stored(controller, "never-said-hello") == [(1, 1)]


def test_bad_result_batches_are_rejected_and_not_acked(
    controller: Controller, agents: Callable[..., SimAgent]
) -> None:
    agent = agents("dev-a")
    recorder = _acks_of(agent)
    topic = agent.topic(DeviceChannel.RESULTS)
    valid = json.loads(encode(ResultBatch(device_id="dev-a", boot_epoch=1, records=records([1]))))

    def send(payload: dict[str, Any]) -> None:
        agent.client.publish(topic, json.dumps(payload).encode(), qos=QoS.AT_LEAST_ONCE, wait_s=5)

    send({**valid, "device_id": "dev-b"})
    send({**valid, "records": []})
    send({**valid, "records": [{**valid["records"][0], "seq": 0}]})
    expected = {("results", "device_mismatch"): 1, ("results", "malformed"): 2}
    assert wait_for(lambda: controller.bridge.rejects.snapshot() == expected)

    agent.results(records([1]))  # a good batch after the bad ones: the only ack
    assert wait_for(lambda: len(acks(recorder)) == 1)
    assert acks(recorder)[0].seqs == [1]
    assert _stored(controller, "dev-a") == [(1, 1)]


def test_no_ack_while_the_table_is_unusable_then_an_ack_for_the_resend(
    make_controller: Callable[..., Controller],
    database_url: str,
    agents: Callable[..., SimAgent],
) -> None:
    controller = make_controller(database_url, ingest_retry_s=0.3)
    agent = agents("dev-a")
    recorder = _acks_of(agent)
    with _engine(controller).begin() as connection:
        connection.exec_driver_sql("ALTER TABLE results RENAME TO results_away")

    agent.results(records([1, 2]))
    assert wait_for(
        lambda: (
            controller.metric(
                "spillway_mqtt_rejected_total", channel="results", reason="storage_error"
            )
            == 1
        )
    )
    with _engine(controller).begin() as connection:
        connection.exec_driver_sql("ALTER TABLE results_away RENAME TO results")

    agent.results(records([2, 3]))  # what the agent resends, and one more
    assert wait_for(lambda: len(acks(recorder)) >= 1)
    assert controller.bridge.wait_idle(10)
    # Acks from one publisher arrive in order: had the failed batch been acked, it would
    # be first.
    assert [ack.seqs for ack in acks(recorder)] == [[2, 3]]
    assert controller.metric("spillway_result_acks_total") == 1
    assert _stored(controller, "dev-a") == [(1, 2), (1, 3)]
    assert controller.metric("spillway_result_gaps") == 1  # seq 1 is still on the device


@contextmanager
def _failing_commits(engine: Engine) -> Iterator[None]:
    """Every COMMIT on ``engine`` fails in the driver, as a connection lost at that moment
    would: the transaction is rolled back and the driver raises."""
    dialect = engine.dialect
    real_commit = dialect.do_commit

    def fail(dbapi_connection: Any) -> None:
        dbapi_connection.rollback()
        raise dialect.loaded_dbapi.OperationalError("injected commit failure")

    dialect.do_commit = fail  # type: ignore[method-assign]
    try:
        yield
    finally:
        dialect.do_commit = real_commit  # type: ignore[method-assign]


def test_a_failed_commit_is_never_acked_and_a_recovered_one_is(
    make_controller: Callable[..., Controller],
    database_url: str,
    agents: Callable[..., SimAgent],
) -> None:
    controller = make_controller(database_url, ingest_retry_s=0.3)
    agent = agents("dev-a")
    recorder = _acks_of(agent)

    with _failing_commits(_engine(controller)):
        agent.results(records([1, 2]))
        assert wait_for(
            lambda: (
                controller.metric(
                    "spillway_mqtt_rejected_total", channel="results", reason="storage_error"
                )
                == 1
            )
        )
    assert _stored(controller, "dev-a") == []  # rolled back

    agent.results(records([1, 2]))
    assert wait_for(lambda: len(acks(recorder)) >= 1)
    assert controller.bridge.wait_idle(10)
    assert [ack.seqs for ack in acks(recorder)] == [[1, 2]]
    assert _stored(controller, "dev-a") == [(1, 1), (1, 2)]
    assert controller.metric("spillway_results_ingested_total") == 2
    assert controller.metric("spillway_results_duplicates_total") == 0


def test_a_database_that_comes_back_within_the_retry_budget_loses_nothing(
    make_controller: Callable[..., Controller],
    agents: Callable[..., SimAgent],
    tmp_path: Any,
) -> None:
    """SQLite locked by someone else: the worker waits, then commits and acks."""
    import sqlite3

    database = tmp_path / "c.db"
    controller = make_controller(f"sqlite:///{database}")
    agent = agents("dev-a")
    recorder = _acks_of(agent)
    locker = sqlite3.connect(database, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        agent.results(records([1]))
        assert wait_for(lambda: controller.bridge.pending == 1)  # waiting for the lock
        assert acks(recorder) == []  # nothing is committed, so nothing is acked
    finally:
        locker.execute("COMMIT")
        locker.close()
    assert wait_for(lambda: len(acks(recorder)) == 1)
    assert _stored(controller, "dev-a") == [(1, 1)]


# -- gaps ---------------------------------------------------------------------------------


def test_gaps_are_detected_per_boot_and_closed(
    controller: Controller,
    agents: Callable[..., SimAgent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="cloud_controller.bridge")
    agent = agents("dev-a")

    def gaps_are(n: int) -> Callable[[], bool]:
        return lambda: (
            controller.bridge.wait_idle(5) and controller.metric("spillway_result_gaps") == n
        )

    agent.results(records([1, 2]))
    assert wait_for(gaps_are(0))
    agent.results(records([5, 7]))  # 3, 4 and 6 are missing
    assert wait_for(gaps_are(3))
    agent.results(records([2]), boot_epoch=2)  # a new boot numbers from 1 again
    assert wait_for(gaps_are(4))
    opened = [r for r in caplog.records if r.getMessage() == "results missing"]
    assert [(r.boot_epoch, r.first_missing_seq, r.missing) for r in opened] == [  # type: ignore[attr-defined]
        (1, 3, 3),
        (2, 1, 1),
    ]

    agent.results(records([4, 3]))
    assert wait_for(gaps_are(2))
    agent.results(records([6, 1]))
    agent.results(records([1]), boot_epoch=2)
    assert wait_for(gaps_are(0))
    closed = [r for r in caplog.records if r.getMessage() == "result gap closed"]
    assert sorted((r.boot_epoch, r.contiguous_seq) for r in closed) == [(1, 7), (2, 2)]  # type: ignore[attr-defined]


def test_the_gap_tracker_starts_from_what_the_database_holds(database_url: str) -> None:
    """After a controller restart the tracker seeds each key from the stored seqs."""
    engine = make_engine(database_url)
    try:
        migrate(engine)
        with Session(engine) as session:
            assert ingest.stored_seqs(session, "dev-a", 1) == ingest.StoredSeqs(0, frozenset())
            batch = ResultBatch(device_id="dev-a", boot_epoch=1, records=records([3, 4, 5]))
            stored = ingest.store_results(session, batch, now=SERVED_AT)
            assert (stored.inserted, stored.duplicates, stored.seqs) == (3, 0, (3, 4, 5))
            assert ingest.stored_seqs(session, "dev-a", 1) == ingest.StoredSeqs(5, frozenset())
            holes = ResultBatch(device_id="dev-a", boot_epoch=1, records=records([8, 9, 5]))
            stored = ingest.store_results(session, holes, now=SERVED_AT)
            assert (stored.inserted, stored.duplicates) == (2, 1)
            seeded = ingest.stored_seqs(session, "dev-a", 1)
            assert seeded == ingest.StoredSeqs(3, frozenset({4, 5, 8, 9}))
    finally:
        engine.dispose()

    tracker = GapTracker()
    change = tracker.observe(("dev-a", 1), [10], contiguous=seeded.contiguous, above=seeded.above)
    assert (change.missing_before, change.missing_after, change.contiguous) == (0, 2, 5)
    assert change.opened
    change = tracker.observe(("dev-a", 1), [7, 6])
    assert change.closed and change.contiguous == 10
    assert tracker.missing == 0
    assert tracker.forget_complete() == 1 and not tracker.knows(("dev-a", 1))


# -- retention ----------------------------------------------------------------------------


def test_results_older_than_the_retention_are_deleted_on_schedule(
    make_controller: Callable[..., Controller],
    database_url: str,
    agents: Callable[..., SimAgent],
) -> None:
    controller = make_controller(
        database_url, results_retention_s=3600, results_cleanup_interval_s=600
    )
    agent = agents("dev-a")
    agent.results(records([1, 2, 3]))
    assert wait_for(lambda: _ingested(controller) == 3)
    controller.clock.advance(1800)
    agent.results(records([4, 5]))
    assert wait_for(lambda: _ingested(controller) == 5)

    controller.clock.advance(1801)  # 1..3 are now 3601 s old, 4..5 1801 s
    assert wait_for(
        lambda: controller.metric("spillway_results_deleted_total", reason="retention") == 3
    )
    assert _stored(controller, "dev-a") == [(1, 4), (1, 5)]
    assert controller.metric("spillway_results_deleted_total", reason="max_rows") == 0
    assert controller.http.get("/api/v1/results/req-1").status_code == 404


def test_the_oldest_results_beyond_the_row_limit_are_deleted(
    make_controller: Callable[..., Controller],
    database_url: str,
    agents: Callable[..., SimAgent],
) -> None:
    controller = make_controller(database_url, results_max_rows=2)
    agent = agents("dev-a")
    agent.results(records([1, 2, 3]))
    agent.results(records([4, 5]))
    assert wait_for(lambda: _ingested(controller) == 5)
    controller.bridge.request_cleanup()
    assert controller.bridge.wait_idle(10)
    assert _stored(controller, "dev-a") == [(1, 4), (1, 5)]
    assert controller.metric("spillway_results_deleted_total", reason="max_rows") == 3


# -- REST ---------------------------------------------------------------------------------


@pytest.fixture
def served(controller: Controller, agents: Callable[..., SimAgent]) -> Controller:
    """dev-a served seqs 1..5 (seconds 1..5 after SERVED_AT), dev-b seqs 1..2 (11, 12)."""
    a, b = agents("dev-a"), agents("dev-b")
    a.results(
        [
            record(1, embeddings=[[1.0, 2.0, 3.0]], variant="minilm-int8"),
            *records(range(2, 6)),
        ]
    )
    b.results(
        [
            record(
                1,
                request_id="b-1",
                served_at=SERVED_AT.replace(second=11),
                tier="cloud",
                offload_reason="overflow",
                queued_ms=4.5,
                latency_ms=20.25,
            ),
            record(2, request_id="b-2", served_at=SERVED_AT.replace(second=12)),
        ]
    )
    assert wait_for(lambda: _ingested(controller) == 7)
    return controller


def test_get_one_result_with_and_without_embeddings(served: Controller) -> None:
    body = served.http.get("/api/v1/results/req-1").json()
    assert body == {
        "device_id": "dev-a",
        "boot_epoch": 1,
        "seq": 1,
        "request_id": "req-1",
        "status": "ok",
        "tier": "edge",
        "variant": "minilm-int8",
        "offload_reason": None,
        "queued_ms": 0.0,
        "latency_ms": 0.0,
        "served_at": "2030-01-01T00:00:01Z",
        "received_at": "2030-01-01T00:00:00Z",
        "embeddings": [[1.0, 2.0, 3.0]],
    }
    lean = served.http.get("/api/v1/results/req-1", params={"include_embeddings": "false"})
    assert lean.json()["embeddings"] is None
    cloud = served.http.get("/api/v1/results/b-1").json()
    assert (cloud["tier"], cloud["offload_reason"], cloud["queued_ms"], cloud["latency_ms"]) == (
        "cloud",
        "overflow",
        4.5,
        20.25,
    )
    assert cloud["embeddings"] is None


def test_unknown_request_is_a_404_that_says_why(served: Controller) -> None:
    missing = served.http.get("/api/v1/results/nope")
    assert missing.status_code == 404
    assert "no result stored for request 'nope'" in missing.json()["detail"]


def test_list_filters_pages_and_orders_by_served_at_then_seq(served: Controller) -> None:
    http = served.http
    everything = http.get("/api/v1/results").json()
    assert everything["total"] == 7
    assert [(r["device_id"], r["seq"]) for r in everything["items"]] == [
        *(("dev-a", seq) for seq in range(1, 6)),
        ("dev-b", 1),
        ("dev-b", 2),
    ]
    assert all(r["embeddings"] is None for r in everything["items"])

    seen: list[int] = []
    for page in (1, 2, 3):
        body = http.get(
            "/api/v1/results", params={"device_id": "dev-a", "page": page, "page_size": 2}
        ).json()
        assert (body["total"], body["page"], body["page_size"]) == (5, page, 2)
        seen += [r["seq"] for r in body["items"]]
    assert seen == [1, 2, 3, 4, 5]

    window = http.get(
        "/api/v1/results",
        params={"since": "2030-01-01T00:00:02Z", "until": "2030-01-01T00:00:11+00:00"},
    ).json()
    assert [(r["device_id"], r["seq"]) for r in window["items"]] == [
        ("dev-a", 2),
        ("dev-a", 3),
        ("dev-a", 4),
        ("dev-a", 5),
    ]
    with_vectors = http.get(
        "/api/v1/results", params={"device_id": "dev-a", "include_embeddings": "true"}
    ).json()
    assert with_vectors["items"][0]["embeddings"] == [[1.0, 2.0, 3.0]]
    assert http.get("/api/v1/results", params={"device_id": "dev-z"}).json()["total"] == 0


def test_list_rejects_bad_ranges_and_pages_with_a_message(served: Controller) -> None:
    http = served.http

    def error(**params: Any) -> tuple[list[Any], str]:
        response = http.get("/api/v1/results", params=params)
        assert response.status_code == 422, response.text
        detail = response.json()["detail"][0]
        return detail["loc"], detail["msg"]

    loc, msg = error(since="2030-01-02T00:00:00Z", until="2030-01-01T00:00:00Z")
    assert loc == ["query", "until"] and "is before since" in msg
    loc, msg = error(since="2030-01-01T00:00:00")
    assert loc == ["query", "since"] and "time zone" in msg
    loc, _ = error(until="yesterday")
    assert loc == ["query", "until"]
    loc, msg = error(page_size=served.settings.max_page_size + 1)
    assert loc == ["query", "page_size"] and "exceeds the maximum" in msg
    loc, _ = error(page=0)
    assert loc == ["query", "page"]


def test_a_full_batch_is_one_statement_on_either_database(database_url: str) -> None:
    """500 records (the protocol's most) with every column: within both drivers' limits."""
    engine = make_engine(database_url)
    try:
        migrate(engine)
        full = records(range(1, 501), variant="minilm-int8", offload_reason="policy")
        with Session(engine) as session:
            batch = ResultBatch(device_id="dev-a", boot_epoch=1, records=full)
            assert ingest.store_results(session, batch, now=SERVED_AT).inserted == 500
            again = ingest.store_results(session, batch, now=SERVED_AT)
            assert (again.inserted, again.duplicates, len(again.seqs)) == (0, 500, 500)
    finally:
        engine.dispose()
