"""The retry policy, which is also the ``Retry`` signal a handler may raise.

One class plays both parts so that users learn one name::

    @app.on_queue("emails", retry=eventfn.Retry(attempts=5, backoff=1.0, cap=60))
    async def send(email: Email) -> None:
        if provider.busy():
            raise eventfn.Retry(after=30)   # counted as an attempt, delay chosen here

Delays are waited out in the broker (delayed redelivery), never in a sleeping task.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Literal

from eventfn.exceptions import ConfigurationError

Jitter = Literal["full", "equal", "none"]
Verdict = Literal["retry", "dead"]


class Retry(Exception):
    """A retry policy (given to a decorator) or a retry signal (raised by a handler).

    Args:
        attempts: deliveries in all, the first included, before a message is dead-lettered.
        backoff: delay in seconds before the second attempt.
        factor: growth of the delay per attempt (exponential backoff).
        cap: the longest delay, in seconds.
        jitter: ``"full"`` (uniform in ``[0, delay]``, the default, which spreads retry storms),
            ``"equal"`` (uniform in ``[delay/2, delay]``) or ``"none"``.
        on: exception types that are retried (default: every ``Exception``).
        never: exception types that are never retried (dead-lettered at once); wins over ``on``.
        after: only when raised: retry after this many seconds instead of the policy's delay.
    """

    def __init__(
        self,
        *,
        attempts: int = 5,
        backoff: float = 1.0,
        factor: float = 2.0,
        cap: float = 300.0,
        jitter: Jitter = "full",
        on: tuple[type[BaseException], ...] = (Exception,),
        never: tuple[type[BaseException], ...] = (),
        after: float | None = None,
    ) -> None:
        super().__init__(f"retry after {after}s" if after is not None else "retry")
        if attempts < 1:
            raise ConfigurationError(f"Retry(attempts={attempts}): attempts must be at least 1")
        if backoff < 0 or cap < 0 or factor < 1:
            raise ConfigurationError(
                "Retry(backoff, factor, cap): backoff and cap must be >= 0 and factor >= 1"
            )
        if jitter not in ("full", "equal", "none"):
            raise ConfigurationError(f"Retry(jitter={jitter!r}): use 'full', 'equal' or 'none'")
        if after is not None and after < 0:
            raise ConfigurationError(f"Retry(after={after}): after must be >= 0")
        self.attempts = attempts
        self.backoff = backoff
        self.factor = factor
        self.cap = cap
        self.jitter: Jitter = jitter
        self.on = on
        self.never = never
        self.after = after

    def __repr__(self) -> str:
        if self.after is not None:
            return f"Retry(after={self.after})"
        return (
            f"Retry(attempts={self.attempts}, backoff={self.backoff}, factor={self.factor}, "
            f"cap={self.cap}, jitter={self.jitter!r})"
        )

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before the delivery that follows failed attempt number ``attempt``."""
        base = min(self.cap, self.backoff * self.factor ** max(0, attempt - 1))
        if self.jitter == "full":
            return base * rand()
        if self.jitter == "equal":
            return base / 2 + base / 2 * rand()
        return base

    def classify(self, exc: BaseException, attempt: int) -> Verdict:
        """Whether failed attempt number ``attempt`` (raising ``exc``) is retried or dead."""
        if isinstance(exc, self.never) or not isinstance(exc, self.on):
            return "dead"
        return "retry" if attempt < self.attempts else "dead"
