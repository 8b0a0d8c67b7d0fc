"""Names of everything the broker creates in RabbitMQ, routing keys, and the URL's own options.

Every name starts with the namespace and a ``/`` (which eventfn forbids in destination and group
names, so two names never collide)::

    {ns}/catalog                 classic queue: what was declared (read under the lock)
    {ns}/lock                    exclusive queue: held while reading or changing shared state
    {ns}/dedupe                  classic queue: ids stored with dedupe (read under the lock)
    {ns}/x/{destination}         topic exchange of a destination
    {ns}/q/{subscription}        quorum queue of a queue or topic subscription
    {ns}/q/{subscription}/{p}    quorum queue of partition p of a stream subscription
    {ns}/dead/{subscription}     classic queue: dead-letter records in state "dead"
    {ns}/replayed/{subscription} classic queue: dead-letter records in state "replayed"
    {ns}/retry/{k}/{subscription}  delay bucket k of a subscription's retries
    {ns}/delay/{k}/{destination}   delay bucket k of a destination's delayed publishes

A routing key is eight words of a hash (of the partition key, or of the message id when there
is none), low bit first, then the CloudEvents type: ``1.0.0.1.1.0.1.0.order.accepted``. A group's
``types`` are its binding keys; partition ``p`` of ``2**j`` binds the low ``j`` words to ``p``'s
bits, so routing to a partition needs no consistent-hash plug-in and no metadata at publish time.
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec

from eventfn.exceptions import ConfigurationError

HASH_BITS = 8
"""Hash words in a routing key: a stream has at most ``2**HASH_BITS`` partitions."""

BUCKET_BASE = 0.016
BUCKET_RATIO = math.sqrt(2.0)
"""Delay bucket k holds delays up to ``BUCKET_BASE * BUCKET_RATIO**k`` seconds."""

_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_MAX_NAME = 255  # bytes, RabbitMQ's limit on queue and exchange names
_MAX_TYPE = 255 - 2 * HASH_BITS
_PREFIXES = tuple(
    ".".join(str((value >> bit) & 1) for bit in range(HASH_BITS)) for value in range(2**HASH_BITS)
)


class Options(msgspec.Struct, frozen=True, kw_only=True):
    """The URL split into what aio-pika connects to and what this broker reads itself."""

    server_url: str
    password: str | None = None
    namespace: str = "eventfn"
    delivery_limit: int = 20
    stream_prefetch: int = 256
    fetch_linger: float = 0.0


def parse_url(url: str, described: str) -> Options:
    """Options of ``url``; ``described`` (the redacted URL) is what errors show."""
    parts = urlsplit(url)
    scheme = "amqps" if parts.scheme.lower() == "amqps" else "amqp"
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in _OWN:
            ours[name] = value
        else:
            theirs.append((name, value))
    server_url = urlunsplit((scheme, parts.netloc, parts.path, urlencode(theirs), ""))
    namespace = ours.get("namespace", "eventfn")
    if not _NAMESPACE.match(namespace):
        raise ConfigurationError(
            f"broker URL {described!r}: namespace {namespace!r} is not allowed; use 1-64 "
            "letters, digits, '.', '_', ':' or '-', starting with a letter or digit"
        )
    return Options(
        server_url=server_url,
        password=parts.password,
        namespace=namespace,
        delivery_limit=_positive(ours, "delivery_limit", 20, described),
        stream_prefetch=min(65535, _positive(ours, "stream_prefetch", 256, described)),
        fetch_linger=_linger(ours.get("fetch_linger"), described),
    )


_OWN = frozenset({"namespace", "delivery_limit", "stream_prefetch", "fetch_linger"})
_MAX_LINGER = 1.0


def _linger(text: str | None, described: str) -> float:
    if text is None:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= _MAX_LINGER:  # also refuses nan
        raise ConfigurationError(
            f"broker URL {described!r}: fetch_linger={text!r} must be seconds from 0 to "
            f"{_MAX_LINGER:g}"
        )
    return value


def _positive(options: dict[str, str], name: str, default: int, described: str) -> int:
    text = options.get(name)
    if text is None:
        return default
    if not text.isdigit() or int(text) < 1:
        raise ConfigurationError(
            f"broker URL {described!r}: {name}={text!r} must be a whole number of at least 1"
        )
    return int(text)


class Names:
    """Queue and exchange names of one namespace."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.catalog = _fit(f"{namespace}/catalog")
        self.lock = _fit(f"{namespace}/lock")
        self.dedupe = _fit(f"{namespace}/dedupe")

    def exchange(self, destination: str) -> str:
        return _fit(f"{self.namespace}/x/{destination}")

    def queue(self, subscription: str) -> str:
        return _fit(f"{self.namespace}/q/{subscription}")

    def partition(self, subscription: str, partition: int) -> str:
        return _fit(f"{self.namespace}/q/{subscription}/{partition}")

    def dead(self, subscription: str) -> str:
        return _fit(f"{self.namespace}/dead/{subscription}")

    def replayed(self, subscription: str) -> str:
        return _fit(f"{self.namespace}/replayed/{subscription}")

    def retry(self, subscription: str, bucket: int) -> str:
        return _fit(f"{self.namespace}/retry/{bucket}/{subscription}")

    def delay(self, destination: str, bucket: int) -> str:
        return _fit(f"{self.namespace}/delay/{bucket}/{destination}")


def _fit(name: str) -> str:
    """``name``, or its start and a digest when it is over RabbitMQ's 255 bytes."""
    if len(name.encode()) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:24]
    return f"{name.encode()[:200].decode(errors='ignore')}~{digest}"


TOKEN_DIGITS = 5


def token(subscription: str) -> str:
    """Five stable digits of a subscription name, ending its dead-letter record ids."""
    digest = int(hashlib.sha256(subscription.encode()).hexdigest()[:12], 16)
    return f"{digest % 10**TOKEN_DIGITS:0{TOKEN_DIGITS}d}"


def bucket_of(delay: float) -> int:
    """The delay bucket of ``delay`` seconds: the first whose bound is not below it."""
    if delay <= BUCKET_BASE:
        return 0
    return max(0, math.ceil(math.log(delay / BUCKET_BASE, BUCKET_RATIO) - 1e-9))


def hash_of(text: str) -> int:
    return zlib.crc32(text.encode())


def routing_key(partition_hash: int, type: str) -> str:
    """The routing key of a message: its hash words, then its type."""
    if len(type.encode()) > _MAX_TYPE:
        raise ConfigurationError(
            f"event type {type[:40]!r}... is longer than the {_MAX_TYPE} bytes RabbitMQ can route"
        )
    return f"{_PREFIXES[partition_hash & (2**HASH_BITS - 1)]}.{type}"


def binding_keys(
    types: tuple[str, ...] | None, partition: int = 0, partitions: int = 1
) -> list[str]:
    """Binding keys of one queue: the hash words of its partition, then its types (or all)."""
    bits = partitions.bit_length() - 1
    words = [str((partition >> bit) & 1) if bit < bits else "*" for bit in range(HASH_BITS)]
    prefix = ".".join(words)
    if types is None:
        return [f"{prefix}.#"]
    return [f"{prefix}.{type}" for type in types]


def check_subscription(types: tuple[str, ...] | None, partitions: int, name: str) -> None:
    """Refuse what the topic-exchange mapping cannot carry, saying what to do instead."""
    if partitions < 1 or partitions > 2**HASH_BITS or partitions & (partitions - 1):
        raise ConfigurationError(
            f"stream subscription {name!r} has partitions={partitions}; on RabbitMQ it must be "
            f"a power of two up to {2**HASH_BITS} (1, 2, 4, ... {2**HASH_BITS})"
        )
    for type in types or ():
        if {"*", "#"} & set(type.split(".")):
            raise ConfigurationError(
                f"subscription {name!r} filters on type {type!r}: a '*' or '#' word would be a "
                "wildcard in a RabbitMQ binding key; name event types without them"
            )
        routing_key(0, type)  # too long to route: refused now, not at the first publish
