"""Who runs the replicas: one ``Orchestrator`` interface, local processes behind it by default.

``LocalProcessOrchestrator`` starts each replica as ``tp`` processes of
``python -m cloud_controller.pool.replica`` with torchrun's variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and the pool's settings as
``SPILLWAY_POOL_*``. ``supervise()`` checks every rank: when one has died, the rest of its
group is killed (a TP group cannot continue without a rank) and the group starts again with a
fresh rendezvous port and the same replica id, so the broker hands it back its session and
its unacknowledged requests. Repeated crashes back off (1 s doubling to 30 s).

The Kubernetes backend lives in :mod:`cloud_controller.pool.kubernetes`; the policy that picks
a replica count from the queue is :func:`desired_replicas`, shared by both.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cloud_controller.pool.settings import PoolSettings

logger = logging.getLogger(__name__)


class OrchestratorError(RuntimeError):
    """The orchestrator could not do what was asked; worth retrying on the next tick."""


class Orchestrator(Protocol):
    """What the supervisor needs from whoever runs replicas."""

    def scale(self, replicas: int) -> None:
        """Run exactly ``replicas`` replicas (start or stop the highest indexes)."""

    def supervise(self) -> None:
        """Restart what died; called every supervisor tick."""

    def desired(self) -> int:
        """The replica count last asked for."""

    def shutdown(self) -> None:
        """Stop every replica."""


def desired_replicas(
    *,
    queued_items: int,
    per_item_ms: float,
    current: int,
    min_replicas: int,
    max_replicas: int,
    target_wait_ms: float,
) -> int:
    """Replicas that keep ``queued_items * per_item_ms / replicas`` under ``target_wait_ms``.

    Scale up to what is needed at once; scale down one step at a time, and only when one replica
    fewer would still wait under half the target (hysteresis against flapping).
    """
    work_ms = queued_items * per_item_ms
    needed = max(min_replicas, min(max_replicas, math.ceil(work_ms / target_wait_ms)))
    if needed >= current:
        return needed
    fewer = current - 1
    if fewer == 0:
        return 0 if queued_items == 0 else current
    return fewer if work_ms / fewer < target_wait_ms / 2 else current


_REPLICA_MAIN = "from cloud_controller.pool.replica import main; main()"
"""What each rank process runs (``-m`` would name the module's logger ``__main__``)."""


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalReplica:
    """One replica's rank processes and restart history."""

    index: int
    replica_id: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    starts: int = 0
    """Times the group was started; ``starts - 1`` is its restart count."""
    crashes_in_a_row: int = 0
    not_before: float = 0.0
    """Monotonic time before which a crashed group is not restarted (backoff)."""
    started_at: float = 0.0

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)

    def running(self) -> bool:
        return bool(self.procs) and all(p.poll() is None for p in self.procs)


class LocalProcessOrchestrator:
    """Replicas as local process groups, restarted as a whole when any rank dies."""

    def __init__(
        self,
        settings: PoolSettings,
        *,
        python: str = sys.executable,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self._settings = settings
        self._python = python
        self._extra_env = extra_env or {}
        self._desired = 0
        self.replicas: dict[int, LocalReplica] = {}
        self.log_dir = settings.state_dir / "logs"

    def desired(self) -> int:
        return self._desired

    def scale(self, replicas: int) -> None:
        self._desired = replicas
        for index in range(replicas):
            if index not in self.replicas:
                replica = LocalReplica(index, self._settings.replica_client_id(index))
                self.replicas[index] = replica
                self._start(replica)
        for index in sorted(self.replicas, reverse=True):
            if index >= replicas:
                self._stop(self.replicas.pop(index))

    def supervise(self) -> None:
        now = time.monotonic()
        for replica in self.replicas.values():
            if replica.running():
                if now - replica.started_at > 60:
                    replica.crashes_in_a_row = 0
                continue
            if replica.procs:
                codes = [p.poll() for p in replica.procs]
                logger.warning(
                    "replica lost a rank; restarting its group",
                    extra={"replica_id": replica.replica_id, "exit_codes": codes},
                )
                self._kill(replica)
                replica.procs = []
                replica.crashes_in_a_row += 1
                replica.not_before = now + min(30.0, 0.5 * 2**replica.crashes_in_a_row)
            if now >= replica.not_before:
                self._start(replica)

    def shutdown(self) -> None:
        for index in sorted(self.replicas, reverse=True):
            self._stop(self.replicas.pop(index))
        self._desired = 0

    # -- processes -------------------------------------------------------------------------

    def _start(self, replica: LocalReplica) -> None:
        tp = self._settings.tp
        port = _free_port()
        env = {
            **os.environ,
            **self._settings.as_env(),
            **self._extra_env,
            "SPILLWAY_POOL_REPLICA_ID": replica.replica_id,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(tp),
        }
        self.log_dir.mkdir(parents=True, exist_ok=True)
        replica.procs = []
        for rank in range(tp):
            log_path = self.log_dir / f"{replica.replica_id}-rank{rank}.log"
            with log_path.open("ab") as log:
                replica.procs.append(
                    subprocess.Popen(
                        [self._python, "-c", _REPLICA_MAIN],
                        env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        replica.starts += 1
        replica.started_at = time.monotonic()
        logger.info(
            "replica started",
            extra={"replica_id": replica.replica_id, "pids": replica.pids, "tp": tp},
        )

    def _kill(self, replica: LocalReplica) -> None:
        for proc in replica.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in replica.procs:
            proc.wait()

    def _stop(self, replica: LocalReplica, *, timeout_s: float = 15.0) -> None:
        """SIGTERM rank 0 (it stops the other ranks), then SIGKILL whatever is left."""
        if replica.procs and replica.procs[0].poll() is None:
            replica.procs[0].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in replica.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        self._kill(replica)
        logger.info("replica stopped", extra={"replica_id": replica.replica_id})


def rank_log(settings: PoolSettings, replica_id: str, rank: int) -> Path:
    """Where a local replica's rank writes its log."""
    return settings.state_dir / "logs" / f"{replica_id}-rank{rank}.log"
