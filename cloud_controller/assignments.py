"""Which model variant a device should run: a section of its desired state.

``assign_model`` resolves ``name@version/variant`` in the registry (it must be in a ready
version) and sets the device's next desired generation with the ``model`` key of the
policy replaced by::

    {"model": {"name", "version", "variant", "artifact_sha256", "size_bytes",
               "tokenizer_sha256", "manifest": <the signed manifest>}}

Every other key of the policy is kept. The agent verifies the signed manifest itself
(``models.manifest.verify``) and pulls the artifact and the tokenizer by digest from the
chunk server. Which variant goes to which device is the rollouts' business, not this
module's. Knows nothing of HTTP.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session

from cloud_controller import registry
from cloud_controller.bridge import Bridge
from cloud_controller.entities import DesiredSet, ModelVariant
from protocol.messages import MODEL_POLICY_KEY, ModelAssignment

MODEL_KEY = MODEL_POLICY_KEY


def model_section(name: str, version: str, row: ModelVariant) -> dict[str, Any]:
    """The wire form of the assignment (validated by ``protocol.messages.ModelAssignment``)."""
    return ModelAssignment(
        name=name,
        version=version,
        variant=row.variant,
        artifact_sha256=row.artifact_sha256,
        size_bytes=row.size_bytes,
        tokenizer_sha256=row.tokenizer_sha256,
        manifest=row.manifest,
    ).model_dump(mode="json")


def assign_model(
    *, bridge: Bridge, engine: Engine, device_id: str, name: str, version: str, variant: str
) -> DesiredSet:
    """Point ``device_id`` at a ready variant; raises ``ModelNotFound`` (unknown model,
    version or variant), ``ModelConflict`` (version not ready, e.g. deprecated),
    ``DeviceNotFound`` or ``DesiredNotPublished``."""
    with Session(engine) as session:
        section = model_section(
            name, version, registry.resolve_variant(session, name, version, variant)
        )
    applied: dict[str, Any] = {}

    def change(current: dict[str, Any]) -> dict[str, Any]:
        applied.clear()
        applied.update(current, **{MODEL_KEY: section})
        return dict(applied)

    generation = bridge.amend_desired(device_id, change)
    return DesiredSet(device_id=device_id, generation=generation, policy=applied)
