"""Payloads of the data plane: inference requests and responses, the result uplink and
its acknowledgements, and the cloud pool's queue and back-pressure signal.

Embeddings travel as ``EmbeddingBlock``: base64 of little-endian float32 rows, about a
third the size of a JSON list of floats. numpy is imported only by the two helpers that
convert, so this module stays importable without it.
"""

from __future__ import annotations

import base64
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.messages import Envelope

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

MAX_TEXTS = 256
MAX_TEXT_CHARS = 8192


class Tier(StrEnum):
    EDGE = "edge"
    CLOUD = "cloud"


class InferStatus(StrEnum):
    OK = "ok"
    OVERLOADED = "overloaded"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INVALID = "invalid"
    ERROR = "error"


class OffloadReason(StrEnum):
    OVERFLOW = "overflow"
    """The predicted local wait would miss the request's SLO."""
    DEADLINE = "deadline"
    """The request's own deadline cannot be met locally."""
    POLICY = "policy"
    """Policy sends this traffic to the cloud (e.g. quality sampling)."""


class EmbeddingBlock(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    count: int = Field(ge=0)
    dim: int = Field(ge=1, le=65536)
    data_b64: str

    @model_validator(mode="after")
    def _size_matches(self) -> EmbeddingBlock:
        expected = self.count * self.dim * 4
        if len(self.data_b64) != 4 * ((expected + 2) // 3):
            raise ValueError(f"data_b64 does not hold {self.count}x{self.dim} float32")
        return self

    @classmethod
    def from_array(cls, rows: npt.NDArray[np.float32]) -> EmbeddingBlock:
        import numpy as np

        arr = np.ascontiguousarray(rows, dtype="<f4")
        count, dim = arr.shape
        return cls(count=count, dim=dim, data_b64=base64.b64encode(arr.tobytes()).decode())

    def to_array(self) -> npt.NDArray[np.float32]:
        import numpy as np

        raw = base64.b64decode(self.data_b64)
        return np.frombuffer(raw, dtype="<f4").reshape(self.count, self.dim).astype(np.float32)


class InferRequest(Envelope):
    """Embed ``texts``. On a device's ``infer`` topic (local apps) or the pool's queue.

    ``device_id`` is the sender: the device, or ``gateway`` for the controller's
    ``POST /api/v1/embed``. The answer goes to the MQTT v5 response topic, with the
    request's correlation data.
    """

    kind: Literal["infer_request"] = "infer_request"
    request_id: str = Field(min_length=1, max_length=128)
    texts: list[str] = Field(min_length=1, max_length=MAX_TEXTS)
    deadline: datetime | None = None
    """Absolute time after which the answer is useless; past it, no computing."""
    priority: int = Field(default=1, ge=0, le=9)
    """0 runs first."""
    offload_reason: OffloadReason | None = None

    @model_validator(mode="after")
    def _texts_bounded(self) -> InferRequest:
        for i, text in enumerate(self.texts):
            if len(text) > MAX_TEXT_CHARS:
                raise ValueError(f"texts[{i}] has {len(text)} characters (max {MAX_TEXT_CHARS})")
        return self


class InferResponse(Envelope):
    kind: Literal["infer_response"] = "infer_response"
    request_id: str = Field(min_length=1, max_length=128)
    status: InferStatus
    detail: str | None = Field(default=None, max_length=2000)
    tier: Tier
    variant: str | None = None
    queued_ms: float = Field(default=0.0, ge=0)
    compute_ms: float = Field(default=0.0, ge=0)
    embeddings: EmbeddingBlock | None = None


class ResultRecord(BaseModel):
    """One served request, as kept in the outbox; keyed (device_id, boot_epoch, seq)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    seq: int = Field(ge=1)
    request_id: str = Field(min_length=1, max_length=128)
    status: InferStatus
    tier: Tier
    variant: str | None = None
    offload_reason: OffloadReason | None = None
    queued_ms: float = Field(default=0.0, ge=0)
    latency_ms: float = Field(default=0.0, ge=0)
    served_at: datetime
    embeddings: EmbeddingBlock | None = None


class ResultBatch(Envelope):
    """Outbox records on their way up; redelivery is expected and harmless."""

    kind: Literal["results"] = "results"
    boot_epoch: int = Field(ge=0)
    records: list[ResultRecord] = Field(min_length=1, max_length=500)


class ResultAck(Envelope):
    """Sent by the controller after its database commit; the agent then deletes them."""

    kind: Literal["result_ack"] = "result_ack"
    boot_epoch: int = Field(ge=0)
    seqs: list[int] = Field(min_length=1, max_length=500)


class PoolStatus(Envelope):
    """The pool's back-pressure signal, retained; edges stop offloading when it says so."""

    kind: Literal["pool_status"] = "pool_status"
    accepting: bool
    queue_depth: int = Field(ge=0)
    est_wait_ms: float = Field(ge=0)
    replicas: int = Field(ge=0)
