"""Idempotency: exactly-once *effects* from at-least-once delivery.

For a subscription with ``idempotent=True`` (or an ``idempotency_key=``), each message's key is
acquired in the idempotency store before the handler runs:

- new (or its record expired): the handler runs while the key is held in progress under a lease
  that the store renews; when it returns, the key is marked completed for ``idempotency_ttl``
  with the events it emitted (and its result, with ``store_result=True``). If it raises
  (anything, ``Drop`` and ``DeadLetter`` included), the key is released and the exception goes
  on as before, so a retry or a replay runs it again.
- completed with the same payload: :class:`~eventfn.exceptions.Duplicate`: acked without
  running, the first run's emitted events published again (same ids) in case its ack was lost.
- in progress elsewhere: ``on_duplicate="wait"`` (default) polls until it completes (a
  duplicate) or its lease runs out (taken over), for at most one lease, then retries later;
  ``on_duplicate="retry"`` raises ``Retry(after=<the holder's remaining lease>)`` at once.
  Never two runs of one key at once.
- the same key with a different payload (completed or in progress): dead-lettered, naming the
  key; never skipped silently.

The key is the message id, or ``idempotency_key(event)``, scoped to the subscription (each topic
group's effect is its own). The payload's fingerprint is a BLAKE2b hash of its bytes.

What this cannot do: a crash *between* a handler's side effect and the completion record (a few
milliseconds) leaves the key in progress, and its lease expiry lets the handler run again. Only
an effect committed together with the record, or an effect that is idempotent itself, closes
that window.
"""

from __future__ import annotations

import inspect
import logging
import typing
from collections.abc import Callable
from hashlib import blake2b
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from eventfn.brokers.base import OutgoingMessage
from eventfn.exceptions import ConfigurationError, DeadLetter, Duplicate
from eventfn.idempotency.base import Claim, IdempotencyRecord, IdempotencyStore
from eventfn.retry import Retry

if TYPE_CHECKING:
    from eventfn.middleware import Call, Environment, Invocation
    from eventfn.subscriptions import Subscription

log = logging.getLogger("eventfn.idempotency")

FIRST_POLL = 0.01
MAX_POLL = 0.5
RELEASE_TIMEOUT = 10.0


_NO_RESULT = msgspec.Raw()
"""msgspec omits a default by identity: always this object for "no result", never a new one."""


class _Outcome(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a completed key keeps: the handler's result (JSON) and the messages it emitted."""

    result: msgspec.Raw = _NO_RESULT
    emitted: tuple[OutgoingMessage, ...] = ()


_encode = msgspec.json.Encoder().encode
_decode_outcome = msgspec.json.Decoder(_Outcome).decode


def idempotency(call_next: Call, subscription: Subscription, env: Environment) -> Call:
    """Run each key's handler once; see the module docstring."""
    options = subscription.options
    if not options.idempotent:
        return call_next
    if subscription.batch is not None:
        # A batch is many keys in one call: there is no one key to hold (registration refuses
        # this too; this guards a subscription built another way).
        raise ConfigurationError(
            f"handler {subscription.name}: idempotent= is not supported on a batch handler"
        )
    store = env.idempotency
    if store is None:
        raise ConfigurationError(
            f"handler {subscription.name} is idempotent but the runner opened no idempotency "
            "store; run it with eventfn.Runner (or set env.idempotency)"
        )
    scope = subscription.ref.name
    key_of = _key_getter(subscription)
    timeout = subscription.timeout
    lease = max(store.lease, 2 * timeout) if timeout else store.lease
    ttl = options.idempotency_ttl
    keep_result = options.store_result
    duplicates = _Duplicates(store, scope, lease, options.on_duplicate)

    async def call(invocation: Invocation) -> Any:
        key = key_of(invocation)
        fingerprint = blake2b(invocation.envelope.payload_bytes(), digest_size=16).hexdigest()
        got = await store.acquire(scope, key, fingerprint, lease=lease)
        claim = got if isinstance(got, Claim) else await duplicates.handle(got, key, fingerprint)
        store.hold(claim)
        try:
            result = await call_next(invocation)
        except BaseException:
            store.drop(claim)
            await _release(store, claim)
            raise
        store.drop(claim)
        emitted = invocation.context.emitted
        kept = result if keep_result else None
        outcome = _outcome(kept, emitted, scope) if kept is not None or emitted else None
        await _complete(store, claim, ttl, outcome)
        return result

    return call


class _Duplicates:
    """What to do when the key is not free: a duplicate, a conflict, or wait for its holder."""

    def __init__(self, store: IdempotencyStore, scope: str, lease: float, policy: str) -> None:
        self.store = store
        self.scope = scope
        self.lease = lease
        self.wait = policy == "wait"

    async def handle(self, record: IdempotencyRecord, key: str, fingerprint: str) -> Claim:
        """Raise ``Duplicate``, ``DeadLetter`` or ``Retry``, or return the key once taken over."""
        deadline: float | None = None
        delay = FIRST_POLL
        while True:
            self._check(record, key, fingerprint)
            remaining = max(0.0, record.expires_at - self.store.clock())
            now = anyio.current_time()
            deadline = now + self.lease if deadline is None else deadline
            if not self.wait or now >= deadline:
                raise Retry(after=remaining)
            # Poll without holding anything: each poll is an acquire, which takes the key over
            # as soon as the holder's stored lease has run out.
            await anyio.sleep(min(delay, remaining + 0.001, deadline - now))
            delay = min(delay * 2, MAX_POLL)
            got = await self.store.acquire(self.scope, key, fingerprint, lease=self.lease)
            if isinstance(got, Claim):
                return got
            record = got

    def _check(self, record: IdempotencyRecord, key: str, fingerprint: str) -> None:
        if record.fingerprint != fingerprint:
            state = "completed" if record.state == "completed" else "in progress"
            raise DeadLetter(
                f"idempotency key {key!r} of {self.scope} was already used for a different "
                f"payload ({state}, payload hash {record.fingerprint[:12]}, this one "
                f"{fingerprint[:12]}); give each distinct event its own key"
            )
        if record.state == "completed":
            raise Duplicate(
                f"idempotency key {key!r} of {self.scope} was already handled",
                emitted=_emitted(record),
            )


async def _release(store: IdempotencyStore, claim: Claim) -> None:
    # Shielded: a handler cancelled at shutdown must still free its key for the redelivery.
    with anyio.move_on_after(RELEASE_TIMEOUT, shield=True):
        try:
            await store.release(claim)
        except Exception as exc:
            log.warning(
                "could not release idempotency key %r of %s (free again once its lease runs "
                "out): %s: %s",
                claim.key,
                claim.scope,
                type(exc).__name__,
                exc,
            )


async def _complete(
    store: IdempotencyStore, claim: Claim, ttl: float, outcome: bytes | None
) -> None:
    try:
        completed = await store.complete(claim, ttl=ttl, outcome=outcome)
    except Exception as exc:
        # The effect has happened: failing the message now would run it again for sure. Acked,
        # the key stays in progress until its lease runs out, and only a later duplicate runs.
        log.error(
            "could not mark idempotency key %r of %s completed; a duplicate arriving after its "
            "lease may run again: %s: %s",
            claim.key,
            claim.scope,
            type(exc).__name__,
            exc,
        )
        return
    if not completed:
        log.warning(
            "idempotency key %r of %s was taken over while its handler ran (lease lost)",
            claim.key,
            claim.scope,
        )


def _outcome(result: Any, emitted: list[OutgoingMessage], scope: str) -> bytes | None:
    raw = _NO_RESULT
    if result is not None:
        try:
            raw = msgspec.Raw(_encode(result))
        except (TypeError, msgspec.EncodeError) as exc:
            # The effect has happened: keep the key completed, without the result.
            log.error("%s: result not stored, it cannot be encoded as JSON: %s", scope, exc)
    if raw is _NO_RESULT and not emitted:
        return None
    # an open send span is this process's business, not part of what the key keeps
    kept = tuple(m if m.span is None else msgspec.structs.replace(m, span=None) for m in emitted)
    return _encode(_Outcome(result=raw, emitted=kept))


def _emitted(record: IdempotencyRecord) -> tuple[OutgoingMessage, ...]:
    return _decode_outcome(record.outcome).emitted if record.outcome else ()


def stored_result(record: IdempotencyRecord) -> bytes | None:
    """The JSON of the result a completed key keeps (``store_result=True``), if any.

    >>> msgspec.json.decode(stored_result(await store.get("orders/reserve", "o-1")))
    """
    result = _decode_outcome(record.outcome).result if record.outcome else _NO_RESULT
    return bytes(result) if result else None


def _message_id(invocation: Invocation) -> str:
    return invocation.envelope.id


def _key_getter(subscription: Subscription) -> Callable[[Invocation], str]:
    function = subscription.options.idempotency_key
    if function is None:
        return _message_id
    index = _event_index(subscription)
    where = f"idempotency_key of {subscription.name}"

    def key_of(invocation: Invocation) -> str:
        try:
            key = function(invocation.args[index])
        except Exception as exc:
            # The same event gives the same failure every time: retrying cannot help.
            raise DeadLetter(f"{where} failed on this event: {type(exc).__name__}: {exc}") from exc
        if key is None or key == "":
            raise DeadLetter(f"{where} returned {key!r} for this event; it must return a key")
        return key if isinstance(key, str) else str(key)

    return key_of


def _event_index(subscription: Subscription) -> int:
    """Where the decoded event is among the handler's arguments."""
    if subscription.data_type is not None:
        hints = typing.get_type_hints(subscription.handler)
        parameters = inspect.signature(subscription.handler).parameters
        for index, name in enumerate(parameters):
            if hints.get(name) == subscription.data_type:
                return index
    raise ConfigurationError(
        f"handler {subscription.name} has idempotency_key= but no event parameter to apply it "
        "to; add a parameter annotated with the event type, or drop idempotency_key= to key "
        "by message id"
    )
