"""What this device is and how busy it is: the agent's one view of the host.

``probe_capabilities`` runs once per start (it may import onnxruntime, which is slow on a
small board); ``sample_metrics`` runs every telemetry interval and must stay cheap.
psutil and onnxruntime are touched only here, so tests and other hosts can hand the
agent a different ``SystemProbe``. onnxruntime is optional: without it the device
announces no execution providers.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
from typing import Protocol

import psutil

from protocol.messages import RuntimeCapabilities

logger = logging.getLogger(__name__)

_MB = 1024 * 1024


class SystemProbe(Protocol):
    """The seam between the agent and the host it runs on."""

    def capabilities(self) -> RuntimeCapabilities: ...

    def metrics(self) -> dict[str, float]: ...


def agent_version() -> str:
    """The installed ``spillway`` distribution's version, or ``0+unknown``."""
    try:
        return importlib.metadata.version("spillway")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def onnxruntime_info() -> tuple[list[str], str | None]:
    """(execution providers, version) of onnxruntime, or ([], None) when not importable."""
    if importlib.util.find_spec("onnxruntime") is None:
        return [], None
    try:
        ort = importlib.import_module("onnxruntime")
        providers = [str(p) for p in ort.get_available_providers()]
        return providers[:16], str(getattr(ort, "__version__", "")) or None
    except Exception as exc:  # a broken install must not keep the device offline
        logger.warning("onnxruntime present but unusable: %s", exc)
        return [], None


class HostProbe:
    """The real host, through psutil (and onnxruntime when installed)."""

    def __init__(self) -> None:
        # The first cpu_percent(None) call returns 0.0; prime it so samples are meaningful.
        psutil.cpu_percent(interval=None)

    def capabilities(self) -> RuntimeCapabilities:
        providers, ort_version = onnxruntime_info()
        return RuntimeCapabilities(
            execution_providers=providers,
            memory_mb=psutil.virtual_memory().total // _MB,
            cpu_count=os.cpu_count() or 1,
            onnxruntime_version=ort_version,
        )

    def metrics(self) -> dict[str, float]:
        memory = psutil.virtual_memory()
        metrics: dict[str, float] = {
            "cpu_percent": float(psutil.cpu_percent(interval=None)),
            "memory_used_mb": memory.used / _MB,
            "memory_available_mb": memory.available / _MB,
            "memory_percent": float(memory.percent),
        }
        try:
            load_1m, _, _ = os.getloadavg()
            metrics["load_1m"] = float(load_1m)
        except OSError:
            pass
        temperature = _max_temperature_c()
        if temperature is not None:
            metrics["temperature_max_c"] = temperature
        return metrics


def _max_temperature_c() -> float | None:
    """Hottest sensor in degrees Celsius (Jetson thermal zones), None where unreadable."""
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return None
    try:
        sensors = read()
    except (OSError, RuntimeError):
        return None
    values = [t.current for entries in sensors.values() for t in entries if t.current]
    return float(max(values)) if values else None
