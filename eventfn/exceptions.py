"""Errors raised by eventfn, and the control-flow signals a handler may raise.

The error tree::

    EventfnError
     ├── ConfigurationError        a mistake in how eventfn is set up; fails at import or start-up
     │    ├── RegistrationError    a handler that cannot be registered (names it and the fix)
     │    └── UnknownBrokerError   a broker URL whose scheme no installed broker handles
     ├── BrokerError               the broker failed an operation
     │    └── BrokerUnavailable    the broker cannot be reached (URL shown, password redacted)
     ├── PublishError              a message was refused before it reached the broker
     │    ├── PayloadTooLarge      the encoded envelope is over the configured limit
     │    ├── InvalidDestination   a destination name that is not allowed
     │    └── UnknownDestination   nothing has declared that destination yet
     └── DecodeError               an envelope or payload that cannot be decoded (a poison message)

Control-flow signals, raised by a handler to say what happened (see ``DESIGN.md`` section 4)::

    Retry(after=30)        retry at a time the handler chooses; counted as an attempt
    Drop("reason")         ack without effect; logged and counted
     └── Duplicate          (raised by the idempotency middleware) the effect already happened
    DeadLetter("reason")   straight to the dead-letter queue; no retries

``Retry`` doubles as the retry *policy* given to a decorator (``retry=Retry(attempts=5)``); the
policy itself lives in :mod:`eventfn.retry`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from eventfn.brokers.base import OutgoingMessage


class EventfnError(Exception):
    """Base class of every error eventfn raises."""


class ConfigurationError(EventfnError):
    """eventfn is set up wrongly; the message says how to fix it."""


class RegistrationError(ConfigurationError):
    """A handler cannot be registered; the message names the handler and the fix."""


class UnknownBrokerError(ConfigurationError):
    """No installed broker handles the URL's scheme."""


class BrokerError(EventfnError):
    """The broker failed an operation."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached."""


class PublishError(EventfnError):
    """A message was refused before it reached the broker."""


class PayloadTooLarge(PublishError):
    """The encoded envelope is larger than the configured limit."""


class InvalidDestination(PublishError):
    """The destination name is not allowed."""


class UnknownDestination(PublishError):
    """No subscription has declared the destination, so the message would have nowhere to go."""


class DecodeError(EventfnError):
    """An envelope or payload cannot be decoded or fails validation (a poison message)."""


class Drop(Exception):
    """Raise from a handler to acknowledge a message without effect.

    >>> raise Drop("order was cancelled before it shipped")
    """

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


class Filtered(Drop):
    """Raised while building a handler's arguments: the message is not for this handler (an
    object event that its ``match``, ``prefix``, ``suffix`` or ``events`` leave out). It is
    acked quietly and counted as dropped."""


class Duplicate(Drop):
    """Raised by the idempotency middleware: this message's effect has already happened.

    The message is acked without running the handler; ``emitted`` are the events the first,
    successful run emitted, published again (same ids) in case that run's ack was lost.
    """

    def __init__(self, reason: str = "", emitted: tuple[OutgoingMessage, ...] = ()) -> None:
        super().__init__(reason)
        self.emitted = emitted


class DeadLetter(Exception):
    """Raise from a handler to send a message straight to the dead-letter queue, without retries.

    >>> raise DeadLetter("customer does not exist")
    """

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
