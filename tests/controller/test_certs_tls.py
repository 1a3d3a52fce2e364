"""Generated certificates against a real mosquitto TLS listener with client certificates."""

from __future__ import annotations

import time
from pathlib import Path

from cloud_controller.certs import ensure_ca, issue
from protocol.mqtt import MqttClient, MqttSettings
from sim.broker import MosquittoBroker, free_port


def test_device_with_generated_certificate_connects_and_one_without_is_refused(
    tmp_path: Path,
) -> None:
    pki = tmp_path / "pki"
    ca = ensure_ca(pki)
    server = issue(pki, "broker", server_names=["localhost", "127.0.0.1"])
    device = issue(pki, "edge-7")
    tls_port = free_port()
    tls_listener = "\n".join(
        [
            f"listener {tls_port} 127.0.0.1",
            f"cafile {ca.cert}",
            f"certfile {server.cert}",
            f"keyfile {server.key}",
            "require_certificate true",
            "use_identity_as_username true",
        ]
    )
    with MosquittoBroker(tmp_path / "broker", extra_config=tls_listener):
        base = {"host": "127.0.0.1", "port": tls_port, "backoff_max_s": 0.5}
        good = MqttClient(
            MqttSettings(
                client_id="edge-7",
                tls_ca_file=str(ca.cert),
                tls_cert_file=str(device.cert),
                tls_key_file=str(device.key),
                **base,  # type: ignore[arg-type]
            )
        )
        anonymous = MqttClient(
            MqttSettings(client_id="intruder", tls_ca_file=str(ca.cert), **base)  # type: ignore[arg-type]
        )
        good.start()
        anonymous.start()
        try:
            assert good.wait_connected(10)
            time.sleep(1.5)  # the refused client has had several tries by now
            assert not anonymous.is_connected and anonymous.connects == 0
        finally:
            good.stop()
            anonymous.stop()


def test_ca_is_created_once(tmp_path: Path) -> None:
    first = ensure_ca(tmp_path)
    before = first.cert.read_bytes()
    assert ensure_ca(tmp_path).cert.read_bytes() == before
