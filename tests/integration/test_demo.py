"""``spillway demo`` end to end, short: every part a real process, the report checked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.timeout(420)  # its own 400 s bound reports first, with the demo's output
def test_demo_tells_the_whole_story(tmp_path: Path, serving_models: Path) -> None:
    report = tmp_path / "r.json"
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spillway",
            "demo",
            "--agents",
            "2",
            "--duration",
            "8",
            "--report",
            str(report),
            "--work-dir",
            str(tmp_path / "demo"),
            "--model-dir",
            str(serving_models),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its broker, controller, pool and agents share its group
    )
    try:
        stdout, stderr = demo.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(demo.pid, signal.SIGKILL)  # no orphan keeps loading the machine
        stdout, stderr = demo.communicate()
        pytest.fail(f"the demo did not finish in 400 s: {stdout[-2000:]} {stderr[-1000:]}")
    done = subprocess.CompletedProcess(demo.args, demo.returncode, stdout, stderr)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-2000:])
    body = json.loads(report.read_text())
    assert body["controller_url"] in done.stdout
    assert f"{body['controller_url']}/dashboard/" in done.stdout
    assert "export SPILLWAY_URL=" in done.stdout and "SPILLWAY_TOKEN=spw_" in done.stdout

    assert body["models"]["version"] == "1.0.0" and body["models"]["state"] == "ready"
    assert set(body["models"]["variants_mib"]) == {"fp32-onnx", "int8-onnx"}
    assert body["online"] == 2
    assert {d["profile"] for d in body["devices"]} == {"jetson-orin-nano", "jetson-orin-nx"}

    rollout = body["rollout"]
    assert rollout["state"] == "completed"
    assert [w["state"] for w in rollout["waves"]] == ["passed", "passed"]
    assert rollout["waves"][0]["canary"] is True
    assert set(rollout["devices"].values()) == {"active"}
    assert {d["variant"] for d in body["devices"]} == {"int8-onnx"}

    totals = body["traffic"]["totals"]
    assert totals["requests"] > 0 and totals["ok"] == totals["edge"] + totals["cloud"]
    assert totals["edge"] > 0, totals
    assert body["traffic"]["burst"]["cloud"] > 0, body["traffic"]  # the burst overflowed
    traffic = body["traffic"]
    assert traffic["pool_capacity_rps"] > 0  # the burst was sized with the pool's probe too
    assert traffic["burst_rps"] >= 1.5 * traffic["edge_capacity_rps"] - 0.1
    for device in body["devices"]:
        assert device["traffic"]["requests"] > 0
        assert device["traffic"]["variants"] == ["int8-onnx"]
