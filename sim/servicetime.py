"""The service-time model of simulated devices, calibrated on this machine.

Only a few agents of a simulated fleet can run real ONNX Runtime inference on a 2-core host;
the rest need a stand-in that takes as long as a real device would. ``calibrate`` measures
the real INT8 variant once (batch size -> median latency, one intra-op thread: one
"calibration core"), ``save``/``load_or_calibrate`` keep the measurement in the run's output
so a rerun reuses it and a report can show it, and nothing here holds a hard-coded latency.

``ServiceTimeModel`` interpolates the measured latencies (linearly between measured batch
sizes, extrapolated from the last two beyond them) and divides by the profile's
``relative_speed``. ``SimulatedModel`` is a ``ServingModel`` that sleeps that long per batch
and returns unit vectors: the agent's serving runtime (batching, outbox, offload) stays
real, only the matrix multiplications are modelled. Its ``device`` says "simulated", and
every report row it feeds carries that label.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.padding import Rows
from edge_agent.serving import ServingModel
from sim.profiles import DeviceProfile

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
EMBEDDING_DIM = 384


class CalibrationError(RuntimeError):
    """No model to calibrate with, or an unreadable calibration file; says which."""


@dataclass(frozen=True)
class Calibration:
    """Measured median latency of one batch, in ms, by batch size, on one machine."""

    batch_ms: dict[int, float]
    variant: str
    intra_op_threads: int
    machine: str
    measured_at: str
    repeats: int

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["batch_ms"] = {str(k): v for k, v in sorted(self.batch_ms.items())}
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Calibration:
        try:
            return cls(
                batch_ms={int(k): float(v) for k, v in body["batch_ms"].items()},
                variant=str(body["variant"]),
                intra_op_threads=int(body["intra_op_threads"]),
                machine=str(body["machine"]),
                measured_at=str(body["measured_at"]),
                repeats=int(body["repeats"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CalibrationError(f"calibration file is not a calibration: {exc}") from exc


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs"


def calibrate(
    embed: Callable[[list[str]], Rows],
    texts: Sequence[str],
    *,
    variant: str,
    intra_op_threads: int,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    repeats: int = 7,
    seed: int = 0,
) -> Calibration:
    """Median latency of ``embed`` per batch size, batch sizes interleaved per repeat."""
    if not texts:
        raise CalibrationError("no texts to calibrate with")
    rng = random.Random(seed)
    pool = list(texts)
    samples: dict[int, list[float]] = {b: [] for b in batch_sizes}
    embed(pool[: max(batch_sizes)])  # warm-up: first runs allocate
    for _ in range(repeats):
        order = list(batch_sizes)
        rng.shuffle(order)
        for b in order:
            start = rng.randrange(0, max(1, len(pool) - b))
            batch = pool[start : start + b]
            began = time.perf_counter()
            embed(batch)
            samples[b].append((time.perf_counter() - began) * 1000.0)
    return Calibration(
        batch_ms={b: statistics.median(v) for b, v in samples.items()},
        variant=variant,
        intra_op_threads=intra_op_threads,
        machine=machine_description(),
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        repeats=repeats,
    )


def save(calibration: Calibration, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(calibration.to_json(), indent=2) + "\n")


def load(path: Path) -> Calibration:
    try:
        body = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"{path}: {exc}") from exc
    if not isinstance(body, dict):
        raise CalibrationError(f"{path}: not a JSON object")
    return Calibration.from_json(body)


def load_or_calibrate(path: Path, measure: Callable[[], Calibration]) -> tuple[Calibration, bool]:
    """The calibration cached at ``path``, else ``measure()`` saved there; (it, reused?)."""
    if path.is_file():
        return load(path), True
    calibration = measure()
    save(calibration, path)
    return calibration, False


def measure_int8(model_dir: Path, *, threads: int = 1, repeats: int = 7) -> Calibration:
    """Calibrate with the built INT8 variant in ``model_dir`` on ``threads`` intra-op threads."""
    from edge_agent.serving import serving_model
    from models.corpus import stdlib_sentences
    from models.errors import ModelError
    from models.loader import load_model
    from models.signing import keyring, load_public_key

    variant_dir = model_dir / "int8-onnx"
    key_path = model_dir / "keys" / "signing.key.pub"
    if not (variant_dir / "manifest.json").is_file() or not key_path.is_file():
        raise CalibrationError(
            f"no built int8-onnx in {model_dir}; run: spillway models build --out {model_dir}"
        )
    try:
        loaded = load_model(
            variant_dir,
            trusted_keys=keyring([load_public_key(key_path)]),
            intra_op_threads=threads,
        )
    except ModelError as exc:
        raise CalibrationError(f"int8-onnx: {exc}") from exc
    texts = stdlib_sentences(evaluation=600).evaluation
    return calibrate(
        serving_model(loaded).embed,
        texts,
        variant="int8-onnx",
        intra_op_threads=threads,
        repeats=repeats,
    )


class ServiceTimeModel:
    """Batch latency of a profile: the calibration interpolated, divided by its speed."""

    def __init__(self, calibration: Calibration, *, speed: float) -> None:
        if not calibration.batch_ms:
            raise CalibrationError("calibration has no batch sizes")
        if not speed > 0:
            raise CalibrationError(f"speed must be > 0, got {speed}")
        self.calibration = calibration
        self.speed = speed
        self._sizes = sorted(calibration.batch_ms)
        self._ms = [calibration.batch_ms[b] for b in self._sizes]

    @classmethod
    def for_profile(
        cls, calibration: Calibration, profile: DeviceProfile, *, scale: float = 1.0
    ) -> ServiceTimeModel:
        return cls(calibration, speed=profile.relative_speed * scale)

    def batch_ms(self, items: int) -> float:
        if items <= 0:
            return 0.0
        sizes, ms = self._sizes, self._ms
        if len(sizes) == 1 or items <= sizes[0]:
            measured = ms[0] * items / sizes[0]
        elif items >= sizes[-1]:
            slope = (ms[-1] - ms[-2]) / (sizes[-1] - sizes[-2])
            measured = ms[-1] + max(slope, 0.0) * (items - sizes[-1])
        else:
            measured = float(np.interp(items, sizes, ms))
        return measured / self.speed

    def capacity_per_s(self, batch: int) -> float:
        """Texts/s when every batch has ``batch`` texts."""
        return batch * 1000.0 / self.batch_ms(batch)


class SimulatedModel:
    """A ``ServingModel`` that takes the modelled time and returns unit vectors."""

    def __init__(
        self,
        service: ServiceTimeModel,
        *,
        label: str,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.service = service
        self.label = label
        self._sleep = sleep
        self.batches = 0
        self.items = 0

    def embed(self, texts: list[str]) -> Rows:
        self._sleep(self.service.batch_ms(len(texts)) / 1000.0)
        self.batches += 1
        self.items += len(texts)
        rows = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
        rows[:, 0] = 1.0
        return rows

    def serving_model(self, variant: str = "int8-onnx") -> ServingModel:
        return ServingModel(variant=variant, device=f"simulated {self.label}", embed=self.embed)
