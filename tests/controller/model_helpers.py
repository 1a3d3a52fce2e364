"""Helpers for the model registry tests: signed manifests, uploads, dropped folders and a
chunk-pulling client speaking ``protocol.transfer`` through ``protocol.mqtt.MqttClient``."""

from __future__ import annotations

import json
import os
import queue
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from models.manifest import Manifest, SignedManifest, sign
from models.signing import SigningKey, load_signing_key
from protocol.codec import encode
from protocol.mqtt import InboundMessage, MqttClient
from protocol.topics import QoS, Topics
from protocol.transfer import ChunkRequest, ChunkResponse, decode_chunk
from sim.broker import MosquittoBroker
from tests.controller.helpers import Controller, mqtt_client

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def dev_key(models_dir: Path) -> SigningKey:
    return load_signing_key(models_dir / "keys" / "signing.key")


def built_manifest(models_dir: Path, variant: str) -> dict[str, Any]:
    """The signed manifest ``models.build`` wrote for ``variant`` (as a dict)."""
    raw: dict[str, Any] = json.loads((models_dir / variant / "manifest.json").read_text())
    return raw


def synthetic(
    models_dir: Path,
    data: bytes,
    *,
    key: SigningKey | None = None,
    now: datetime | None = None,
    **changes: Any,
) -> bytes:
    """A manifest for ``data`` (a small fake artifact) modelled on the built FP32 one and
    signed with ``key`` (default: the dev key the controller trusts)."""
    import hashlib

    body = dict(built_manifest(models_dir, "fp32-onnx")["manifest"])
    now = now or datetime.now(UTC)
    body.update(
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        created_at=now.isoformat(),
        expires_at=(now + timedelta(days=30)).isoformat(),
    )
    body.update(changes)
    signed = sign(Manifest.model_validate(body), key or dev_key(models_dir))
    return signed.model_dump_json().encode()


def tamper(manifest: bytes, **changes: Any) -> bytes:
    """Change fields of a signed manifest without signing it again."""
    signed = SignedManifest.model_validate_json(manifest)
    body = {**signed.manifest, **changes}
    return signed.model_copy(update={"manifest": body}).model_dump_json().encode()


def upload(
    http: Any,
    name: str,
    manifest: bytes,
    artifact: bytes | Path,
    *,
    tokenizer: bytes | Path | None = None,
) -> httpx.Response:
    def part(value: bytes | Path) -> Any:
        return value.open("rb") if isinstance(value, Path) else value

    files: dict[str, Any] = {
        "manifest": ("manifest.json", manifest, "application/json"),
        "artifact": ("artifact", part(artifact), "application/octet-stream"),
    }
    if tokenizer is not None:
        files["tokenizer"] = ("tokenizer.json", part(tokenizer), "application/json")
    response: httpx.Response = http.post(f"/api/v1/models/{name}/versions", files=files)
    return response


def store_files(controller: Controller) -> list[Path]:
    """Every file in the controller's artifact store, temporary ones included."""
    root = controller.settings.artifact_dir
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def drop_folder(
    watch_dir: Path,
    folder: str,
    *,
    source: Path | bytes,
    source_name: str = "model.onnx",
    metadata: dict[str, Any] | None,
    tokenizer: Path | None = None,
) -> Path:
    """Drop a model the atomic way: build it in a hidden folder, then rename it."""
    hidden = watch_dir / f".{folder}"
    hidden.mkdir(parents=True)
    if isinstance(source, Path):
        link_or_copy(source, hidden / source_name)
    else:
        (hidden / source_name).write_bytes(source)
    if tokenizer is not None:
        link_or_copy(tokenizer, hidden / "tokenizer.json")
    if metadata is not None:
        (hidden / "model.json").write_text(json.dumps(metadata))
    target = watch_dir / folder
    hidden.rename(target)
    return target


class ChunkClient:
    """Pulls chunks the way an agent does: request with response topic + correlation data."""

    def __init__(self, broker: MosquittoBroker, device_id: str) -> None:
        self.device_id = device_id
        self.topics = Topics()
        self.reply_topic = self.topics.replies(device_id)
        self._answers: queue.Queue[InboundMessage] = queue.Queue()
        self.client: MqttClient = mqtt_client(broker, device_id)
        self.client.subscribe(self.reply_topic, self._answers.put, qos=QoS.AT_LEAST_ONCE)

    def ask(
        self, sha256: str, offset: int, length: int, *, timeout_s: float = 20.0
    ) -> tuple[ChunkResponse, bytes]:
        correlation = uuid.uuid4().bytes
        request = ChunkRequest(
            device_id=self.device_id, artifact_sha256=sha256, offset=offset, length=length
        )
        self.client.publish(
            self.topics.model_chunks(),
            encode(request),
            qos=QoS.AT_LEAST_ONCE,
            response_topic=self.reply_topic,
            correlation_data=correlation,
            wait_s=5,
        )
        while True:
            message = self._answers.get(timeout=timeout_s)
            if message.correlation_data == correlation:
                return decode_chunk(message.payload, max_bytes=8 << 20)

    def fetch(self, sha256: str, *, chunk_bytes: int) -> bytes:
        """The whole blob, chunk by chunk, each one checked by ``decode_chunk``."""
        parts: list[bytes] = []
        offset = 0
        while True:
            header, data = self.ask(sha256, offset, chunk_bytes)
            assert header.status == "ok", header
            assert header.offset == offset
            parts.append(data)
            offset += len(data)
            if offset >= header.total_bytes:
                return b"".join(parts)

    def stop(self) -> None:
        self.client.stop()
