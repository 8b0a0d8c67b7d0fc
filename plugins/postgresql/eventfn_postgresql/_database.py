"""The broker's connections to PostgreSQL: its pools, its schema, and errors at the boundary.

Two pools: a small one for the broker's own statements (fetch, settle, publish, ...), and one
made on first use for handlers' outbox transactions (:func:`eventfn_postgresql.transaction`), so
that 64 handlers holding transactions open never starve the runner's fetches and settles.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any, TypeAlias, TypeVar

import anyio
import asyncpg
from asyncpg.pool import PoolConnectionProxy

from eventfn.exceptions import BrokerError, BrokerUnavailable
from eventfn_postgresql._errors import CONTENDED, mapped
from eventfn_postgresql._sql import ADDED_TABLES, SCHEMA_VERSION, Statements
from eventfn_postgresql._url import Settings

log = logging.getLogger("eventfn.postgresql")

Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"
_T = TypeVar("_T")

# Bounds every broker statement, so that a shielded one (claim, settle) cannot hang forever on a
# server that stopped answering. Handlers' outbox transactions get no such bound.
_COMMAND_TIMEOUT = 60.0
_CONNECT_TIMEOUT = 10.0
_CONTENDED_ATTEMPTS = 5


async def _keep_session(connection: asyncpg.Connection[asyncpg.Record]) -> None:
    """The broker's own connections keep no session state: no reset query on release."""


class Database:
    """The pools of one broker instance, and the namespace's schema."""

    def __init__(self, settings: Settings, sql: Statements, described: str) -> None:
        self.settings = settings
        self.sql = sql
        self.described = described
        self._pool: Pool | None = None
        self._outbox: Pool | None = None
        self._outbox_lock: anyio.Lock | None = None

    def errors(self, what: str, *, all_unavailable: bool = False) -> AbstractContextManager[None]:
        """Map driver errors to ``BrokerError``/``BrokerUnavailable`` saying ``what`` failed."""
        return mapped(
            f"PostgreSQL broker {self.described}: {what}",
            self.settings.password,
            all_unavailable=all_unavailable,
        )

    async def open(self) -> None:
        """Connect and make the schema if it is not there (idempotent)."""
        if self._pool is not None:
            return
        with self.errors("cannot connect", all_unavailable=True):
            pool = await self._create_pool(
                min_size=1,
                max_size=self.settings.pool_size,
                command_timeout=_COMMAND_TIMEOUT,
                reset=_keep_session,
            )
        try:
            with self.errors("cannot prepare the schema", all_unavailable=True):
                async with pool.acquire() as connection:
                    await self._migrate(connection)
        except BaseException:
            pool.terminate()
            raise
        self._pool = pool

    async def _create_pool(self, **options: Any) -> Pool:
        pool: Pool = await asyncpg.create_pool(
            self.settings.dsn,
            timeout=_CONNECT_TIMEOUT,
            server_settings=self.settings.server_settings,
            **options,
        )
        return pool

    async def _migrate(self, connection: Connection) -> None:
        if await self._schema_version(connection) == SCHEMA_VERSION and await self._has_added(
            connection
        ):
            return
        async with connection.transaction():
            # Two runners starting at once on a new namespace: one creates, the other waits here
            # and then finds the schema made.
            await connection.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                f"eventfn:{self.settings.namespace}",
            )
            version = await self._schema_version(connection)
            if version is None:
                for statement in self.sql.create:
                    await connection.execute(statement)
            elif version > SCHEMA_VERSION:
                raise BrokerUnavailable(
                    f"PostgreSQL broker {self.described} has schema version {version}, newer "
                    f"than this eventfn-postgresql understands ({SCHEMA_VERSION}); upgrade it"
                )
            else:  # made by an older version: add what it lacks
                for statement in self.sql.added:
                    await connection.execute(statement)

    async def _schema_version(self, connection: Connection) -> int | None:
        # pg_class itself, not to_regclass(): a name lookup may answer from this session's
        # cache of names that did not exist, even after another runner created them.
        exists = await connection.fetchval(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n"
            " ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = 'meta')",
            self.settings.namespace,
        )
        if not exists:
            return None
        version: int | None = await connection.fetchval(self.sql.version)
        return version

    async def _has_added(self, connection: Connection) -> bool:
        """Whether the namespace has every table of ``ADDED_TABLES``."""
        count = await connection.fetchval(
            "SELECT count(*) FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n"
            " ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = ANY ($2::text[])",
            self.settings.namespace,
            list(ADDED_TABLES),
        )
        return bool(count == len(ADDED_TABLES))

    async def close(self) -> None:
        pools = (self._pool, self._outbox)
        self._pool = self._outbox = None
        for pool in pools:
            if pool is not None:
                with anyio.move_on_after(10, shield=True):
                    await pool.close()
                pool.terminate()  # whatever did not close in time

    def _connected(self) -> Pool:
        if self._pool is None:
            raise BrokerError(
                f"PostgreSQL broker {self.described} is not connected; "
                "use `async with broker:` or await broker.connect() first"
            )
        return self._pool

    async def call(self, what: str, operation: Callable[[Connection], Awaitable[_T]]) -> _T:
        """Run ``operation`` on a pooled connection; again if PostgreSQL aborted it as the
        loser of a deadlock (it changed nothing then)."""
        pool = self._connected()
        with self.errors(what):
            for attempt in itertools.count(1):
                try:
                    async with pool.acquire() as connection:
                        return await operation(connection)
                except CONTENDED as exc:
                    if attempt >= _CONTENDED_ATTEMPTS:
                        raise
                    log.debug("%s: %s, trying again", what, type(exc).__name__)
        raise AssertionError("unreachable")  # pragma: no cover

    async def outbox(self) -> Pool:
        """The pool of handlers' outbox transactions (made on first use)."""
        self._connected()
        if self._outbox_lock is None:
            self._outbox_lock = anyio.Lock()
        async with self._outbox_lock:
            if self._outbox is None:
                with self.errors("cannot connect", all_unavailable=True):
                    self._outbox = await self._create_pool(
                        min_size=0, max_size=self.settings.outbox_pool
                    )
        return self._outbox
