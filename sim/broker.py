"""Start, stop and restart a real Mosquitto process on a free port.

Tests and the demo use this to get a broker of their own that they can kill and bring
back; the configuration carries Spillway's limits (``mosquitto-limits.conf``), the
same ones the deployable config in ``manifests/mosquitto`` holds.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from importlib import resources
from pathlib import Path
from types import TracebackType

from sim.processes import terminate

logger = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """Mosquitto is missing or would not start; the message says why."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def broker_limits() -> str:
    return (resources.files("sim") / "mosquitto-limits.conf").read_text()


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if found is None:
        raise BrokerError("mosquitto not found: install it with 'apt-get install -y mosquitto'")
    return found


class MosquittoBroker:
    """One mosquitto process with persistence in ``data_dir``; restartable on the same port."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        extra_config: str = "",
        limits: bool = True,
        password_file: Path | None = None,
        acl_file: Path | None = None,
    ) -> None:
        """``password_file`` turns anonymous access off (every listener, including ones in
        ``extra_config``: settings are not per listener); ``acl_file`` enforces an ACL such
        as ``cloud_controller.broker_auth`` writes."""
        self.data_dir = data_dir
        self.host = host
        self.port = port if port is not None else free_port(host)
        self._extra_config = extra_config
        self._limits = limits
        """False runs mosquitto with its own defaults (used to show what the limits fix)."""
        self.password_file = password_file
        self.acl_file = acl_file
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.data_dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "mosquitto.log"

    def render_config(self) -> str:
        return "\n".join(
            [
                f"listener {self.port} {self.host}",
                # As root, mosquitto would switch to user 'mosquitto' and lose access to
                # data_dir; a test broker keeps the caller's identity.
                *(["user root"] if os.geteuid() == 0 else []),
                *(
                    ["allow_anonymous true"]
                    if self.password_file is None
                    else ["allow_anonymous false", f"password_file {self.password_file}"]
                ),
                *([f"acl_file {self.acl_file}"] if self.acl_file is not None else []),
                "persistence true",
                f"persistence_location {self.data_dir}/",
                "autosave_interval 1",
                f"log_dest file {self.log_path}",
                "log_type error",
                "log_type warning",
                "log_type notice",
                broker_limits() if self._limits else "",
                self._extra_config,
                "",
            ]
        )

    def start(self, *, timeout_s: float = 10.0) -> None:
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.render_config())
        self._proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = (self._proc.stderr.read() if self._proc.stderr else b"").decode()
                tail = self.log_path.read_text()[-500:] if self.log_path.exists() else ""
                raise BrokerError(f"mosquitto exited at start: {err.strip() or tail.strip()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    logger.info("mosquitto listening", extra={"port": self.port})
                    return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port} in {timeout_s}s")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """SIGTERM: mosquitto saves its persistence file and exits."""
        if self._proc is None:
            return
        terminate(self._proc, timeout_s=timeout_s)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: what a crash looks like."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
