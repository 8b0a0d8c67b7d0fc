"""``redis://host:port/db?namespace=name``: the eventfn broker on Redis Streams.

Each subscription (a queue, or one group of a topic or stream) is one Redis stream with one
consumer group; a publish copies the message into the stream of every subscription its
destination has at that moment. Every multi-key step is one Lua script (``lua/``), so each
protocol call is one round trip and atomic. The plug-in's README gives the key layout, what
each call does in Redis commands, and why.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, ClassVar, NamedTuple, cast
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from eventfn.brokers.base import (
    Broker,
    Clock,
    DeadLetterRecord,
    Delivery,
    OutgoingMessage,
    Settlement,
    SubscriptionRef,
    SubscriptionStats,
)
from eventfn.exceptions import (
    BrokerError,
    BrokerUnavailable,
    ConfigurationError,
    UnknownDestination,
)
from eventfn_redis import _codec
from eventfn_redis._codec import Arg
from eventfn_redis._scripts import Scripts

log = logging.getLogger("eventfn.redis")

# The longest XREAD BLOCK of a waiting fetch. A lease that runs out wakes nobody, so a long
# wait looks again at least this often.
_MAX_BLOCK = 1.0
# Messages per publish script and settlements per settle script: a script blocks the server
# while it runs, so huge batches go in slices of a few milliseconds each.
_SLICE = 500
# XPENDING ... IDLE needs 6.2; everything else is older.
_MIN_VERSION = (6, 2)


class _Sub(NamedTuple):
    """A subscription as this instance knows it: Redis keys are named by ``sid``."""

    sid: str
    name: str
    group: str


class RedisBroker(Broker):
    """Broker on Redis Streams: ``redis://[:password@]host[:port][/db][?namespace=name]``.

    Every key starts with the namespace (default ``eventfn``), so several apps or test runs
    share one Redis without seeing each other; :meth:`drop` deletes one namespace's keys.

    >>> broker = RedisBroker("redis://127.0.0.1:6379/0?namespace=shop")
    """

    scheme = "redis"
    known_gaps: ClassVar[dict[str, str]] = {}  # it meets every check of the conformance kit

    def __init__(self, url: str, *, clock: Clock = time.time) -> None:
        super().__init__(url, clock=clock)
        self.namespace, self._client_url = _codec.split_url(url, self.describe())
        self._prefix = f"{self.namespace}:"
        self._password = urlsplit(url).password
        # One consumer name per instance: XINFO CONSUMERS shows which runner holds what.
        # Receipts fence by delivery count, not by name, so names need not be stable.
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._redis: Redis | None = None
        self._scripts: Scripts | None = None
        self._subs: dict[str, _Sub] = {}
        # Declared by this instance: declared again if Redis lost them (a restart without
        # persistence), so that a runner goes on with what is published from then on.
        self._refs: dict[str, SubscriptionRef] = {}
        self._fetched: dict[str, _Sub] = {}

    # -- connection -----------------------------------------------------------------------

    async def connect(self) -> None:
        if self._redis is not None:
            return
        client = Redis.from_url(
            self._client_url,
            socket_connect_timeout=5.0,
            # Above any XREAD BLOCK of a fetch; a server that hangs longer is an error.
            socket_timeout=30.0,
            # One quick retry on a fresh connection hides a connection that was closed while
            # idle; a server that is down fails fast, and the runner backs off and logs it.
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
            client_name=f"eventfn:{self.consumer}",
        )
        try:
            with self._errors("connect"):
                info = await client.info("server")
            version = tuple(int(part) for part in str(info["redis_version"]).split(".")[:2])
            if version < _MIN_VERSION:
                raise BrokerUnavailable(
                    f"Redis broker {self.describe()} runs Redis {info['redis_version']}; "
                    "eventfn needs Redis 6.2 or later"
                )
        except BaseException:
            await client.aclose()
            raise
        self._redis = client
        self._scripts = Scripts(client, self._prefix)

    async def close(self) -> None:
        client, self._redis = self._redis, None
        if client is None:
            return
        fetched, self._fetched = list(self._fetched.values()), {}
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
            if fetched and self._scripts is not None:
                args: list[Arg] = [self.consumer]
                for sub in fetched:
                    args += [sub.sid, sub.group]
                # Best effort: a crashed runner leaves an empty consumer behind, as this would.
                with suppress(redis_errors.RedisError, OSError):
                    await self._scripts.run("retire", args)
        await client.aclose()
        self._scripts = None

    def _client(self) -> tuple[Redis, Scripts]:
        if self._redis is None or self._scripts is None:
            raise BrokerError(
                f"Redis broker {self.describe()} is not connected; "
                "use `async with broker:` or await broker.connect() first"
            )
        return self._redis, self._scripts

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """redis-py's exceptions as eventfn's, naming the URL without its password."""
        try:
            yield
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            raise BrokerUnavailable(
                f"Redis broker {self.describe()} is unreachable ({doing}): {self._text(exc)}"
            ) from exc
        except redis_errors.ResponseError as exc:
            raise self._script_error(str(exc)) or BrokerError(
                f"Redis broker {self.describe()} failed to {doing}: {self._text(exc)}"
            ) from exc
        except redis_errors.RedisError as exc:
            raise BrokerError(
                f"Redis broker {self.describe()} failed to {doing}: {self._text(exc)}"
            ) from exc

    def _text(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        return text.replace(self._password, "***") if self._password else text

    def _script_error(self, text: str) -> Exception | None:
        """The error a script refused with (``redis.error_reply``), if it is one of ours."""
        code, _, detail = text.partition(" ")
        if code == "UNKNOWN_DESTINATION":
            return UnknownDestination(
                f"nothing has declared destination {detail!r} on {self.describe()}; "
                "start a runner of an app that subscribes to it (or call app.declare()) first"
            )
        if code == "KIND_CONFLICT":
            kind, _, destination = detail.partition(" ")
            return ConfigurationError(
                f"destination {destination!r} is a {kind} on this broker, not what was "
                "declared now; use another name or the same kind everywhere"
            )
        if code == "NAME_CONFLICT":
            owner, _, name = detail.partition(" ")
            return ConfigurationError(
                f"subscription name {name!r} is already used by destination {owner!r}; "
                "rename the destination or the group"
            )
        return None

    async def _run(self, script: str, args: Sequence[Arg], doing: str) -> Any:
        _, scripts = self._client()
        with self._errors(doing):
            return await scripts.run(script, args)

    # -- subscriptions ----------------------------------------------------------------------

    async def declare(self, subscriptions: Sequence[SubscriptionRef]) -> None:
        if not subscriptions:
            await anyio.lowlevel.checkpoint()
            return
        args: list[Arg] = []
        for ref in subscriptions:
            args += [ref.name, ref.destination, ref.kind, ref.group, _codec.types_arg(ref.types)]
        sids = await self._run("declare", args, "declare subscriptions")
        for ref, sid in zip(subscriptions, sids, strict=True):
            self._subs[ref.name] = _Sub(sid.decode(), ref.name, ref.group)
            self._refs[ref.name] = ref

    async def _sub(self, name: str) -> _Sub:
        sub = self._subs.get(name)
        if sub is not None:
            return sub
        client, _ = self._client()
        with self._errors("look up a subscription"):
            sid = await client.hget(f"{self._prefix}subscriptions", name)
            group = sid and await client.hget(f"{self._prefix}sub:{_str(sid)}", "group")
        if not sid or not group:
            raise ConfigurationError(f"subscription {name!r} was never declared")
        sub = self._subs[name] = _Sub(_str(sid), name, _str(group))
        return sub

    async def _declare_again(self, sub: _Sub) -> _Sub:
        """A subscription's keys are gone: declare it again if this instance declared it."""
        self._subs.pop(sub.name, None)
        ref = self._refs.get(sub.name)
        if ref is None:
            return await self._sub(sub.name)  # declared again by another instance, or never
        log.warning(
            "Redis lost subscription %s (restarted without persistence?): declaring it again",
            sub.name,
        )
        await self.declare([ref])
        return self._subs[sub.name]

    # -- publishing -------------------------------------------------------------------------

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        if not messages:
            await anyio.lowlevel.checkpoint()
            return
        now = self.clock()
        for part in _codec.chunks(messages, _SLICE):
            await self._run("publish", _codec.publish_args(part, now), "publish")

    # -- consuming --------------------------------------------------------------------------

    async def fetch(
        self, subscription: SubscriptionRef, limit: int, *, lease: float, wait: float = 0.0
    ) -> list[Delivery]:
        sub = await self._sub(subscription.name)
        if limit <= 0:
            await anyio.lowlevel.checkpoint()
            return []
        deadline = anyio.current_time() + wait
        while True:
            reply = await self._claim(sub, limit, lease)
            if reply[0] == -1:
                sub = await self._declare_again(sub)
                continue
            if reply[0] > 0:
                return await self._hand_out(sub, reply)
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                return []
            _, last_id, next_due, now = reply
            due_in = (next_due - now) / 1000 if next_due >= 0 else _MAX_BLOCK
            await self._wait_for_entry(sub, last_id, min(remaining, due_in, _MAX_BLOCK))

    async def _claim(self, sub: _Sub, limit: int, lease: float) -> list[Any]:
        args: list[Arg] = [sub.sid, sub.group, self.consumer, limit, _codec.milliseconds(lease)]
        self._fetched[sub.sid] = sub
        # Run to the end even if the caller is cancelled: what it leased is given back then.
        with anyio.CancelScope(shield=True):
            reply: list[Any] = await self._run("fetch", args, f"fetch from {sub.name}")
        return reply

    async def _hand_out(self, sub: _Sub, reply: list[Any]) -> list[Delivery]:
        found = _codec.deliveries(sub.name, sub.sid, reply)
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), suppress(BrokerError):
                await self.settle([Settlement(delivery=d, outcome="release") for d in found])
            raise
        return found

    async def _wait_for_entry(self, sub: _Sub, last_id: bytes, seconds: float) -> None:
        """Block until the stream gets an entry after ``last_id``, or ``seconds`` pass."""
        block = int(seconds * 1000)
        if block < 1:
            await anyio.lowlevel.checkpoint()
            return
        client, _ = self._client()
        # Plain XREAD claims nothing, so a wait that is cancelled or cut off loses nothing.
        with self._errors(f"wait on {sub.name}"):
            await client.xread({f"{self._prefix}sub:{sub.sid}:stream": last_id}, 1, block)

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        if not settlements:
            await anyio.lowlevel.checkpoint()
            return
        now = self.clock()
        for part in _codec.chunks(settlements, _SLICE):
            await self._run("settle", _codec.settle_args(part, self.consumer, now), "settle")

    async def extend(self, deliveries: Sequence[Delivery], lease: float) -> None:
        if not deliveries:
            await anyio.lowlevel.checkpoint()
            return
        for part in _codec.chunks(deliveries, _SLICE):
            args = _codec.extend_args(part, self.consumer, lease)
            await self._run("extend", args, "extend leases")

    async def stats(self, subscription: SubscriptionRef) -> SubscriptionStats:
        sub = await self._sub(subscription.name)
        reply = await self._run("stats", [sub.sid], f"count {sub.name}")
        if reply[0] == -1:
            raise ConfigurationError(f"subscription {sub.name!r} is gone from {self.describe()}")
        in_stream, pending, expired, waiting, due, later, dead = reply
        return SubscriptionStats(
            subscription=sub.name,
            # An expired or released lease is ready again, as is a delayed message now due.
            ready=in_stream - pending + expired + waiting + due,
            delayed=later,
            in_flight=pending - expired,
            dead=dead,
        )

    # -- dead letters -----------------------------------------------------------------------

    async def dead_letters(
        self, subscription: str | None = None, *, limit: int = 100, after: str | None = None
    ) -> list[DeadLetterRecord]:
        sid = "" if subscription is None else (await self._sub(subscription)).sid
        start = 0 if after is None else _codec.record_number(after)
        if start is None or limit <= 0:
            await anyio.lowlevel.checkpoint()
            return []
        reply = await self._run("dead_page", [sid, start, limit], "list dead letters")
        return _codec.records(reply)

    async def dead_letter(self, record_id: str) -> DeadLetterRecord | None:
        number = _codec.record_number(record_id)
        if number is None:
            await anyio.lowlevel.checkpoint()
            return None
        client, _ = self._client()
        with self._errors("read a dead letter"):
            fields = await client.hgetall(f"{self._prefix}dl:{number}")
        # bytes, as every reply of this client: see _str()
        return _codec.record(str(number), cast(dict[bytes, bytes], fields)) if fields else None

    async def replay(self, record_ids: Sequence[str]) -> int:
        numbers = sorted({n for n in map(_codec.record_number, record_ids) if n is not None})
        if not numbers:
            await anyio.lowlevel.checkpoint()
            return 0
        return int(await self._run("replay", numbers, "replay dead letters"))

    async def purge(self, subscription: str | None = None) -> int:
        if subscription is not None:
            sids = [(await self._sub(subscription)).sid]
        else:
            client, _ = self._client()
            with self._errors("list subscriptions"):
                sids = [_str(sid) for sid in await client.hvals(f"{self._prefix}subscriptions")]
        if not sids:
            return 0
        return int(await self._run("purge", sids, "purge dead letters"))

    async def drop(self) -> None:
        """Delete every key of this broker's namespace, and no other."""
        client, _ = self._client()
        with self._errors("drop the namespace"):
            batch: list[bytes] = []
            async for key in client.scan_iter(match=f"{self._prefix}*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    await client.unlink(*batch)
                    batch = []
            if batch:
                await client.unlink(*batch)
        self._subs.clear()
        self._refs.clear()
        self._fetched.clear()


def _str(value: bytes | str) -> str:
    # The client returns bytes (decode_responses is off: bodies are bytes); redis-py's type
    # hints allow str as well.
    return value.decode() if isinstance(value, bytes) else value
