"""The embedding model: build, publish, verify and load all-MiniLM-L6-v2 variants.

Only torch-free modules are re-exported here, because the edge agent imports this package on devices
without torch. The torch implementation lives in :mod:`models.encoder`; builds in
:mod:`models.build`.
"""

from models.backends import EmbeddingBackend, OnnxBackend, TorchBackend
from models.errors import (
    ArtifactIntegrityError,
    ArtifactMissingError,
    BadSignatureError,
    CorruptArtifactError,
    DigestMismatchError,
    IncompatibleArtifactError,
    InsufficientMemoryError,
    ManifestError,
    ManifestExpiredError,
    ManifestFormatError,
    ModelError,
    OpsetUnsupportedError,
    PermanentModelError,
    RollbackError,
    RuntimeUnavailableError,
    SignatureError,
    TemporaryModelError,
    TruncatedArtifactError,
    UnknownKeyError,
)
from models.loader import LoadedModel, load_model
from models.manifest import Manifest, SignedManifest, sign, verify
from models.quality import QualityGate, QualityMetrics
from models.signing import Keyring, SigningKey, keyring
from models.tokenization import EmbeddingTokenizer, load_tokenizer

__all__ = [
    "ArtifactIntegrityError",
    "ArtifactMissingError",
    "BadSignatureError",
    "CorruptArtifactError",
    "DigestMismatchError",
    "EmbeddingBackend",
    "EmbeddingTokenizer",
    "IncompatibleArtifactError",
    "InsufficientMemoryError",
    "Keyring",
    "LoadedModel",
    "Manifest",
    "ManifestError",
    "ManifestExpiredError",
    "ManifestFormatError",
    "ModelError",
    "OnnxBackend",
    "OpsetUnsupportedError",
    "PermanentModelError",
    "QualityGate",
    "QualityMetrics",
    "RollbackError",
    "RuntimeUnavailableError",
    "SignatureError",
    "SignedManifest",
    "SigningKey",
    "TemporaryModelError",
    "TorchBackend",
    "TruncatedArtifactError",
    "UnknownKeyError",
    "keyring",
    "load_model",
    "load_tokenizer",
    "sign",
    "verify",
]
