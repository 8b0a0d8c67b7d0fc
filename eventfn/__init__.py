"""eventfn: plain async functions that react to queues, topics, streams and domain events.

>>> app = eventfn.App("shop")
>>> @app.on_event(OrderAccepted, group="reserve-inventory")
... async def reserve_inventory(event: OrderAccepted) -> None: ...
"""

from eventfn.app import App
from eventfn.batch import BatchResult
from eventfn.brokers.base import Broker, DeadLetterRecord, Delivery, SubscriptionRef
from eventfn.context import Context
from eventfn.deadletters import DeadLetterQueue
from eventfn.events import Envelope, event_type
from eventfn.exceptions import (
    BrokerError,
    BrokerUnavailable,
    ConfigurationError,
    DeadLetter,
    DecodeError,
    Drop,
    EventfnError,
    InvalidDestination,
    PayloadTooLarge,
    PublishError,
    RegistrationError,
    UnknownBrokerError,
    UnknownDestination,
)
from eventfn.options import HandlerOptions
from eventfn.retry import Retry
from eventfn.router import Router
from eventfn.runtime.breaker import CircuitBreaker
from eventfn.runtime.runner import Runner, Summary
from eventfn.sources.schedule import Tick
from eventfn.sources.upload import ObjectNotLocal, Upload

__version__ = "0.1.0"

__all__ = [
    "App",
    "BatchResult",
    "Broker",
    "BrokerError",
    "BrokerUnavailable",
    "CircuitBreaker",
    "ConfigurationError",
    "Context",
    "DeadLetter",
    "DeadLetterQueue",
    "DeadLetterRecord",
    "DecodeError",
    "Delivery",
    "Drop",
    "Envelope",
    "EventfnError",
    "HandlerOptions",
    "InvalidDestination",
    "ObjectNotLocal",
    "PayloadTooLarge",
    "PublishError",
    "RegistrationError",
    "Retry",
    "Router",
    "Runner",
    "SubscriptionRef",
    "Summary",
    "Tick",
    "UnknownBrokerError",
    "UnknownDestination",
    "Upload",
    "event_type",
]
