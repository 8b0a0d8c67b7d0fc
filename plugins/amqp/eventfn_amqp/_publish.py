"""Confirmed publishing: every message is stored by RabbitMQ before ``publish`` returns."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import anyio
from aiormq.abc import AbstractChannel
from aiormq.exceptions import AMQPError, ChannelNotFoundEntity
from pamqp.commands import Basic

from eventfn.exceptions import BrokerError, UnknownDestination
from eventfn_amqp._wire import dead


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One AMQP publish: where to, and what."""

    exchange: str
    routing_key: str
    body: bytes
    properties: Basic.Properties


class Publisher:
    """One channel in confirm mode, opened on first use and again after RabbitMQ closed it.

    A batch is published as concurrent ``basic.publish`` frames whose confirms are awaited
    together, so a batch costs about one round trip, not one per message.
    """

    def __init__(
        self, connect: Callable[[], Awaitable[aio_pika.abc.AbstractConnection]], described: str
    ) -> None:
        self._connect = connect
        self._described = described
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._raw: AbstractChannel | None = None
        self._lock = anyio.Lock()

    async def _ready(self) -> AbstractChannel:
        if not dead(self._raw):
            assert self._raw is not None
            return self._raw
        async with self._lock:
            if self._raw is None or dead(self._raw):
                await self.close()
                connection = await self._connect()
                self._channel = await connection.channel(publisher_confirms=True)
                self._raw = await self._channel.get_underlay_channel()
            return self._raw

    async def send(self, messages: Sequence[Outgoing]) -> None:
        """Publish every message and wait for all their confirms (each one exactly once)."""
        if not messages:
            return
        raw = await self._ready()
        results = await asyncio.gather(
            *(self._one(raw, message) for message in messages), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise self._error(result, messages)

    async def _one(self, raw: AbstractChannel, message: Outgoing) -> None:
        confirm: Any = await raw.basic_publish(
            message.body,
            exchange=message.exchange,
            routing_key=message.routing_key,
            properties=message.properties,
        )
        if not isinstance(confirm, Basic.Ack):
            raise BrokerError(f"RabbitMQ refused to store a message ({type(confirm).__name__})")

    def _error(self, error: BaseException, messages: Sequence[Outgoing]) -> BaseException:
        if isinstance(error, ChannelNotFoundEntity):
            # an exchange or queue deleted since it was checked (a drop, or an operator)
            return UnknownDestination(f"RabbitMQ on {self._described} no longer has it: {error}")
        if isinstance(error, AMQPError | ConnectionError):
            return BrokerError(
                f"publishing {len(messages)} messages to {self._described} failed: "
                f"{type(error).__name__}: {error}"
            )
        return error

    async def close(self) -> None:
        channel, self._channel, self._raw = self._channel, None, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):  # the server may have closed it
                await channel.close()
