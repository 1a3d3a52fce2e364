"""Helpers for the rollout tests: registered fake versions and simulated agents that
install what their desired state says (or fail to), and send telemetry."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cloud_controller.rollout_engine import RolloutEngine
from protocol.messages import ApplyOutcome, ReportedState
from protocol.topics import DeviceChannel
from tests.controller.helpers import Controller, SimAgent, wait_for
from tests.controller.model_helpers import synthetic, upload

MODEL = "tiny"
GOOD = {
    "model_requests": 200.0,
    "model_errors": 0.0,
    "latency_p95_ms": 30.0,
    "offload_ratio": 0.0,
    "quality_samples": 20.0,
    "quality_agreement_mean": 0.9995,
    "quality_agreement_min": 0.998,
}


def register(controller: Controller, models: Path, version: str, *variants: str) -> None:
    tokenizer = (models / "fp32-onnx" / "tokenizer.json").read_bytes()
    for variant in variants or ("fp32-onnx",):
        data = os.urandom(4096)
        precision = variant.split("-")[0]
        manifest = synthetic(
            models,
            data,
            model_name=MODEL,
            model_version=version,
            variant=variant,
            precision=precision,
        )
        response = upload(controller.http, MODEL, manifest, data, tokenizer=tokenizer)
        assert response.status_code == 201, response.text


def engine(controller: Controller) -> RolloutEngine:
    rollouts: RolloutEngine = controller.app.state.rollouts
    return rollouts


def desired(controller: Controller, device_id: str) -> dict[str, Any]:
    body: dict[str, Any] = controller.device(device_id)["desired"] or {}
    return body


class Fleet:
    """Simulated agents that answer their desired state like the real one would."""

    def __init__(self, controller: Controller, agents: dict[str, SimAgent]) -> None:
        self.controller = controller
        self.agents = agents
        self.failing: set[str] = set()

    def respond(self, *device_ids: str) -> None:
        """Each device reports its current desired generation: the model active (or
        failed, for ``failing`` ones); waits until the controller stored the report."""
        for device_id in device_ids or tuple(self.agents):
            want = desired(self.controller, device_id)
            if not want:
                continue
            generation = want["generation"]
            section = dict(want["policy"].get("model") or {})
            failed = device_id in self.failing
            self.agents[device_id].send(
                DeviceChannel.REPORTED,
                ReportedState(
                    device_id=device_id,
                    observed_generation=generation,
                    outcome=ApplyOutcome.FAILED if failed else ApplyOutcome.APPLIED,
                    policy={
                        **want["policy"],
                        "model": {
                            "state": "failed" if failed else "active",
                            "artifact_sha256": section.get("artifact_sha256"),
                            "version": section.get("version"),
                            "variant": section.get("variant"),
                        },
                    },
                    error="digest_mismatch: simulated" if failed else None,
                    boot_epoch=self.agents[device_id].boot_epoch,
                ),
            )
            assert wait_for(
                lambda d=device_id, g=generation: (
                    (self.controller.device(d).get("reported") or {}).get("observed_generation")
                    == g
                )
            ), f"{device_id}'s report was not stored"

    def telemetry(self, device_id: str, **metrics: float) -> None:
        count = len(self.controller.http.get(f"/api/v1/devices/{device_id}/telemetry").json())
        self.agents[device_id].telemetry(**{**GOOD, **metrics})
        assert wait_for(
            lambda: (
                len(self.controller.http.get(f"/api/v1/devices/{device_id}/telemetry").json())
                > count
            )
        )

    def running_sha(self, device_id: str) -> str | None:
        reported = self.controller.device(device_id).get("reported") or {}
        sha: str | None = ((reported.get("policy") or {}).get("model") or {}).get("artifact_sha256")
        return sha
