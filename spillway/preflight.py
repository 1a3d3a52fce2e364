"""Start-up checks: every process checks what it needs before serving.

A failed check raises ``PreflightError`` whose message is one line naming the problem;
entry points print that line and exit non-zero instead of showing a traceback.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

Check = Callable[[], None]
S = TypeVar("S", bound=BaseSettings)

EXIT_PREFLIGHT = 2
"""Exit status of a process that stopped because a start-up check failed."""


class PreflightError(RuntimeError):
    """A start-up requirement is not met; the message says which and how to fix it."""


def port_free(host: str, port: int, *, what: str) -> Check:
    def check() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise PreflightError(
                    f"{what}: cannot listen on {host}:{port} ({exc.strerror}); "
                    "choose another port or stop what holds it"
                ) from exc

    return check


def tcp_reachable(host: str, port: int, *, what: str, timeout_s: float = 2.0) -> Check:
    def check() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                pass
        except OSError as exc:
            raise PreflightError(
                f"{what} at {host}:{port} is unreachable ({exc.strerror or exc})"
            ) from exc

    return check


def packages_present(*modules: str, extra: str) -> Check:
    def check() -> None:
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            raise PreflightError(
                f"missing Python packages {', '.join(missing)}; "
                f"install them with: pip install 'spillway[{extra}]'"
            )

    return check


def files_readable(files: Mapping[str, Path | None], *, what: str) -> Check:
    """Every given file (``setting name -> path``; None = not configured) exists and can be
    read, so a typo in a TLS path stops the process with one line instead of a traceback
    from the TLS library at the first connect."""

    def check() -> None:
        for name, path in files.items():
            if path is None:
                continue
            if not path.is_file():
                raise PreflightError(f"{what}: {name} {path} does not exist or is not a file")
            if not os.access(path, os.R_OK):
                raise PreflightError(f"{what}: {name} {path} is not readable by this user")

    return check


MQTT_TLS_FIELDS = ("mqtt_tls_ca_file", "mqtt_tls_cert_file", "mqtt_tls_key_file")


def mqtt_tls_files_readable(settings: BaseSettings) -> Check:
    """The ``mqtt_tls_*`` files of any side's settings exist and are readable."""
    return files_readable(
        {name: getattr(settings, name, None) for name in MQTT_TLS_FIELDS}, what="MQTT TLS"
    )


def check_mqtt_credentials(
    *,
    username: str | None,
    password: object | None,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
) -> None:
    """Settings validation shared by every side: raise ``ValueError`` for MQTT credential
    settings that cannot work together (no disk access; ``files_readable`` checks that)."""
    if password is not None and username is None:
        raise ValueError("mqtt_password is set but mqtt_username is not")
    if (cert_file is None) != (key_file is None):
        raise ValueError("mqtt_tls_cert_file and mqtt_tls_key_file go together")
    if cert_file is not None and ca_file is None:
        raise ValueError("a client certificate needs mqtt_tls_ca_file (TLS is off without it)")


def run_checks(checks: Iterable[Check]) -> None:
    """Run every check in order; the first failure raises ``PreflightError``."""
    for check in checks:
        check()


def settings_from(
    settings_type: type[S],
    overrides: Mapping[str, Any],
    *,
    secondary: Iterable[str] = (),
) -> S:
    """Settings from the environment with ``overrides`` (None = not given) on top.

    Invalid settings raise ``PreflightError`` naming the first problem, with the option and
    environment variable to fix a missing one. Fields in ``secondary`` are named only when
    nothing else is wrong (their defaults derive from other fields).
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return settings_type(**given)
    except ValidationError as exc:
        errors = exc.errors()
        skip = {(name,) for name in secondary}
        causes = [e for e in errors if tuple(e["loc"]) not in skip] or errors
        first = causes[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        hint = ""
        if first["type"] == "missing":
            prefix = str(settings_type.model_config.get("env_prefix", ""))
            hint = f" (pass --{where.replace('_', '-')} or set {prefix}{where.upper()})"
        more = f" (+{len(causes) - 1} more)" if len(causes) > 1 else ""
        raise PreflightError(f"invalid setting {where}: {first['msg']}{hint}{more}") from exc
