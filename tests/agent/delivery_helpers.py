"""Helpers for model delivery tests: a chunk responder over a real broker and signed
assignments made with a test key."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from models.manifest import Manifest, sign
from models.signing import SigningKey
from protocol.messages import MODEL_POLICY_KEY, ModelAssignment
from protocol.mqtt import InboundMessage, MqttClient, MqttSettings
from protocol.topics import QoS, Topics
from protocol.transfer import (
    ChunkResponse,
    ChunkStatus,
    TransferDone,
    TransferListening,
    decode_transfer_message,
    encode_chunk,
)
from sim.broker import MosquittoBroker


@dataclass(frozen=True)
class Asked:
    device_id: str
    sha256: str
    offset: int
    length: int


class ChunkResponder:
    """Plays the controller's chunk server: serves ``blobs`` (digest -> bytes as served,
    which a test may have corrupted), optionally slowly, and records every request."""

    def __init__(
        self,
        broker: MosquittoBroker,
        blobs: dict[str, bytes],
        *,
        delay_s: float = 0.0,
        busy_first: int = 0,
    ) -> None:
        self.blobs = dict(blobs)
        self.delay_s = delay_s
        self.busy_left = busy_first
        self.topics = Topics()
        self._lock = threading.Lock()
        self.asked: list[Asked] = []
        self.done: list[str] = []
        """Digests named by ``TransferDone`` messages, in order."""
        self.served_bytes: dict[str, int] = {}
        self.hold_from: dict[str, int] = {}
        """digest -> offset: requests at or past it are recorded but never answered (a
        download stalls there, so a test can kill it at a known point)."""
        self.client = MqttClient(
            MqttSettings(
                host=broker.host,
                port=broker.port,
                client_id=f"chunks-{uuid.uuid4().hex[:8]}",
                keepalive_s=5,
                backoff_initial_s=0.05,
                backoff_max_s=0.3,
            )
        )
        self.client.subscribe(
            self.topics.model_chunks_shared(), self._on_request, qos=QoS.AT_LEAST_ONCE
        )
        self.client.start()
        assert self.client.wait_connected(10), "chunk responder did not connect"
        time.sleep(0.1)

    def add(self, data: bytes, served: bytes | None = None) -> str:
        """Serve ``served`` (default ``data``) under ``data``'s digest; return the digest."""
        sha = hashlib.sha256(data).hexdigest()
        self.blobs[sha] = data if served is None else served
        return sha

    def requests(self, sha256: str | None = None) -> list[Asked]:
        with self._lock:
            return [a for a in self.asked if sha256 is None or a.sha256 == sha256]

    def reset(self) -> None:
        with self._lock:
            self.asked.clear()

    def _on_request(self, msg: InboundMessage) -> None:
        message = decode_transfer_message(msg.payload, max_bytes=4096)
        if isinstance(message, TransferDone):
            with self._lock:
                self.done.append(message.artifact_sha256)
            return
        if isinstance(message, TransferListening):
            return  # a listener announcement: the controller's broadcast bookkeeping
        request = message
        assert msg.response_topic is not None
        with self._lock:
            self.asked.append(
                Asked(request.device_id, request.artifact_sha256, request.offset, request.length)
            )
            busy = self.busy_left > 0
            if busy:
                self.busy_left -= 1
            held = request.offset >= self.hold_from.get(request.artifact_sha256, request.offset + 1)
        if held:
            return
        if self.delay_s:
            time.sleep(self.delay_s)
        data = self.blobs.get(request.artifact_sha256)

        def header(status: ChunkStatus, **kw: Any) -> ChunkResponse:
            values: dict[str, Any] = {
                "device_id": request.device_id,
                "artifact_sha256": request.artifact_sha256,
                "status": status,
                "offset": request.offset,
                "length": 0,
                "total_bytes": 0 if data is None else len(data),
            }
            values.update(kw)
            return ChunkResponse(**values)

        if busy:
            frame = encode_chunk(header(ChunkStatus.BUSY, retry_after_ms=50), b"")
        elif data is None:
            frame = encode_chunk(header(ChunkStatus.NOT_FOUND, detail="unknown"), b"")
        elif request.offset >= len(data):
            frame = encode_chunk(header(ChunkStatus.BAD_RANGE), b"")
        else:
            part = data[request.offset : request.offset + request.length]
            frame = encode_chunk(
                header(
                    ChunkStatus.OK,
                    length=len(part),
                    chunk_sha256=hashlib.sha256(part).hexdigest(),
                ),
                part,
            )
            with self._lock:
                key = request.artifact_sha256
                self.served_bytes[key] = self.served_bytes.get(key, 0) + len(part)
        self.client.publish(
            msg.response_topic, frame, qos=QoS(1), correlation_data=msg.correlation_data
        )

    def close(self) -> None:
        self.client.stop()


# -- signed assignments -------------------------------------------------------------------


def built_manifest(variant_dir: Path) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((variant_dir / "manifest.json").read_text())["manifest"]
    return body


def signed_manifest(body: dict[str, Any], key: SigningKey, **changes: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    values = {
        **body,
        "created_at": now.isoformat(),
        "expires_at": (now + timedelta(days=30)).isoformat(),
        **changes,
    }
    return sign(Manifest.model_validate(values), key).model_dump(mode="json")


def assignment(
    variant_dir: Path,
    key: SigningKey,
    *,
    version: str = "1.0.0",
    artifact: bytes | None = None,
    manifest: dict[str, Any] | None = None,
    **changes: Any,
) -> dict[str, Any]:
    """The ``model`` policy section for the built variant in ``variant_dir`` (or for a
    synthetic ``artifact`` described by the same manifest), signed with ``key``."""
    body = built_manifest(variant_dir)
    if artifact is not None:
        changes.setdefault("sha256", hashlib.sha256(artifact).hexdigest())
        changes.setdefault("size_bytes", len(artifact))
    signed = manifest if manifest is not None else signed_manifest(body, key, **changes)
    inner = signed.get("manifest", body)
    return ModelAssignment(
        name="minilm",
        version=version,
        variant=inner["variant"],
        artifact_sha256=inner["sha256"],
        size_bytes=inner["size_bytes"],
        tokenizer_sha256=inner["tokenizer_sha256"],
        manifest=signed,
    ).model_dump(mode="json")


def model_policy(section: dict[str, Any], **other: Any) -> dict[str, Any]:
    return {MODEL_POLICY_KEY: section, **other}
