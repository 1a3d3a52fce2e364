"""``spillway certs``: the development PKI from the command line (``cloud_controller.certs``).

Writes PEM files an operator copies into Kubernetes Secrets (the broker's server
certificate) and onto edge nodes (one client certificate per device, CN = device id).
Development and test clusters only; production uses the cluster's issuer.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from cloud_controller.certs import ensure_ca, issue
from protocol.topics import validate_device_id

certs_app = typer.Typer(
    help="Development PKI: a CA, the broker's server certificate, per-device certificates.",
    no_args_is_help=True,
)

DirOption = Annotated[Path, typer.Option("--dir", help="Folder holding the CA and certificates.")]


@certs_app.command("ca")
def create_ca(directory: DirOption = Path("var/pki")) -> None:
    """Create the development CA (ca.pem, ca.key) unless it exists."""
    ca = ensure_ca(directory)
    typer.echo(f"CA: {ca.cert} (key {ca.key})")


@certs_app.command("server")
def server_cert(
    names: Annotated[list[str], typer.Argument(help="DNS names and IPs of the broker.")],
    directory: DirOption = Path("var/pki"),
    common_name: Annotated[str, typer.Option(help="CN of the certificate.")] = "mosquitto",
    valid_days: Annotated[int, typer.Option(min=1, help="Validity in days.")] = 365,
) -> None:
    """Issue a server certificate (e.g. for the broker's TLS listener or the Ingress)."""
    issued = issue(directory, common_name, server_names=names, valid_days=valid_days)
    typer.echo(f"server: {issued.cert} (key {issued.key})")


@certs_app.command("device")
def device_certs(
    device_ids: Annotated[list[str], typer.Argument(help="Device ids (= KubeEdge node names).")],
    directory: DirOption = Path("var/pki"),
    valid_days: Annotated[int, typer.Option(min=1, help="Validity in days.")] = 365,
    bundle: Annotated[
        bool,
        typer.Option(help="Also write <dir>/devices/<id>/{ca.pem,device.pem,device.key}."),
    ] = True,
) -> None:
    """Issue one client certificate per device; its CN is the device id (the MQTT username)."""
    for device_id in device_ids:
        try:
            validate_device_id(device_id)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="DEVICE_IDS") from exc
        if device_id in ("ca", "mosquitto"):  # their files would overwrite the CA's/broker's
            raise typer.BadParameter(f"{device_id!r} is reserved", param_hint="DEVICE_IDS")
    ca = ensure_ca(directory)
    for device_id in device_ids:
        issued = issue(directory, device_id, valid_days=valid_days)
        line = f"{device_id}: {issued.cert}"
        if bundle:
            folder = directory / "devices" / device_id
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ca.cert, folder / "ca.pem")
            shutil.copyfile(issued.cert, folder / "device.pem")
            shutil.copyfile(issued.key, folder / "device.key")
            (folder / "device.key").chmod(0o600)
            line += f" (copy {folder}/ to /etc/spillway/tls/ on the node)"
        typer.echo(line)
