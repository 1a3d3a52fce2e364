"""``spillway certs`` (cloud_controller.certs_cli) writes a CA, a server and device bundles."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from cloud_controller.certs_cli import certs_app

runner = CliRunner()


def test_ca_server_and_device_bundles(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert runner.invoke(certs_app, ["ca", "--dir", str(pki)]).exit_code == 0
    ca_before = (pki / "ca.pem").read_bytes()
    result = runner.invoke(certs_app, ["server", "mqtt.example.com", "10.0.0.5", "--dir", str(pki)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(certs_app, ["device", "jetson-1", "jetson-2", "--dir", str(pki)])
    assert result.exit_code == 0, result.output
    assert (pki / "ca.pem").read_bytes() == ca_before
    for device in ("jetson-1", "jetson-2"):
        folder = pki / "devices" / device
        assert (folder / "ca.pem").read_bytes() == ca_before
        cert = x509.load_pem_x509_certificate((folder / "device.pem").read_bytes())
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert cn == device
        assert (folder / "device.key").stat().st_mode & 0o077 == 0


def test_bad_and_reserved_device_ids_are_refused(tmp_path: Path) -> None:
    for bad in ("a/b", "ca", "mosquitto", "spillway-controller", "spillway-pool"):
        result = runner.invoke(certs_app, ["device", bad, "--dir", str(tmp_path)])
        assert result.exit_code == 2, (bad, result.output)
    assert not (tmp_path / "ca.pem").exists()
