"""The NATS connection and the JetStream API calls the broker makes, with errors mapped.

Every vendor exception stops here: what leaves is ``BrokerUnavailable`` (the server cannot be
reached or did not answer in time) or ``BrokerError`` (it answered with an error), each naming
the broker by its redacted URL, never the raw one. Requests and publish acknowledgements come
back on one wildcard inbox, so a batch of publishes is sent at once and its acks awaited
together (a window), instead of one round trip each.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from eventfn.exceptions import BrokerError, BrokerUnavailable, EventfnError, PayloadTooLarge
from eventfn_nats._names import Settings

log = logging.getLogger("eventfn.nats")

API = "$JS.API"
WRONG_LAST_SEQUENCE = 10071
_WINDOW = 1024  # publishes in flight before their acks are awaited


class ApiError(BrokerError):
    """JetStream answered a request with an error; ``code`` is its ``err_code``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Stored:
    """A message read back from a stream (a direct get)."""

    sequence: int
    subject: str
    data: bytes
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class PubAck:
    sequence: int
    duplicate: bool


Outgoing = tuple[str, bytes, dict[str, str] | None]
"""A publish: subject, payload, headers."""


class Wire:
    """One connection to NATS with JetStream; ``describe`` names it in errors."""

    def __init__(self, settings: Settings, describe: Callable[[], str], timeout: float) -> None:
        self.settings = settings
        self.describe = describe
        self.timeout = timeout
        self._nc: Client | None = None
        self._closing = False
        self._prefix = ""
        self._waiting: dict[str, tuple[asyncio.Future[Msg], Outgoing | None]] = {}
        self._tokens = itertools.count(1)
        self._listeners: list[Callable[[], None]] = []

    @property
    def nc(self) -> Client:
        if self._nc is None or self._nc.is_closed:
            raise BrokerUnavailable(f"{self.describe()} is not connected; call connect() first")
        return self._nc

    async def connect(self) -> None:
        settings = self.settings
        nc = Client()
        try:
            await nc.connect(
                servers=settings.servers,
                user=settings.user,
                password=settings.password,
                token=settings.token,
                name="eventfn",
                connect_timeout=2,
                allow_reconnect=True,
                max_reconnect_attempts=1,  # at start-up: fail fast, naming the cause
                reconnect_time_wait=1,
                # No buffering while disconnected: a publish then fails (the runner retries it),
                # rather than an ack going out later, after its lease may have passed on.
                pending_size=0,
                skip_subject_validation=True,  # every subject is built by _names
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
            )
        except Exception as exc:  # nats-py raises several unrelated kinds on connect
            cause = nc.last_error or exc
            with contextlib.suppress(Exception):
                await nc.close()
            raise BrokerUnavailable(
                f"cannot connect to {self.describe()}: {_reason(cause)}; is nats-server "
                "running with JetStream (-js)?"
            ) from None
        # Once running, reconnect for as long as it takes: the runner retries with backoff.
        nc.options["max_reconnect_attempts"] = -1
        self._nc = nc
        self._closing = False
        self._prefix = nc.new_inbox()
        await nc.subscribe(f"{self._prefix}.*", cb=self._on_reply)

    @property
    def connected(self) -> bool:
        return self._nc is not None

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is None or nc.is_closed:
            return
        self._closing = True
        with contextlib.suppress(Exception):
            if nc.is_connected:
                await nc.flush(timeout=2)  # acks are sent without waiting: let them leave
        with contextlib.suppress(Exception):
            await nc.close()

    # -- callbacks ------------------------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        log.warning("nats %s: %s", self.describe(), _reason(exc))

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("nats %s: disconnected, reconnecting", self.describe())

    async def _on_reconnected(self) -> None:
        log.warning("nats %s: reconnected", self.describe())
        for listener in self._listeners:
            listener()
        # What was sent as the connection dropped may never have reached the server. A read or a
        # publish (with its Nats-Msg-Id or expected last sequence) is sent again; an ack or nak
        # is not (its lease may have passed on meanwhile): its caller hears it was lost.
        nc = self._nc
        for token, (future, item) in list(self._waiting.items()):
            if future.done():
                continue
            if item is None or nc is None:
                future.set_exception(BrokerUnavailable(f"{self.describe()}: connection lost"))
                continue
            subject, payload, headers = item
            with contextlib.suppress(Exception):
                await nc.publish(subject, payload, f"{self._prefix}.{token}", headers)

    def on_reconnect(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after each reconnection (requests in flight may have been lost)."""
        self._listeners.append(listener)

    async def _on_reply(self, msg: Msg) -> None:
        waiting = self._waiting.pop(msg.subject[len(self._prefix) + 1 :], None)
        if waiting is not None and not waiting[0].done():
            waiting[0].set_result(msg)

    # -- requests ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def boundary(self, what: str) -> Iterator[None]:
        """Map whatever nats-py raises inside to eventfn's errors."""
        try:
            yield
        except EventfnError:
            raise
        except nats.errors.MaxPayloadError:
            raise PayloadTooLarge(
                f"{what} on {self.describe()}: a message is over the server's max_payload"
            ) from None
        except nats.errors.OutboundBufferLimitError:  # publishing while not connected
            raise BrokerUnavailable(
                f"{what} on {self.describe()} failed: not connected (reconnecting)"
            ) from None
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            raise BrokerUnavailable(f"{what} on {self.describe()} failed: {_reason(exc)}") from None

    async def send(
        self, outgoing: Sequence[Outgoing], what: str, *, again: bool = True
    ) -> list[Msg]:
        """Publish each with its own reply inbox; the replies, in order.

        ``again``: after a reconnection, send what got no reply yet again (see
        ``_on_reconnected``); an ack or nak says False.
        """
        replies: list[Msg] = []
        with self.boundary(what):
            for start in range(0, len(outgoing), _WINDOW):
                futures: list[asyncio.Future[Msg]] = []
                tokens: list[str] = []
                try:
                    for item in outgoing[start : start + _WINDOW]:
                        token = str(next(self._tokens))
                        future = asyncio.get_running_loop().create_future()
                        self._waiting[token] = (future, item if again else None)
                        futures.append(future)
                        tokens.append(token)
                        subject, payload, headers = item
                        await self.nc.publish(subject, payload, f"{self._prefix}.{token}", headers)
                    async with asyncio.timeout(self.timeout):
                        replies += await asyncio.gather(*futures)
                finally:
                    for token in tokens:
                        self._waiting.pop(token, None)
        return replies

    async def api(self, operation: str, request: dict[str, Any] | None = None) -> dict[str, Any]:
        """One JetStream API call (``STREAM.INFO.name``...); its JSON answer."""
        payload = b"" if request is None else json.dumps(request).encode()
        [reply] = await self.send([(f"{API}.{operation}", payload, None)], operation)
        _check_status(reply, operation, self.describe)
        answer: dict[str, Any] = json.loads(reply.data)
        error = answer.get("error")
        if error:
            raise ApiError(
                f"{operation} on {self.describe()}: {error.get('description')}",
                int(error.get("err_code", 0)),
            )
        return answer

    async def publish(self, outgoing: Sequence[Outgoing], what: str) -> list[PubAck]:
        """Store messages in their streams; raises on the first one refused."""
        acks = []
        for reply in await self.send(outgoing, what):
            _check_status(reply, what, self.describe)
            answer = json.loads(reply.data)
            error = answer.get("error")
            if error:
                raise ApiError(
                    f"{what} on {self.describe()}: {error.get('description')}",
                    int(error.get("err_code", 0)),
                )
            acks.append(PubAck(int(answer["seq"]), bool(answer.get("duplicate"))))
        return acks

    async def publish_each(self, outgoing: Sequence[Outgoing], what: str) -> list[ApiError | None]:
        """Store messages in their streams; for each, None or the error it was refused with."""
        results: list[ApiError | None] = []
        for reply in await self.send(outgoing, what):
            _check_status(reply, what, self.describe)
            error = json.loads(reply.data).get("error")
            results.append(
                None
                if not error
                else ApiError(
                    f"{what} on {self.describe()}: {error.get('description')}",
                    int(error.get("err_code", 0)),
                )
            )
        return results

    async def get(self, stream: str, request: dict[str, Any]) -> Stored | None:
        """A direct get (``seq``, ``last_by_subj`` or ``next_by_subj``); None if not found."""
        [found] = await self.get_many(stream, [request])
        return found

    async def get_many(
        self, stream: str, requests: Sequence[dict[str, Any]]
    ) -> list[Stored | None]:
        subject = f"{API}.DIRECT.GET.{stream}"
        outgoing = [(subject, json.dumps(r).encode(), None) for r in requests]
        found: list[Stored | None] = []
        for reply in await self.send(outgoing, f"reading {stream}"):
            headers = reply.headers or {}
            status = headers.get("Status")
            if status == "404":
                found.append(None)
                continue
            if status:
                raise BrokerError(f"reading {stream} on {self.describe()}: status {status}")
            found.append(
                Stored(int(headers["Nats-Sequence"]), headers["Nats-Subject"], reply.data, headers)
            )
        return found

    async def purge(self, stream: str, subject: str) -> int:
        """Delete every message of ``subject`` (wildcards allowed); how many."""
        answer = await self.api(f"STREAM.PURGE.{stream}", {"filter": subject})
        return int(answer.get("purged", 0))

    async def delete(self, stream: str, sequence: int) -> None:
        with contextlib.suppress(ApiError):  # already gone is fine
            await self.api(f"STREAM.MSG.DELETE.{stream}", {"seq": sequence, "no_erase": True})

    async def delete_many(self, stream: str, sequences: Sequence[int]) -> None:
        """Delete these messages, all at once; one already gone is fine."""
        subject = f"{API}.STREAM.MSG.DELETE.{stream}"
        await self.send(
            [
                (subject, json.dumps({"seq": seq, "no_erase": True}).encode(), None)
                for seq in sequences
            ],
            f"deleting from {stream}",
        )

    async def subject_counts(self, stream: str, subjects: str) -> dict[str, int]:
        """Messages per subject matching ``subjects`` in ``stream``."""
        counts: dict[str, int] = {}
        while True:
            request = {"subjects_filter": subjects, "offset": len(counts)}
            answer = await self.api(f"STREAM.INFO.{stream}", request)
            page = answer["state"].get("subjects") or {}
            counts.update(page)
            if not page or len(counts) >= int(answer.get("total", 0)):
                return counts


def _check_status(reply: Msg, what: str, describe: Callable[[], str]) -> None:
    status = (reply.headers or {}).get("Status")
    if status == "503":
        raise BrokerUnavailable(f"{what} on {describe()}: no JetStream answered (status 503)")
    if status:
        raise BrokerError(f"{what} on {describe()}: status {status}")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
