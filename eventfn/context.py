"""The per-message ``Context`` a handler can ask for by annotation."""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Generic

from typing_extensions import TypeVar

from eventfn.brokers.base import Delivery, OutgoingMessage
from eventfn.events import Envelope

if TYPE_CHECKING:
    from eventfn.app import App

_current: ContextVar[Context[Any] | None] = ContextVar("eventfn_context", default=None)

S = TypeVar("S", default=Any)
"""The lifespan state's type; a bare ``eventfn.Context`` means ``Context[Any]``."""


class Context(Generic[S]):
    """What a handler knows about the message it is handling, and its way to emit events.

    Events emitted here (or with ``app.emit``/``app.publish`` while the handler runs) are
    published only if the handler succeeds, together with the ack::

        @app.on_event(OrderAccepted, group="reserve-inventory")
        async def reserve(event: OrderAccepted, ctx: eventfn.Context) -> None:
            ctx.log.info("reserving for %s (attempt %d)", event.order_id, ctx.attempt)
            await ctx.emit(InventoryReserved(order_id=event.order_id))

    Annotated ``eventfn.Context[Resources]``, its :attr:`state` is typed as what the app's
    lifespan yields.
    """

    __slots__ = ("_app", "delivery", "emitted", "envelope", "subscription")

    def __init__(self, app: App, subscription: str, delivery: Delivery, envelope: Envelope) -> None:
        self._app = app
        self.subscription = subscription
        self.delivery = delivery
        self.envelope = envelope
        self.emitted: list[OutgoingMessage] = []

    @property
    def state(self) -> S:
        """What the app's ``@app.lifespan`` yielded: resources opened once per runner."""
        return self._app.state  # type: ignore[no-any-return]

    @property
    def attempt(self) -> int:
        """Which delivery of this message this is: 1 the first time."""
        return self.delivery.attempt

    @property
    def message_id(self) -> str:
        """The message's id (the CloudEvents ``id``), the same on every attempt."""
        return self.envelope.id

    @property
    def key(self) -> str | None:
        """The partition key of a stream record."""
        return self.envelope.partitionkey

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose lines carry the message id, subscription and attempt."""
        return logging.LoggerAdapter(
            logging.getLogger("eventfn.handler"),
            {
                "message_id": self.message_id,
                "subscription": self.subscription,
                "attempt": self.attempt,
            },
        )

    async def emit(self, event: Any, *, key: str | None = None, subject: str | None = None) -> str:
        """Emit a domain event on the app's event bus once this handler succeeds; its id."""
        return await self._app.emit(event, key=key, subject=subject)

    async def publish(
        self,
        destination: str,
        data: Any,
        *,
        type: str | None = None,
        key: str | None = None,
        subject: str | None = None,
    ) -> str:
        """Publish to a destination once this handler succeeds; returns the message id."""
        return await self._app.publish(destination, data, type=type, key=key, subject=subject)


def current() -> Context[Any] | None:
    """The context of the handler running in this task, if any."""
    return _current.get()
