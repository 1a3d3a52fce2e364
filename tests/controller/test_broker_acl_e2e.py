"""Credentials end to end: real controller and agent processes, and TLS for the cloud side.

The broker is a real mosquitto with the password file and ACL ``spillway certs mqtt-user``
writes; each process gets its own credentials from the environment, as in a deployment.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from cloud_controller.broker_auth import CONTROLLER_USER, POOL_USER
from cloud_controller.certs import ensure_ca, issue
from cloud_controller.certs_cli import certs_app
from cloud_controller.pool.cli import pool_app
from cloud_controller.pool.settings import PoolSettings
from cloud_controller.settings import CloudSettings
from models.signing import load_or_create_signing_key, public_path
from protocol.mqtt import MqttClient
from sim.broker import MosquittoBroker, free_port
from sim.processes import ADMIN_TOKEN_ENV, ChildProcess, bearer, new_admin_token
from spillway.preflight import PreflightError, settings_from
from tests.integration.fleet import wait_for

runner = CliRunner()


def _issue(auth: Path, *args: str) -> None:
    result = runner.invoke(certs_app, ["mqtt-user", *args, "--dir", str(auth)])
    assert result.exit_code == 0, result.output


@pytest.fixture
def auth_dir(tmp_path: Path) -> Path:
    auth = tmp_path / "auth"
    _issue(auth, "edge-a", "edge-b")
    _issue(auth, CONTROLLER_USER, "--role", "controller")
    _issue(auth, POOL_USER, "--role", "pool")
    return auth


def _password(auth: Path, user: str) -> str:
    return (auth / "credentials" / user).read_text()


def test_cli_keeps_passwords_out_of_its_output(auth_dir: Path) -> None:
    result = runner.invoke(certs_app, ["mqtt-user", "edge-a", "--dir", str(auth_dir)])
    assert result.exit_code == 0 and "rotated" in result.output
    password = _password(auth_dir, "edge-a")
    assert password not in result.output
    assert (auth_dir / "credentials" / "edge-a").stat().st_mode & 0o077 == 0
    shown = runner.invoke(certs_app, ["mqtt-user", "edge-c", "--dir", str(auth_dir), "--show"])
    assert shown.exit_code == 0 and shown.stdout.startswith("edge-c:")
    refused = runner.invoke(certs_app, ["mqtt-user", POOL_USER, "--dir", str(auth_dir)])
    assert refused.exit_code == 2
    revoked = runner.invoke(certs_app, ["mqtt-revoke", "edge-c", "--dir", str(auth_dir)])
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    assert "edge-c:" not in (auth_dir / "passwd").read_text()


@pytest.fixture
def secured_broker(tmp_path: Path, auth_dir: Path) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(
        tmp_path / "broker", password_file=auth_dir / "passwd", acl_file=auth_dir / "acl"
    ) as broker:
        yield broker


def test_agent_with_its_credentials_comes_online_at_a_controller_with_its_own(
    tmp_path: Path, auth_dir: Path, secured_broker: MosquittoBroker
) -> None:
    http_port = free_port()
    key_path = tmp_path / "keys" / "signing.key"
    load_or_create_signing_key(key_path)  # the agents trust its public half for desired state
    admin_token = new_admin_token()
    controller = ChildProcess(
        "controller",
        [
            "controller",
            "serve",
            "--port",
            str(http_port),
            "--mqtt-port",
            str(secured_broker.port),
            "--database-url",
            f"sqlite:///{tmp_path / 'controller.db'}",
        ],
        log_path=tmp_path / "controller.log",
        env={
            "SPILLWAY_MQTT_USERNAME": CONTROLLER_USER,
            "SPILLWAY_MQTT_PASSWORD": _password(auth_dir, CONTROLLER_USER),
            "SPILLWAY_SIGNING_KEY_PATH": str(key_path),
            ADMIN_TOKEN_ENV: admin_token,
        },
    )

    def agent(device_id: str, password: str) -> ChildProcess:
        return ChildProcess(
            device_id,
            [
                "agent",
                "run",
                "--device-id",
                device_id,
                "--mqtt-port",
                str(secured_broker.port),
                "--state-dir",
                str(tmp_path / "agents" / device_id),
                "--heartbeat-interval-s",
                "1",
            ],
            log_path=tmp_path / f"{device_id}.log",
            env={
                "SPILLWAY_EDGE_MQTT_PASSWORD": password,
                "SPILLWAY_EDGE_DESIRED_KEY_FILES": json.dumps([str(public_path(key_path))]),
            },
        )

    good = agent("edge-a", _password(auth_dir, "edge-a"))
    # edge-b with edge-a's password: refused by the broker, never seen by the controller.
    impostor = agent("edge-b", _password(auth_dir, "edge-a"))
    http = httpx.Client(
        base_url=f"http://127.0.0.1:{http_port}", timeout=5, headers=bearer(admin_token)
    )

    def device(device_id: str) -> dict[str, object]:
        response = http.get(f"/api/v1/devices/{device_id}")
        return {} if response.status_code == 404 else dict(response.json())

    try:
        controller.start()
        wait_for(lambda: http.get("/readyz").status_code == 200, 60, what="controller ready")
        good.start()
        impostor.start()
        wait_for(lambda: device("edge-a").get("status") == "online", 60, what="edge-a online")
        # Desired state reaches the agent (read on its desired topic) and its report comes
        # back (write on its reported topic): the ACL lets the whole loop through.
        response = http.put(
            "/api/v1/devices/edge-a/desired", json={"policy": {"offload_slo_ms": 150}}
        )
        response.raise_for_status()
        generation = response.json()["generation"]
        wait_for(
            lambda: (
                (device("edge-a").get("reported") or {}).get("observed_generation")  # type: ignore[union-attr]
                == generation
            ),
            30,
            what="edge-a reports the new generation",
        )
        time.sleep(1.0)
        assert device("edge-b") == {}
        assert good.exited() is None and impostor.exited() is None  # retrying, not crashed
        assert _password(auth_dir, "edge-a") not in (tmp_path / "edge-a.log").read_text()
        assert _password(auth_dir, CONTROLLER_USER) not in (tmp_path / "controller.log").read_text()
    finally:
        for proc in (impostor, good, controller):
            proc.stop()
        http.close()


def _tls_broker(tmp_path: Path, auth_dir: Path) -> tuple[MosquittoBroker, int, Path]:
    pki = tmp_path / "pki"
    ca = ensure_ca(pki)
    server = issue(pki, "mosquitto", server_names=["localhost", "127.0.0.1"])
    tls_port = free_port()
    listener = "\n".join(
        [
            f"listener {tls_port} 127.0.0.1",
            f"cafile {ca.cert}",
            f"certfile {server.cert}",
            f"keyfile {server.key}",
            "tls_version tlsv1.2",
        ]
    )
    broker = MosquittoBroker(
        tmp_path / "broker",
        extra_config=listener,
        password_file=auth_dir / "passwd",
        acl_file=auth_dir / "acl",
    )
    return broker, tls_port, ca.cert


def test_controller_and_pool_connect_over_tls_with_credentials(
    tmp_path: Path, auth_dir: Path
) -> None:
    broker, tls_port, ca = _tls_broker(tmp_path, auth_dir)
    controller = CloudSettings(
        mqtt_port=tls_port,
        mqtt_username=CONTROLLER_USER,
        mqtt_password=SecretStr(_password(auth_dir, CONTROLLER_USER)),
        mqtt_tls_ca_file=ca,
        mqtt_reconnect_backoff_max_s=0.5,
    )
    pool = PoolSettings(
        mqtt_port=tls_port,
        mqtt_username=POOL_USER,
        mqtt_password=SecretStr(_password(auth_dir, POOL_USER)),
        mqtt_tls_ca_file=ca,
    )
    wrong = pool.model_copy(update={"mqtt_password": SecretStr("not-it")})
    plain_text = pool.model_copy(update={"mqtt_tls_ca_file": None})  # TLS port, no TLS
    with broker:
        clients = {
            "controller": MqttClient(controller.mqtt()),
            "pool": MqttClient(pool.mqtt("spillway-pool-0")),
            "wrong": MqttClient(wrong.mqtt("spillway-pool-1")),
            "plain": MqttClient(plain_text.mqtt("spillway-pool-2")),
        }
        for client in clients.values():
            client.start()
        try:
            assert clients["controller"].wait_connected(10)
            assert clients["pool"].wait_connected(10)
            time.sleep(1.5)  # the refused ones have had several tries by now
            assert clients["wrong"].connects == 0 and clients["plain"].connects == 0
        finally:
            for client in clients.values():
                client.stop()
    assert "not-it" not in repr(wrong) and _password(auth_dir, POOL_USER) not in repr(pool)
    env = pool.as_env()  # what local replicas get: the password itself, not a mask
    assert env["SPILLWAY_POOL_MQTT_PASSWORD"] == _password(auth_dir, POOL_USER)


def test_missing_tls_file_and_half_credentials_stop_with_one_line(tmp_path: Path) -> None:
    result = runner.invoke(
        pool_app, ["serve", "--mqtt-tls-ca-file", str(tmp_path / "nope.pem"), "--replicas", "0"]
    )
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert "mqtt_tls_ca_file" in line and "nope.pem" in line
    with pytest.raises(PreflightError, match="mqtt_password is set but mqtt_username is not"):
        settings_from(CloudSettings, {"mqtt_password": "x"})
    with pytest.raises(PreflightError, match="mqtt_tls_cert_file and mqtt_tls_key_file"):
        settings_from(PoolSettings, {"mqtt_tls_ca_file": "ca.pem", "mqtt_tls_cert_file": "c"})
