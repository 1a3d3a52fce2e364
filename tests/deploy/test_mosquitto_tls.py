"""The prod overlay's broker configuration, run by a real mosquitto with generated certificates.

The config and ACL files are the ones in ``manifests/overlays/prod/mosquitto/``; only
ports, file paths and the log destination are substituted for this machine. The password
file (the ``spillway-mqtt-auth`` Secret in prod) is made the way docs/deploy.md says, by
``cloud_controller.broker_auth``.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from cloud_controller.broker_auth import CONTROLLER_USER, POOL_USER, BrokerAuthDir, Role
from cloud_controller.certs import Issued, ensure_ca, issue
from sim.broker import free_port, mosquitto_binary
from sim.processes import terminate

PROD = Path(__file__).resolve().parents[2] / "manifests" / "overlays" / "prod" / "mosquitto"


@dataclass
class Broker:
    plain_port: int
    tls_port: int
    ca: Issued
    pki: Path
    passwords: dict[str, str]


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    import socket

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {log.read_text() if log.exists() else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not listen on {port}")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    tmp = tmp_path_factory.mktemp("prod-broker")
    pki = tmp / "pki"
    ca = ensure_ca(pki)
    server = issue(pki, "mosquitto", server_names=["localhost", "127.0.0.1"])
    plain_port, tls_port = free_port(), free_port()
    (tmp / "data").mkdir()
    log = tmp / "mosquitto.log"
    replacements = {
        "listener 1883": f"listener {plain_port} 127.0.0.1",
        "listener 8883": f"listener {tls_port} 127.0.0.1",
        "/mosquitto/certs/ca.crt": str(ca.cert),
        "/mosquitto/certs/tls.crt": str(server.cert),
        "/mosquitto/certs/tls.key": str(server.key),
        "/mosquitto/config/": f"{tmp}/",
        "/mosquitto/auth/": f"{tmp}/auth/",
        "/mosquitto/data/": f"{tmp}/data/",
        "log_dest stdout": f"log_dest file {log}",
    }
    config = (PROD / "mosquitto.conf").read_text()
    for old, new in replacements.items():
        assert old in config, old
        config = config.replace(old, new)
    if os.geteuid() == 0:  # as root mosquitto would switch to user 'mosquitto'
        config = "user root\n" + config
    for acl in ("acl", "acl-devices"):
        (tmp / acl).write_text((PROD / acl).read_text())
    auth = BrokerAuthDir(tmp / "auth")
    passwords = {
        CONTROLLER_USER: auth.issue(CONTROLLER_USER, Role.CONTROLLER).password,
        POOL_USER: auth.issue(POOL_USER, Role.POOL).password,
    }
    (tmp / "mosquitto.conf").write_text(config)
    proc = subprocess.Popen(
        [mosquitto_binary(), "-c", str(tmp / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(plain_port, proc, log)
        _wait_port(tls_port, proc, log)
        yield Broker(plain_port, tls_port, ca, pki, passwords)
    finally:
        terminate(proc, timeout_s=10)


class Client:
    """A paho MQTT v5 client that records its connect result and what it receives."""

    def __init__(self, client_id: str, *, username: str | None = None, password: str = "") -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.connected = threading.Event()
        self.refused = threading.Event()
        self.subscribed = threading.Event()
        self.granted: list[int] = []
        self.received: list[str] = []
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda _c, _u, msg: self.received.append(msg.topic)

    def _on_connect(self, _c: object, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        (self.refused if rc.is_failure else self.connected).set()

    def _on_subscribe(
        self, _c: object, _u: object, _mid: int, codes: list[ReasonCode], _p: Properties | None
    ) -> None:
        self.granted = [c.value for c in codes]
        self.subscribed.set()

    def tls(self, ca: Path, cert: Issued | None = None) -> Client:
        self.client.tls_set(
            ca_certs=str(ca),
            certfile=str(cert.cert) if cert else None,
            keyfile=str(cert.key) if cert else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
        return self

    def connect(self, port: int) -> bool:
        try:
            self.client.connect("127.0.0.1", port, keepalive=10)
        except (OSError, ssl.SSLError):
            return False
        self.client.loop_start()
        # A refused TLS handshake closes the socket without a CONNACK: give it 2 s.
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not self.refused.is_set():
            if self.connected.wait(0.02):
                return True
        return self.connected.is_set()

    def subscribe(self, topic: str) -> list[int]:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(5)
        return self.granted

    def publish(self, topic: str) -> None:
        self.client.publish(topic, b"x", qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_device_with_generated_certificate_connects_and_one_without_is_refused(
    broker: Broker,
) -> None:
    device = Client("edge-a").tls(broker.ca.cert, issue(broker.pki, "edge-a"))
    anonymous = Client("intruder").tls(broker.ca.cert)
    try:
        assert device.connect(broker.tls_port)
        assert not anonymous.connect(broker.tls_port)
    finally:
        device.close()
        anonymous.close()


def test_a_certificate_from_another_ca_is_refused(broker: Broker, tmp_path: Path) -> None:
    other = issue(tmp_path / "other-pki", "edge-a")
    client = Client("edge-a").tls(broker.ca.cert, other)
    try:
        assert not client.connect(broker.tls_port)
    finally:
        client.close()


def test_in_cluster_listener_wants_a_cloud_password(broker: Broker) -> None:
    refused = [
        Client("anonymous"),
        Client("spillway-controller", username=CONTROLLER_USER, password="guess"),
        Client("spillway-pool-0", username=POOL_USER, password=broker.passwords[CONTROLLER_USER]),
    ]
    accepted = Client("spillway-pool-0", username=POOL_USER, password=broker.passwords[POOL_USER])
    try:
        for client in refused:
            assert not client.connect(broker.plain_port)
        assert accepted.connect(broker.plain_port)
    finally:
        for client in (*refused, accepted):
            client.close()


def test_acl_keeps_a_device_to_its_own_topics(broker: Broker) -> None:
    root = "spillway/v1"
    a = Client("edge-a").tls(broker.ca.cert, issue(broker.pki, "edge-a"))
    b = Client("edge-b").tls(broker.ca.cert, issue(broker.pki, "edge-b"))
    cloud = Client(
        "spillway-controller", username=CONTROLLER_USER, password=broker.passwords[CONTROLLER_USER]
    )
    pool = Client("spillway-pool-0", username=POOL_USER, password=broker.passwords[POOL_USER])
    try:
        assert a.connect(broker.tls_port) and b.connect(broker.tls_port)
        assert cloud.connect(broker.plain_port) and pool.connect(broker.plain_port)
        # Mosquitto 2.0 grants a subscription the ACL does not allow (SUBACK QoS 1) and
        # then delivers nothing on it: the read check runs per message. So: a subscribes to
        # b's subtree and to the pool's queue, and must receive none of those messages.
        for topic in ("devices/edge-a/#", "pool/status", "devices/edge-b/#", "pool/requests"):
            assert a.subscribe(f"{root}/{topic}") == [1]
        assert b.subscribe(f"{root}/devices/edge-b/#") == [1]
        assert cloud.subscribe(f"{root}/devices/+/results") == [1]
        assert cloud.subscribe(f"$share/chunks/{root}/models/chunks") == [1]
        assert pool.subscribe(f"$share/pool/{root}/pool/requests") == [1]

        cloud.publish(f"{root}/devices/edge-b/desired")  # reaches b only
        b.publish(f"{root}/devices/edge-b/results")  # allowed
        a.publish(f"{root}/pool/requests")  # allowed
        a.publish(f"{root}/models/chunks")  # allowed
        cloud.publish(f"{root}/pool/status")
        # Denied publishes: a writes as b, a announces pool status (only the pool may).
        for topic in ("devices/edge-b/results", "pool/status"):
            spy = Client("edge-a-spy").tls(broker.ca.cert, issue(broker.pki, "edge-a-spy"))
            assert spy.connect(broker.tls_port)
            spy.client.publish(f"{root}/{topic}", b"forged", qos=1)
            deadline = time.monotonic() + 3
            while spy.client.is_connected() and time.monotonic() < deadline:
                time.sleep(0.02)
            # Mosquitto 2.0.11 drops the connection of a client whose publish is denied.
            assert not spy.client.is_connected(), topic
            spy.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (
            len(b.received) < 1 or len(cloud.received) < 2 or not pool.received
        ):
            time.sleep(0.05)
        time.sleep(0.3)  # anything denied would have arrived by now
        # b does not read its own results back: a device only writes its uplink channels.
        assert b.received == [f"{root}/devices/edge-b/desired"]
        assert cloud.received == [f"{root}/devices/edge-b/results", f"{root}/models/chunks"]
        assert pool.received == [f"{root}/pool/requests"]
        assert a.received == [f"{root}/pool/status"]  # not the forged one
    finally:
        for client in (a, b, cloud, pool):
            client.close()
