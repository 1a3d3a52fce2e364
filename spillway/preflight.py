"""Start-up checks: every process checks what it needs before serving.

A failed check raises ``PreflightError`` whose message is one line naming the problem;
entry points print that line and exit non-zero instead of showing a traceback.
"""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Callable, Iterable

Check = Callable[[], None]


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


def run_checks(checks: Iterable[Check]) -> None:
    """Run every check in order; the first failure raises ``PreflightError``."""
    for check in checks:
        check()
