"""``rate="200/s"``: a token bucket per handler, per runner process.

Starts are spaced evenly, and no window of the rate's period (a second for ``/s``) ever holds
more grants than the rate allows; N runner processes allow N times the rate between them.
Waiting happens before the handler starts, so the downstream store sees the limit. A handler
starts a few µs after its grant, on the same turn of the event loop; only a pause of the whole
interpreter in between (a garbage collection of a large heap) can move a start by more than the
millisecond of margin kept, and so let one start more into a window (the benchmark suite saw
2,001 starts in one second at 2,000/s once, on RabbitMQ, where the runner is busiest).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from eventfn.middleware import Call, Environment, Invocation

if TYPE_CHECKING:
    from eventfn.subscriptions import Subscription


class TokenBucket:
    """Hands out tokens at ``per_second``, holding at most ``burst`` unused ones.

    It is the generic cell rate algorithm: ``_due`` is when the bucket would be empty again,
    and each grant moves it one interval on. The schedule is kept, not restarted, when a wait
    ends late: an event loop wakes a timer up to a millisecond or more past its time (more when
    it is busy), and restarting from the late moment would lose that much per grant, which
    caps a limiter at roughly one start per millisecond whatever its rate. A grant may therefore
    catch up on at most ``slack`` seconds of schedule; a bucket idle for longer starts afresh.
    What catching up could let through in one ``window`` is refused by the window itself: the
    last ``per_second * window + burst - 1`` grants are remembered, and a grant waits until the
    oldest of them is a whole window old. Waiters are served in arrival order (one lock), so
    none is starved.
    """

    _MAX_REMEMBERED = 65_536  # a faster limit keeps to the schedule alone (within ``slack``)

    def __init__(
        self,
        per_second: float,
        burst: float = 1.0,
        clock: Callable[[], float] | None = None,
        *,
        window: float = 1.0,
        slack: float = 0.01,
    ) -> None:
        self.interval = 1.0 / per_second
        self.burst = burst
        self.window = window
        self.slack = slack
        self.clock = clock or anyio.current_time
        self._due = -float("inf")
        self._lock = anyio.Lock()
        allowed = int(per_second * window + burst - 1 + 1e-9)
        self._recent: deque[float] | None = (
            deque(maxlen=allowed) if 1 <= allowed <= self._MAX_REMEMBERED else None
        )

    async def acquire(self) -> None:
        async with self._lock:
            now = self.clock()
            due = self._due if self._due > now - self.slack else now
            # up to ``burst`` grants may run ahead of the steady schedule
            start = due - (self.burst - 1) * self.interval
            recent = self._recent
            if recent is not None and len(recent) == recent.maxlen:
                # a millisecond more: a handler starts a few µs after its grant, by a jitter
                # that must not let two starts a window apart fall within one window
                start = max(start, recent[0] + self.window + 0.001)
            if start > now:
                await anyio.sleep(start - now)
            self._due = due + self.interval
            if recent is not None:
                recent.append(max(self.clock(), start))


def rate_limit(call_next: Call, subscription: Subscription, env: Environment) -> Call:
    """Wait for a token before each handler start when the subscription has ``rate=``."""
    rate = subscription.options.rate
    if rate is None:
        return call_next
    bucket = TokenBucket(rate.per_second, rate.burst, window=rate.period)

    async def call(invocation: Invocation) -> Any:
        await bucket.acquire()
        return await call_next(invocation)

    return call
