"""What one running controller holds: built by the app's lifespan, read by dependencies."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Engine

from cloud_controller.bridge import Bridge
from cloud_controller.clock import Clock
from cloud_controller.metrics import ControllerMetrics
from cloud_controller.settings import CloudSettings


@dataclass(frozen=True)
class Runtime:
    settings: CloudSettings
    engine: Engine
    bridge: Bridge
    metrics: ControllerMetrics
    clock: Clock
