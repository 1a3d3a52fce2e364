"""Broker credentials and ACL (``cloud_controller.broker_auth``) in a real mosquitto.

The broker runs with the generated password file and ACL on a free port; devices, the
controller and the pool connect with their own credentials through paho.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from cloud_controller.broker_auth import (
    CONTROLLER_USER,
    POOL_USER,
    Access,
    BrokerAuthDir,
    CredentialError,
    Role,
    allowed,
    controller_grants,
    device_grants,
    hash_password,
    pool_grants,
    read_password_file,
    render_acl,
    verify_password,
)
from protocol.topics import DeviceChannel, Topics
from sim.broker import MosquittoBroker

TOPICS = Topics()
SHA = "ab" * 32


def _artifact_topic(sha: str) -> str:
    builder = getattr(TOPICS, "artifact_chunks", None)
    return builder(sha) if builder else f"{TOPICS.root}/artifacts/{sha}/chunks"


def agent_topics(device_id: str) -> dict[str, Access]:
    """Every topic an agent uses and what it does there (from ``protocol.topics``)."""
    used = {
        TOPICS.device(device_id, channel): (
            Access.WRITE if channel.spec.direction == "up" else Access.READ
        )
        for channel in DeviceChannel
    }
    used[TOPICS.device(device_id, DeviceChannel.INFER)] = Access.READWRITE
    used[TOPICS.replies(device_id)] = Access.READ
    used[TOPICS.chunk_replies(device_id)] = Access.READ
    used[TOPICS.pool_requests()] = Access.WRITE
    used[TOPICS.pool_status()] = Access.READ
    used[TOPICS.model_chunks()] = Access.WRITE
    used[_artifact_topic(SHA)] = Access.READ
    return used


# -- the ACL as data ---------------------------------------------------------------------------


def test_every_topic_an_agent_uses_is_allowed_and_no_topic_of_another_device() -> None:
    grants = device_grants(TOPICS)
    for topic, access in agent_topics("edge-a").items():
        for wanted in (Access.READ, Access.WRITE):
            if access.allows(wanted):
                assert allowed(grants, "edge-a", topic, wanted), (topic, wanted)
    for channel in DeviceChannel:  # only what the channel's direction needs
        topic = TOPICS.device("edge-a", channel)
        if channel is not DeviceChannel.INFER:
            wrong = Access.READ if channel.spec.direction == "up" else Access.WRITE
            assert not allowed(grants, "edge-a", topic, wrong), (topic, wrong)
    for wanted in (Access.READ, Access.WRITE):
        for topic in (
            *(TOPICS.device("edge-b", c) for c in DeviceChannel),
            TOPICS.replies("edge-b"),
            TOPICS.chunk_replies("edge-b"),
        ):
            assert not allowed(grants, "edge-a", topic, wanted), (topic, wanted)
    # Shared topics: a device neither reads the pool's queue nor writes its status,
    # the model registry's requests or an artifact broadcast.
    assert not allowed(grants, "edge-a", TOPICS.pool_requests(), Access.READ)
    assert not allowed(grants, "edge-a", TOPICS.pool_status(), Access.WRITE)
    assert not allowed(grants, "edge-a", TOPICS.model_chunks(), Access.READ)
    assert not allowed(grants, "edge-a", _artifact_topic(SHA), Access.WRITE)


def test_cloud_identities_get_what_they_use() -> None:
    controller, pool = controller_grants(TOPICS), pool_grants(TOPICS)
    for channel in DeviceChannel:
        access = Access.READ if channel.spec.direction == "up" else Access.WRITE
        assert allowed(controller, CONTROLLER_USER, TOPICS.device("edge-a", channel), access)
    for topic in (TOPICS.model_chunks(), TOPICS.chunk_replies("edge-a"), _artifact_topic(SHA)):
        assert allowed(controller, CONTROLLER_USER, topic, Access.READWRITE)
    assert allowed(pool, POOL_USER, TOPICS.pool_requests(), Access.READ)
    assert allowed(pool, POOL_USER, TOPICS.pool_status(), Access.WRITE)
    assert allowed(pool, POOL_USER, f"{TOPICS.root}/pool/replicas/pool-0/load", Access.READWRITE)
    assert allowed(pool, POOL_USER, TOPICS.replies("edge-a"), Access.WRITE)
    assert not allowed(
        pool, POOL_USER, TOPICS.device("edge-a", DeviceChannel.DESIRED), Access.WRITE
    )
    assert not allowed(pool, POOL_USER, TOPICS.device("edge-a", DeviceChannel.RESULTS), Access.READ)


def test_device_ids_cannot_take_a_cloud_identity(tmp_path: Path) -> None:
    auth = BrokerAuthDir(tmp_path)
    for name in (CONTROLLER_USER, POOL_USER):
        with pytest.raises(CredentialError):
            auth.issue(name, Role.DEVICE)
    with pytest.raises(CredentialError):
        auth.issue("a/b", Role.DEVICE)
    with pytest.raises(CredentialError):
        auth.issue("someone-else", Role.CONTROLLER)
    assert not auth.password_file.exists()


def test_rotation_replaces_the_password_and_keeps_the_others(tmp_path: Path) -> None:
    auth = BrokerAuthDir(tmp_path)
    first = auth.issue("edge-a", Role.DEVICE)
    other = auth.issue("edge-b", Role.DEVICE)
    second = auth.issue("edge-a", Role.DEVICE)
    assert not first.rotated and second.rotated and first.password != second.password
    entries = read_password_file(auth.password_file)
    assert verify_password(second.password, entries["edge-a"])
    assert not verify_password(first.password, entries["edge-a"])
    assert verify_password(other.password, entries["edge-b"])
    assert second.password not in repr(second)
    assert auth.password_file.stat().st_mode & 0o077 == 0
    assert auth.revoke("edge-a") and not auth.revoke("edge-a")
    assert auth.users() == ["edge-b"]


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd absent")
def test_hashes_agree_with_mosquitto_passwd(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(path), "edge-a", "s3cret"], check=True)
    encoded = read_password_file(path)["edge-a"]
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3cret!", encoded)
    assert encoded.split("$")[2] == hash_password("s3cret").split("$")[2]  # iteration count


# -- a real mosquitto with the generated files -------------------------------------------------


@dataclass
class Secured:
    broker: MosquittoBroker
    passwords: dict[str, str]


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    auth = BrokerAuthDir(tmp_path / "auth")
    passwords = {
        "edge-a": auth.issue("edge-a", Role.DEVICE).password,
        "edge-b": auth.issue("edge-b", Role.DEVICE).password,
        CONTROLLER_USER: auth.issue(CONTROLLER_USER, Role.CONTROLLER).password,
        POOL_USER: auth.issue(POOL_USER, Role.POOL).password,
    }
    assert auth.acl_file.read_text() == render_acl(TOPICS)
    broker = MosquittoBroker(
        tmp_path / "broker", password_file=auth.password_file, acl_file=auth.acl_file
    )
    with broker:
        yield Secured(broker, passwords)


class Client:
    """A paho MQTT v5 client recording its CONNACK and what it receives."""

    def __init__(self, client_id: str, username: str | None, password: str | None) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.connected = threading.Event()
        self.refused = threading.Event()
        self.subscribed = threading.Event()
        self.received: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message

    def _on_connect(self, _c: object, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        (self.refused if rc.is_failure else self.connected).set()

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.received.append((msg.topic, bytes(msg.payload)))

    def connect(self, port: int) -> bool:
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not self.refused.is_set():
            if self.connected.wait(0.02):
                return True
        return False

    def subscribe(self, topic: str) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(5)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def topics(self) -> list[str]:
        with self._lock:
            return [topic for topic, _ in self.received]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _as(secured: Secured, user: str, client_id: str | None = None) -> Client:
    client = Client(client_id or user, user, secured.passwords[user])
    assert client.connect(secured.broker.port), user
    return client


def _wait(predicate: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not predicate():  # type: ignore[operator]
        time.sleep(0.02)


def test_wrong_or_missing_password_is_refused(secured: Secured) -> None:
    port = secured.broker.port
    for client in (
        Client("edge-a", "edge-a", secured.passwords["edge-b"]),  # another device's
        Client("edge-a", "edge-a", "guess"),
        Client("edge-a", None, None),  # anonymous
        Client("ghost", "ghost", "whatever"),  # unknown user
    ):
        try:
            assert not client.connect(port)
            assert client.refused.is_set()
        finally:
            client.close()


def test_a_device_reads_and_writes_only_its_own_topics(secured: Secured) -> None:
    root = TOPICS.root
    a, b = _as(secured, "edge-a"), _as(secured, "edge-b")
    controller = _as(secured, CONTROLLER_USER)
    clients = [a, b, controller]
    try:
        # a subscribes to its own topics and to b's (mosquitto 2.0 grants the SUBACK and
        # then checks every message against the ACL: a must receive none of b's).
        for topic in (
            TOPICS.device("edge-a", DeviceChannel.DESIRED),
            TOPICS.device("edge-a", DeviceChannel.ACKS),
            TOPICS.replies("edge-a") + "/#",
            TOPICS.pool_status(),
            _artifact_topic(SHA),
            f"{root}/devices/edge-b/#",
            TOPICS.replies("edge-b") + "/#",
            TOPICS.pool_requests(),
            TOPICS.model_chunks(),
        ):
            a.subscribe(topic)
        b.subscribe(f"{root}/devices/edge-b/#")
        controller.subscribe(f"{root}/devices/+/results")
        controller.subscribe(TOPICS.model_chunks_shared())

        for channel in (DeviceChannel.DESIRED, DeviceChannel.ACKS):
            controller.publish(TOPICS.device("edge-a", channel), b"for-a")
            controller.publish(TOPICS.device("edge-b", channel), b"for-b")
        controller.publish(TOPICS.chunk_replies("edge-a"), b"chunk-a")
        controller.publish(TOPICS.chunk_replies("edge-b"), b"chunk-b")
        controller.publish(_artifact_topic(SHA), b"broadcast")
        a.publish(TOPICS.device("edge-a", DeviceChannel.RESULTS), b"from-a")
        a.publish(TOPICS.model_chunks(), b"chunk-request")
        b.publish(TOPICS.device("edge-b", DeviceChannel.RESULTS), b"from-b")

        expected_a = {
            TOPICS.device("edge-a", DeviceChannel.DESIRED),
            TOPICS.device("edge-a", DeviceChannel.ACKS),
            TOPICS.chunk_replies("edge-a"),
            _artifact_topic(SHA),
        }
        _wait(lambda: set(a.topics()) >= expected_a and len(controller.topics()) >= 3)
        time.sleep(0.5)  # anything a may not read would have arrived by now
        assert sorted(a.topics()) == sorted(expected_a), a.received
        assert sorted(controller.topics()) == sorted(
            [
                TOPICS.device("edge-a", DeviceChannel.RESULTS),
                TOPICS.device("edge-b", DeviceChannel.RESULTS),
                TOPICS.model_chunks(),
            ]
        )
        assert [p for _, p in b.received if p.startswith(b"for-")] == [b"for-b", b"for-b"]
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize(
    "topic",
    [
        TOPICS.device("edge-b", DeviceChannel.RESULTS),  # forging b's uplink
        TOPICS.device("edge-b", DeviceChannel.STATUS),
        TOPICS.device("edge-a", DeviceChannel.DESIRED),  # its own desired state is the cloud's
        TOPICS.pool_status(),
        TOPICS.replies("edge-b"),
    ],
)
def test_a_device_cannot_publish_where_it_may_not(secured: Secured, topic: str) -> None:
    controller = _as(secured, CONTROLLER_USER)
    b = _as(secured, "edge-b")
    try:
        controller.subscribe(f"{TOPICS.root}/#")
        b.subscribe(f"{TOPICS.root}/#")
        forger = _as(secured, "edge-a", client_id="edge-a-forger")
        forger.client.publish(topic, b"forged", qos=1)
        # Mosquitto 2.0.11 drops the connection of a client whose publish is denied.
        _wait(lambda: not forger.client.is_connected(), 3)
        forger.close()
        controller.publish(TOPICS.device("edge-b", DeviceChannel.ACKS), b"marker")
        _wait(lambda: b"marker" in [p for _, p in b.received])
        time.sleep(0.3)
        assert b"forged" not in [p for _, p in controller.received + b.received]
    finally:
        controller.close()
        b.close()


def test_the_pool_takes_requests_and_answers_on_reply_topics(secured: Secured) -> None:
    pool = _as(secured, POOL_USER, client_id="spillway-pool-0")
    a = _as(secured, "edge-a")
    try:
        pool.subscribe(TOPICS.pool_requests_shared())
        a.subscribe(TOPICS.replies("edge-a"))
        a.subscribe(TOPICS.pool_status())
        a.publish(TOPICS.pool_requests(), b"request")
        pool.publish(TOPICS.replies("edge-a"), b"answer")
        pool.publish(TOPICS.pool_status(), b"status")
        _wait(lambda: len(a.received) >= 2 and pool.received)
        assert pool.topics() == [TOPICS.pool_requests()]
        assert sorted(p for _, p in a.received) == [b"answer", b"status"]
    finally:
        pool.close()
        a.close()
