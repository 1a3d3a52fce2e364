"""Batched ingest: many messages in one transaction, applied as one by one would, a poison
message costing only itself, results acknowledged only after their batch's commit, and
control messages overtaking a backlog of telemetry. Real broker, both databases."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session

from cloud_controller import ingest
from cloud_controller.database import make_engine, migrate
from cloud_controller.entities import Device
from cloud_controller.ingest import Ingested
from protocol.messages import (
    ApplyOutcome,
    DeviceStatus,
    Heartbeat,
    Hello,
    Presence,
    ReportedState,
    RuntimeCapabilities,
    Telemetry,
)
from protocol.topics import DeviceChannel
from tests.controller.helpers import (
    SERVED_AT,
    Controller,
    Recorder,
    SimAgent,
    acks,
    records,
    wait_for,
)

T0 = SERVED_AT


def _engine(controller: Controller) -> Engine:
    engine: Engine = controller.app.state.runtime.engine
    return engine


def _hello(device_id: str, boot_epoch: int = 1) -> Hello:
    return Hello(
        device_id=device_id,
        hardware_class="rpi5",
        agent_version="0.1.0",
        capabilities=RuntimeCapabilities(
            execution_providers=["CPUExecutionProvider"], memory_mb=1024, cpu_count=4
        ),
        boot_epoch=boot_epoch,
        keepalive_s=5,
    )


def _beat(device_id: str, seq: int, boot_epoch: int = 1) -> Heartbeat:
    return Heartbeat(device_id=device_id, seq=seq, uptime_s=float(seq), boot_epoch=boot_epoch)


def _sample(device_id: str, value: float, boot_epoch: int = 1) -> Telemetry:
    return Telemetry(device_id=device_id, boot_epoch=boot_epoch, metrics={"cpu_percent": value})


@contextmanager
def _write_lock(database_url: str) -> Iterator[None]:
    """Hold the database's write lock (readers go on): the controller's writer waits."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        locker = sqlite3.connect(url.database or "", isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")
            yield
        finally:
            locker.execute("COMMIT")
            locker.close()
        return
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            transaction = connection.begin()
            connection.exec_driver_sql(
                "LOCK TABLE devices, telemetry_samples, reported_states, results IN EXCLUSIVE MODE"
            )
            try:
                yield
            finally:
                transaction.rollback()
    finally:
        engine.dispose()


def _worker_holds_one(controller: Controller) -> bool:
    """The worker took the one message there was and waits for the database."""
    bridge = controller.bridge
    return wait_for(lambda: bridge.pending == 1 and bridge.queued == 0)


# -- apply_batch on either database ---------------------------------------------------------


def test_a_mixed_batch_is_applied_as_one_by_one_would(database_url: str) -> None:
    """Hellos, presence, reports, heartbeats and telemetry of several devices, in one
    transaction: last_seen is the newest, history is trimmed once, stale and unknown ones
    are ignored, presence is applied in order, superseded heartbeats are coalesced."""
    engine = make_engine(database_url)
    try:
        migrate(engine)
        at = [T0 + timedelta(seconds=i) for i in range(40)]
        batch: list[tuple[ingest.Inbound, Any]] = [
            (_hello("a"), at[0]),
            (_hello("b", boot_epoch=3), at[0]),
            (Presence(device_id="a", status=DeviceStatus.OFFLINE, boot_epoch=1), at[1]),
            (Presence(device_id="a", status=DeviceStatus.ONLINE, boot_epoch=1), at[2]),
            (Presence(device_id="b", status=DeviceStatus.OFFLINE, boot_epoch=3), at[3]),
            (
                ReportedState(
                    device_id="a",
                    observed_generation=4,
                    outcome=ApplyOutcome.APPLIED,
                    boot_epoch=1,
                ),
                at[4],
            ),
        ]
        batch += [(_sample("a", float(i)), at[5 + i]) for i in range(5)]  # keep 3 of 5
        batch += [(_beat("a", seq), at[10 + seq]) for seq in range(1, 4)]  # two coalesced
        batch += [
            (_beat("b", 1, boot_epoch=2), at[20]),  # older boot than b's hello: ignored
            (_sample("b", 9.0, boot_epoch=3), at[21]),
            (_beat("ghost", 1), at[22]),  # never said hello
            (_beat("a", 9, boot_epoch=2), at[6]),  # a new boot; received earlier
            (_sample("a", 99.0, boot_epoch=1), at[30]),  # from the boot before: ignored
        ]
        with Session(engine) as session:
            applied = ingest.apply_batch(session, batch, keep=3)
            session.commit()
        outcomes = [done.outcome for done in applied]
        assert outcomes == [Ingested.APPLIED] * 14 + [
            Ingested.STALE_BOOT_EPOCH,
            Ingested.APPLIED,
            Ingested.UNKNOWN_DEVICE,
            Ingested.APPLIED,
            Ingested.STALE_BOOT_EPOCH,
        ]
        coalesced = [i for i, done in enumerate(applied) if done.coalesced]
        assert coalesced == [11, 12, 13]  # a's beats 1-3; the new boot's beat wrote

        with engine.connect() as connection:
            devices = {
                row.id: row
                for row in connection.execute(
                    sa.text("SELECT id, status, boot_epoch, last_seen FROM devices")
                )
            }
            samples = connection.execute(
                sa.text("SELECT device_id, metrics FROM telemetry_samples ORDER BY id")
            ).all()
            reported = connection.execute(
                sa.text("SELECT device_id, observed_generation FROM reported_states")
            ).all()
        assert set(devices) == {"a", "b"}
        assert devices["a"].status == "online" and devices["b"].status == "offline"
        assert (devices["a"].boot_epoch, devices["b"].boot_epoch) == (2, 3)
        with Session(engine) as session:
            a = session.get(Device, "a")
            b = session.get(Device, "b")
            assert a is not None and b is not None
            assert a.last_seen == at[13]  # the newest receive time, not the last message's
            assert b.last_seen == at[21]
        assert [(d, m["cpu_percent"]) for d, m in _json_rows(samples)] == [
            ("a", 2.0),
            ("a", 3.0),
            ("a", 4.0),
            ("b", 9.0),
        ]
        assert [tuple(row) for row in reported] == [("a", 4)]
    finally:
        engine.dispose()


def _json_rows(rows: list[Any]) -> list[tuple[str, dict[str, float]]]:
    import json

    return [(r[0], r[1] if isinstance(r[1], dict) else json.loads(r[1])) for r in rows]


# -- through the broker -----------------------------------------------------------------------


def test_a_batch_from_many_devices_is_applied_and_counted(
    make_controller: Callable[..., Controller],
    database_url: str,
    agents: Callable[..., SimAgent],
) -> None:
    controller = make_controller(database_url, telemetry_history=2, ingest_batch_linger_s=0)
    fleet = [agents(f"dev-{i}") for i in range(6)]
    for agent in fleet:
        agent.hello()
    assert wait_for(lambda: controller.http.get("/api/v1/devices").json()["total"] == 6)
    assert controller.bridge.wait_idle(10)
    received_before = controller.metric("spillway_ingest_received_total", channel="heartbeat")
    batches_before = controller.metric("spillway_ingest_batch_messages_count")

    with _write_lock(database_url):
        fleet[0].heartbeat()  # the worker takes it and waits for the lock
        assert _worker_holds_one(controller)
        for agent in fleet:
            for value in range(3):
                agent.heartbeat()
                agent.telemetry(cpu_percent=float(value))
        fleet[5].report(7)
        assert wait_for(lambda: controller.bridge.pending == 1 + 6 * 6 + 1)
    assert controller.bridge.wait_idle(20)

    # The held heartbeat alone, then all the rest in one transaction.
    assert controller.metric("spillway_ingest_batch_messages_count") - batches_before == 1
    assert controller.metric("spillway_ingest_batch_messages_sum") >= 37
    heartbeats = controller.metric("spillway_mqtt_messages_total", channel="heartbeat")
    assert heartbeats == 19
    assert (
        controller.metric("spillway_ingest_received_total", channel="heartbeat") - received_before
        == 19
    )
    # Only the newest heartbeat of a device in a batch writes last_seen: of 3 each, 2 not.
    assert controller.metric("spillway_ingest_coalesced_total", channel="heartbeat") == 12
    assert controller.metric("spillway_mqtt_messages_total", channel="telemetry") == 18
    for agent in fleet:
        history = controller.http.get(
            f"/api/v1/devices/{agent.device_id}/telemetry", params={"limit": 10}
        ).json()
        assert [s["metrics"]["cpu_percent"] for s in history] == [2.0, 1.0]
    assert controller.device("dev-5")["reported"]["observed_generation"] == 7
    assert controller.metric("spillway_mqtt_rejected_total", channel="telemetry") == 0


def _poison(engine: Engine, device_id: str) -> None:
    """Make the database refuse telemetry of ``device_id`` (a constraint, not an outage)."""
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            connection.exec_driver_sql(
                "CREATE TRIGGER poison BEFORE INSERT ON telemetry_samples "
                f"WHEN NEW.device_id = '{device_id}' BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
            )
        else:
            connection.exec_driver_sql(
                "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF NEW.device_id = '{device_id}' THEN RAISE EXCEPTION 'poisoned'; END IF; "
                "RETURN NEW; END $$"
            )
            connection.exec_driver_sql(
                "CREATE TRIGGER poison BEFORE INSERT ON telemetry_samples "
                "FOR EACH ROW EXECUTE FUNCTION poison()"
            )


def test_a_poison_message_does_not_lose_the_rest_of_its_batch(
    make_controller: Callable[..., Controller],
    database_url: str,
    agents: Callable[..., SimAgent],
) -> None:
    controller = make_controller(database_url, ingest_retry_s=0.3)
    good, bad = agents("dev-good"), agents("dev-bad")
    recorder = Recorder(good.client, good.topic(DeviceChannel.ACKS))
    good.hello()
    bad.hello()
    assert wait_for(lambda: controller.http.get("/api/v1/devices").json()["total"] == 2)
    assert controller.bridge.wait_idle(10)
    _poison(_engine(controller), "dev-bad")

    with _write_lock(database_url):
        good.heartbeat()
        good.telemetry(cpu_percent=1.0)
        bad.telemetry(cpu_percent=2.0)
        good.telemetry(cpu_percent=3.0)
        good.results(records([1, 2]))
        good.report(3)
        assert wait_for(lambda: controller.bridge.pending == 6)
    assert controller.bridge.wait_idle(20)

    assert controller.metric("spillway_ingest_batch_fallbacks_total") >= 1
    assert controller.bridge.rejects.snapshot() == {("telemetry", "storage_error"): 1}
    assert controller.metric("spillway_mqtt_messages_total", channel="telemetry") == 2
    history = controller.http.get("/api/v1/devices/dev-good/telemetry").json()
    assert [s["metrics"]["cpu_percent"] for s in history] == [3.0, 1.0]
    assert controller.device("dev-good")["reported"]["observed_generation"] == 3
    assert wait_for(lambda: len(acks(recorder)) == 1)
    assert acks(recorder)[0].seqs == [1, 2]
    assert controller.metric("spillway_results_ingested_total") == 2


@contextmanager
def _failing_commits(engine: Engine) -> Iterator[None]:
    """Every COMMIT fails in the driver, as a connection lost at that moment would."""
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


def test_results_in_a_batch_are_acked_after_its_commit_and_once(
    make_controller: Callable[..., Controller],
    database_url: str,
    agents: Callable[..., SimAgent],
) -> None:
    controller = make_controller(database_url, ingest_retry_s=0.3)
    senders = [agents(f"dev-{i}") for i in range(3)]
    recorders = [Recorder(a.client, a.topic(DeviceChannel.ACKS)) for a in senders]

    def send_all() -> None:
        with _write_lock(database_url):
            for agent in senders:
                agent.results(records([1, 2, 3]))
            assert wait_for(lambda: controller.bridge.pending == 3)
        assert controller.bridge.wait_idle(20)

    with _failing_commits(_engine(controller)):
        send_all()
    assert controller.metric("spillway_ingest_batch_messages_count") >= 1
    assert all(acks(r) == [] for r in recorders)  # nothing committed, nothing acked
    assert controller.bridge.rejects.snapshot() == {("results", "storage_error"): 3}

    send_all()  # what the agents resend
    send_all()  # and once more, as a lost ack would make them
    assert wait_for(lambda: all(len(acks(r)) == 2 for r in recorders))
    assert all([a.seqs for a in acks(r)] == [[1, 2, 3]] * 2 for r in recorders)
    assert controller.metric("spillway_results_ingested_total") == 9
    assert controller.metric("spillway_results_duplicates_total") == 9
    with _engine(controller).connect() as connection:
        count = connection.execute(sa.text("SELECT count(*) FROM results")).scalar_one()
    assert count == 9


def test_control_messages_overtake_a_backlog_of_telemetry(
    make_controller: Callable[..., Controller],
    database_url: str,
    agents: Callable[..., SimAgent],
) -> None:
    """The database is held; telemetry piles up, then a report arrives: the report is
    applied in the first batch after the lock is released, before the backlog."""
    controller = make_controller(database_url, ingest_batch_max=5, ingest_batch_linger_s=0)
    agent = agents("dev-1")
    agent.hello()
    assert wait_for(lambda: controller.has_device("dev-1", status="online"))
    assert controller.bridge.wait_idle(10)

    writes: list[str] = []
    lock = threading.Lock()

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        text = " ".join(statement.split()).lower()
        for table in ("reported_states", "telemetry_samples"):
            if text.startswith(f"insert into {table}"):
                with lock:
                    writes.append(table)

    engine = _engine(controller)
    sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        with _write_lock(database_url):
            agent.telemetry(cpu_percent=-1.0)
            assert _worker_holds_one(controller)
            for value in range(40):
                agent.telemetry(cpu_percent=float(value))
            assert wait_for(lambda: controller.bridge.pending == 41)
            agent.report(1)
            assert wait_for(lambda: controller.bridge.pending == 42)
        assert controller.bridge.wait_idle(20)
    finally:
        sa.event.remove(engine, "before_cursor_execute", seen)

    assert controller.metric("spillway_mqtt_messages_total", channel="telemetry") == 41
    assert controller.device("dev-1")["reported"]["observed_generation"] == 1
    # The sample the worker held went first; then the report, first in the next batch,
    # before all 40 queued samples (4 in its batch, then 36 at 5 per batch: 9 inserts).
    assert writes == ["telemetry_samples", "reported_states"] + ["telemetry_samples"] * 9


def test_sqlite_reads_are_not_blocked_by_a_writer(tmp_path: Any) -> None:
    """WAL: the API's reads go on while the ingest writer holds its transaction."""
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        migrate(engine)
        with engine.connect() as connection:
            mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar_one()
            timeout_ms = connection.exec_driver_sql("PRAGMA busy_timeout").scalar_one()
        assert mode == "wal" and timeout_ms > 0
        with Session(engine) as writer:
            ingest.apply_batch(writer, [(_hello("a"), T0)], keep=3)  # holds the write lock
            with engine.connect() as reader:
                count = reader.execute(sa.text("SELECT count(*) FROM devices")).scalar_one()
            assert count == 0  # not blocked, and sees only what is committed
            writer.commit()
        with engine.connect() as reader:
            assert reader.execute(sa.text("SELECT count(*) FROM devices")).scalar_one() == 1
    finally:
        engine.dispose()
