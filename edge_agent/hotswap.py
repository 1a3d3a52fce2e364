"""The loaded models: the active one and the previous one, kept warm for instant revert.

``ModelSlots.activate(new)`` makes ``new`` the active model and keeps the one it replaces
as ``previous`` (the one before that is released); ``revert()`` swaps the two back. When
the agent serves, every change goes through ``swap`` (``ServingRuntime.swap_model``): one
reference assignment, so a batch already running finishes on the old model, every batch
after it runs on the new one and no request is dropped. Knows no MQTT and no files::

    SwapError              nothing was changed
    └── NothingToRevert    there is no previous model loaded
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_agent.installed import InstallRecord
    from edge_agent.serving import ServingModel


class SwapError(RuntimeError):
    """The active model was not changed."""


class NothingToRevert(SwapError):
    """No previous model is loaded."""


@dataclass(frozen=True)
class LoadedVariant:
    """A model ready to serve, and what it is (``record`` None: not installed by delivery,
    e.g. the variant the agent was started with)."""

    model: ServingModel
    record: InstallRecord | None
    artifact_sha256: str | None = None

    @property
    def sha256(self) -> str | None:
        return self.record.artifact_sha256 if self.record is not None else self.artifact_sha256


class ModelSlots:
    """Active and previous model; thread-safe."""

    def __init__(self, active: LoadedVariant | None = None) -> None:
        self._lock = threading.Lock()
        self._active = active
        self._previous: LoadedVariant | None = None
        self._swap: Callable[[ServingModel], object] | None = None

    def attach(self, swap: Callable[[ServingModel], object]) -> None:
        """Route every change to the serving runtime from now on."""
        with self._lock:
            self._swap = swap

    @property
    def active(self) -> LoadedVariant | None:
        with self._lock:
            return self._active

    @property
    def previous(self) -> LoadedVariant | None:
        with self._lock:
            return self._previous

    def activate(self, new: LoadedVariant) -> LoadedVariant | None:
        """Serve ``new`` from now on; return the model it replaced (now ``previous``)."""
        with self._lock:
            if self._swap is not None:
                self._swap(new.model)
            replaced, self._active = self._active, new
            self._previous = replaced
            return replaced

    def revert(self) -> LoadedVariant:
        """Serve the previous model again (instant: it is loaded); return it."""
        with self._lock:
            back = self._previous
            if back is None:
                raise NothingToRevert("no previous model is loaded")
            if self._swap is not None:
                self._swap(back.model)
            self._previous, self._active = self._active, back
            return back
