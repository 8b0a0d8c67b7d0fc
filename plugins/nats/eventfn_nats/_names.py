"""The URL, and the name of every stream, consumer and subject the broker makes.

Everything lives under the URL's namespace: a subject starts with ``{ns}.`` and a stream name
with ``{ns}~``, so ``drop()`` finds a namespace's streams by subject and touches nothing else.
Names are turned into tokens that NATS accepts in subjects and stream or consumer names: a dot
becomes ``~`` (destination names never hold one), and anything unusual is hashed behind ``=``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from eventfn.brokers.base import QUEUE_GROUP, SubscriptionRef
from eventfn.exceptions import ConfigurationError

DEFAULT_NAMESPACE = "eventfn"
DEFAULT_LEASE = 30.0
"""Seconds: the consumers' ``AckWait``, the runner's default lease (``?lease=`` changes it)."""

_NAMESPACE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_SCHEMES = {"nats": "nats", "tls": "tls"}


@dataclass(frozen=True)
class Settings:
    """What a ``nats://`` URL says; the credentials never go into ``servers``."""

    servers: list[str]
    user: str | None
    password: str | None
    token: str | None
    namespace: str
    lease: float
    max_deliver: int = -1


def parse_url(url: str) -> Settings:
    """``nats://[user:password@ | token@]host:port[,host:port...]?namespace=ns&lease=30``.

    ``max_deliver=N`` caps JetStream's own redeliveries (default: no cap; see the README).
    """
    parts = urlsplit(url)
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise ConfigurationError(f"not a NATS URL scheme: {parts.scheme!r} (use nats:// or tls://)")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    servers = [f"{scheme}://{host}" for host in (hosts or "127.0.0.1:4222").split(",") if host]
    user, password, token = _credentials(userinfo)
    query = parse_qs(parts.query, keep_blank_values=True)
    namespace = query.get("namespace", [DEFAULT_NAMESPACE])[-1]
    if not _NAMESPACE.fullmatch(namespace):
        raise ConfigurationError(
            f"namespace {namespace!r} is not allowed: use 1 to 64 letters, digits, _ or -"
        )
    try:
        lease = float(query.get("lease", [DEFAULT_LEASE])[-1])
    except ValueError:
        raise ConfigurationError("lease in a nats:// URL is a number of seconds") from None
    if not 0.1 <= lease <= 86400:
        raise ConfigurationError("lease in a nats:// URL must be between 0.1 and 86400 seconds")
    try:
        max_deliver = int(query.get("max_deliver", [-1])[-1])
    except ValueError:
        raise ConfigurationError("max_deliver in a nats:// URL is a whole number") from None
    return Settings(servers, user, password, token, namespace, lease, max_deliver)


def _credentials(userinfo: str) -> tuple[str | None, str | None, str | None]:
    if not userinfo:
        return None, None, None
    name, colon, secret = userinfo.partition(":")
    if colon:
        return unquote(name), unquote(secret), None
    return None, None, unquote(name)  # nats://TOKEN@host: a bare user part is a token


def token(name: str) -> str:
    """A subject token (and stream or consumer name part) standing for ``name``."""
    if _PLAIN.fullmatch(name):
        return name.replace(".", "~")
    return "=" + hashlib.blake2b(name.encode(), digest_size=12).hexdigest()


def hashed(value: str) -> str:
    """A fixed-length token for a record key or message id, whatever its characters."""
    return hashlib.blake2b(value.encode(), digest_size=12).hexdigest()


def split_subscription(name: str) -> tuple[str, str]:
    """``dest`` or ``dest/group`` (as in ``SubscriptionRef.name``) as (destination, group)."""
    destination, _, group = name.partition("/")
    return destination, group or QUEUE_GROUP


class Names:
    """Streams, consumers and subjects of one namespace.

    Per destination one stream ``{ns}~{dest}`` holding ``{ns}.{dest}.>``:

    - queue (work-queue retention): messages on ``.m``, one consumer ``queue``;
    - topic (interest retention): messages on ``.{type}.~``, a replay for one group on
      ``.{type}.{group}``; a consumer per group filters ``.{type}.*`` (one type) or ``.*.*``;
    - stream (work-queue retention): per group, records wait on ``.{group}.w.{key}`` and the
      key's head alone is on ``.{group}.r.{key}`` (keyless records on ``.{group}.r.~``); the
      group's consumer takes ``.{group}.r.*``;
    - every kind: messages published with a delay wait on ``.later`` for the ``~later``
      consumer, which moves them when due.

    Beside them ``{ns}~~sys`` keeps destination metadata and delivery bookkeeping,
    ``{ns}~~dlq`` the dead letters, and ``{ns}~~dd`` the de-duplication markers.
    """

    def __init__(self, namespace: str) -> None:
        self.ns = namespace
        self.sys_stream = f"{namespace}~~sys"
        self.dlq_stream = f"{namespace}~~dlq"
        self.dedupe_stream = f"{namespace}~~dd"
        self.dedupe_subjects = f"{namespace}.~dd.>"
        self.all_subjects = f"{namespace}.>"

    # -- destinations --------------------------------------------------------------------

    def stream(self, destination: str) -> str:
        return f"{self.ns}~{token(destination)}"

    def subjects(self, destination: str) -> str:
        return f"{self.ns}.{token(destination)}.>"

    def queue_subject(self, destination: str) -> str:
        return f"{self.ns}.{token(destination)}.m"

    def topic_subject(self, destination: str, type_token: str, group: str | None = None) -> str:
        route = "~" if group is None else token(group)
        return f"{self.ns}.{token(destination)}.{type_token}.{route}"

    def waiting_subject(self, ref: SubscriptionRef, key_token: str) -> str:
        return f"{self.ns}.{token(ref.destination)}.{token(ref.group)}.w.{key_token}"

    def ready_subject(self, ref: SubscriptionRef, key_token: str) -> str:
        return f"{self.ns}.{token(ref.destination)}.{token(ref.group)}.r.{key_token}"

    def later_subject(self, destination: str) -> str:
        return f"{self.ns}.{token(destination)}.later"

    def filter_subject(self, ref: SubscriptionRef) -> str:
        """The subject filter of the consumer of ``ref``'s group."""
        dest = token(ref.destination)
        if ref.kind == "queue":
            return f"{self.ns}.{dest}.m"
        if ref.kind == "stream":
            return f"{self.ns}.{dest}.{token(ref.group)}.r.*"
        if ref.types is not None and len(ref.types) == 1:
            return f"{self.ns}.{dest}.{token(ref.types[0])}.*"
        return f"{self.ns}.{dest}.*.*"

    # -- bookkeeping (in the sys stream) ----------------------------------------------------

    def meta_subject(self, destination: str) -> str:
        return f"{self.ns}.~sys.meta.{token(destination)}"

    def state_subject(self, ref: SubscriptionRef, sequence: int) -> str:
        return f"{self.ns}.~sys.att.{token(ref.destination)}.{token(ref.group)}.{sequence}"

    def due_subject(self, ref: SubscriptionRef, sequence: int | str) -> str:
        return f"{self.ns}.~sys.due.{token(ref.destination)}.{token(ref.group)}.{sequence}"

    # -- de-duplication markers (in the dd stream) ------------------------------------------

    def marker_subject(self, destination: str, message_id: str) -> str:
        return f"{self.ns}.~dd.{token(destination)}.{hashed(message_id)}"

    # -- dead letters (in the dlq stream) ---------------------------------------------------

    def dead_prefix(self, destination: str | None = None, group: str | None = None) -> str:
        """The dead-letter subjects of one subscription, or of all (without the last tokens)."""
        if destination is None:
            return f"{self.ns}.~dlq.*.*"
        return f"{self.ns}.~dlq.{token(destination)}.{token(group or QUEUE_GROUP)}"

    def dead_subject(self, ref: SubscriptionRef, message_id: str, part: str) -> str:
        """``part`` is ``b`` (the record as first written), ``dead`` or ``replayed``."""
        return f"{self.dead_prefix(ref.destination, ref.group)}.{hashed(message_id)}.{part}"
