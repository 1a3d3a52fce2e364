"""The controller's domain errors, mapped to HTTP statuses in ``app.py`` and nowhere else::

ControllerError            base class
├── DeviceNotFound         permanent: no device with that id (404)
├── ResultNotFound         permanent: no stored result for that request id (404)
└── DesiredNotPublished    temporary: stored, but the broker client refused it (503);
                           the bridge republishes every desired state on reconnect
"""

from __future__ import annotations


class ControllerError(Exception):
    """Base of the controller's domain errors."""


class DeviceNotFound(ControllerError, LookupError):
    def __init__(self, device_id: str) -> None:
        super().__init__(f"device {device_id!r} not found")
        self.device_id = device_id


class ResultNotFound(ControllerError, LookupError):
    def __init__(self, request_id: str) -> None:
        super().__init__(
            f"no result stored for request {request_id!r} "
            "(not yet received from its device, or deleted by retention)"
        )
        self.request_id = request_id


class DesiredNotPublished(ControllerError):
    def __init__(self, device_id: str, generation: int, reason: str) -> None:
        super().__init__(
            f"desired state of {device_id!r} stored as generation {generation} "
            f"but not published: {reason}"
        )
        self.device_id = device_id
        self.generation = generation
