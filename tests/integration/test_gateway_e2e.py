"""The API gateway path: POST /api/v1/embed on the controller → broker → overflow pool."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from cloud_controller.pool.tensor_parallel import embed_reference
from sim.broker import MosquittoBroker
from tests.integration.fleet import Fleet, wait_for
from tests.pool.helpers import running_pool

TEXTS = ["The pool answers for clients without a device.", "Overflow lands in the cloud."]


@pytest.fixture
def fleet(broker: MosquittoBroker, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(broker, tmp_path)
    f.start_controller()
    yield f
    f.close()


def test_gateway_embeds_through_the_pool(
    fleet: Fleet, broker: MosquittoBroker, tmp_path: Path
) -> None:
    with running_pool(
        host=broker.host, port=broker.port, state_dir=tmp_path / "pool", replicas=1, tp=1
    ):
        answers: list[httpx.Response] = []

        def accepted() -> bool:  # the gateway first has to see the pool's status say so
            answers.append(fleet.http.post("/api/v1/embed", json={"texts": TEXTS}, timeout=60))
            return answers[-1].status_code != 429

        wait_for(accepted, 30, what="the gateway to see the pool accepting")
        response = answers[-1]
        assert response.status_code == 200, response.text
        body = response.json()
        rows = np.array(body["embeddings"], dtype=np.float32)
        assert rows.shape == (2, 384) and body["status"] == "ok"
        cosine = (rows * embed_reference(TEXTS)).sum(axis=1)
        assert cosine.min() >= 0.99999  # full precision in the cloud

        bad = fleet.http.post("/api/v1/embed", json={"texts": []})
        assert bad.status_code == 422


def test_gateway_without_a_pool_times_out_with_a_clear_status(fleet: Fleet) -> None:
    response = fleet.http.post(
        "/api/v1/embed", json={"texts": ["nobody is listening"], "deadline_ms": 500}, timeout=30
    )
    assert response.status_code == 504
    assert "no answer from the pool" in response.json()["detail"]
