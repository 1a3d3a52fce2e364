"""A canary on a deliberately degraded model fails its quality gate and is rolled back, with
every part real: mosquitto, ``spillway controller serve`` and its rollout engine, two
``spillway agent run`` processes serving ONNX models and answering HTTP traffic, and the
cloud overflow pool whose FP32 answers the agents' quality probe compares against.

Version 1.0.0 is the good INT8 build, delivered to both agents through the controller (so
the controller records it as their assignment before the rollout). Version 2.0.0 is the
same model with its word embeddings drowned in noise, signed with a higher release. The
rollout sends 2.0.0 to a canary of one device with every locally served request sampled;
the canary's cosine against the pool's FP32 answers falls far below the gate, the wave
fails, and the engine assigns 1.0.0 again, which the agent still has loaded (the instant
revert). The other device never leaves 1.0.0.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sim.broker import MosquittoBroker
from tests.integration.fleet import wait_for
from tests.integration.rollout_e2e_helpers import (
    MINILM,
    ServingFleet,
    Traffic,
    degraded_variant,
    signed_manifest,
)
from tests.pool.helpers import running_pool

DEVICES = ("edge-a", "edge-b")
ROLLBACK_WITHIN_S = 60.0
"""Issue 7: every updated device is back on the previous version this soon after the gate
failed."""
MIN_AGREEMENT = 0.95


@pytest.fixture
def fleet(broker: MosquittoBroker, tmp_path: Path, serving_models: Path) -> Iterator[ServingFleet]:
    f = ServingFleet(broker, tmp_path, serving_models)
    try:
        yield f
    finally:
        f.close()


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@pytest.mark.slow
def test_degraded_canary_fails_its_quality_gate_and_is_rolled_back(
    fleet: ServingFleet, broker: MosquittoBroker, tmp_path: Path, serving_models: Path
) -> None:
    fleet.start_controller()
    good_dir = serving_models / "int8-onnx"
    good = fleet.upload(good_dir, signed_manifest(good_dir, fleet.key, model_version="1.0.0"))
    bad_dir = degraded_variant(
        good_dir, tmp_path / "degraded" / "int8-onnx", fleet.key, version="2.0.0", release=2
    )
    bad = fleet.upload(bad_dir, (bad_dir / "manifest.json").read_bytes())
    assert (good["version"], bad["version"]) == ("1.0.0", "2.0.0")
    v1 = hashlib.sha256((good_dir / "model.onnx").read_bytes()).hexdigest()
    v2 = json.loads((bad_dir / "manifest.json").read_text())["manifest"]["sha256"]
    assert v1 != v2

    with running_pool(
        host=broker.host, port=broker.port, state_dir=tmp_path / "pool", replicas=1, tp=1
    ):
        for device_id in DEVICES:
            fleet.serving_agent(device_id).start()
        for device_id in DEVICES:
            wait_for(
                lambda d=device_id: fleet.status(d) == "online", 60, what=f"{device_id} online"
            )
            put = fleet.http.put(
                f"/api/v1/devices/{device_id}/model",
                json={"name": MINILM, "version": "1.0.0", "variant": "int8-onnx"},
            )
            assert put.status_code == 200, put.text
        for device_id in DEVICES:
            wait_for(
                lambda d=device_id: fleet.running(d) == ("1.0.0", v1),
                120,
                what=f"{device_id} to run 1.0.0",
            )
        generations = {d: fleet.device(d)["desired"]["generation"] for d in DEVICES}

        with Traffic(fleet.http_ports) as traffic:
            for device_id in DEVICES:
                wait_for(
                    lambda d=device_id: traffic.served(d) > 0, 30, what=f"{device_id} answering"
                )
            response = fleet.http.post(
                "/api/v1/rollouts",
                json={
                    "model": MINILM,
                    "version": "2.0.0",
                    "target": {"device_ids": list(DEVICES)},
                    "waves": {
                        "canary_share": 0.5,
                        "canary_min_devices": 1,
                        "wave_size": 1,
                        "interval_s": 3,
                        "install_timeout_s": 120,
                        "gate_timeout_s": 120,
                    },
                    "gates": {
                        "min_quality_agreement": MIN_AGREEMENT,
                        "min_quality_samples": 5,
                        # This test is about quality; a noisy shared host must not trip these.
                        "max_p95_latency_ms": None,
                        "max_offload_rate": None,
                    },
                    "quality_sample_share": 1.0,
                },
            )
            assert response.status_code == 201, response.text
            rollout = response.json()
            rid = rollout["id"]
            assert [w["devices"] for w in rollout["waves"]] == [1, 1]
            assert all(d["variant"] == "int8-onnx" for d in rollout["devices"])
            (canary,) = [d["device_id"] for d in rollout["devices"] if d["wave"] == 0]
            (other,) = [d for d in DEVICES if d != canary]

            seen_other: set[tuple[str | None, str | None]] = set()

            def watching(predicate: Callable[[], bool]) -> bool:
                seen_other.add(fleet.running(other))
                return predicate()

            wait_for(
                lambda: watching(lambda: fleet.running(canary) == ("2.0.0", v2)),
                120,
                what="the canary to run 2.0.0",
            )
            assert fleet.model_section(canary)["release"] == 2

            def wave_verdict() -> str | None:
                verdict: str | None = fleet.rollout(rid)["waves"][0]["gate_verdict"]
                return verdict

            wait_for(
                lambda: watching(lambda: wave_verdict() == "fail"),
                150,
                what="the canary's gates to fail",
            )
            failed = fleet.rollout(rid)
            failed_at = _at(failed["waves"][0]["evaluated_at"])

            def back_on_v1() -> bool:
                return fleet.running(canary) == ("1.0.0", v1)

            left_s = ROLLBACK_WITHIN_S - (datetime.now(UTC) - failed_at).total_seconds()
            wait_for(lambda: watching(back_on_v1), max(left_s, 0.0), what="the canary on 1.0.0")
            back_s = (datetime.now(UTC) - failed_at).total_seconds()
            wait_for(
                lambda: watching(lambda: fleet.rollout(rid)["state"] == "rolled_back"),
                30,
                what="the rollout to end rolled back",
            )
            served_by_canary = traffic.served(canary)
        seen_other.add(fleet.running(other))

    done = fleet.rollout(rid)
    print(
        f"gate failed {failed_at.isoformat()}; canary back on 1.0.0 {back_s:.1f} s later; "
        f"canary answered {served_by_canary} requests locally; gates {done['waves'][0]}"
    )
    assert back_s <= ROLLBACK_WITHIN_S
    assert "quality_agreement" in done["reason"], done["reason"]
    assert done["waves"][0]["state"] == "failed"
    gates = {g["name"]: g for g in done["waves"][0]["gate_results"]}
    quality = gates["quality_agreement"]
    assert quality["verdict"] == "fail" and quality["threshold"] == MIN_AGREEMENT
    assert quality["value"] < 0.9  # far below: noise, not quantization
    assert gates["error_rate"]["verdict"] == "pass"
    assert done["waves"][1]["state"] == "pending"  # the second wave never started
    devices = {d["device_id"]: d for d in done["devices"]}
    assert devices[canary]["state"] == "rolled_back"
    assert devices[canary]["activated_at"] is not None
    assert devices[canary]["previous_version"] == "1.0.0"
    assert devices[other]["state"] == "pending"

    # The canary's desired state is 1.0.0 again, without the sampling; the other device's
    # desired state was never touched, and it never reported anything but 1.0.0.
    canary_policy = fleet.device(canary)["desired"]["policy"]
    assert canary_policy["model"]["version"] == "1.0.0"
    assert canary_policy["model"]["artifact_sha256"] == v1
    assert "quality_sample_share" not in canary_policy
    assert fleet.device(other)["desired"]["generation"] == generations[other]
    assert seen_other == {("1.0.0", v1)}
    assert fleet.running(canary) == ("1.0.0", v1)

    audit = fleet.http.get("/api/v1/audit", params={"object_type": "rollout", "page_size": 200})
    assert audit.status_code == 200, audit.text
    rows = audit.json()["items"]
    started = [r for r in rows if r["action"] == "rollout.start"]
    assert [r["detail"].get("rollout_id") for r in started] == [rid]
    assert started[0]["outcome"] == "success" and started[0]["actor"] != "rollout-engine"
    engine = {r["action"]: r for r in rows if r["actor"] == "rollout-engine"}
    assert {"rollout.wave_failed", "rollout.rolling_back", "rollout.rolled_back"} <= set(engine)
    assert all(r["object_id"] == str(rid) for r in engine.values())
    assert "quality_agreement" in engine["rollout.rolling_back"]["detail"]["reason"]
