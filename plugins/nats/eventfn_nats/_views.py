"""This instance's view of the destinations and subscriptions it fetches from."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from eventfn.brokers.base import OutgoingMessage, SubscriptionRef
from eventfn_nats._names import token
from eventfn_nats._puller import Puller


def nak(delay: float) -> bytes:
    return b'-NAK {"delay": %d}' % int(delay * 1e9) if delay > 0 else b"-NAK"


@dataclass(eq=False)
class Destination:
    """This instance's view of a destination: the mover of its delayed messages."""

    name: str
    later: Puller
    next_look: float = 0.0  # monotonic: when to look for due delayed messages again
    next_due: float = math.inf  # epoch: the earliest delayed message seen not due yet


@dataclass(eq=False)
class Subscription:
    ref: SubscriptionRef
    puller: Puller
    destination: Destination
    types: frozenset[str] | None = None  # type tokens a topic group takes (None: all)
    group: str = ""
    next_sweep: float = 0.0
    ordered: bool = field(init=False)
    filtered: bool = field(init=False)

    def __post_init__(self) -> None:
        self.group = token(self.ref.group)
        self.ordered = self.ref.kind == "stream"
        self.filtered = self.ref.kind == "topic"
        if self.ref.kind == "topic" and self.ref.types is not None:
            self.types = frozenset(token(t) for t in self.ref.types)

    def takes(self, subject: str) -> bool:
        """A topic message on ``{type}.{route}``: for every group (``~``) or this one only."""
        head, _, route = subject.rpartition(".")
        if route != "~" and route != self.group:
            return False
        return self.types is None or head.rpartition(".")[2] in self.types


def moved(
    destination: str, body: bytes, headers: dict[str, str], key: str | None
) -> OutgoingMessage:
    return OutgoingMessage(
        destination=destination,
        id=headers.get("Ef-Id") or headers["Nats-Msg-Id"],
        type=headers.get("Ef-Type", ""),
        body=body,
        key=key,
        published_at=float(headers["Ef-Pub"]),
    )
