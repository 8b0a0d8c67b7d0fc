"""Virtual time for :class:`eventfn.testing.TestRuntime`: a clock that moves only when told, and
a ``memory://`` broker that can say what is due on it.

Time moves by :meth:`VirtualClock.advance`, one timer at a time: to the next virtual sleep that
ends (a scheduler) or the next delayed delivery that comes due (a retry), whichever is first.
At each stop the clock lets the runner handle what came due before it moves on, so a day of a
five-minute schedule is 288 ticks, each handled at its own instant.
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
import math
from collections.abc import Sequence
from typing import Protocol

import anyio
import anyio.lowlevel

from eventfn.brokers.base import Delivery, OutgoingMessage, Settlement, SubscriptionRef
from eventfn.brokers.memory import MemoryBroker


class NotIdle(TimeoutError):
    """The runtime did not become idle within its (real-time) timeout; the message says what
    is still pending."""


class Driver(Protocol):
    """What a :class:`VirtualClock` drives: something that settles and has timers of its own."""

    async def settle(self) -> None:
        """Return once everything due now has been handled."""

    def next_due(self) -> float | None:
        """The next instant something of its own comes due (a delayed delivery)."""

    def moved(self) -> None:
        """The clock moved: look again at what is due."""


class _Timer:
    __slots__ = ("at", "event", "gone", "woken")

    def __init__(self, at: float) -> None:
        self.at = at
        self.event = anyio.Event()
        self.woken = False
        self.gone = False


class VirtualClock:
    """Epoch seconds that move only by :meth:`advance`; also a virtual ``sleep``.

    It is a ``Callable[[], float]`` like ``time.time``, so it is the broker's clock, and
    :meth:`sleep` is what the runtime's schedulers wait with.

    >>> clock = VirtualClock(dt.datetime(2026, 3, 28, tzinfo=dt.UTC))
    >>> await clock.advance(60)  # every sleep that ends on the way returns, in order
    >>> clock.datetime
    datetime.datetime(2026, 3, 28, 0, 1, tzinfo=datetime.timezone.utc)
    """

    def __init__(self, start: float | dt.datetime | None = None) -> None:
        self._now = epoch(start)
        self.start = self._now
        self._timers: list[tuple[float, int, _Timer]] = []
        self._seq = itertools.count()
        self._waking = 0  # sleepers woken that have not run yet
        self.driver: Driver | None = None

    def __call__(self) -> float:
        return self._now

    def __repr__(self) -> str:
        return f"VirtualClock({self.datetime.isoformat()})"

    def now(self) -> float:
        """The virtual time in epoch seconds."""
        return self._now

    @property
    def datetime(self) -> dt.datetime:
        """The virtual time as an aware UTC datetime."""
        return dt.datetime.fromtimestamp(self._now, dt.UTC)

    @property
    def elapsed(self) -> float:
        """Virtual seconds since the clock started."""
        return self._now - self.start

    @property
    def busy(self) -> bool:
        """Whether a sleeper was woken and has not run yet."""
        return self._waking > 0

    async def sleep(self, seconds: float) -> None:
        """Wait until the virtual time has moved ``seconds`` on."""
        if not seconds > 0:
            await anyio.lowlevel.checkpoint()
            return
        timer = _Timer(self._now + seconds)
        heapq.heappush(self._timers, (timer.at, next(self._seq), timer))
        try:
            await timer.event.wait()
        finally:
            timer.gone = True
            if timer.woken:
                self._waking -= 1

    def next_timer(self) -> float | None:
        """When the next virtual sleep ends, if any sleeps."""
        while self._timers and self._timers[0][2].gone:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    async def advance(self, seconds: float) -> None:
        """Move ``seconds`` on, stopping at every timer due on the way and letting what came
        due be handled there (with a runtime: until it is idle) before moving on.

        >>> await rt.clock.advance(24 * 3600)  # a day of schedules and retries, in ms
        """
        if seconds < 0:
            raise ValueError(f"advance({seconds}): virtual time only moves forward")
        await self.advance_to(self._now + seconds)

    async def advance_to(self, when: float | dt.datetime) -> None:
        """Move on to ``when`` (epoch seconds or a datetime), as :meth:`advance` does."""
        target = epoch(when)
        await self._settle()
        while (due := self._next_due()) is not None and due <= target:
            self._move(max(due, self._now))
            await self._settle()
        if target > self._now:
            self._move(target)
            await self._settle()

    def _next_due(self) -> float | None:
        dues = [self.next_timer(), self.driver.next_due() if self.driver else None]
        return min((d for d in dues if d is not None), default=None)

    def _move(self, to: float) -> None:
        self._now = to
        while (at := self.next_timer()) is not None and at <= to:
            _, _, timer = heapq.heappop(self._timers)
            timer.woken = True
            self._waking += 1
            timer.event.set()
        if self.driver is not None:
            self.driver.moved()

    async def _settle(self) -> None:
        if self.driver is not None:
            await self.driver.settle()
            return
        while self.busy:
            await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()


def epoch(when: float | dt.datetime | None) -> float:
    """Epoch seconds of ``when`` (a naive datetime is UTC; ``None`` is now)."""
    if when is None:
        import time

        return time.time()
    if isinstance(when, dt.datetime):
        return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()
    if not math.isfinite(when):
        raise ValueError(f"{when!r} is not a point in time")
    return float(when)


class Backlog:
    """What a subscription holds on a :class:`VirtualBroker`, at the virtual now."""

    __slots__ = ("delayed", "leased", "next_due", "ready", "subscription")

    def __init__(self, subscription: str) -> None:
        self.subscription = subscription
        self.ready = 0  # a fetch could lease it now
        self.leased = 0  # a runner holds it: running, prefetched or being settled
        self.delayed = 0  # visible later (a retry's backoff, a delay=)
        self.next_due: float | None = None

    def __str__(self) -> str:
        text = f"{self.subscription}: {self.ready} ready, {self.leased} leased"
        if self.delayed:
            text += f", {self.delayed} delayed"
        return text


class VirtualBroker(MemoryBroker):
    """A ``memory://`` broker on a :class:`VirtualClock` that can say what it holds.

    It reads its rows as :meth:`MemoryBroker.fetch` would lease them (a stream record behind
    its key's head is not ready), and :meth:`wake` makes waiting fetches look again once the
    clock moved (their own timeout counts real seconds).
    """

    def __init__(self, url: str, clock: VirtualClock) -> None:
        super().__init__(url, clock=clock)
        self.changed = anyio.Event()
        self._fetches: set[anyio.CancelScope] = set()
        self._interrupted = False

    async def fetch(
        self, subscription: SubscriptionRef, limit: int, *, lease: float, wait: float = 0.0
    ) -> list[Delivery]:
        # a fetch waits until ``wait`` virtual seconds pass, which they may never do: a runner
        # that stops gets its waiting fetches ended by :meth:`interrupt` instead
        if self._interrupted:
            await anyio.lowlevel.checkpoint()
            return []
        with anyio.CancelScope() as scope:
            self._fetches.add(scope)
            try:
                return await super().fetch(subscription, limit, lease=lease, wait=wait)
            finally:
                self._fetches.discard(scope)
        return []  # cancelled while waiting, before leasing anything

    def interrupt(self) -> None:
        """End every waiting fetch with nothing, and every later one (the runner stops)."""
        self._interrupted = True
        for scope in self._fetches:
            scope.cancel()

    def wake(self) -> None:
        """Wake every fetch waiting on this broker."""
        for sub in self._state.subscriptions.values():
            sub.wake()

    def backlog(self) -> list[Backlog]:
        """Each subscription's ready, leased and delayed rows."""
        now = self.clock()
        found = []
        for name, sub in self._state.subscriptions.items():
            counts = Backlog(name)
            heads: set[str] = set()
            ordered = sub.ref.kind == "stream"
            for row in sub.rows.values():
                behind = ordered and row.key is not None and row.key in heads
                if ordered and row.key is not None:
                    heads.add(row.key)
                if row.leased:
                    counts.leased += 1
                elif row.visible_at > now:
                    counts.delayed += 1
                    counts.next_due = min(counts.next_due or math.inf, row.visible_at)
                elif not behind:
                    counts.ready += 1
            found.append(counts)
        return found

    def next_due(self) -> float | None:
        """When the next delayed row becomes visible."""
        dues = [b.next_due for b in self.backlog() if b.next_due is not None]
        return min(dues, default=None)

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        await super().publish(messages)
        self._changed()

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        await super().settle(settlements)
        self._changed()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()


async def wait_changed(broker: VirtualBroker, at_most: float) -> None:
    """Wait until the broker's rows change (a publish or a settle), or ``at_most`` seconds."""
    with anyio.move_on_after(at_most):
        await broker.changed.wait()
