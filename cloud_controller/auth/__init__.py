"""Authentication and roles of the REST API: bearer API tokens with a role each.

``roles`` (``Role``, ``Principal``) knows nothing of HTTP or storage; ``tokens`` stores
tokens hashed; ``dependencies`` turns a request's bearer token into a ``Principal``.
Routes declare what they need with ``ViewerDep`` (reads), ``OperatorDep`` (mutations) or
``AdminDep`` (tokens, audit log).
"""

from __future__ import annotations

from cloud_controller.auth.dependencies import AdminDep, OperatorDep, ViewerDep
from cloud_controller.auth.roles import Principal, Role

__all__ = ["AdminDep", "OperatorDep", "Principal", "Role", "ViewerDep"]
