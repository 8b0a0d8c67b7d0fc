"""What a batch handler may return to report partial failure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventfn.exceptions import EventfnError


class BatchResult:
    """Returned by a batch handler: which items failed (the rest succeeded).

    Name the failed items by the objects the handler received (the decoded events, or their
    envelopes); only those go through the retry policy::

        @app.on_queue("rows", batch=100, batch_wait=0.5)
        async def load(rows: list[Row]) -> eventfn.BatchResult | None:
            rejected = await warehouse.insert_many(rows)
            return eventfn.BatchResult(failed=rejected, reason="constraint violated")
    """

    __slots__ = ("failed", "reason")

    def __init__(self, failed: Sequence[Any] = (), reason: str = "") -> None:
        self.failed = list(failed)
        self.reason = reason

    def __repr__(self) -> str:
        return f"BatchResult(failed=<{len(self.failed)} items>, reason={self.reason!r})"


class BatchItemFailed(EventfnError):
    """The failure recorded for an item that its batch handler reported as failed."""
