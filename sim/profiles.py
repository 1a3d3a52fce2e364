"""Jetson-class device profiles the simulator and demo give their agents."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceProfile:
    hardware_class: str
    memory_mb: int
    """Memory budget of the whole module (shared CPU/GPU on Jetson)."""
    int8: bool
    fp16: bool


PROFILES: tuple[DeviceProfile, ...] = (
    DeviceProfile("jetson-orin-nano", memory_mb=8 * 1024, int8=True, fp16=True),
    DeviceProfile("jetson-orin-nx", memory_mb=16 * 1024, int8=True, fp16=True),
    DeviceProfile("jetson-agx-orin", memory_mb=64 * 1024, int8=True, fp16=True),
)


def profile_for(index: int) -> DeviceProfile:
    """Profiles in turn, so a small fleet still has every hardware class."""
    return PROFILES[index % len(PROFILES)]
