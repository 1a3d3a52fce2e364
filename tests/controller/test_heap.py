"""Start-up objects are left out of garbage collections while the controller serves."""

from __future__ import annotations

import gc

from cloud_controller.heap import long_lived_frozen
from tests.controller.helpers import Controller


def test_objects_alive_at_the_start_are_frozen_until_the_end() -> None:
    gc.unfreeze()
    kept: list[list[int]] = [[] for _ in range(100)]  # tracked by the collector
    with long_lived_frozen():
        assert gc.get_freeze_count() >= len(kept)
    assert gc.get_freeze_count() == 0


def test_a_serving_controller_keeps_its_start_up_heap_frozen(controller: Controller) -> None:
    assert controller.bridge.is_connected
    assert gc.get_freeze_count() > 10_000  # the app, its routes and schemas, the modules
