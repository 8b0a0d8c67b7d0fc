"""Idempotency stores: where the idempotency middleware remembers which keys are handled.

:func:`open_store` picks the store for a broker (the runner calls it when a handler has
``idempotent=True``):

- ``sqlite:///path/x.db``: a SQLite file of its own next to the broker's, ``path/x.idempotency.db``
  (its own file, so that its writes never wait on the broker's and vice versa);
- ``memory://name``: the in-process store shared by every runner on that URL in this process;
- any other broker: for now, the SQLite file ``eventfn-idempotency.db`` in the current directory
  (shared by the runners of one machine only; plug-in brokers will bring their own store).

``EVENTFN_IDEMPOTENCY_LEASE`` (seconds, default 30) sets the shortest in-progress lease: how long
a key stays blocked after its holder died. Leases are renewed while a handler runs, so a short
one only costs renewal writes for long handlers.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from eventfn.brokers.base import Broker
from eventfn.exceptions import ConfigurationError
from eventfn.idempotency.base import (
    DEFAULT_LEASE,
    Claim,
    IdempotencyError,
    IdempotencyRecord,
    IdempotencyStore,
    log,
)
from eventfn.idempotency.memory import MemoryIdempotencyStore
from eventfn.idempotency.sqlite import SQLiteIdempotencyStore

if TYPE_CHECKING:
    from eventfn.app import App

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_STORE_FILE",
    "Claim",
    "IdempotencyError",
    "IdempotencyRecord",
    "IdempotencyStore",
    "MemoryIdempotencyStore",
    "SQLiteIdempotencyStore",
    "open_store",
    "store_for",
]

DEFAULT_STORE_FILE = "eventfn-idempotency.db"
"""The store of a broker that has none of its own yet, in the current directory."""

LEASE_ENV = "EVENTFN_IDEMPOTENCY_LEASE"


@asynccontextmanager
async def open_store(app: App, broker: Broker) -> AsyncIterator[IdempotencyStore]:
    """The idempotency store for ``broker``, open and renewing leases until the block ends.

    >>> async with open_store(app, broker) as store: ...
    """
    store = store_for(broker)
    log.info("idempotency store for app %s: %s", app.name, store.describe())
    async with store:
        yield store


def store_for(broker: Broker) -> IdempotencyStore:
    """The (unopened) store that goes with a broker; see the module docstring."""
    from eventfn.brokers.memory import MemoryBroker
    from eventfn.brokers.sqlite import SQLiteBroker

    lease = _lease()
    if isinstance(broker, MemoryBroker):
        return MemoryIdempotencyStore(broker.url, clock=broker.clock, lease=lease)
    if isinstance(broker, SQLiteBroker):
        return SQLiteIdempotencyStore(_beside(broker.path), clock=broker.clock, lease=lease)
    return SQLiteIdempotencyStore(Path.cwd() / DEFAULT_STORE_FILE, clock=broker.clock, lease=lease)


def _beside(path: str) -> str:
    """``x.db`` -> ``x.idempotency.db``; an in-memory broker gets an in-memory store."""
    if path == ":memory:":
        return path
    broker_file = Path(path)
    name = f"{broker_file.stem}.idempotency{broker_file.suffix or '.db'}"
    return str(broker_file.with_name(name))


def _lease() -> float:
    text = os.environ.get(LEASE_ENV)
    if text is None:
        return DEFAULT_LEASE
    try:
        lease = float(text)
    except ValueError:
        lease = 0.0
    if not lease > 0:
        raise ConfigurationError(f"{LEASE_ENV}={text!r} must be a positive number of seconds")
    return lease
