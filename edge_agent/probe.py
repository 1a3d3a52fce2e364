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
import time
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


class LoadSampler:
    """How busy the host is *besides this process*, for the adaptive batch limit.

    The agent's own inference saturates a small board's cores by design; counting that as
    "load" would shrink batches exactly when batching helps most. So the load is the CPU
    share used by everyone else (system busy minus this process) or memory use, whichever
    is higher. Samples are taken at most every ``min_interval_s`` (two reads of /proc), with
    counters of its own so they never disturb ``HostProbe``'s ``cpu_percent`` windows.
    """

    def __init__(self, *, min_interval_s: float = 1.0) -> None:
        self._proc = psutil.Process()
        self._min_interval_s = min_interval_s
        self._cpus = psutil.cpu_count() or 1
        self._last = self._read()
        self._sample: dict[str, float] = {
            "cpu_percent": 0.0,
            "agent_cpu_percent": 0.0,
            "other_cpu_percent": 0.0,
            "memory_percent": float(psutil.virtual_memory().percent),
            "memory_used_mb": psutil.virtual_memory().used / _MB,
        }

    def _read(self) -> tuple[float, float, float, float]:
        """(wall monotonic, system busy s, system total s, own cpu s)."""
        t = psutil.cpu_times()
        idle = t.idle + getattr(t, "iowait", 0.0)
        total = sum(t)
        # guest time is already counted in user on Linux
        total -= getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
        own = self._proc.cpu_times()
        return time.monotonic(), total - idle, total, own.user + own.system

    def sample(self) -> dict[str, float]:
        """The latest sample (percentages of the whole host), refreshed when due."""
        if time.monotonic() - self._last[0] < self._min_interval_s:
            return self._sample
        now = self._read()
        wall, busy, total, own = (b - a for a, b in zip(self._last, now, strict=True))
        self._last = now
        if total <= 0 or wall <= 0:
            return self._sample
        cpu = 100.0 * busy / total
        mine = min(cpu, 100.0 * own / (wall * self._cpus))
        memory = psutil.virtual_memory()
        self._sample = {
            "cpu_percent": cpu,
            "agent_cpu_percent": mine,
            "other_cpu_percent": max(0.0, cpu - mine),
            "memory_percent": float(memory.percent),
            "memory_used_mb": memory.used / _MB,
        }
        return self._sample

    def load(self) -> float:
        """0..1: the larger of others' CPU share and memory use."""
        s = self.sample()
        return max(s["other_cpu_percent"], s["memory_percent"]) / 100.0
