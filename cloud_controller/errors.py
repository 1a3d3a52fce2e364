"""The controller's domain errors, mapped to HTTP statuses in ``app.py`` and nowhere else::

ControllerError            base class
├── DeviceNotFound         permanent: no device with that id (404)
├── ResultNotFound         permanent: no stored result for that request id (404)
├── DesiredNotPublished    temporary: stored, but the broker client refused it (503);
│                          the bridge republishes every desired state on reconnect
├── NotAuthenticated       permanent: no, an unknown or a revoked API token (401)
├── PermissionDenied       permanent: the token's role is below the route's (403)
├── TokenNotFound          permanent: no API token with that id (404)
├── TokenConflict          permanent: already revoked, or the last admin token (409)
└── RegistryError          the model registry refused a request
    ├── ModelNotFound      permanent: no such model, version or variant (404)
    ├── ModelConflict      permanent: the registry's state forbids it - already
    │                      registered, deprecated, not ready (409)
    ├── UploadMalformed    permanent: the request is not a usable upload (400)
    ├── UploadRejected     permanent: signature, integrity or name check failed (422)
    └── UploadTooLarge     permanent: larger than ``max_upload_bytes`` (413)
└── PolicyError            the policy or group API refused a request
    ├── PolicyNotFound     permanent: no policy (or version) of that name (404)
    ├── GroupNotFound      permanent: no device group of that name (404)
    └── PolicyConflict     permanent: the name is taken (409)

Registry and policy errors carry a short machine-readable ``reason`` (``bad_signature``,
``digest_mismatch``, ...) beside the message.
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


class RegistryError(ControllerError):
    """Base of the model registry's refusals; ``reason`` is a short machine-readable word."""

    status_code = 400

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ModelNotFound(RegistryError, LookupError):
    status_code = 404

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="not_found")


class ModelConflict(RegistryError):
    status_code = 409


class UploadMalformed(RegistryError):
    status_code = 400


class UploadRejected(RegistryError):
    status_code = 422


class UploadTooLarge(RegistryError):
    status_code = 413

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="too_large")


class PolicyError(ControllerError):
    """Base of the policy and group API's refusals; ``reason`` is machine-readable."""

    status_code = 400

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class PolicyNotFound(PolicyError, LookupError):
    status_code = 404

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="not_found")


class GroupNotFound(PolicyError, LookupError):
    status_code = 404

    def __init__(self, name: str) -> None:
        super().__init__(f"device group {name!r} not found", reason="not_found")


class PolicyConflict(PolicyError):
    status_code = 409

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="conflict")


class NotAuthenticated(ControllerError):
    """No usable bearer token; answered 401 with ``WWW-Authenticate: Bearer``."""


class PermissionDenied(ControllerError):
    """The token is valid but its role is below the one the route needs (403)."""


class TokenNotFound(ControllerError, LookupError):
    def __init__(self, token_id: int) -> None:
        super().__init__(f"API token {token_id} not found")
        self.token_id = token_id


class TokenConflict(ControllerError):
    """The token's state forbids the change (409)."""
