"""What one running controller holds: built by the app's lifespan, read by dependencies."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Engine

from cloud_controller.artifacts import ArtifactStore
from cloud_controller.bridge import Bridge
from cloud_controller.clock import Clock
from cloud_controller.metrics import ControllerMetrics
from cloud_controller.settings import CloudSettings
from cloud_controller.transfer import ChunkServer
from cloud_controller.trust import Trust
from cloud_controller.watching import ModelWatcher


@dataclass(frozen=True)
class Runtime:
    settings: CloudSettings
    engine: Engine
    bridge: Bridge
    metrics: ControllerMetrics
    clock: Clock
    store: ArtifactStore
    trust: Trust
    chunks: ChunkServer
    watcher: ModelWatcher | None
    """None when no ``model_watch_dir`` is set."""
