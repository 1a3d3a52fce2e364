"""Jetson-class device profiles the simulator and demo give their agents.

A profile says what a device can hold (``memory_mb``, shared CPU/GPU on Jetson), which
precisions its accelerators run (``int8``, ``fp16``) and how fast it runs Spillway's INT8
MiniLM *relative to one core of the machine the calibration ran on* (``relative_speed``).

Where the speed comes from, plainly: Spillway's INT8 variant is ONNX Runtime dynamic
quantization (``DynamicQuantizeLinear`` + ``MatMulInteger``), which ONNX Runtime runs on
the CPU execution provider; on a Jetson it therefore runs on the Arm CPU cluster, not the
GPU. The published facts are each module's CPU cores and maximum CPU clock (NVIDIA Jetson
Orin series data sheets, ``cpu_cores`` / ``cpu_max_ghz`` below). The per-core factor
``ARM_A78AE_PER_GHZ_VS_REFERENCE`` (an Arm Cortex-A78AE core's INT8 GEMM throughput per GHz
relative to one reference x86 core at its own clock) is an **assumption**, not a
measurement: no Jetson was available to this project. ``relative_speed`` is derived from
these three numbers with ``PARALLEL_EFFICIENCY`` (also an assumption), so every simulated
number inherits that caveat and every report labels such devices "simulated".
"""

from __future__ import annotations

from dataclasses import dataclass

ARM_A78AE_PER_GHZ_VS_REFERENCE = 0.2
"""Assumption: one Cortex-A78AE core at 1 GHz does 0.2x the INT8 MiniLM work of one
reference core (this project's AMD EPYC Zen 3 core at its ~3 GHz boost, AVX2)."""

PARALLEL_EFFICIENCY = 0.7
"""Assumption: ONNX Runtime's intra-op threads scale to 70 % on a module's cores for
MiniLM-sized GEMMs."""

SPEED_SOURCE = (
    "derived: published CPU cores x max GHz (NVIDIA Jetson Orin data sheets) x assumed "
    f"{ARM_A78AE_PER_GHZ_VS_REFERENCE} per-GHz A78AE/Zen3 INT8 factor x assumed "
    f"{PARALLEL_EFFICIENCY} parallel efficiency; not measured on a Jetson"
)


@dataclass(frozen=True)
class DeviceProfile:
    hardware_class: str
    memory_mb: int
    """Memory budget of the whole module (shared CPU/GPU on Jetson)."""
    int8: bool
    """INT8 tensor cores / DLA available (TensorRT INT8)."""
    fp16: bool
    """FP16 on the GPU available."""
    cpu_cores: int = 1
    """Arm Cortex-A78AE cores (data sheet)."""
    cpu_max_ghz: float = 1.0
    """Maximum CPU clock in GHz (data sheet)."""

    @property
    def relative_speed(self) -> float:
        """INT8 MiniLM throughput relative to one calibration core (see module docstring)."""
        return (
            self.cpu_cores * self.cpu_max_ghz * ARM_A78AE_PER_GHZ_VS_REFERENCE * PARALLEL_EFFICIENCY
        )

    @property
    def speed_source(self) -> str:
        return SPEED_SOURCE

    def fits(self, model_bytes: int, *, overhead_mb: int = 512) -> bool:
        """Whether a model of ``model_bytes`` plus the runtime's ``overhead_mb`` fits."""
        return model_bytes / 2**20 + overhead_mb <= self.memory_mb

    def precisions(self) -> tuple[str, ...]:
        """Precisions this device can run, best first (FP32 always)."""
        return (*(("int8",) if self.int8 else ()), *(("fp16",) if self.fp16 else ()), "fp32")


PROFILES: tuple[DeviceProfile, ...] = (
    DeviceProfile(
        "jetson-orin-nano",
        memory_mb=8 * 1024,
        int8=True,
        fp16=True,
        cpu_cores=6,
        cpu_max_ghz=1.5,
    ),
    DeviceProfile(
        "jetson-orin-nx",
        memory_mb=16 * 1024,
        int8=True,
        fp16=True,
        cpu_cores=8,
        cpu_max_ghz=2.0,
    ),
    DeviceProfile(
        "jetson-agx-orin",
        memory_mb=64 * 1024,
        int8=True,
        fp16=True,
        cpu_cores=12,
        cpu_max_ghz=2.2,
    ),
)


class UnknownProfile(KeyError):
    """No profile of that hardware class; the message lists the known ones."""

    def __str__(self) -> str:
        return str(self.args[0])


def profile_for(index: int) -> DeviceProfile:
    """Profiles in turn, so a small fleet still has every hardware class."""
    return PROFILES[index % len(PROFILES)]


def profile_named(hardware_class: str) -> DeviceProfile:
    for profile in PROFILES:
        if profile.hardware_class == hardware_class:
            return profile
    known = ", ".join(p.hardware_class for p in PROFILES)
    raise UnknownProfile(f"unknown device profile {hardware_class!r}; known: {known}")
