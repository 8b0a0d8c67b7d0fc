"""``eventfn asyncapi``: an app's channels, messages and operations as an AsyncAPI 3.0 document.

Channels are destinations: those the app consumes (queues, topics, streams, its event bus,
``bucket.<name>`` and ``schedule.<name>``) and those its handlers declare they publish to. Every
message is a CloudEvents 1.0 envelope in JSON structured mode (``application/cloudevents+json``),
so a message's payload is the envelope, whose ``data`` is the JSON Schema msgspec makes of the
handler's type (one shared ``components.schemas``). Each subscription is a ``receive`` operation,
each ``emits=`` target a ``send`` operation. Ids keep to AsyncAPI's component key pattern.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import sys
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

import msgspec
from msgspec import Struct

import eventfn
from eventfn.app import App
from eventfn.events import event_type
from eventfn.exceptions import ConfigurationError
from eventfn.runtime.sources import TICK_TYPE
from eventfn.sources.records import CREATED, DELETED, UploadRecord
from eventfn.sources.schedule import Tick
from eventfn.subscriptions import Subscription

ASYNCAPI = "3.0.0"
CONTENT_TYPE = "application/cloudevents+json"
_SCHEMAS = "#/components/schemas/"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")  # AsyncAPI component keys: ^[\w\d\.\-_]+$ (ASCII)
_DATA_KEYWORDS = frozenset({"default", "const", "enum", "examples", "example"})

ATTRIBUTES: dict[str, dict[str, Any]] = {
    "specversion": {"type": "string", "const": "1.0", "description": "CloudEvents version"},
    "id": {"type": "string", "description": "message id (a UUIDv7 unless the publisher set one)"},
    "source": {"type": "string", "format": "uri-reference", "description": "`/<app>` if eventfn"},
    "type": {"type": "string", "description": "CloudEvents type"},
    "time": {"type": "string", "format": "date-time", "description": "when it was published"},
    "subject": {"type": "string"},
    "datacontenttype": {"type": "string", "examples": ["application/json"]},
    "dataschema": {"type": "string", "format": "uri"},
    "data": {"description": "the event, as JSON"},
    "data_base64": {"type": "string", "contentEncoding": "base64", "description": "binary data"},
    "traceparent": {"type": "string", "description": "W3C trace context of the send span"},
    "tracestate": {"type": "string"},
    "partitionkey": {"type": "string", "description": "the partition key of a stream record"},
}
"""The attributes of :class:`eventfn.Envelope`, as JSON Schema."""

_LITERALS: dict[str, dict[str, Any]] = {
    "s3.notification": {
        "type": "object",
        "description": 'An S3 or MinIO notification ({"Records": [...]}), an EventBridge event '
        'from S3 ("source": "aws.s3") or the s3:TestEvent; read into upload records.',
    },
}
"""Data described by hand: a message spec names one instead of giving a type."""

_KINDS = {
    "queue": "each message is handled by one consumer among all runners; no order",
    "topic": "every subscriber group gets its own copy, with its own retries and dead letters",
    "stream": "records of one key (partitionkey) are handled one at a time, in publish order",
}


class _Spec(NamedTuple):
    """A kind of message: its fixed CloudEvents type, if any, and its data: a type msgspec
    describes, a key of ``_LITERALS``, or None for any payload."""

    type: str | None
    data: Any


def document(app: App, *, broker_url: str | None = None, version: str = "0.0.0") -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of ``app``, as JSON-ready data.

    ``broker_url`` adds a ``servers`` entry (without user info); ``version`` is ``info.version``.

    >>> doc = document(shop.app, broker_url="redis://:secret@cache:6379/0")
    >>> doc["channels"]["order-events"]["address"], doc["servers"]["broker"]["host"]
    ('order-events', 'cache:6379')
    """
    return _Builder(app).build(broker_url, version)


class _Builder:
    def __init__(self, app: App) -> None:
        self.app = app
        self.known = _event_classes(app.subscriptions)
        self.channels: dict[str, dict[str, Any]] = {}
        self.channel_ids: dict[str, str] = {}  # destination -> channel id
        self.messages: dict[str, dict[str, Any]] = {}
        self.message_ids: dict[_Spec, str] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.received = [(sub, self.receives(sub)) for sub in app.subscriptions]
        self.sent = [
            (sub, dest, specs) for sub in app.subscriptions for dest, specs in self.sends(sub)
        ]
        specs = [s for _, found in self.received for s in found]
        specs += [s for _, _, found in self.sent for s in found]
        self.schemas = _Schemas(s.data for s in specs if not isinstance(s.data, str | None))

    def build(self, broker_url: str | None, version: str) -> dict[str, Any]:
        for sub, specs in self.received:
            self.receive(sub, specs)
        for sub, destination, specs in self.sent:  # after: a channel's messages are all known
            self.send(sub, destination, specs)
        name = self.app.name
        about = (
            f"Channels, messages and operations of the eventfn app `{name}`. Every message is a "
            "CloudEvents 1.0 envelope in JSON structured mode whose `data` is the event; domain "
            f"events travel on the topic `{self.app.event_bus}`."
        )
        info = {"title": name, "version": version, "description": about}
        doc: dict[str, Any] = {"asyncapi": ASYNCAPI, "id": f"urn:eventfn:{name}"}
        doc["info"] = info | {"x-eventfn-version": eventfn.__version__}
        doc["defaultContentType"] = CONTENT_TYPE
        if broker_url:
            doc["servers"] = {"broker": server(broker_url)}
        doc |= {"channels": self.channels, "operations": self.operations}
        doc["components"] = {"schemas": self.schemas.components, "messages": self.messages}
        return doc

    def receives(self, sub: Subscription) -> list[_Spec]:
        if sub.trigger == "schedule":
            return [_Spec(TICK_TYPE, Tick)]
        if sub.trigger == "upload":
            deletions = self.app.watched.get(sub.ref.destination.removeprefix("bucket."), False)
            specs = [_Spec(CREATED, UploadRecord)] + [_Spec(DELETED, UploadRecord)] * deletions
            return [*specs, _Spec(None, "s3.notification")]
        hint = _data_hint(sub)
        if sub.ref.types:
            return [_Spec(t, hint or self.known.get(t)) for t in sub.ref.types]
        return [_Spec(None, hint)]

    def sends(self, sub: Subscription) -> list[tuple[str, list[_Spec]]]:
        emits = sub.options.emits
        if emits is None:
            return []
        targets = [(self.app.event_bus, [_Spec(t, self.known.get(t))]) for t in emits.events]
        return targets + [(name, []) for name in emits.destinations]

    def channel(self, destination: str, kind: str | None, partitions: int = 1) -> str:
        if destination in self.channel_ids:
            return self.channel_ids[destination]
        bus = destination == self.app.event_bus
        kind = kind or ("topic" if bus else None)
        what = f"{kind} `{destination}`: {_KINDS[kind]}" if kind in _KINDS else ""
        if bus:
            what = f"The event bus of app `{self.app.name}`, a {what}; domain events by type."
        elif kind is None:
            what = f"`{destination}`: handlers of this app publish to it; none consumes it here."
        channel: dict[str, Any] = {"address": destination, "description": what, "messages": {}}
        if kind is not None:
            channel["x-eventfn-kind"] = kind
        if kind == "stream":
            channel["x-eventfn-partitions"] = partitions
        ident = self.channel_ids[destination] = _unique(destination, self.channels)
        self.channels[ident] = channel
        return ident

    def message(self, channel: str, spec: _Spec) -> dict[str, str]:
        """A reference to the channel's message of ``spec`` (added to both if new)."""
        ident = self.message_ids.get(spec)
        if ident is None:
            name = spec.type or self.schemas.name(spec.data)
            ident = self.message_ids[spec] = _unique(name, self.messages)
            self.messages[ident] = self.message_object(spec, name)
        self.channels[channel]["messages"][ident] = {"$ref": f"#/components/messages/{ident}"}
        return {"$ref": f"#/channels/{channel}/messages/{ident}"}

    def message_object(self, spec: _Spec, name: str) -> dict[str, Any]:
        data = _LITERALS.get(spec.data) if isinstance(spec.data, str) else None
        if data is None and spec.data is not None:
            data = self.schemas.of(spec.data)
        struct = isinstance(spec.data, type) and issubclass(spec.data, Struct)
        message: dict[str, Any] = {"name": name, "title": spec.data.__name__ if struct else name}
        about = _summary(spec.data) if struct else None
        if spec.data is None:
            about = "Any CloudEvents message: JSON `data`, or binary `data_base64`."
            if spec.type is not None:
                about = "No handler of this app takes its class, so its `data` is open here."
        message |= {"summary": about} if about else {}
        message["contentType"] = CONTENT_TYPE
        message["payload"] = payload = _envelope(spec.type, data)
        if spec.type is None and struct:
            payload["properties"]["type"]["examples"] = [event_type(spec.data)]
        return message

    def receive(self, sub: Subscription, specs: list[_Spec]) -> None:
        ref = sub.ref
        channel = self.channel(ref.destination, ref.kind, ref.partitions)
        short = sub.name.rsplit(".", 1)[-1]
        where = f"{', '.join(ref.types)} on " if ref.types else ""
        where += f"{ref.kind} `{ref.destination}`"
        group = ref.group if ref.kind != "queue" else None
        operation: dict[str, Any] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{channel}"},
            "summary": f"{short} handles {where}" + (f" as group `{group}`" if group else ""),
        }
        description = inspect.getdoc(sub.handler)
        operation |= {"description": description} if description else {}
        operation["messages"] = [self.message(channel, spec) for spec in specs]
        extra: dict[str, Any] = {"handler": sub.name, "trigger": sub.trigger, "group": group}
        extra |= {"kind": ref.kind, "subscription": ref.name, "concurrency": sub.concurrency}
        extra["batch"] = sub.batch[0] if sub.batch else None
        operation |= {f"x-eventfn-{k}": v for k, v in extra.items() if v is not None}
        self.operations[_unique(short, self.operations, f"{short}.{ref.name}")] = operation

    def send(self, sub: Subscription, destination: str, specs: list[_Spec]) -> None:
        channel = self.channel(destination, None)
        short = sub.name.rsplit(".", 1)[-1]
        verb, target = ("emits", specs[0].type) if specs else ("publishes", destination)
        refs = [self.message(channel, spec) for spec in specs]
        if not refs:  # a destination: whatever its channel carries, else any message
            if not self.channels[channel]["messages"]:
                self.message(channel, _Spec(None, None))
            refs = [
                {"$ref": f"#/channels/{channel}/messages/{m}"}
                for m in self.channels[channel]["messages"]
            ]
        self.operations[_unique(f"{short}.{verb}.{target}", self.operations)] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel}"},
            "summary": f"{short} {verb} {target} (declared with emits=)",
            "messages": refs,
            "x-eventfn-handler": sub.name,
        }


def _envelope(type: str | None, data: dict[str, Any] | None) -> dict[str, Any]:
    properties = {name: dict(schema) for name, schema in ATTRIBUTES.items()}
    required = ["specversion", "id", "source", "type"]
    if type is not None:
        properties["type"] = {"type": "string", "const": type}
    if data is not None:  # decoded as JSON: a binary payload would be dead-lettered
        properties["data"] = data
        del properties["data_base64"]
        required.append("data")
    return {"type": "object", "required": required, "properties": properties}


def server(url: str) -> dict[str, Any]:
    """The AsyncAPI server of a broker URL, without its user info and query: no password.

    >>> server("amqp://user:secret@rabbit:5672/?namespace=prod")["host"]
    'rabbit:5672'
    """
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    found: dict[str, Any] = {"host": host or "localhost", "protocol": parts.scheme or "unknown"}
    if parts.path not in ("", "/"):
        found["pathname"] = parts.path
    found["description"] = f"eventfn broker at {parts.scheme}://{host}{parts.path}"
    namespace = parse_qs(parts.query).get("namespace")
    if namespace:
        found["x-eventfn-namespace"] = namespace[0]
    return found


class _Schemas:
    """JSON Schemas of the data types, from msgspec, with one shared components section."""

    def __init__(self, types: Iterable[Any]) -> None:
        usable = [t for t in dict.fromkeys(types) if _describable(t)]
        refs, found = msgspec.json.schema_components(usable, ref_template=_SCHEMAS + "{name}")
        self.renamed: dict[str, str] = {}
        for name in found:
            self.renamed[name] = _unique(name, self.renamed.values())
        self.components = {self.renamed[n]: self.adapt(s) for n, s in found.items()}
        self._of: dict[Any, dict[str, Any]] = {
            t: self.adapt(r) for t, r in zip(usable, refs, strict=True)
        }

    def of(self, hint: Any) -> dict[str, Any]:
        return self._of.get(hint, {"description": f"{hint!r} (no JSON Schema)"})

    def name(self, hint: Any) -> str:
        if hint is None or isinstance(hint, str):
            return hint or "CloudEvent"
        ref = self._of.get(hint, {}).get("$ref")
        if ref:
            return str(ref).removeprefix(_SCHEMAS)
        return hint.__name__ if isinstance(hint, type) else repr(hint).replace("typing.", "")

    def adapt(self, node: Any) -> Any:
        """msgspec's JSON Schema (2020-12 flavoured) as AsyncAPI's draft-07 Schema Object."""
        if isinstance(node, list):
            return [self.adapt(item) for item in node]
        if not isinstance(node, dict):
            return node
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DATA_KEYWORDS:
                out[key] = value
            elif key == "$ref" and isinstance(value, str) and value.startswith(_SCHEMAS):
                name = value.removeprefix(_SCHEMAS)
                out[key] = _SCHEMAS + self.renamed.get(name, name)
            elif key == "discriminator" and isinstance(value, dict):
                continue  # OpenAPI's object; AsyncAPI's is a string. Tags stay in the enums.
            elif key == "description" and isinstance(value, str):
                out[key] = inspect.cleandoc(value)
            elif key == "prefixItems":  # a tuple: draft-07 says items: [...], additionalItems
                out["items"] = self.adapt(value)
                out["additionalItems"] = self.adapt(node.get("items", True))
            elif not (key == "items" and "prefixItems" in node):
                out[key] = self.adapt(value)
        return out


def _describable(hint: Any) -> bool:
    try:
        msgspec.json.schema(hint)
    except (TypeError, ValueError):
        return False
    return True


def _data_hint(sub: Subscription) -> Any:
    """The type of one message's data (an item's, for a batch), or None for any payload."""
    hint = sub.data_type
    if sub.batch is not None:
        args = typing.get_args(hint)
        hint = args[0] if typing.get_origin(hint) is list and args else None
    origin = typing.get_origin(hint) or hint
    if isinstance(origin, type) and issubclass(origin, Struct | dict | list):
        return hint
    return None


def _event_classes(subs: list[Subscription]) -> dict[str, type[Any]]:
    """CloudEvents type -> the Struct that handlers take for it (``emits=`` keeps only types)."""
    known: dict[str, type[Any]] = {}
    for sub in subs:
        hint = _data_hint(sub)
        if isinstance(hint, type) and issubclass(hint, Struct):
            for type_ in sub.ref.types or (event_type(hint),):
                known.setdefault(type_, hint)
    return known


def _summary(cls: type[Any]) -> str | None:
    doc = vars(cls).get("__doc__")
    return inspect.cleandoc(doc).split("\n\n", 1)[0].replace("\n", " ") if doc else None


def _unique(name: str, taken: Iterable[str], *others: str) -> str:
    """``name`` as a valid AsyncAPI id not yet taken; else the first free of ``others``, or _2."""
    used = set(taken)
    candidates = [_UNSAFE.sub("_", n).strip("_") or "_" for n in (name, *others)]
    for candidate in candidates:
        if candidate not in used:
            return candidate
    number = 2
    while f"{candidates[0]}_{number}" in used:
        number += 1
    return f"{candidates[0]}_{number}"


# -- command line -------------------------------------------------------------------------------


def add_parser(commands: Any, broker_help: str) -> None:
    """Add ``asyncapi`` to the ``eventfn`` subcommands.

    ``broker_help`` is unused: this --broker never falls back to sqlite:///eventfn.db.

    >>> add_parser(parser.add_subparsers(dest="command"), broker_help)
    """
    parser = commands.add_parser("asyncapi", help="write the app's AsyncAPI 3.0 document")
    parser.add_argument("app", help="module:attribute, e.g. shop:app")
    parser.add_argument("-o", "--output", help="write to FILE (.yaml/.yml: YAML with PyYAML)")
    parser.add_argument(
        "--broker",
        help="broker URL for the servers section, written without user info (default: "
        "$EVENTFN_BROKER, else the app's broker=, else no servers section)",
    )
    parser.add_argument("--api-version", default="0.0.0", help="info.version (default 0.0.0)")


def run(args: argparse.Namespace) -> int:
    """``eventfn asyncapi APP [-o FILE] [--broker URL]``: print or write the document.

    >>> eventfn.cli.main(["asyncapi", "shop:app", "-o", "shop.asyncapi.yaml"])
    wrote the AsyncAPI document of app shop to shop.asyncapi.yaml
    0
    """
    from eventfn.cli import load_app  # not at the top: eventfn.cli imports this module

    path = Path(args.output) if args.output else None
    yaml = _yaml() if path is not None and path.suffix.lower() in (".yaml", ".yml") else None
    app = load_app(args.app)
    url = args.broker or os.environ.get("EVENTFN_BROKER") or app.broker_url
    doc = document(app, broker_url=url, version=args.api_version)
    if yaml is not None:  # through JSON, so that shared objects are written out, not aliased
        text = yaml.safe_dump(json.loads(json.dumps(doc)), sort_keys=False, allow_unicode=True)
    else:
        text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if path is None:
        sys.stdout.write(text)
        return 0
    path.write_text(text, encoding="utf-8")
    print(f"wrote the AsyncAPI document of app {app.name} to {path}")
    return 0


def _yaml() -> Any:
    try:
        return importlib.import_module("yaml")
    except ImportError:
        raise ConfigurationError(
            "a .yaml/.yml output needs PyYAML, which is not installed: `pip install pyyaml`, "
            "or write JSON with -o FILE.json"
        ) from None
