"""The in-process idempotency store, for tests and the ``memory://`` broker.

Stores made with the same ``name`` in one process share their records (as ``memory://`` brokers
of one URL share their messages), so two runners in one process see each other's keys. Each
operation decides and writes without awaiting in between, which is what makes it atomic.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio.lowlevel
import msgspec

from eventfn.idempotency.base import (
    DEFAULT_LEASE,
    Claim,
    Clock,
    IdempotencyRecord,
    IdempotencyStore,
)

Records = dict[tuple[str, str], IdempotencyRecord]

_SHARED: dict[str, Records] = {}


class MemoryIdempotencyStore(IdempotencyStore):
    """Records in a dict: private, or shared by every store of the same ``name`` in a process.

    >>> store = MemoryIdempotencyStore("memory://orders")
    """

    def __init__(
        self, name: str | None = None, *, clock: Clock | None = None, lease: float = DEFAULT_LEASE
    ) -> None:
        import time

        super().__init__(clock=clock or time.time, lease=lease)
        self.name = name
        self.records: Records = {} if name is None else _SHARED.setdefault(name, {})

    @classmethod
    def reset(cls, name: str | None = None) -> None:
        """Forget the shared records of one name, or of all (for test isolation)."""
        if name is None:
            _SHARED.clear()
        else:
            _SHARED.pop(name, None)

    def describe(self) -> str:
        return f"memory ({self.name or 'private'})"

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def acquire(
        self, scope: str, key: str, fingerprint: str, *, lease: float
    ) -> Claim | IdempotencyRecord:
        await anyio.lowlevel.checkpoint()
        now = self.clock()
        current = self.records.get((scope, key))
        if current is not None and current.expires_at > now:
            return current
        claim = Claim(scope, key, fingerprint, self.new_token(), lease, now + lease)
        self.records[scope, key] = IdempotencyRecord(
            scope=scope,
            key=key,
            state="in_progress",
            fingerprint=fingerprint,
            token=claim.token,
            expires_at=claim.expires_at,
        )
        return claim

    async def complete(self, claim: Claim, *, ttl: float, outcome: bytes | None) -> bool:
        await anyio.lowlevel.checkpoint()
        current = self.records.get((claim.scope, claim.key))
        if current is not None and current.token != claim.token:
            return False
        self.records[claim.scope, claim.key] = IdempotencyRecord(
            scope=claim.scope,
            key=claim.key,
            state="completed",
            fingerprint=claim.fingerprint,
            token=claim.token,
            expires_at=self.clock() + ttl,
            outcome=outcome,
        )
        return True

    async def release(self, claim: Claim) -> None:
        await anyio.lowlevel.checkpoint()
        current = self.records.get((claim.scope, claim.key))
        if current is not None and current.token == claim.token:
            del self.records[claim.scope, claim.key]

    async def renew(self, claims: Sequence[Claim]) -> list[Claim]:
        await anyio.lowlevel.checkpoint()
        now = self.clock()
        lost = []
        for claim in claims:
            current = self.records.get((claim.scope, claim.key))
            if current is None or current.token != claim.token or current.state != "in_progress":
                lost.append(claim)
                continue
            claim.expires_at = now + claim.lease
            self.records[claim.scope, claim.key] = msgspec.structs.replace(
                current, expires_at=claim.expires_at
            )
        return lost

    async def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        await anyio.lowlevel.checkpoint()
        current = self.records.get((scope, key))
        return current if current is not None and current.expires_at > self.clock() else None

    async def sweep(self) -> int:
        await anyio.lowlevel.checkpoint()
        now = self.clock()
        expired = [k for k, record in self.records.items() if record.expires_at <= now]
        for k in expired:
            del self.records[k]
        return len(expired)
