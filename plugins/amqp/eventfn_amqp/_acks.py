"""Acks of a settle batch as few frames as RabbitMQ allows: ``basic.ack`` with ``multiple``.

``basic.ack(tag, multiple=True)`` acks every delivery of the channel still outstanding up to
``tag``, in one frame (one write, and one settle command in the quorum queue's log instead of
one per message). That is only right for a run of tags that starts at the channel's oldest
outstanding delivery and holds nothing this instance has not settled, so :class:`Acks` keeps,
per channel, the tags delivered and not yet settled, in order. A batch's acks that lie in that
leading run go out as one ``multiple`` ack (its highest tag, which is still outstanding, as
RabbitMQ requires); the rest (behind a delivery still being handled) go one by one, at once:
an ack is never held back.

Tags of a channel are 1, 2, 3... in delivery order. Every delivery must have been seen here, in
sequence, before ``multiple`` may cover it: after a gap (a delivery aiormq did not hand over),
the channel's acks go one by one, as a ``multiple`` ack could take a message nobody handled.

Frames go out in the order they were planned (one settle at a time per channel): a ``multiple``
ack overtaking an earlier single ack or nack would take that tag first, and RabbitMQ closes a
channel that acks an unknown tag; a nack counts as settled only once its frame is queued, so no
``multiple`` ack can take a message on its way back to the queue.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

import anyio
from aiormq.abc import AbstractChannel

_FRAME_TIMEOUT = 5.0


class Acks:
    """The delivery tags of one channel that are not settled yet, in delivery order."""

    __slots__ = ("_lock", "_next", "_order", "_settled", "contiguous")

    def __init__(self) -> None:
        self._order: deque[int] = deque()
        self._settled: set[int] = set()
        self._next = 1
        self.contiguous = True
        self._lock = asyncio.Lock()  # FIFO, and free of checkpoints when nobody holds it

    async def ack(self, channel: AbstractChannel, tags: Iterable[int]) -> None:
        """Ack these outstanding deliveries of ``channel``, in as few frames as allowed."""
        async with self._lock:
            multiple, single = self.plan(tags)
            # not waiting for the socket to drain: a connection that dies meanwhile never
            # takes the frames, and RabbitMQ requeues the messages with the channel
            with anyio.move_on_after(_FRAME_TIMEOUT):
                if multiple:
                    await channel.basic_ack(multiple, multiple=True, wait=False)
                for tag in single:
                    await channel.basic_ack(tag, wait=False)

    async def nack(self, channel: AbstractChannel, tag: int) -> None:
        """Return an outstanding delivery of ``channel`` to its queue."""
        async with self._lock:
            with anyio.move_on_after(_FRAME_TIMEOUT):
                await channel.basic_nack(tag, requeue=True)
                self.settled(tag)

    def arrived(self, tag: int) -> None:
        """A delivery was handed over (in tag order, as aiormq runs its callbacks)."""
        if tag != self._next:
            self.contiguous = False  # from now on: one ack per delivery
            self._order.clear()
            self._settled.clear()
        self._next = tag + 1
        if self.contiguous:
            self._order.append(tag)

    def settled(self, tag: int) -> None:
        """A delivery was settled by a frame of its own (a nack, or a single ack)."""
        if self.contiguous:
            self._settled.add(tag)
            self._advance(())

    def plan(self, tags: Iterable[int]) -> tuple[int, list[int]]:
        """Acks for these outstanding tags: the tag of one ``multiple`` ack (0 for none), and
        the tags to ack one by one. Every tag given counts as settled from now on."""
        batch = list(tags)
        if not self.contiguous:
            return 0, batch
        self._settled.update(batch)
        multiple = self._advance(batch)
        if not multiple:
            return 0, batch
        # the leading run is a prefix of the (increasing) tags: the rest are all above it
        return multiple, [tag for tag in batch if tag > multiple]

    def _advance(self, batch: Iterable[int]) -> int:
        """Drop the leading run of settled tags; the highest of them that is in ``batch``."""
        mine = set(batch)
        highest = 0
        order, settled = self._order, self._settled
        while order and order[0] in settled:
            tag = order.popleft()
            settled.discard(tag)
            if tag in mine:
                highest = tag
        return highest
