from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from protocol.codec import MalformedMessage, decode, encode
from protocol.inference import MAX_TEXT_CHARS, EmbeddingBlock, InferRequest


def test_embedding_block_round_trips_float32_rows() -> None:
    rows = np.random.default_rng(0).standard_normal((3, 384)).astype(np.float32)
    block = EmbeddingBlock.from_array(rows)
    assert np.array_equal(
        EmbeddingBlock.model_validate_json(block.model_dump_json()).to_array(), rows
    )


def test_embedding_block_refuses_a_wrong_size() -> None:
    block = EmbeddingBlock.from_array(np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(ValidationError, match="does not hold"):
        EmbeddingBlock(count=3, dim=4, data_b64=block.data_b64)


def test_infer_request_bounds_texts() -> None:
    ok = InferRequest(device_id="d", request_id="r1", texts=["hello"])
    assert decode(encode(ok), InferRequest).texts == ["hello"]
    too_long = ok.model_dump(mode="json") | {"texts": ["x" * (MAX_TEXT_CHARS + 1)]}
    with pytest.raises(MalformedMessage, match="characters"):
        decode(json.dumps(too_long).encode(), InferRequest)
    with pytest.raises(ValidationError):
        InferRequest(device_id="d", request_id="r2", texts=[])
