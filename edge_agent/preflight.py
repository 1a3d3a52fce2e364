"""The agent's start-up checks, in the order the CLI runs them.

Fatal (one line ``spillway agent: <problem>`` on stderr, exit 2, no traceback): required
packages missing, settings invalid, ``state_dir`` not writable, state files corrupt.

Not fatal: an unreachable broker. A device must keep serving with the state it has
applied and reconnect when the network comes back (a Jetson on a flaky uplink boots
before its Wi-Fi does), so ``warn_if_broker_unreachable`` logs one warning line and the
MQTT client keeps retrying with capped, jittered backoff.

Only the standard library is imported at module level: the package check must run
before anything imports paho or pydantic.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spillway.preflight import (
    Check,
    PreflightError,
    packages_present,
    port_free,
    settings_from,
    tcp_reachable,
)

if TYPE_CHECKING:
    from edge_agent.settings import EdgeSettings

logger = logging.getLogger(__name__)

REQUIRED_MODULES = ("paho.mqtt", "pydantic", "pydantic_settings", "psutil")
SERVING_MODULES = ("numpy", "onnxruntime", "tokenizers", "fastapi", "uvicorn", "prometheus_client")


def required_packages() -> Check:
    return packages_present(*REQUIRED_MODULES, extra="edge")


def serving_packages() -> Check:
    """What local inference needs (checked only when a model dir is given)."""
    return packages_present(*SERVING_MODULES, extra="edge,cpu")


def serving_checks(settings: EdgeSettings) -> list[Check]:
    """Model files present and the HTTP port free, before anything is loaded."""
    checks = [serving_packages()]
    variant_dir = settings.variant_dir()

    def model_present() -> None:
        if not (variant_dir / "manifest.json").is_file():
            raise PreflightError(
                f"no manifest.json in {variant_dir}; pass --model-dir holding the "
                f"'{settings.model_variant}' variant (spillway models build --out DIR)"
            )
        key = settings.public_key_file()
        if not key.is_file():
            raise PreflightError(f"trusted key {key} not found; pass --trusted-key")

    checks.append(model_present)
    if settings.http_port:
        checks.append(port_free(settings.http_host, settings.http_port, what="HTTP ingress"))
    return checks


def load_settings(overrides: dict[str, Any]) -> EdgeSettings:
    """``EdgeSettings`` from ``overrides`` and the environment, or one-line PreflightError."""
    from edge_agent.settings import EdgeSettings

    # Without a device id there is no default state_dir either: name the cause only.
    return settings_from(EdgeSettings, overrides, secondary=("state_dir",))


def state_dir_writable(state_dir: Path) -> Check:
    """The state directory exists (or can be made) and a file in it can be written+fsynced."""

    def check() -> None:
        probe = state_dir / f".write-check-{uuid.uuid4().hex}"
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"ok")
                os.fsync(fd)
            finally:
                os.close(fd)
            probe.unlink()
        except OSError as exc:
            raise PreflightError(
                f"state dir {state_dir} is not writable ({exc.strerror or exc}); "
                "pass a writable --state-dir"
            ) from exc

    return check


def warn_if_broker_unreachable(settings: EdgeSettings, *, timeout_s: float = 2.0) -> bool:
    """Log one warning if the broker does not accept TCP now; never raises. True if reachable."""
    check = tcp_reachable(
        settings.mqtt_host, settings.mqtt_port, what="broker", timeout_s=timeout_s
    )
    try:
        check()
    except PreflightError as exc:
        logger.warning("%s; running offline and retrying in the background", exc)
        return False
    return True
