"""Brokers, chosen by URL scheme through the ``eventfn.brokers`` entry-point group."""

from __future__ import annotations

import time
from importlib.metadata import entry_points
from urllib.parse import urlsplit

from eventfn.brokers.base import (
    Broker,
    Clock,
    DeadLetterRecord,
    Delivery,
    Failure,
    Kind,
    OutgoingMessage,
    Settlement,
    SubscriptionRef,
    SubscriptionStats,
    partition_of,
    redact_url,
)
from eventfn.exceptions import UnknownBrokerError

DEFAULT_URL = "sqlite:///eventfn.db"

__all__ = [
    "DEFAULT_URL",
    "Broker",
    "DeadLetterRecord",
    "Delivery",
    "Failure",
    "Kind",
    "OutgoingMessage",
    "Settlement",
    "SubscriptionRef",
    "SubscriptionStats",
    "from_url",
    "installed_schemes",
    "partition_of",
    "redact_url",
]

_ALIASES = {"postgres": "postgresql", "rediss": "redis", "amqps": "amqp", "tls": "nats"}


def installed_schemes() -> list[str]:
    """The URL schemes of every installed broker, sorted."""
    return sorted({ep.name for ep in entry_points(group="eventfn.brokers")})


def from_url(url: str, *, clock: Clock = time.time) -> Broker:
    """Make the broker for ``url`` (not yet connected).

    >>> broker = from_url("sqlite:///shop.db")
    """
    scheme = urlsplit(url).scheme.lower()
    if not scheme:
        raise UnknownBrokerError(
            f"broker URL {redact_url(url)!r} has no scheme; write it like sqlite:///eventfn.db "
            f"(installed schemes: {', '.join(installed_schemes())})"
        )
    scheme = _ALIASES.get(scheme, scheme)
    found = [ep for ep in entry_points(group="eventfn.brokers") if ep.name == scheme]
    if not found:
        raise UnknownBrokerError(
            f"no installed broker handles {scheme}:// (in {redact_url(url)!r}); installed schemes: "
            f"{', '.join(installed_schemes())}. A networked broker comes from its plug-in: "
            f"pip install eventfn-{scheme} (plugins/{scheme} in the eventfn repository)"
        )
    cls = found[0].load()
    if not (isinstance(cls, type) and issubclass(cls, Broker)):
        raise UnknownBrokerError(
            f"entry point {found[0].value!r} for {scheme}:// is not an eventfn Broker subclass"
        )
    return cls(url, clock=clock)
