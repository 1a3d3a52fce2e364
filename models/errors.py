"""Typed failures of model manifests and loading, classed by what the caller should do.

Upper layers (agent, controller) catch these, never ``onnxruntime``/``torch``/``cryptography``
errors:
the loader translates those at its boundary with ``raise ... from exc``.

::

    ModelError
    ├── PermanentModelError            retrying the same artifact + manifest cannot succeed
    │   ├── ManifestError
    │   │   ├── ManifestFormatError    missing, not JSON, or not the manifest schema
    │   │   ├── SignatureError
    │   │   │   ├── UnknownKeyError    key id not in the trusted keyring
    │   │   │   └── BadSignatureError  signature does not match the manifest bytes
    │   │   ├── ManifestExpiredError   now >= expires_at (a newer release is needed)
    │   │   └── RollbackError          release older than one already accepted
    │   ├── ArtifactIntegrityError
    │   │   ├── ArtifactMissingError   the file the manifest names is absent
    │   │   ├── TruncatedArtifactError byte size differs from the manifest
    │   │   ├── DigestMismatchError    sha256 differs from the manifest
    │   │   └── CorruptArtifactError   digest matches but the runtime cannot use the file
    │   └── IncompatibleArtifactError
    │       ├── RuntimeUnavailableError the runtime is not installed / too old
    │       └── OpsetUnsupportedError  the installed runtime cannot run this opset
    └── TemporaryModelError            may succeed later without a new artifact
        └── InsufficientMemoryError    not enough free memory right now
"""

from __future__ import annotations


class ModelError(Exception):
    """Base of every error this package raises about a model artifact."""


class PermanentModelError(ModelError):
    """Retrying with the same artifact and manifest cannot succeed."""


class TemporaryModelError(ModelError):
    """The same artifact may load later (e.g. once memory is freed)."""


class ManifestError(PermanentModelError):
    pass


class ManifestFormatError(ManifestError):
    pass


class SignatureError(ManifestError):
    pass


class UnknownKeyError(SignatureError):
    pass


class BadSignatureError(SignatureError):
    pass


class ManifestExpiredError(ManifestError):
    pass


class RollbackError(ManifestError):
    pass


class ArtifactIntegrityError(PermanentModelError):
    pass


class ArtifactMissingError(ArtifactIntegrityError):
    pass


class TruncatedArtifactError(ArtifactIntegrityError):
    pass


class DigestMismatchError(ArtifactIntegrityError):
    pass


class CorruptArtifactError(ArtifactIntegrityError):
    pass


class IncompatibleArtifactError(PermanentModelError):
    pass


class RuntimeUnavailableError(IncompatibleArtifactError):
    pass


class OpsetUnsupportedError(IncompatibleArtifactError):
    pass


class InsufficientMemoryError(TemporaryModelError):
    pass
