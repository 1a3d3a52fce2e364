"""The agent as a process (``python -m edge_agent``): Last Will, graceful stop, CLI errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from protocol.messages import ApplyOutcome, DeviceStatus
from protocol.topics import DeviceChannel
from sim.broker import MosquittoBroker
from tests.agent.helpers import (
    KEEPALIVE_S,
    REPO_ROOT,
    Cloud,
    ProcessFactory,
    retained_presence,
    wait_for,
)

STARTUP_S = 30.0  # interpreter start + imports on a loaded CI machine
WILL_SLACK_S = 1.5
"""A SIGKILLed agent's socket is closed by the kernel, so the Will is nearly immediate."""
KEEPALIVE_SWEEP_S = 5.0
"""A frozen agent is noticed only by the broker's keepalive sweep, which mosquitto 2.0 runs
on a coarse timer: observed 1-3 s after the 1.5 x keepalive deadline on this machine."""


def presence_is(
    broker: MosquittoBroker, status: DeviceStatus, reason: str | None = None
) -> Callable[[], bool]:
    def check() -> bool:
        p = retained_presence(broker, "dev-1")
        return p is not None and p.status == status and (reason is None or p.reason == reason)

    return check


def test_sigkill_leaves_the_last_will_then_restart_bumps_boot_epoch(
    cloud: Cloud, broker: MosquittoBroker, agent_process: ProcessFactory
) -> None:
    agent = agent_process("dev-1", extra=["--label", "site=lab"])
    agent.start()
    wait_for(presence_is(broker, DeviceStatus.ONLINE), STARTUP_S, what="online")
    cloud.publish_desired("dev-1", 1, {"v": 1})
    wait_for(lambda: len(cloud.reports("dev-1")) == 1, 10, what="generation 1 reported")

    agent.signal(signal.SIGKILL)
    agent.wait()
    wait_for(
        presence_is(broker, DeviceStatus.OFFLINE, "lost"),
        1.5 * KEEPALIVE_S + WILL_SLACK_S,
        what="Last Will",
    )

    agent.start()  # same state dir: boot epoch 2, generation 1 re-reported, not re-applied
    wait_for(
        lambda: any(r.boot_epoch == 2 for r in cloud.reports("dev-1")), STARTUP_S, what="re-report"
    )
    hellos = cloud.seen("dev-1", DeviceChannel.HELLO)
    assert [h.boot_epoch for h in hellos] == [1, 2]
    assert hellos[-1].labels == {"site": "lab"}
    again = [r for r in cloud.reports("dev-1") if r.boot_epoch == 2]
    assert {(r.observed_generation, r.outcome) for r in again} == {(1, ApplyOutcome.APPLIED)}
    applied_lines = [
        line for line in agent.log().splitlines() if '"desired generation applied"' in line
    ]
    assert len(applied_lines) == 1  # only the first process applied it


def test_a_frozen_agent_is_declared_lost_by_keepalive_and_comes_back(
    broker: MosquittoBroker, agent_process: ProcessFactory
) -> None:
    """SIGSTOP keeps the TCP connection open but silent: only the keepalive can notice."""
    agent = agent_process("dev-1")
    agent.start()
    wait_for(presence_is(broker, DeviceStatus.ONLINE), STARTUP_S, what="online")
    agent.signal(signal.SIGSTOP)
    try:
        wait_for(
            presence_is(broker, DeviceStatus.OFFLINE, "lost"),
            1.5 * KEEPALIVE_S + KEEPALIVE_SWEEP_S,
            what="Last Will after keepalive expiry",
        )
    finally:
        agent.signal(signal.SIGCONT)
    wait_for(presence_is(broker, DeviceStatus.ONLINE), 20, what="online after thaw")


def test_sigterm_says_shutdown_and_exits_zero(
    broker: MosquittoBroker, agent_process: ProcessFactory
) -> None:
    agent = agent_process("dev-1")
    agent.start()
    wait_for(presence_is(broker, DeviceStatus.ONLINE), STARTUP_S, what="online")
    agent.signal(signal.SIGTERM)
    assert agent.wait() == 0, agent.log()[-2000:]
    presence = retained_presence(broker, "dev-1")
    assert presence is not None
    assert (presence.status, presence.reason) == (DeviceStatus.OFFLINE, "shutdown")
    for line in agent.log().splitlines():  # every log line is one JSON object
        assert json.loads(line)["component"] == "agent"


def test_sigint_also_stops_gracefully(
    broker: MosquittoBroker, agent_process: ProcessFactory
) -> None:
    agent = agent_process("dev-1")
    agent.start()
    wait_for(presence_is(broker, DeviceStatus.ONLINE), STARTUP_S, what="online")
    agent.signal(signal.SIGINT)
    assert agent.wait() == 0
    assert presence_is(broker, DeviceStatus.OFFLINE, "shutdown")()


def test_unreachable_broker_at_start_warns_once_and_keeps_retrying(
    broker: MosquittoBroker, agent_process: ProcessFactory
) -> None:
    broker.stop()
    agent = agent_process("dev-1")
    agent.start()
    wait_for(lambda: "unreachable" in agent.log(), STARTUP_S, what="warning")
    assert agent.proc is not None and agent.proc.poll() is None
    warnings = [
        json.loads(line)
        for line in agent.log().splitlines()
        if line.startswith("{") and json.loads(line)["level"] == "warning"
    ]
    assert len(warnings) == 1 and "running offline" in warnings[0]["msg"]
    time.sleep(0.5)
    broker.start()
    wait_for(presence_is(broker, DeviceStatus.ONLINE), 20, what="online after broker start")


def run_cli(*args: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args, "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


def test_cli_rejects_a_bad_label_with_one_line(tmp_path: Path) -> None:
    done = run_cli("--device-id", "dev-1", "--label", "no-equals-sign", state_dir=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "spillway agent: label 'no-equals-sign' must look like key=value"
    ]
    assert done.stdout == ""


def test_cli_start_up_problems_are_one_line_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    cases = [
        (("--mqtt-port", "1"), "device_id"),  # missing device id
        (("--device-id", "bad id"), "device_id"),
        (("--device-id", "d", "--keepalive-s", "0"), "keepalive_s"),
    ]
    for args, needle in cases:
        done = run_cli(*args, state_dir=tmp_path / "s")
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.splitlines()
        assert line.startswith("spillway agent: ") and needle in line
    done = run_cli("--device-id", "d", state_dir=blocker / "sub")
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert "not writable" in line


def test_corrupt_state_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "boot.json").write_text("{torn")
    done = run_cli("--device-id", "d", "--mqtt-port", "1", state_dir=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].startswith("spillway agent: ")
    assert "Traceback" not in done.stderr
