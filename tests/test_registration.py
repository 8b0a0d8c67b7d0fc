"""Registration mistakes fail at import time, naming the handler and the fix."""

from __future__ import annotations

import msgspec
import pytest

import eventfn


class Order(msgspec.Struct):
    order_id: str


class OrderAccepted(msgspec.Struct):
    order_id: str


def test_decorators_return_the_function_unchanged() -> None:
    app = eventfn.App("shop")

    async def handler(order: Order) -> None: ...

    assert app.on_queue("orders")(handler) is handler
    assert [s.ref.name for s in app.subscriptions] == ["orders"]


def test_sync_handler_is_refused() -> None:
    app = eventfn.App("shop")
    with pytest.raises(
        eventfn.RegistrationError, match="is not an async function; write it as `async def`"
    ):

        @app.on_queue("orders")
        def handler(order: Order) -> None: ...


def test_unsupported_and_missing_annotations() -> None:
    app = eventfn.App("shop")
    with pytest.raises(
        eventfn.RegistrationError, match=r"parameter 'order' is annotated <class 'int'>"
    ):

        @app.on_queue("a")
        async def typed_int(order: int) -> None: ...

    with pytest.raises(eventfn.RegistrationError, match="parameter 'order' has no annotation"):

        @app.on_queue("b")
        async def untyped(order) -> None: ...  # type: ignore[no-untyped-def]

    with pytest.raises(eventfn.RegistrationError, match="more than one event parameter"):

        @app.on_queue("c")
        async def two(a: Order, b: Order) -> None: ...


def test_duplicate_group_and_kind_conflicts() -> None:
    app = eventfn.App("shop")

    @app.on_topic("order-events", group="email")
    async def first(order: Order) -> None: ...

    with pytest.raises(
        eventfn.RegistrationError,
        match=r"already handled by .*first; give each handler its own group=",
    ):

        @app.on_topic("order-events", group="email")
        async def second(order: Order) -> None: ...

    with pytest.raises(eventfn.RegistrationError, match=r"is a topic .* not a queue"):

        @app.on_queue("order-events")
        async def third(order: Order) -> None: ...


def test_bad_names_and_options() -> None:
    app = eventfn.App("shop")
    with pytest.raises(eventfn.InvalidDestination, match="name 'bad name' is not allowed"):
        app.on_queue("bad name")
    with pytest.raises(eventfn.RegistrationError, match="concurrency=0 must be a positive number"):

        @app.on_queue("jobs", concurrency=0)
        async def handler(order: Order) -> None: ...

    with pytest.raises(
        eventfn.RegistrationError, match=r"Retry\(after=\.\.\.\) is raised from inside"
    ):

        @app.on_queue("jobs2", retry=eventfn.Retry(after=3))
        async def handler2(order: Order) -> None: ...

    with pytest.raises(eventfn.RegistrationError, match=r"must be a msgspec\.Struct class"):
        app.on_event(dict)


def test_on_event_checks_the_parameter_type_and_names_the_type() -> None:
    app = eventfn.App("shop")
    with pytest.raises(eventfn.RegistrationError, match="annotate it as OrderAccepted"):

        @app.on_event(OrderAccepted, group="g")
        async def handler(order: Order) -> None: ...

    @app.on_event(OrderAccepted, group="reserve-inventory")
    async def reserve(event: OrderAccepted, ctx: eventfn.Context) -> None: ...

    (sub,) = app.subscriptions
    assert sub.ref.destination == "events" and sub.ref.kind == "topic"
    assert sub.ref.types == ("order.accepted",)


def test_default_group_is_the_handler_name() -> None:
    app = eventfn.App("shop")

    @app.on_topic("order-events")
    async def update_analytics(order: Order) -> None: ...

    assert app.subscriptions[0].ref.name == "order-events/update-analytics"


def test_event_type_names() -> None:
    class HTTPRequestReceived(msgspec.Struct):
        pass

    class Custom(msgspec.Struct):
        __event_type__ = "com.example.custom.v1"

    assert eventfn.event_type(OrderAccepted) == "order.accepted"
    assert eventfn.event_type(HTTPRequestReceived) == "http.request.received"
    assert eventfn.event_type(Custom) == "com.example.custom.v1"
