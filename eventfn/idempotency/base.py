"""The idempotency store protocol: what the idempotency middleware asks of a store.

A store keeps one record per ``(scope, key)``: the scope is a subscription (each topic group's
effect is its own), the key is the message id or the user's ``idempotency_key``. A record is

- **in progress**, held by one ``token`` under a lease (``expires_at``) that its holder renews
  while the handler runs, so that a crashed holder frees the key after one lease and a long
  handler keeps it; or
- **completed**, remembered until ``expires_at`` (the TTL), with the handler's outcome (stored
  result and emitted messages) as an opaque JSON document.

Every record carries the fingerprint of the payload that made it, so that the same key with
another payload is told apart from a duplicate. Expiry is judged from the stored ``expires_at``
at each operation; :meth:`IdempotencyStore.sweep` only reclaims space.

A store is a plug-in point: subclass :class:`IdempotencyStore`, implement its abstract methods
(each one atomic, see their docstrings) and run ``tests/test_idempotency.py``'s store tests
against it. Background duties (renewing held leases, sweeping) come with the base class.
"""

from __future__ import annotations

import abc
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Literal, Self

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec

from eventfn.exceptions import EventfnError

log = logging.getLogger("eventfn.idempotency")

Clock = Callable[[], float]
State = Literal["in_progress", "completed"]

DEFAULT_LEASE = 30.0
"""Seconds an in-progress record is held without renewal (the shortest lease a store grants)."""

SWEEP_EVERY = 300.0
"""Seconds between sweeps of expired records (space only: expiry never depends on them)."""


class IdempotencyError(EventfnError):
    """The idempotency store failed an operation (the message is retried by its policy)."""


class IdempotencyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A key as a store holds it. ``expires_at`` ends the lease (in progress) or the TTL."""

    scope: str
    key: str
    state: State
    fingerprint: str
    token: str
    expires_at: float
    outcome: bytes | None = None


class Claim:
    """Proof that this caller holds a key in progress: returned by a successful acquire.

    ``expires_at`` follows the renewals; ``lost`` turns true when a renewal finds that the key
    was taken over (the lease had run out and someone else acquired it).
    """

    __slots__ = ("expires_at", "fingerprint", "key", "lease", "lost", "scope", "token")

    def __init__(
        self, scope: str, key: str, fingerprint: str, token: str, lease: float, expires_at: float
    ) -> None:
        self.scope = scope
        self.key = key
        self.fingerprint = fingerprint
        self.token = token
        self.lease = lease
        self.expires_at = expires_at
        self.lost = False

    def __repr__(self) -> str:
        return f"Claim({self.scope!r}, {self.key!r}, token={self.token!r})"


class IdempotencyStore(abc.ABC):
    """Base class of idempotency stores. Use one as ``async with store:``.

    Args:
        clock: epoch seconds; the broker's clock, so that a virtual clock works.
        lease: the shortest in-progress lease, in seconds; the middleware asks for longer ones
            for handlers with long timeouts.

    >>> async with SQLiteIdempotencyStore("shop.idempotency.db") as store:
    ...     got = await store.acquire("orders/reserve", "o-1", fingerprint, lease=30)
    """

    def __init__(self, *, clock: Clock = time.time, lease: float = DEFAULT_LEASE) -> None:
        if not lease > 0:
            raise ValueError(f"lease={lease!r} must be a positive number of seconds")
        self.clock = clock
        self.lease = lease
        self.held: dict[str, Claim] = {}
        # Renewal is due after a third of a lease, and every lease is at least ``lease``:
        # looking at a third of that (at most every second) renews each claim in time.
        self.renew_every = min(1.0, lease / 3)
        self.sweep_every = SWEEP_EVERY
        # A token must differ from every other acquire of the key, in any process: a random
        # 48-bit prefix per store object (one per runner) and a counter make that cheap.
        self._token_prefix = os.urandom(6).hex()
        self._tokens = itertools.count(1)
        self._stack: AsyncExitStack | None = None

    def new_token(self) -> str:
        """A token no other acquire (in any process) has used."""
        return f"{self._token_prefix}-{next(self._tokens)}"

    def describe(self) -> str:
        """Where the records live, for logs."""
        return type(self).__name__

    # -- the plug-in surface ---------------------------------------------------------------------

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open connections and create the schema if needed."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close connections. Idempotent."""

    @abc.abstractmethod
    async def acquire(
        self, scope: str, key: str, fingerprint: str, *, lease: float
    ) -> Claim | IdempotencyRecord:
        """One atomic step: hold the key in progress for ``lease`` seconds, or say who has it.

        The key is acquired when it has no record or its record has expired (lease or TTL
        over, judged from the stored time): the record becomes in progress under a new token
        with this ``fingerprint``, and a :class:`Claim` is returned. Otherwise the record as it
        stands (in progress elsewhere, or completed) is returned. Of any number of concurrent
        acquirers of one key, in any number of processes, exactly one gets the claim.
        """

    @abc.abstractmethod
    async def complete(self, claim: Claim, *, ttl: float, outcome: bytes | None) -> bool:
        """Mark the claimed key completed for ``ttl`` seconds, keeping ``outcome`` (JSON).

        Returns False when the claim was lost (another token holds the key); a record that
        vanished meanwhile (expired and swept, not taken) is written completed anyway.
        """

    @abc.abstractmethod
    async def release(self, claim: Claim) -> None:
        """Delete the record if ``claim`` still holds it, so that the next acquire wins at once."""

    @abc.abstractmethod
    async def renew(self, claims: Sequence[Claim]) -> list[Claim]:
        """Extend each claim's lease by its own ``lease`` from now; return the lost ones.

        A claim is lost when its record now has another token, is completed or is gone. A claim
        whose lease ran out but that nobody took over (nor swept) is renewed: it was never lost.
        """

    @abc.abstractmethod
    async def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        """The record of a key, or None if it has none or it has expired."""

    @abc.abstractmethod
    async def sweep(self) -> int:
        """Delete expired records; how many. Only space depends on it, never correctness."""

    # -- held leases ------------------------------------------------------------------------------

    def hold(self, claim: Claim) -> None:
        """Keep renewing ``claim`` until :meth:`drop` (while its handler runs)."""
        self.held[claim.token] = claim

    def drop(self, claim: Claim) -> None:
        """Stop renewing ``claim``."""
        self.held.pop(claim.token, None)

    async def renew_held(self) -> None:
        """Renew every held claim that has used a third of its lease."""
        now = self.clock()
        due = [c for c in self.held.values() if now >= c.expires_at - c.lease * 2 / 3]
        if not due:
            return
        for claim in await self.renew(due):
            claim.lost = True
            self.drop(claim)
            log.warning(
                "idempotency lease lost: %s key=%r was taken over while its handler ran",
                claim.scope,
                claim.key,
            )

    # -- running ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        stack = AsyncExitStack()
        await stack.enter_async_context(self._running())
        self._stack = stack
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        await self.connect()
        try:
            async with anyio.create_task_group() as tg:
                self._start(tg)
                try:
                    yield
                finally:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                        await self._drain()
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.close()

    def _start(self, tg: anyio.abc.TaskGroup) -> None:
        """Start the background duties; a store with its own (a write batcher) adds them."""
        tg.start_soon(self._keep)

    async def _drain(self) -> None:
        """Finish writes still queued (a store that batches writes overrides this)."""
        await anyio.lowlevel.checkpoint()

    async def _keep(self) -> None:
        next_sweep = anyio.current_time()
        while True:
            await anyio.sleep(self.renew_every)
            if anyio.current_time() >= next_sweep:
                next_sweep = anyio.current_time() + self.sweep_every
                await self._quietly("sweep", self.sweep)
            await self._quietly("renewal", self.renew_held)

    async def _quietly(self, what: str, step: Callable[[], Awaitable[object]]) -> None:
        try:
            await step()
        except Exception as exc:
            # The next tick tries again; a lease outlives several ticks.
            log.warning("idempotency %s failed: %s: %s", what, type(exc).__name__, exc)
