"""Waking fetches: one LISTEN connection per broker instance, shared by all its fetch loops.

Every statement that makes messages of a subscription fetchable (a publish, an ack's emitted
messages, a retry, a release, a replay, the next head of a stream key) sends
``NOTIFY <namespace>_wake, '<subscription id>'`` in its own transaction, so that PostgreSQL
delivers it at commit to every listening broker, in this process or any other. A waiting fetch
also wakes at the earliest due time it knows of, and in any case after ``poll`` seconds: a
notification sent while the LISTEN connection was down is lost, so without it a fetch polls
faster, and the connection is made again by the next fetch after a backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import anyio
import asyncpg

log = logging.getLogger("eventfn.postgresql")

_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 5.0
_CONNECT_TIMEOUT = 10.0


class Waker:
    """Wakes the fetches of one subscription that wait in this process."""

    __slots__ = ("_event", "waiting")

    def __init__(self) -> None:
        self._event: anyio.Event | None = None
        self.waiting = 0  # fetches waiting now (for tests and debugging)

    def current(self) -> anyio.Event:
        """The event the next wake sets; taken before a claim, so a wake during it counts."""
        # Made here, in a task: a notification callback runs outside any task, where anyio
        # cannot tell which event loop library it is in.
        if self._event is None or self._event.is_set():
            self._event = anyio.Event()
        return self._event

    def wake(self) -> None:
        if self._event is not None:
            self._event.set()


class Listener:
    """The LISTEN connection of one broker instance and the wakers of its subscriptions."""

    def __init__(
        self, dsn: str, server_settings: dict[str, str], channel: str, describe: Callable[[], str]
    ) -> None:
        self.dsn = dsn
        self.server_settings = server_settings
        self.channel = channel
        self.describe = describe
        self.wakers: dict[int, Waker] = {}
        self._connection: asyncpg.Connection[Any] | None = None
        self._retry_at = 0.0
        self._backoff = _BACKOFF_MIN
        self._lock: anyio.Lock | None = None

    @property
    def listening(self) -> bool:
        connection = self._connection
        return connection is not None and not connection.is_closed()

    def waker(self, subscription_id: int) -> Waker:
        waker = self.wakers.get(subscription_id)
        if waker is None:
            waker = self.wakers[subscription_id] = Waker()
        return waker

    def wake(self, subscription_ids: Iterable[int] | None) -> None:
        """Wake local fetches at once (a notification would too, a little later)."""
        for subscription_id in subscription_ids or ():
            waker = self.wakers.get(subscription_id)
            if waker is not None:
                waker.wake()

    def wake_all(self) -> None:
        for waker in self.wakers.values():
            waker.wake()

    async def ensure(self) -> bool:
        """Listen if not yet (or no longer) listening; whether notifications now arrive."""
        if self.listening:
            return True
        if anyio.current_time() < self._retry_at:
            return False
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:  # one connection attempt at a time
            if not self.listening and anyio.current_time() >= self._retry_at:
                await self._listen()
        return self.listening

    async def _listen(self) -> None:
        try:
            connection: asyncpg.Connection[Any] = await asyncpg.connect(
                self.dsn, timeout=_CONNECT_TIMEOUT, server_settings=self.server_settings
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._failed(exc)
            return
        try:
            await connection.add_listener(self.channel, self._notified)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            connection.terminate()
            self._failed(exc)
            return
        connection.add_termination_listener(self._lost)
        self._connection = connection
        self._backoff = _BACKOFF_MIN
        # Whatever was published while nobody listened shows to a claim, not to a notification.
        self.wake_all()

    def _failed(self, exc: BaseException) -> None:
        log.warning(
            "cannot LISTEN on %s (polling meanwhile; again in %.1fs): %s",
            self.describe(),
            self._backoff,
            type(exc).__name__,
        )
        self._retry_at = anyio.current_time() + self._backoff
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)

    def _notified(self, connection: object, pid: int, channel: str, payload: object) -> None:
        try:
            subscription_id = int(str(payload))
        except ValueError:
            return
        waker = self.wakers.get(subscription_id)
        if waker is not None:
            waker.wake()

    def _lost(self, connection: object) -> None:
        if connection is self._connection:
            self._connection = None
            log.warning("LISTEN connection to %s lost; polling until it is back", self.describe())
            self.wake_all()

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            connection.remove_termination_listener(self._lost)
            with anyio.move_on_after(5, shield=True):
                await connection.close()
            if not connection.is_closed():
                connection.terminate()
        self.wake_all()
