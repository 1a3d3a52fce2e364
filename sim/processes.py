"""Child processes of the demo and simulator: started with their logs in files, stopped politely.

Each child is a real ``spillway`` process (controller, agent) so the demo exercises
exactly what a deployment runs. A controller started here gets a fresh bootstrap admin
token through its environment (``ADMIN_TOKEN_ENV``); REST clients send it with
``bearer(token)``.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

ADMIN_TOKEN_ENV = "SPILLWAY_ADMIN_TOKEN"
"""The controller setting that makes sure an admin token with this secret exists."""


def new_admin_token() -> str:
    """A fresh secret for a controller's bootstrap admin token."""
    return "spw_" + secrets.token_urlsafe(32)


def bearer(token: str) -> dict[str, str]:
    """The header that authenticates a REST request."""
    return {"Authorization": f"Bearer {token}"}


def terminate(proc: subprocess.Popen[bytes], *, timeout_s: float) -> int:
    """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class ChildProcess:
    """A ``spillway`` subcommand run as a separate process, logging to ``log_path``."""

    def __init__(
        self,
        name: str,
        args: list[str],
        *,
        log_path: Path,
        env: dict[str, str],
        cpus: frozenset[int] | None = None,
    ) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        self.env = env
        """Added to this process's environment at ``start``."""
        self.cpus = cpus
        """Pinned to these CPUs right after it starts (its own children inherit them)."""
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "spillway", *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        log.close()
        if self.cpus:
            os.sched_setaffinity(self._proc.pid, self.cpus)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def exited(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def log_tail(self, lines: int = 5) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, *, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code."""
        if self._proc is None:
            return None
        return terminate(self._proc, timeout_s=timeout_s)

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
