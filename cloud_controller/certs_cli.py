"""``spillway certs``: the development PKI and MQTT credentials from the command line.

Writes PEM files an operator copies into Kubernetes Secrets (the broker's server
certificate) and onto edge nodes (one client certificate per device, CN = device id);
development and test clusters only, production uses the cluster's issuer. ``mqtt-user``
issues per-identity MQTT passwords and the broker's password and ACL files
(``cloud_controller.broker_auth``), in any environment.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated

import typer

from cloud_controller.broker_auth import (
    CONTROLLER_USER,
    POOL_USER,
    BrokerAuthDir,
    CredentialError,
    Role,
    validate_username,
)
from cloud_controller.certs import ensure_ca, issue
from protocol.topics import DEFAULT_ROOT, Topics, validate_device_id

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
        if device_id in (CONTROLLER_USER, POOL_USER):  # the CN becomes the MQTT username
            raise typer.BadParameter(
                f"{device_id!r} is a cloud identity's name", param_hint="DEVICE_IDS"
            )
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


MqttDirOption = Annotated[
    Path,
    typer.Option(
        "--dir", help="Folder of the broker's passwd, acl and acl-devices files (created)."
    ),
]


@certs_app.command("mqtt-user")
def mqtt_user(
    usernames: Annotated[
        list[str], typer.Argument(help="Device ids, or the controller's/pool's username.")
    ],
    directory: MqttDirOption = Path("var/mqtt"),
    role: Annotated[
        Role, typer.Option(help="What the identity is; decides its ACL.")
    ] = Role.DEVICE,
    topic_root: Annotated[str, typer.Option(help="First levels of every topic.")] = DEFAULT_ROOT,
    show: Annotated[
        bool,
        typer.Option(
            "--show/--no-show",
            help="Print 'username:password' on stdout instead of writing "
            "<dir>/credentials/<username> (for piping into a secret store).",
        ),
    ] = False,
) -> None:
    """Create or rotate MQTT passwords (random) and rewrite the broker's ACL files.

    The password is never logged: it goes to <dir>/credentials/<username> (mode 0600) or,
    with --show, to stdout only. Send mosquitto SIGHUP (or restart it) to load the change.
    """
    auth = BrokerAuthDir(directory, Topics(topic_root))
    try:
        for username in usernames:  # validate all before changing anything
            validate_username(username, role, cloud_users=(auth.controller_user, auth.pool_user))
        issued = [auth.issue(username, role) for username in usernames]
    except CredentialError as exc:
        raise typer.BadParameter(str(exc), param_hint="USERNAMES") from exc
    for item in issued:
        verb = "rotated" if item.rotated else "created"
        if show:
            typer.echo(f"{item.username}:{item.password}")
            continue
        path = directory / "credentials" / item.username
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(item.password)
        typer.echo(f"{item.username} ({role}): {verb}; password in {path}")
    typer.echo(
        f"broker files: {auth.password_file}, {auth.acl_file}, {auth.device_acl_file}", err=show
    )


@certs_app.command("mqtt-revoke")
def mqtt_revoke(
    usernames: Annotated[list[str], typer.Argument(help="Usernames to remove.")],
    directory: MqttDirOption = Path("var/mqtt"),
) -> None:
    """Remove MQTT users from the password file (send mosquitto SIGHUP afterwards; a
    connected client stays connected until it reconnects)."""
    auth = BrokerAuthDir(directory)
    for username in usernames:
        removed = auth.revoke(username)
        (directory / "credentials" / username).unlink(missing_ok=True)
        typer.echo(f"{username}: {'revoked' if removed else 'not present'}")
