"""kill -9 a rank under load: the replica restarts and every request is answered exactly once."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np

from cloud_controller.pool.tensor_parallel import embed_reference
from protocol.inference import InferRequest, InferStatus
from sim.broker import MosquittoBroker
from tests.pool.helpers import SENTENCES, running_pool, wait_for


def test_killed_rank_restarts_its_replica_and_requests_are_answered_once(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    with running_pool(
        host=broker.host, port=broker.port, state_dir=tmp_path / "pool", replicas=2, tp=2
    ) as pool:
        requester = pool.requester
        victim = pool.orchestrator.replicas[0]
        victim_id, survivor_id = victim.replica_id, pool.orchestrator.replicas[1].replica_id
        sent: list[InferRequest] = []
        sent_at: dict[str, float] = {}
        stop_sending = threading.Event()

        def keep_sending() -> None:
            i = 0
            while not stop_sending.is_set():
                request = requester.send(SENTENCES[i % 3 : i % 3 + 3])
                sent_at[request.request_id] = time.monotonic()
                sent.append(request)
                i += 1
                time.sleep(0.05)

        sender = threading.Thread(target=keep_sending)
        sender.start()
        try:
            wait_for(
                lambda: (
                    (load := pool.supervisor.loads().get(victim_id)) is not None
                    and load.outstanding_requests > 0
                ),
                timeout_s=60,
                what="the victim replica busy",
            )
            # A burst, so the victim surely holds unanswered requests when its rank dies.
            for _ in range(10):
                request = requester.send(SENTENCES)
                sent_at[request.request_id] = time.monotonic()
                sent.append(request)
            time.sleep(0.2)
            killed_at = time.monotonic()
            os.kill(victim.pids[1], signal.SIGKILL)  # a non-zero rank: the group must restart
            wait_for(lambda: victim.restarts == 1, timeout_s=30, what="the replica restarted")
            wait_for(
                lambda: any(
                    a.response.device_id == victim_id and a.at > victim.started_at
                    for answers in list(requester.answers.values())
                    for a in answers
                ),
                timeout_s=120,
                what=f"answers from the restarted replica\n{pool.log_tail()}",
            )
        finally:
            stop_sending.set()
            sender.join()
        wait_for(
            lambda: all(requester.answered(r.request_id) for r in sent),
            timeout_s=120,
            what=f"every request answered\n{pool.log_tail()}",
        )
        time.sleep(1.0)  # a duplicate, if any, would arrive now
        counts = {r.request_id: len(requester.answered(r.request_id)) for r in sent}
        assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}

        answers = [requester.answered(r.request_id)[0] for r in sent]
        assert all(a.response.status == InferStatus.OK for a in answers)
        assert victim.restarts == 1 and pool.orchestrator.replicas[1].restarts == 0
        restarted_at = victim.started_at  # same monotonic clock: the orchestrator is in-process
        # The victim's first answer from its new processes (an answer published after the kill
        # can still come from the old rank 0, whose batch had finished).
        back_at = min(
            a.at for a in answers if a.response.device_id == victim_id and a.at > restarted_at
        )
        assert any(
            a.response.device_id == survivor_id and killed_at < a.at < back_at for a in answers
        ), "the other replica kept serving while the victim restarted"
        redelivered = [
            r
            for r, a in zip(sent, answers, strict=True)
            if sent_at[r.request_id] < killed_at
            and a.response.device_id == victim_id
            and a.at > restarted_at
        ]
        assert redelivered, "requests the victim held when killed were answered after restart"

        reference = embed_reference(SENTENCES)
        for request, answer in list(zip(sent, answers, strict=True))[::10]:
            assert answer.response.embeddings is not None
            rows = answer.response.embeddings.to_array()
            expected = reference[[SENTENCES.index(text) for text in request.texts]]
            assert np.abs(rows - expected).max() < 1e-4
