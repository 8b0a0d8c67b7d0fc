"""asyncpg and OS errors, mapped at the boundary to eventfn's ``BrokerError`` tree.

Messages name the broker by its redacted URL. A PostgreSQL error text may name the user (``role
"x" does not exist``) but never has the password; a client-side one might quote the DSN, so the
password is also blanked out of every message, to be sure.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
from asyncpg import exceptions as pg

from eventfn.exceptions import BrokerError, BrokerUnavailable

# The server or the connection to it is gone or refusing: a runner retries these with backoff.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    pg.OperatorInterventionError,
    pg.InsufficientResourcesError,
)
# Two transactions that touched the same rows in another order: one is aborted, and running it
# again is safe because it changed nothing.
CONTENDED: tuple[type[BaseException], ...] = (pg.DeadlockDetectedError, pg.SerializationError)
DRIVER: tuple[type[BaseException], ...] = (asyncpg.PostgresError, pg.InternalClientError)
_MAPPED: tuple[type[BaseException], ...] = (*UNAVAILABLE, *DRIVER, ValueError)


def explain(exc: BaseException, password: str | None) -> str:
    """``Type: message`` of an exception, with ``password`` (if any) blanked out."""
    text = f"{type(exc).__name__}: {exc}"
    return text.replace(password, "***") if password else text


@contextmanager
def mapped(what: str, password: str | None, *, all_unavailable: bool = False) -> Iterator[None]:
    """Raise driver errors as ``BrokerUnavailable`` or ``BrokerError`` saying ``what`` failed.

    ``all_unavailable``: at start-up every failure means the broker cannot be used, including
    a ``ValueError`` from asyncpg's parsing of the DSN (explained, not chained: its text may
    quote the DSN).
    """
    try:
        yield
    except _MAPPED as exc:
        if isinstance(exc, UNAVAILABLE):
            error: type[BrokerError] = BrokerUnavailable
        elif isinstance(exc, DRIVER):
            error = BrokerUnavailable if all_unavailable else BrokerError
        elif all_unavailable:
            error = BrokerUnavailable
        else:
            raise  # a ValueError of eventfn's own, not the driver's
        # A client-side error may quote the DSN: explained without its password, not chained.
        cause = None if isinstance(exc, ValueError) else exc
        raise error(f"{what}: {explain(exc, password)}") from cause
