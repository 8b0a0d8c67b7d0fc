"""The broker URL: eventfn's own query parameters, and the DSN that asyncpg gets."""

from __future__ import annotations

import re
from typing import NamedTuple, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from eventfn.brokers.base import redact_url
from eventfn.exceptions import ConfigurationError

DEFAULT_NAMESPACE = "eventfn"

# A PostgreSQL identifier that needs no case folding, short enough that "<namespace>_wake" (the
# LISTEN channel) stays within PostgreSQL's 63 bytes.
_NAMESPACE = re.compile(r"[a-z_][a-z0-9_]{0,57}")


class Settings(NamedTuple):
    """What a ``postgresql://`` URL says, split into eventfn's part and asyncpg's part."""

    dsn: str
    namespace: str
    pool_size: int
    outbox_pool: int
    poll: float
    password: str | None
    server_settings: dict[str, str]

    def __repr__(self) -> str:
        # The DSN and the password stay out of logs, even a debug line that prints settings.
        return (
            f"Settings(dsn={redact_url(self.dsn)!r}, namespace={self.namespace!r}, "
            f"pool_size={self.pool_size}, outbox_pool={self.outbox_pool}, poll={self.poll})"
        )


def parse_url(url: str, described: str) -> Settings:
    """Split ``url``; ``described`` (the redacted URL) is what errors show.

    eventfn's parameters (``namespace``, ``pool_size``, ``outbox_pool``, ``poll``) are taken out;
    every other one (``sslmode``, ``application_name``, ...) goes to asyncpg unchanged.
    """
    try:
        parts = urlsplit(url)
        password = parts.password
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError as exc:
        raise ConfigurationError(f"broker URL {described!r} cannot be parsed: {exc}") from None
    own = {name: value for name, value in query if name in _OWN}
    rest = [(name, value) for name, value in query if name not in _OWN]
    namespace = own.get("namespace", DEFAULT_NAMESPACE)
    if not _NAMESPACE.fullmatch(namespace):
        raise ConfigurationError(
            f"broker URL {described!r}: namespace {namespace!r} must be 1 to 58 lowercase "
            "letters, digits and underscores, starting with a letter or underscore"
        )
    dsn = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest), ""))
    return Settings(
        dsn=dsn,
        namespace=namespace,
        pool_size=_number(own, "pool_size", 4, described, int),
        outbox_pool=_number(own, "outbox_pool", 10, described, int),
        poll=_number(own, "poll", 2.0, described, float),
        password=password,
        # The URL's own settings win: asyncpg would let these override them.
        server_settings={k: v for k, v in _SERVER_SETTINGS.items() if k not in dict(rest)},
    )


_OWN = frozenset({"namespace", "pool_size", "outbox_pool", "poll"})
# Planning a statement is cheap next to compiling it: a queue's statements never need JIT, and
# PostgreSQL's cost estimates of unnest() joins can cross its threshold.
_SERVER_SETTINGS = {"jit": "off", "application_name": "eventfn"}


_N = TypeVar("_N", int, float)


def _number(own: dict[str, str], name: str, default: _N, described: str, kind: type[_N]) -> _N:
    text = own.get(name)
    if text is None:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = kind(0)
    if value <= 0:
        raise ConfigurationError(
            f"broker URL {described!r}: {name}={text!r} must be a positive {kind.__name__}"
        )
    return value
