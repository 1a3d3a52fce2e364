"""TP=2 and TP=3 over gloo equal TP=1 and the models' FP32 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud_controller.pool.tensor_parallel import (
    TensorParallelError,
    TPContext,
    build_tp_encoder,
    check_tp_size,
    embed_reference,
    embed_tensor_parallel,
    valid_tp_sizes,
)
from models.checkpoint import EncoderConfig
from models.tokenization import load_tokenizer
from sim.broker import free_port
from tests.pool.helpers import SENTENCES


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    return load_tokenizer().encode_batch(SENTENCES)


@pytest.fixture(scope="module")
def tp1(batch: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    model = build_tp_encoder(TPContext(rank=0, world_size=1))
    with torch.inference_mode():
        out = model(torch.from_numpy(batch[0]), torch.from_numpy(batch[1]))
    return np.asarray(out.numpy())


def test_tp1_matches_the_models_reference(tp1: np.ndarray) -> None:
    reference = embed_reference(SENTENCES)
    assert np.abs(tp1 - reference).max() < 1e-5
    cosine = (tp1 * reference).sum(axis=1)  # both are unit vectors
    assert cosine.min() >= 0.99999


@pytest.mark.parametrize("tp", [2, 3])
def test_tensor_parallel_equals_tp1(
    tp: int, tp1: np.ndarray, batch: tuple[np.ndarray, np.ndarray]
) -> None:
    per_rank = embed_tensor_parallel(*batch, tp=tp, port=free_port())
    assert len(per_rank) == tp
    reference = embed_reference(SENTENCES)
    for out in per_rank:  # every rank ends with the same full embeddings
        assert out.shape == (len(SENTENCES), 384)
        assert np.abs(out - tp1).max() < 1e-4
        assert (out * reference).sum(axis=1).min() >= 0.99999


def test_tp_sizes_are_the_divisors_of_the_head_count() -> None:
    config = EncoderConfig()
    assert valid_tp_sizes(config) == [1, 2, 3, 4, 6, 12]
    for bad in (5, 8):
        with pytest.raises(TensorParallelError, match="divide"):
            check_tp_size(config, bad)
