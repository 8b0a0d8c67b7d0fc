"""``rate="200/s"``: a token bucket per handler, per runner process.

Starts are spaced evenly (a bucket that holds one token), so no window of one period ever
holds more starts than the rate allows; N runner processes allow N times the rate between
them. Waiting happens before the handler starts, so the downstream store sees the limit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from eventfn.middleware import Call, Environment, Invocation

if TYPE_CHECKING:
    from eventfn.subscriptions import Subscription


class TokenBucket:
    """Hands out tokens at ``per_second``, holding at most ``burst`` unused ones.

    It is the generic cell rate algorithm: ``_due`` is when the bucket would be empty again.
    A grant moves it one interval past the later of itself and the moment of the grant (not
    the moment planned), so an overslept wait never lets the next start come early. Waiters
    are served in arrival order (one lock), so none is starved.
    """

    def __init__(
        self, per_second: float, burst: float = 1.0, clock: Callable[[], float] | None = None
    ) -> None:
        self.interval = 1.0 / per_second
        self.burst = burst
        self.clock = clock or anyio.current_time
        self._due = -float("inf")
        self._lock = anyio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            # up to ``burst`` grants may run ahead of the steady schedule
            wait = self._due - (self.burst - 1) * self.interval - self.clock()
            if wait > 0:
                await anyio.sleep(wait)
            self._due = max(self._due, self.clock()) + self.interval


def rate_limit(call_next: Call, subscription: Subscription, env: Environment) -> Call:
    """Wait for a token before each handler start when the subscription has ``rate=``."""
    rate = subscription.options.rate
    if rate is None:
        return call_next
    bucket = TokenBucket(rate.per_second, rate.burst)

    async def call(invocation: Invocation) -> Any:
        await bucket.acquire()
        return await call_next(invocation)

    return call
