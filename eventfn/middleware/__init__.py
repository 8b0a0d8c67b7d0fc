"""Middleware: small async wrappers around the handler call, composed once at start-up.

A middleware is a callable ``(call_next, subscription, env) -> call``; the runner builds each
subscription's chain with :func:`build_chain`, outermost first, and never changes it after. A
middleware that has nothing to do for a subscription returns ``call_next`` itself, so it costs
nothing on that subscription's hot path. ``env`` gives what the runner shares: the broker, the
clock, and stores such as the idempotency store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from eventfn.brokers.base import Broker, Delivery
from eventfn.context import Context
from eventfn.events import Envelope

if TYPE_CHECKING:
    from eventfn.idempotency import IdempotencyStore
    from eventfn.subscriptions import Subscription


class Invocation:
    """One call of a handler: the decoded arguments and what they came from."""

    __slots__ = ("args", "context", "delivery", "envelope", "subscription")

    def __init__(
        self,
        subscription: Subscription,
        delivery: Delivery,
        envelope: Envelope,
        args: list[Any],
        context: Context[Any],
    ) -> None:
        self.subscription = subscription
        self.delivery = delivery
        self.envelope = envelope
        self.args = args
        self.context = context


class Environment:
    """What middleware may use from the runner that builds it."""

    def __init__(self, broker: Broker, clock: Callable[[], float]) -> None:
        self.broker = broker
        self.clock = clock
        self.idempotency: IdempotencyStore | None = None


Call = Callable[[Invocation], Awaitable[Any]]
Middleware = Callable[[Call, "Subscription", Environment], Call]


def handler_call(subscription: Subscription) -> Call:
    """The innermost call: the user's handler with its decoded arguments."""
    handler = subscription.handler

    async def call(invocation: Invocation) -> Any:
        return await handler(*invocation.args)

    return call


def timeout(call_next: Call, subscription: Subscription, env: Environment) -> Call:
    """Fail a handler that runs longer than its ``timeout`` with ``TimeoutError``."""
    limit = subscription.timeout
    if limit is None:
        return call_next

    async def call(invocation: Invocation) -> Any:
        # asyncio's own timeout costs half of anyio.fail_after per call (about 5 us, not 10),
        # and the runner is asyncio-only anyway (aiosqlite is); both raise TimeoutError
        async with asyncio.timeout(limit):
            return await call_next(invocation)

    return call


def build_chain(
    subscription: Subscription, middleware: Sequence[Middleware], env: Environment
) -> Call:
    """Compose ``middleware`` (outermost first) around the handler call."""
    call = handler_call(subscription)
    for layer in reversed(middleware):
        call = layer(call, subscription, env)
    return call


# The layers live in their own modules, which import the names above: import them last.
from eventfn.middleware.idempotency import idempotency  # noqa: E402
from eventfn.middleware.ratelimit import rate_limit  # noqa: E402

DEFAULT_MIDDLEWARE: tuple[Middleware, ...] = (idempotency, rate_limit, timeout)
"""The default chain, outermost first."""
