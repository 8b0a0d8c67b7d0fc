"""The settler: gathers settlements and hands them to the broker in batches (group commit)."""

from __future__ import annotations

import logging

import anyio

from eventfn import telemetry
from eventfn.brokers.base import Broker, Failure, Settlement
from eventfn.exceptions import PublishError

log = logging.getLogger("eventfn.runner")


class Settler:
    """Batches settlements: while one batch is with the broker, the next one gathers.

    A batch the broker fails to take is kept and tried again with backoff; meanwhile the
    leases run out and the broker redelivers, so a broker fault costs duplicates, not losses.
    """

    def __init__(self, broker: Broker, *, observed: bool = False) -> None:
        self.broker = broker
        self.observed = observed  # end the send spans of emitted messages, count them
        self.pending: list[Settlement] = []
        self.flushing = False
        self._wake = anyio.Event()
        self._closed = False
        self._flushed = anyio.Event()

    @property
    def idle(self) -> bool:
        """Nothing waiting and nothing with the broker."""
        return not self.pending and not self.flushing

    def add(self, settlement: Settlement) -> None:
        self.pending.append(settlement)
        if len(self.pending) == 1:
            self._wake.set()

    def close(self) -> None:
        """Flush what is pending, then stop."""
        self._closed = True
        self._wake.set()

    async def wait_flushed(self) -> None:
        """Wait until everything added so far has been handed to the broker."""
        while not self.idle:
            await self._flushed.wait()

    async def _settle_apart(self, batch: list[Settlement]) -> None:
        for index, settlement in enumerate(batch):
            try:
                await self.broker.settle([settlement])
                if self.observed:
                    telemetry.sent(settlement.emitted, self.broker.system)
            except PublishError as exc:
                log.error(
                    "dead-letter %s id=%s: what it emitted was refused: %s",
                    settlement.delivery.subscription,
                    settlement.delivery.id,
                    exc,
                )
                failure = Failure(
                    error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
                    message=f"an emitted event was refused: {exc}",
                    at=self.broker.clock(),
                )
                dead = Settlement(delivery=settlement.delivery, outcome="dead", failure=failure)
                await self.broker.settle([dead])
                if self.observed:
                    telemetry.sent(settlement.emitted, self.broker.system, exc)
            except Exception:
                self.pending[:0] = batch[index:]  # the broker is failing: the loop retries
                raise

    async def run(self) -> None:
        backoff = 0.05
        while True:
            if not self.pending:
                if self._closed:
                    return
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            batch, self.pending = self.pending, []
            self.flushing = True
            try:
                await self.broker.settle(batch)
                backoff = 0.05
                if self.observed:
                    for settlement in batch:
                        if settlement.emitted:
                            telemetry.sent(settlement.emitted, self.broker.system)
            except PublishError:
                # permanent, and caused by one message's emits: settle apart, dead-letter it
                await self._settle_apart(batch)
            except Exception as exc:
                self.pending[:0] = batch
                log.warning(
                    "settle of %d messages failed, trying again in %.2fs: %s: %s",
                    len(batch),
                    backoff,
                    type(exc).__name__,
                    exc,
                )
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                self.flushing = False
                self._flushed.set()
                self._flushed = anyio.Event()
