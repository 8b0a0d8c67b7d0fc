"""``eventfn asyncapi``: the document validates against the official AsyncAPI 3.0.0 JSON Schema
and says what the app does: a channel per destination, a receive operation per subscription, the
msgspec schemas of the events inside CloudEvents envelopes, and no password.

The schema is ``schemas/3.0.0.json`` of the npm package ``@asyncapi/specs``, which ``make unit``
fetches (pinned in the Makefile) into ``tests/.asyncapi/``. Without it these tests skip outside
CI and fail under ``CI=true``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
import referencing
from referencing.jsonschema import DRAFT7

import eventfn
from eventfn._asyncapi import ATTRIBUTES, add_parser, document, run
from eventfn.exceptions import ConfigurationError
from eventfn.sources.schedule import Tick
from examples.orders import shop

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "tests" / ".asyncapi" / "3.0.0.json"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
COMPONENT_KEY = re.compile(r"^[A-Za-z0-9_.\-]+$")  # AsyncAPI's ^[\w\d\.\-_]+$, ASCII as in JS


class Invalid(AssertionError):
    """The document is not a valid AsyncAPI 3.0.0 document."""


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    if not SCHEMA.is_file():
        problem = f"{SCHEMA.relative_to(ROOT)} is missing: `make unit` fetches it from npm"
        if IN_CI:
            pytest.fail(f"{problem}; under CI=true a missing schema is a failure")
        pytest.skip(problem)
    schema = json.loads(SCHEMA.read_text())
    assert schema["$id"] == "http://asyncapi.com/definitions/3.0.0/asyncapi.json"
    # The bundled file keeps each definition under its own $id: crawl them, so every $ref
    # resolves offline (the registry has no retrieve hook: an unknown URL raises, never fetches).
    registry = referencing.Registry().with_resource(schema["$id"], DRAFT7.create_resource(schema))
    return jsonschema.Draft7Validator(
        schema,
        registry=registry.crawl(),
        format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER,
    )


def validate(validator: jsonschema.Draft7Validator, doc: dict[str, Any]) -> None:
    """The official schema, plus what a schema cannot see: refs resolve, ids keep the pattern,
    and an operation's messages are messages of its own channel."""
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        raise Invalid("\n".join(f"{list(e.absolute_path)}: {e.message[:300]}" for e in errors))
    for ref in _refs(doc):
        _resolve(doc, ref)
    for section in ("channels", "operations"):
        _keys(doc.get(section, {}), section)
    for section, entries in doc.get("components", {}).items():
        _keys(entries, f"components.{section}")
    for ident, operation in doc.get("operations", {}).items():
        channel = operation["channel"]["$ref"]
        for message in operation.get("messages", []):
            if not message["$ref"].startswith(f"{channel}/messages/"):
                raise Invalid(f"operation {ident}: {message['$ref']} is not in {channel}")


def _refs(node: Any) -> list[str]:
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    if not isinstance(node, dict):
        return []
    own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
    return own + [ref for value in node.values() for ref in _refs(value)]


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    if not ref.startswith("#/"):
        raise Invalid(f"{ref}: not a reference inside the document")
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise Invalid(f"{ref}: nothing at {part!r}")
        node = node[part]
    return node


def _keys(entries: dict[str, Any], where: str) -> None:
    for key in entries:
        if not COMPONENT_KEY.match(key):
            raise Invalid(f"{where}: id {key!r} does not match {COMPONENT_KEY.pattern}")


def payload_validator(doc: dict[str, Any], message: str) -> jsonschema.Draft7Validator:
    """A validator of one message's payload, its $refs resolved in the document."""
    root = {"$ref": f"#/components/messages/{message}/payload", "components": doc["components"]}
    return jsonschema.Draft7Validator(root)


# -- an app with every shape --------------------------------------------------------------------


class Thumbnail(msgspec.Struct):
    """A picture to shrink."""

    path: str
    size: tuple[int, int] = (128, 128)


class Click(msgspec.Struct, rename="camel"):
    user_id: str
    page: str


class Cat(msgspec.Struct, tag=True):
    name: str


class Dog(msgspec.Struct, tag=True):
    barks: bool


class PetAdopted(msgspec.Struct):
    """A pet found a home."""

    pet: Cat | Dog


class Welcome(msgspec.Struct):
    user_id: str


class Odd(msgspec.Struct):
    blob: msgspec.Raw = msgspec.Raw(b"{}")  # msgspec has no JSON Schema for a Raw default


def mixed_app() -> eventfn.App:
    app = eventfn.App("mixed", event_bus="bus")

    @app.on_queue("thumbnails")
    async def make_thumbnail(job: Thumbnail) -> None:
        """Shrink one picture."""

    @app.on_topic("order-events", group="billing")
    async def bill(order: shop.OrderAccepted) -> None: ...

    @app.on_topic("order-events", group="audit")
    async def audit(raw: bytes) -> None: ...

    @app.on_stream("clicks", key="user_id", group="sessionize")
    async def sessionize(click: Click) -> None: ...

    @app.on_event(PetAdopted, group="celebrate", emits=[Welcome, "emails"])
    async def celebrate(event: PetAdopted, ctx: eventfn.Context) -> None: ...

    @app.on_event(shop.InventoryReserved, group="notify")
    async def notify(event: shop.InventoryReserved) -> None: ...

    @app.on_queue("raw-jobs", emits=["order-events"])
    async def raw(envelope: eventfn.Envelope) -> None: ...

    @app.on_queue("rows", batch=10)
    async def rows(items: list[dict[str, int]]) -> None: ...

    @app.on_queue("odd")
    async def odd(item: Odd) -> None: ...

    @app.on_upload("invoices", events=["created", "deleted"])
    async def extract(upload: eventfn.Upload) -> None: ...

    @app.on_schedule(every=60)
    async def poll(tick: Tick) -> None: ...

    return app


# -- the documents validate -----------------------------------------------------------------


def test_the_example_shop_validates_and_says_what_it_does(
    validator: jsonschema.Draft7Validator,
) -> None:
    doc = document(shop.app)
    validate(validator, doc)
    assert doc["asyncapi"] == "3.0.0" and doc["info"]["title"] == "shop"
    assert "servers" not in doc
    assert {c["address"] for c in doc["channels"].values()} == {"order-events", "events"}
    receive = {k: v for k, v in doc["operations"].items() if v["action"] == "receive"}
    assert len(receive) == len(shop.app.subscriptions) == 4
    channels = {k: v["channel"]["$ref"] for k, v in receive.items()}
    assert channels == {
        "reserve_inventory": "#/channels/order-events",
        "send_customer_email": "#/channels/order-events",
        "update_analytics": "#/channels/order-events",
        "notify_warehouse": "#/channels/events",
    }
    assert receive["send_customer_email"]["x-eventfn-group"] == "send-customer-email"
    schema = doc["components"]["schemas"]["OrderAccepted"]  # rename="camel"
    assert set(schema["properties"]) == {"orderId", "customerId", "units"}
    assert schema["required"] == ["orderId", "customerId"]
    emitted = doc["operations"]["reserve_inventory.emits.inventory.reserved"]
    assert emitted["action"] == "send" and emitted["channel"] == {"$ref": "#/channels/events"}
    message = doc["components"]["messages"]["inventory.reserved"]
    assert message["contentType"] == "application/cloudevents+json"
    payload = message["payload"]["properties"]
    assert payload["type"]["const"] == "inventory.reserved"
    assert payload["data"] == {"$ref": "#/components/schemas/InventoryReserved"}


@pytest.fixture(scope="module")
def mixed() -> tuple[eventfn.App, dict[str, Any]]:
    app = mixed_app()
    return app, document(app)


def test_an_app_with_every_shape_validates(
    validator: jsonschema.Draft7Validator, mixed: tuple[eventfn.App, dict[str, Any]]
) -> None:
    app, doc = mixed
    validate(validator, doc)
    addresses = {c["address"] for c in doc["channels"].values()}
    assert addresses == {s.ref.destination for s in app.subscriptions} | {"emails"}
    receive = [op for op in doc["operations"].values() if op["action"] == "receive"]
    assert len(receive) == len(app.subscriptions)
    for sub in app.subscriptions:
        (op,) = [op for op in receive if op["x-eventfn-handler"] == sub.name]
        channel = _resolve(doc, op["channel"]["$ref"])
        assert channel["address"] == sub.ref.destination
        assert channel["x-eventfn-kind"] == sub.ref.kind
        assert op.get("x-eventfn-group") == (sub.ref.group if sub.ref.kind != "queue" else None)
    on_topic = [op for op in receive if op["channel"] == {"$ref": "#/channels/order-events"}]
    assert sorted(op["x-eventfn-group"] for op in on_topic) == ["audit", "billing"]
    assert set(doc["channels"]["order-events"]["messages"]) == {"OrderAccepted", "CloudEvent"}
    assert doc["channels"]["clicks"]["x-eventfn-partitions"] == 16
    sends = {k: v for k, v in doc["operations"].items() if v["action"] == "send"}
    assert set(sends) == {
        "celebrate.emits.welcome",
        "celebrate.publishes.emails",
        "raw.publishes.order-events",
    }
    assert sends["celebrate.emits.welcome"]["channel"] == {"$ref": "#/channels/bus"}
    assert len(sends["raw.publishes.order-events"]["messages"]) == 2  # what the topic carries


def test_messages_carry_the_schemas_of_the_handlers_types(
    mixed: tuple[eventfn.App, dict[str, Any]],
) -> None:
    _, doc = mixed
    assert set(doc["components"]["schemas"]["Click"]["properties"]) == {"userId", "page"}
    generic = doc["components"]["messages"]["CloudEvent"]["payload"]["properties"]
    assert "data_base64" in generic and "data" in generic  # bytes and Envelope take any payload
    welcome = doc["components"]["messages"]["welcome"]["payload"]["properties"]
    assert welcome["type"]["const"] == "welcome"  # emits=[Welcome] keeps its type, not its class
    on_bus = {"pet.adopted", "inventory.reserved", "welcome"}
    assert set(doc["channels"]["bus"]["messages"]) == on_bus
    assert set(doc["channels"]["bucket.invoices"]["messages"]) == {
        "eventfn.upload.created",
        "eventfn.upload.deleted",
        "s3.notification",
    }
    tick = doc["components"]["messages"]["eventfn.schedule.tick"]["payload"]["properties"]
    assert tick["data"] == {"$ref": "#/components/schemas/Tick"}
    rows = _resolve(doc, doc["operations"]["rows"]["messages"][0]["$ref"])
    item = _resolve(doc, rows["$ref"])["payload"]["properties"]["data"]
    assert item == {"type": "object", "additionalProperties": {"type": "integer"}}  # per item
    pet = doc["components"]["schemas"]["PetAdopted"]["properties"]["pet"]
    assert "discriminator" not in pet and len(pet["anyOf"]) == 2
    odd = doc["components"]["messages"]["Odd"]["payload"]["properties"]["data"]
    assert "no JSON Schema" in odd["description"] and "Odd" not in doc["components"]["schemas"]
    size = doc["components"]["schemas"]["Thumbnail"]["properties"]["size"]
    assert size["items"] == [{"type": "integer"}] * 2 and size["additionalItems"] is False


def test_ids_are_made_valid_and_unique(validator: jsonschema.Draft7Validator) -> None:
    app = eventfn.App("ids")

    @app.on_queue("jobs:high")
    async def work(job: Thumbnail) -> None: ...

    @app.on_queue("jobs_high")
    async def other(job: Thumbnail) -> None: ...

    app.on_queue("jobs.low")(work)  # one function, two subscriptions
    doc = document(app)
    validate(validator, doc)
    assert {k: v["address"] for k, v in doc["channels"].items()} == {
        "jobs_high": "jobs:high",
        "jobs_high_2": "jobs_high",
        "jobs.low": "jobs.low",
    }
    assert set(doc["operations"]) == {"work", "other", "work.jobs.low"}


# -- the payload schemas describe real messages ---------------------------------------------


def test_the_payload_schemas_accept_the_envelopes_eventfn_publishes() -> None:
    doc = document(shop.app)
    assert set(ATTRIBUTES) == set(eventfn.Envelope.__struct_fields__)
    order = shop.OrderAccepted(order_id="o1", customer_id="c1")
    sent = json.loads(shop.app.message("order-events", order, key="k", subject="s").body)
    payload_validator(doc, "OrderAccepted").validate(sent)
    event = shop.InventoryReserved(order_id="o1", units=2)
    emitted = json.loads(shop.app.message(shop.app.event_bus, event).body)
    payload_validator(doc, "inventory.reserved").validate(emitted)
    with pytest.raises(jsonschema.ValidationError, match="orderId"):
        payload_validator(doc, "OrderAccepted").validate(sent | {"data": {"customerId": "c1"}})
    with pytest.raises(jsonschema.ValidationError, match=r"inventory\.reserved"):
        payload_validator(doc, "inventory.reserved").validate(emitted | {"type": "other"})


# -- invalid documents are rejected ---------------------------------------------------------


def _broken(doc: dict[str, Any], how: str) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    operation = doc["operations"]["reserve_inventory"]
    if how == "no asyncapi field":
        del doc["asyncapi"]
    elif how == "unknown action":
        operation["action"] = "consume"
    elif how == "channel not a reference":
        operation["channel"] = "order-events"
    elif how == "dangling channel ref":
        operation["channel"] = {"$ref": "#/channels/nowhere"}
    elif how == "message of another channel":
        operation["messages"] = [{"$ref": "#/channels/events/messages/inventory.reserved"}]
    elif how == "bad component key":
        doc["components"]["schemas"]["Order Accepted"] = {"type": "object"}
    return doc


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("no asyncapi field", "'asyncapi' is a required property"),
        ("unknown action", "'consume'"),
        ("channel not a reference", "'channel': 'order-events'"),
        ("dangling channel ref", "#/channels/nowhere: nothing at 'nowhere'"),
        ("message of another channel", "is not in #/channels/order-events"),
        ("bad component key", "'Order Accepted' does not match"),
    ],
)
def test_an_invalid_document_is_rejected(
    validator: jsonschema.Draft7Validator, how: str, reason: str
) -> None:
    validate(validator, document(shop.app))
    with pytest.raises(Invalid, match=re.escape(reason)):
        validate(validator, _broken(document(shop.app), how))


# -- servers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "protocol", "host"),
    [
        ("amqp://shop:s3cret@rabbit:5672/?namespace=prod", "amqp", "rabbit:5672"),
        ("redis://:s3cret@127.0.0.1:6379/0?namespace=prod", "redis", "127.0.0.1:6379"),
        ("nats://s3cret@nats.internal:4222?namespace=prod", "nats", "nats.internal:4222"),
        ("postgresql://shop:s3cret@db:5432/shop?namespace=prod", "postgresql", "db:5432"),
        ("sqlite:///shop.db", "sqlite", "localhost"),
    ],
)
def test_servers_come_from_the_broker_url_without_passwords(
    validator: jsonschema.Draft7Validator, url: str, protocol: str, host: str
) -> None:
    doc = document(shop.app, broker_url=url)
    validate(validator, doc)
    server = doc["servers"]["broker"]
    assert (server["protocol"], server["host"]) == (protocol, host)
    assert "s3cret" not in json.dumps(doc)
    if "namespace" in url:
        assert server["x-eventfn-namespace"] == "prod"


# -- the command ----------------------------------------------------------------------------


def command(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="eventfn")
    add_parser(parser.add_subparsers(dest="command"), "broker URL")
    return parser.parse_args(["asyncapi", *argv])


def test_the_command_prints_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EVENTFN_BROKER", raising=False)
    assert run(command("examples.orders.shop:app", "--api-version", "1.2.0")) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == document(shop.app, version="1.2.0") and "servers" not in printed
    monkeypatch.setenv("EVENTFN_BROKER", "redis://:s3cret@cache:6379/0")
    assert run(command("examples.orders.shop:app")) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["servers"]["broker"]["host"] == "cache:6379" and "s3cret" not in str(printed)


def test_the_command_writes_a_file(tmp_path: Path, validator: jsonschema.Draft7Validator) -> None:
    out = tmp_path / "shop.asyncapi.json"
    broker = "amqp://shop:s3cret@rabbit:5672/"
    assert run(command("examples.orders.shop:app", "-o", str(out), "--broker", broker)) == 0
    text = out.read_text()
    assert text.startswith('{\n  "asyncapi": "3.0.0"') and "s3cret" not in text
    validate(validator, json.loads(text))


def test_yaml_without_pyyaml_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now raises ImportError
    with pytest.raises(ConfigurationError, match=r"PyYAML.*pip install pyyaml.*\.json"):
        run(command("examples.orders.shop:app", "-o", str(tmp_path / "shop.yaml")))
    assert not (tmp_path / "shop.yaml").exists()


def test_yaml_with_pyyaml(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    out = tmp_path / "shop.asyncapi.yml"
    assert run(command("examples.orders.shop:app", "-o", str(out))) == 0
    text = out.read_text()
    assert text.startswith("asyncapi: 3.0.0") and "&id" not in text  # no YAML aliases
    assert yaml.safe_load(text) == document(shop.app)
