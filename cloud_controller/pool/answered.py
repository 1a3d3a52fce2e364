"""What a replica has already answered, so a request is computed once.

Two kinds of repeat reach a replica, and they are answered differently:

* **the same MQTT message again** (same envelope ``message_id``): the broker redelivers a
  message whose PUBACK it never got, e.g. after the replica was killed between publishing the
  answer and acknowledging the request. The answer already went out, so the repeat is only
  acknowledged: answering it again would give the client two responses.
* **the same ``request_id`` in a new message**: a client retried (its own timeout, a
  reconnect). It wants an answer, so the cached response is published again, not recomputed.

Records live in memory (an LRU) and in a small SQLite file, which a restarted replica reopens:
with the replica's stable MQTT client id the broker redelivers its unacknowledged requests to
that same replica, and the file says which of them were already answered. The only window
left is between the answer's PUBACK and the record's commit (milliseconds); a kill there gives
one duplicate answer, which the client drops by correlation data.

This module knows sqlite3 and nothing of MQTT or torch.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import OrderedDict
from pathlib import Path


class AnsweredStore:
    """Bounded record of answered requests: ``message_id``s seen and responses by request id."""

    def __init__(self, path: Path | None, *, capacity: int = 4096) -> None:
        """``path`` None keeps records in memory only; ``capacity`` is in requests."""
        self._capacity = capacity
        self._lock = threading.Lock()
        self._responses: OrderedDict[str, bytes] = OrderedDict()
        self._messages: OrderedDict[str, str] = OrderedDict()  # message_id -> request_id
        self._db: sqlite3.Connection | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS answered ("
                " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
                " message_id TEXT NOT NULL UNIQUE,"
                " request_id TEXT NOT NULL,"
                " response BLOB)"
            )
            rows = self._db.execute(
                "SELECT message_id, request_id, response FROM answered ORDER BY seq DESC LIMIT ?",
                (capacity,),
            ).fetchall()
            for message_id, request_id, response in reversed(rows):
                self._remember(
                    message_id, request_id, None if response is None else bytes(response)
                )

    def _remember(self, message_id: str, request_id: str, response: bytes | None) -> None:
        self._messages[message_id] = request_id
        self._messages.move_to_end(message_id)
        if response is not None:
            self._responses[request_id] = response
            self._responses.move_to_end(request_id)
        while len(self._messages) > self._capacity:
            self._messages.popitem(last=False)
        while len(self._responses) > self._capacity:
            self._responses.popitem(last=False)

    def message_answered(self, message_id: str) -> bool:
        with self._lock:
            return message_id in self._messages

    def response_for(self, request_id: str) -> bytes | None:
        with self._lock:
            response = self._responses.get(request_id)
            if response is not None:
                self._responses.move_to_end(request_id)
            return response

    def record(self, *, message_id: str, request_id: str, response: bytes | None) -> None:
        """Remember that ``message_id`` was answered (durable on return); ``response`` None
        (a refusal, an expired deadline) is not replayed to a client that retries."""
        with self._lock:
            self._remember(message_id, request_id, response)
            if self._db is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO answered (message_id, request_id, response)"
                    " VALUES (?, ?, ?)",
                    (message_id, request_id, response),
                )
                self._db.execute(
                    "DELETE FROM answered WHERE seq <= (SELECT MAX(seq) FROM answered) - ?",
                    (self._capacity,),
                )

    def __len__(self) -> int:
        with self._lock:
            return len(self._messages)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
