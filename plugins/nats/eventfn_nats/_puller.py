"""Pulling from one durable consumer, and the receipt that fences a delivery.

A fetch first asks for what is there now (``no_wait``: the server sends up to ``batch``, then a
404 or 408 status if it had fewer), and only when nothing came does it wait: one lingering
request for a single message, so that no open request keeps pulling (and leasing) messages the
caller has no room for; once that one comes, a ``no_wait`` request fetches the rest of the room.

Messages that arrive when no fetch is waiting for them (a lingering request outliving a
cancelled fetch) are kept, leased, for the next fetch, and given back when the broker closes.

Each message is stamped with the earliest time its lease can have started (when the oldest open
request was sent): the broker's fence counts the lease from there, so it never thinks it still
holds a lease the server has already given to someone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import deque

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from eventfn.exceptions import BrokerUnavailable
from eventfn_nats._wire import API, Wire

Pulled = tuple[Msg, float]
"""A message and the earliest (monotonic) time its lease may have started."""


class Puller:
    """Fetches batches from one durable pull consumer on one inbox."""

    def __init__(self, wire: Wire, stream: str, consumer: str) -> None:
        self.wire = wire
        self._next = f"{API}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = ""
        self._sub: Subscription | None = None
        self._messages: deque[Pulled] = deque()
        self._ended: set[str] = set()
        self._open: dict[str, float] = {}  # request token -> when it was sent
        self._closes: dict[str, float] = {}  # request token -> when the server drops it
        self._arrived = asyncio.Event()
        self._tokens = itertools.count(1)
        self._reconnects = 0
        wire.on_reconnect(self._on_reconnect)

    async def start(self) -> None:
        nc = self.wire.nc
        self._inbox = nc.new_inbox()
        with self.wire.boundary("subscribing"):
            self._sub = await nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)

    async def stop(self) -> list[Pulled]:
        """Stop pulling; the messages that came for no fetch (still leased, to give back)."""
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):  # closing: the connection may be gone
                await sub.unsubscribe()
        strays = list(self._messages)
        self._messages.clear()
        return strays

    def _on_reconnect(self) -> None:
        self._reconnects += 1  # open requests were lost with the connection
        self._arrived.set()

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        if headers and not msg.data and "Status" in headers:
            token = msg.subject.rpartition(".")[2]
            self._open.pop(token, None)
            self._closes.pop(token, None)
            self._ended.add(token)
        else:
            self._messages.append((msg, self._oldest_open()))
        self._arrived.set()

    def _oldest_open(self) -> float:
        now = time.monotonic()
        for token, closes in list(self._closes.items()):
            if closes < now:
                self._open.pop(token, None)
                del self._closes[token]
        return min(self._open.values(), default=now)

    async def pull(self, limit: int, wait: float) -> list[Pulled]:
        """Up to ``limit`` messages: what is there now, or else the first to come in ``wait``."""
        got = self._take(limit)
        try:
            if len(got) < limit:
                got += await self._request(limit - len(got))
            if not got and wait > 0:
                got += await self._linger(wait)
                if got and len(got) < limit:
                    got += await self._request(limit - len(got))
        except BaseException:
            self._messages.extendleft(reversed(got))  # not handed out: keep for the next fetch
            raise
        return got

    def _take(self, limit: int) -> list[Pulled]:
        messages = self._messages
        count = min(limit, len(messages))
        return [messages.popleft() for _ in range(count)]

    async def _send(self, request: dict[str, int | bool], lasts: float) -> str:
        token = str(next(self._tokens))
        sent = time.monotonic()
        self._open[token] = sent
        self._closes[token] = sent + lasts
        with self.wire.boundary("fetching"):
            await self.wire.nc.publish(
                self._next, json.dumps(request).encode(), f"{self._inbox}.{token}"
            )
        return token

    async def _request(self, batch: int) -> list[Pulled]:
        request: dict[str, int | bool] = {"batch": batch, "no_wait": True}
        reconnects = self._reconnects
        token = await self._send(request, self.wire.timeout)
        try:
            async with asyncio.timeout(self.wire.timeout):
                while token not in self._ended and len(self._messages) < batch:
                    if reconnects != self._reconnects:  # lost with the connection: ask again
                        reconnects = self._reconnects
                        self._open.pop(token, None)
                        token = await self._send(request, self.wire.timeout)
                    await self._wait()
        except TimeoutError:
            raise BrokerUnavailable(
                f"fetching from {self.wire.describe()}: no answer in {self.wire.timeout:g} s"
            ) from None
        finally:
            self._ended.discard(token)
            self._open.pop(token, None)
            self._closes.pop(token, None)
        return self._take(batch)

    async def _linger(self, wait: float) -> list[Pulled]:
        expires = max(wait, 0.001)
        reconnects = self._reconnects
        token = await self._send({"batch": 1, "expires": int(expires * 1e9)}, expires + 1.0)
        try:
            # The server answers by ``expires`` (a 408); a lost answer (reconnect) ends it too.
            async with asyncio.timeout(expires + 1.0):
                while token not in self._ended and not self._messages:
                    if reconnects != self._reconnects:
                        break
                    await self._wait()
        except TimeoutError:
            pass
        finally:
            self._ended.discard(token)
        return self._take(1)

    async def _wait(self) -> None:
        self._arrived.clear()
        await self._arrived.wait()
