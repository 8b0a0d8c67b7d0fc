"""The receipt of a PostgreSQL delivery: which row, under which lease, from which broker."""

from __future__ import annotations

from typing import TYPE_CHECKING, final

if TYPE_CHECKING:
    from eventfn_postgresql._broker import PostgresBroker


@final
class Receipt:
    """``(seq, claims)`` fences a settle: ``claims`` is raised on every lease of the row, so a
    receipt from a lease that was taken over (or given back) matches nothing. ``broker`` is the
    instance that leased it, which :func:`eventfn_postgresql.transaction` settles through."""

    __slots__ = ("broker", "claims", "seq", "settled")

    def __init__(self, broker: PostgresBroker, seq: int, claims: int) -> None:
        self.broker = broker
        self.seq = seq
        self.claims = claims
        self.settled = False  # acked by an outbox transaction

    def __repr__(self) -> str:
        return f"Receipt(seq={self.seq}, claims={self.claims})"
