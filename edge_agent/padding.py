"""Run one batch of texts as a few length-sorted sub-batches, so padding stays bounded.

A transformer batch is padded to its longest text. On a CPU the cost is about linear in
padded tokens (attention worse), so one long sentence in a batch of short ones can make
the batch slower than running its texts one by one: batching only pays when padding is
small. ``length_groups`` (pure) sorts the texts by token count and cuts a new group when a
text is longer than ``ratio`` x the group's shortest plus ``extra_tokens``; ``PaddedEmbedder``
tokenizes the whole batch once (right-padded), runs each group trimmed to its own longest
length and puts the rows back in request order. This module knows no batching scheduler.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

Rows = npt.NDArray[np.float32]
TokenIds = npt.NDArray[np.int64]

DEFAULT_RATIO = 1.3
DEFAULT_EXTRA_TOKENS = 4


class Tokenizer(Protocol):
    def encode_batch(
        self, texts: list[str], max_length: int | None = None
    ) -> tuple[TokenIds, TokenIds]: ...


class Backend(Protocol):
    def embed(self, input_ids: TokenIds, attention_mask: TokenIds) -> Rows: ...


def length_groups(
    lengths: Sequence[int],
    *,
    ratio: float = DEFAULT_RATIO,
    extra_tokens: int = DEFAULT_EXTRA_TOKENS,
) -> list[list[int]]:
    """Indices of ``lengths`` in groups of similar length, shortest group first.

    Every index appears exactly once; within a group no length exceeds
    ``ratio * shortest + extra_tokens``.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups: list[list[int]] = []
    limit = -1.0
    for i in order:
        if not groups or lengths[i] > limit:
            groups.append([i])
            limit = ratio * lengths[i] + extra_tokens
        else:
            groups[-1].append(i)
    return groups


class PaddedEmbedder:
    """``texts -> (len(texts), dim)`` rows via length-grouped sub-batches."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        backend: Backend,
        *,
        max_length: int,
        ratio: float = DEFAULT_RATIO,
        extra_tokens: int = DEFAULT_EXTRA_TOKENS,
    ) -> None:
        self._tokenizer = tokenizer
        self._backend = backend
        self._max_length = max_length
        self._ratio = ratio
        self._extra_tokens = extra_tokens

    def __call__(self, texts: list[str]) -> Rows:
        ids, mask = self._tokenizer.encode_batch(texts, self._max_length)  # (B, T) each
        if len(texts) == 1:
            return self._backend.embed(ids, mask)
        lengths = mask.sum(axis=1).tolist()
        groups = length_groups(lengths, ratio=self._ratio, extra_tokens=self._extra_tokens)
        if len(groups) == 1:
            return self._backend.embed(ids, mask)
        out: Rows | None = None
        for group in groups:
            index = np.asarray(group)
            width = max(int(lengths[i]) for i in group)
            rows = self._backend.embed(ids[index, :width], mask[index, :width])  # (G, dim)
            if out is None:
                out = np.empty((len(texts), rows.shape[1]), dtype=np.float32)
            out[index] = rows
        assert out is not None
        return out
