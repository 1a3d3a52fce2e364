"""Spillway's cloud controller: device registry, desired state and the REST API.

It listens to every device over MQTT (``bridge``), keeps the fleet in a SQL database whose
schema Alembic owns (``entities``, ``migrations``, ``database``), and serves REST v1
(``app``). It imports ``protocol`` and ``spillway`` plumbing, never ``edge_agent``,
``sim`` or ``spillway.cli``. Heavy imports (FastAPI, SQLModel) happen in the submodules,
so ``cloud_controller.cli`` can check that they are installed before using them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Bridge", "CloudSettings", "create_app"]

if TYPE_CHECKING:
    from cloud_controller.app import create_app
    from cloud_controller.bridge import Bridge
    from cloud_controller.settings import CloudSettings


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from cloud_controller.app import create_app

        return create_app
    if name == "Bridge":
        from cloud_controller.bridge import Bridge

        return Bridge
    if name == "CloudSettings":
        from cloud_controller.settings import CloudSettings

        return CloudSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
