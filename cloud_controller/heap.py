"""Keeping the garbage collector's full collections off the controller's long-lived objects.

Ingest allocates a handful of container objects per inbound message (paho's packet and
properties, the decoded model, queue entries), so at thousands of messages a second
CPython's cyclic collector runs constantly, and each *full* collection walks every object
alive: the app, its routes and schemas, SQLAlchemy's metadata, the imported modules. In
``spillway bench intake`` that was about a fifth of the controller's CPU per message.
``long_lived_frozen`` moves everything alive at start-up into the permanent generation
(``gc.freeze``) for as long as the controller serves, so collections walk only what was
made since; objects that are garbage at that moment stay until the block ends (a one-off,
bounded amount), and reference counting frees everything else as always.

Freezing is a change to the whole interpreter, so only the owner of the process does it:
``spillway controller serve`` around uvicorn (and the intake benchmark's controller
process), never the app's lifespan, which tests start many times in one process.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def long_lived_frozen() -> Iterator[None]:
    """Exempt every object alive now from collections until the block ends."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
