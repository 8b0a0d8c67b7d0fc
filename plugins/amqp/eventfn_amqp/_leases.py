"""Leases kept by the broker object, since RabbitMQ has no visibility timeout.

An unacked delivery stays with its channel until the channel closes. So each delivery handed out
by :meth:`fetch` gets a lease here: a token (the receipt's fence, new on every lease, never
reused) and a deadline. One task wakes at the earliest deadline: an expired queue or topic
delivery is nacked back to its queue (the quorum queue counts the return in
``x-delivery-count``, so the next attempt is one higher); an expired stream record goes back to
the front of its key in this instance. A settle or extend whose token is no longer held is
ignored: that is how a runner that lost its lease is fenced off.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from typing import Protocol

import anyio

log = logging.getLogger("eventfn.amqp")


class Timed(Protocol):
    """Something with a deadline: a lease, or a stream record waiting for its retry."""

    @property
    def finished(self) -> bool:
        """Settled for good: nothing it is scheduled for can matter any more."""

    async def due(self, now: float) -> None:
        """Called at (or after) a time it was scheduled for; it checks whether it still is."""


class Timers:
    """A heap of deadlines (``time.monotonic``) served by one task; stale entries are skipped.

    A settled lease leaves its entry behind until its deadline (a heap cannot remove from the
    middle), and the entry holds the message. At thousands of acks a second that would keep a
    lease period's worth of messages alive, so once the heap has doubled since it was last
    compacted, the entries of finished items are dropped in one pass (amortised O(1) a push).
    """

    _COMPACT_FROM = 4096

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timed]] = []
        self._order = itertools.count()
        self._changed = anyio.Event()
        self._compact_at = self._COMPACT_FROM

    def add(self, when: float, item: Timed) -> None:
        first = not self._heap or when < self._heap[0][0]
        heapq.heappush(self._heap, (when, next(self._order), item))
        if len(self._heap) >= self._compact_at:
            self._compact()
        if first:
            self._changed.set()

    def __len__(self) -> int:
        return len(self._heap)

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if not entry[2].finished]
        heapq.heapify(self._heap)
        self._compact_at = max(self._COMPACT_FROM, 2 * len(self._heap))

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            while self._heap and self._heap[0][0] <= now:
                _, _, item = heapq.heappop(self._heap)
                try:
                    await item.due(now)
                except Exception as exc:  # a lost connection: the next fetch reconnects
                    log.warning("lease timer failed: %s: %s", type(exc).__name__, exc)
            self._changed = anyio.Event()
            timeout = self._heap[0][0] - time.monotonic() if self._heap else None
            with anyio.move_on_after(timeout):
                await self._changed.wait()


class Lease(Timed, Protocol):
    """What a held delivery offers the broker: its fence and its deadline."""

    token: int
    deadline: float

    @property
    def live(self) -> bool:
        """Still leased under ``token``, on a channel that is still open."""


class Leases:
    """The deliveries this broker object has handed out, by receipt token."""

    def __init__(self) -> None:
        self.held: dict[int, Lease] = {}
        self.timers = Timers()
        self._tokens = itertools.count(1)

    def grant(self, item: Lease, seconds: float) -> int:
        token = next(self._tokens)
        item.token = token
        item.deadline = time.monotonic() + seconds
        self.held[token] = item
        self.timers.add(item.deadline, item)
        return token

    def get(self, token: int) -> Lease | None:
        item = self.held.get(token)
        if item is None or item.token != token or not item.live:
            return None
        return item

    def end(self, token: int) -> None:
        self.held.pop(token, None)

    def extend(self, token: int, seconds: float) -> None:
        item = self.get(token)
        if item is not None:
            item.deadline = time.monotonic() + seconds
            self.timers.add(item.deadline, item)
