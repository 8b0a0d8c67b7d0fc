"""eventfn's PostgreSQL broker: ``postgresql://user:pw@host:5432/db?namespace=shop``.

- :class:`PostgresBroker`: the broker, registered for ``postgresql://`` (and ``postgres://``)
  through the ``eventfn.brokers`` entry-point group;
- :func:`transaction`: a handler's own database writes, the message's ack and the events it
  emitted, committed in one transaction (a transactional outbox);
- :class:`LeaseLost`, :class:`OutboxClosed`: what :func:`transaction` raises when it cannot
  keep that promise.
"""

from __future__ import annotations

from eventfn_postgresql._broker import PostgresBroker
from eventfn_postgresql._outbox import LeaseLost, OutboxClosed, Transaction, transaction

__all__ = ["LeaseLost", "OutboxClosed", "PostgresBroker", "Transaction", "transaction"]
