"""The broker's schema and statements, written once per namespace (a PostgreSQL schema).

Layout of a delivery row, and why (the SQLite broker's design, adapted to MVCC and row locks):

- ``visible_at`` serves both the lease (now + lease while leased) and a delayed retry (its due
  time), so "due" is the one index range ``visible_at <= now`` of ``deliveries_due``.
- ``claims`` counts leases handed out and never goes down (``attempts`` does, on release): the
  receipt ``(seq, claims)`` fences a settle from a runner whose lease was taken over. ``seq`` is
  an identity, never reused, so a stale receipt can never match a new row.
- ``blocked`` is true for a stream record that is not the head of its key. ``stream_keys`` counts
  the unsettled records of each (subscription, key): a ``BEFORE INSERT`` trigger raises the
  count under that row's lock and blocks the new record unless it is the only one; deleting a
  head (ack or dead letter: only heads are ever leased, so only heads are ever deleted) lowers
  it and unblocks the key's oldest waiting record. The row lock on ``stream_keys`` serialises a
  key's publishers and settlers across transactions, which a "look for an earlier record"
  check could not do under READ COMMITTED.

A claim is ``UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED LIMIT n)``: claimers skip each
other's rows instead of queueing on them. Every other operation is one statement made of
data-modifying CTEs (one round trip, atomic without BEGIN/COMMIT); the ``NOTIFY`` it sends is
delivered at its commit.
"""

from __future__ import annotations

from typing import NamedTuple

SCHEMA_VERSION = 1

# Tables that older versions can ignore, made if missing (a namespace made before they existed
# gets them at the next connect) without a new version, so that older runners keep working.
ADDED_TABLES = ("dedupe",)

# Times are epoch seconds (float8) from the broker's clock, like every eventfn broker.
_TABLES = """
CREATE TABLE {s}.meta (version integer NOT NULL);

CREATE TABLE {s}.destinations (
    name text PRIMARY KEY,
    kind text NOT NULL
);

CREATE TABLE {s}.subscriptions (
    id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE,
    destination text NOT NULL,
    kind text NOT NULL,
    grp text NOT NULL,
    types text[]
);
CREATE INDEX subscriptions_by_destination ON {s}.subscriptions (destination);

CREATE TABLE {s}.deliveries (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sub integer NOT NULL,
    msg_id text NOT NULL,
    body bytea NOT NULL,
    pkey text,
    okey text,
    published_at double precision NOT NULL,
    visible_at double precision NOT NULL,
    blocked boolean NOT NULL DEFAULT false,
    leased boolean NOT NULL DEFAULT false,
    attempts integer NOT NULL DEFAULT 0,
    claims integer NOT NULL DEFAULT 0,
    first_failed_at double precision
);
-- Index order is the claim order: due time, then publish order.
CREATE INDEX deliveries_due ON {s}.deliveries (sub, visible_at, seq) WHERE NOT blocked;
-- A stream key's waiting records, oldest first: where its next head is found.
CREATE INDEX deliveries_waiting ON {s}.deliveries (sub, okey, seq) WHERE blocked;

CREATE TABLE {s}.stream_keys (
    sub integer NOT NULL,
    okey text NOT NULL,
    unsettled integer NOT NULL,
    PRIMARY KEY (sub, okey)
);

CREATE TABLE {s}.dead_letters (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sub integer NOT NULL,
    msg_id text NOT NULL,
    body bytea NOT NULL,
    pkey text,
    error_type text NOT NULL,
    error_message text NOT NULL,
    traceback text NOT NULL,
    attempts integer NOT NULL,
    first_failed_at double precision NOT NULL,
    last_failed_at double precision NOT NULL,
    published_at double precision NOT NULL,
    replayed integer NOT NULL DEFAULT 0,
    state text NOT NULL DEFAULT 'dead',
    UNIQUE (sub, msg_id)
);
CREATE INDEX dead_letters_listed ON {s}.dead_letters (sub, id) WHERE state = 'dead';
"""

# Each (destination, id) stored with ``dedupe``: when, and until when its window lasts.
_ADDED = """
CREATE TABLE IF NOT EXISTS {s}.dedupe (
    destination text NOT NULL,
    msg_id text NOT NULL,
    stored_at double precision NOT NULL,
    expires_at double precision NOT NULL,
    PRIMARY KEY (destination, msg_id)
);
CREATE INDEX IF NOT EXISTS dedupe_expiry ON {s}.dedupe (expires_at);
"""

_TRIGGERS = """
CREATE FUNCTION {s}.stream_link() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    count_now integer;
BEGIN
    INSERT INTO {s}.stream_keys AS k (sub, okey, unsettled) VALUES (NEW.sub, NEW.okey, 1)
    ON CONFLICT (sub, okey) DO UPDATE SET unsettled = k.unsettled + 1
    RETURNING k.unsettled INTO count_now;
    NEW.blocked := count_now > 1;
    RETURN NEW;
END
$fn$;

CREATE TRIGGER deliveries_link BEFORE INSERT ON {s}.deliveries
FOR EACH ROW WHEN (NEW.okey IS NOT NULL) EXECUTE FUNCTION {s}.stream_link();

CREATE FUNCTION {s}.stream_next() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    count_now integer;
BEGIN
    UPDATE {s}.stream_keys SET unsettled = unsettled - 1
    WHERE sub = OLD.sub AND okey = OLD.okey
    RETURNING unsettled INTO count_now;
    IF count_now = 0 THEN
        DELETE FROM {s}.stream_keys WHERE sub = OLD.sub AND okey = OLD.okey AND unsettled = 0;
    ELSIF count_now > 0 THEN
        -- A fresh snapshot (this is a volatile function): it sees every record counted above.
        UPDATE {s}.deliveries SET blocked = false WHERE seq = (
            SELECT min(seq) FROM {s}.deliveries
            WHERE sub = OLD.sub AND okey = OLD.okey AND blocked
        );
        PERFORM pg_notify({channel}, OLD.sub::text);
    END IF;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER deliveries_next_head AFTER DELETE ON {s}.deliveries
FOR EACH ROW WHEN (OLD.okey IS NOT NULL AND NOT OLD.blocked) EXECUTE FUNCTION {s}.stream_next();
"""

# One row per subscription of the destination that takes the message's type. ``m`` holds the
# messages (with ``ord``, their place in the batch); the caller adds the FROM it comes from.
_FAN_OUT = """INSERT INTO {s}.deliveries
    (sub, msg_id, body, pkey, okey, published_at, visible_at)
SELECT s.id, m.id, m.body, m.key, CASE WHEN s.kind = 'stream' THEN m.key END,
       m.published_at, m.visible_at
FROM {source}
JOIN {s}.subscriptions AS s ON {match}
ORDER BY m.ord, s.id
RETURNING sub"""
# A message goes to every subscription of its destination whose type filter takes it.
_EVERY_GROUP = "s.destination = m.destination AND (s.types IS NULL OR m.type = ANY (s.types))"


# De-duplication (``OutgoingMessage.dedupe``) of the message rows ``{rows}`` (with ``dedupe`` and
# ``ord``), in the statement that inserts them: a window's record and its message commit
# together. The first row of each (destination, id) with dedupe is recorded unless that id was
# stored there within the last ``dedupe`` seconds: INSERT ... ON CONFLICT waits for a concurrent
# publisher of the same id and then sees its record. ``kept`` is what is to be stored. Expired
# records go lazily: a few more than a batch adds, skipping any another transaction holds.
_DEDUPE = """firsts AS (
    SELECT DISTINCT ON (destination, id) destination, id, dedupe, ord FROM {rows}
    WHERE dedupe > 0 ORDER BY destination, id, ord
), swept AS (
    DELETE FROM {s}.dedupe WHERE ctid = ANY (ARRAY(
        SELECT d.ctid FROM {s}.dedupe AS d
        WHERE d.expires_at <= {now} AND NOT EXISTS (
            SELECT FROM firsts AS f WHERE f.destination = d.destination AND f.id = d.msg_id)
        ORDER BY d.expires_at
        LIMIT (SELECT 2 * count(*) + 64 FROM firsts)
        FOR UPDATE SKIP LOCKED
    ))
), recorded AS (
    INSERT INTO {s}.dedupe AS t (destination, msg_id, stored_at, expires_at)
    SELECT destination, id, {now}, {now} + dedupe FROM firsts ORDER BY destination, id
    ON CONFLICT (destination, msg_id) DO UPDATE
        SET stored_at = excluded.stored_at, expires_at = excluded.expires_at
        WHERE t.stored_at <= excluded.stored_at - (excluded.expires_at - excluded.stored_at)
    RETURNING t.destination, t.msg_id
), kept AS (
    SELECT r.* FROM {rows} AS r WHERE r.dedupe <= 0 OR r.ord IN (
        SELECT f.ord FROM firsts AS f
        JOIN recorded AS c ON c.destination = f.destination AND c.msg_id = f.id)
)"""

# Every statement that may make a subscription's messages fetchable ends with this: one NOTIFY
# per subscription (payload: its id), delivered to every listening broker at commit.
_NOTIFY = """notified AS (
    SELECT w.sub FROM (SELECT DISTINCT sub FROM woken) AS w,
    LATERAL pg_notify({channel}, w.sub::text)
)"""


def quote(identifier: str) -> str:
    """A double-quoted SQL identifier."""
    return '"' + identifier.replace('"', '""') + '"'


def channel_of(namespace: str) -> str:
    """The LISTEN/NOTIFY channel of a namespace."""
    return f"{namespace}_wake"


def _messages(params: list[str], cause: str | None = None) -> str:
    """``m``: the messages of a batch as rows, from seven parallel arrays (eight with
    ``dedupe``; and the seq of the ack that emitted each, as ``cause``), with ``ord``, their
    place in the batch."""
    types = ["text", "bytea", "text", "float8", "float8", "text", "text", "float8"]
    arrays = [f"{p}::{t}[]" for p, t in zip(params, types, strict=False)]
    columns = "id, body, key, published_at, visible_at, type, destination"
    if len(params) == len(types):
        columns += ", dedupe"
    if cause is not None:
        arrays.append(f"{cause}::bigint[]")
        columns += ", cause"
    return f"unnest({', '.join(arrays)}) WITH ORDINALITY AS m ({columns}, ord)"


class Statements:
    """Every statement of one namespace, formatted once."""

    def __init__(self, namespace: str) -> None:
        s = quote(namespace)
        self.schema = s
        self.channel = channel_of(namespace)
        channel = "'" + self.channel + "'"
        self.added = [_ADDED.format(s=s)]
        self.create = [
            f"CREATE SCHEMA IF NOT EXISTS {s}",
            _TABLES.format(s=s),
            _TRIGGERS.format(s=s, channel=channel),
            *self.added,
            f"INSERT INTO {s}.meta (version) VALUES ({SCHEMA_VERSION})",
        ]
        self.version = f"SELECT max(version) FROM {s}.meta"
        self.notify = _NOTIFY.format(channel=channel)
        self.publish = (
            f"WITH woken AS ({self.fan_out(_messages(_Numbers().take(7)))}),\n{self.notify}\n"
            "SELECT array_agg(sub) FROM notified"
        )
        # A batch with some message with ``dedupe``: the eight arrays, then now.
        params = _Numbers()
        rows = f"rows AS MATERIALIZED (SELECT * FROM {_messages(params.take(8))})"
        self.publish_deduped = (
            f"WITH {rows},\n{self.dedupe('rows', params.take(1)[0])},\n"
            f"woken AS ({self.fan_out('kept AS m')}),\n{self.notify}\n"
            "SELECT array_agg(sub) FROM notified"
        )
        self._settle: dict[SettleShape, str] = {}
        self._protocol(s)
        self._dead_letters(s)

    def _protocol(self, s: str) -> None:
        self.declare_destination = (
            f"INSERT INTO {s}.destinations (name, kind) VALUES ($1, $2) "
            f"ON CONFLICT (name) DO NOTHING"
        )
        self.destination_kind = f"SELECT kind FROM {s}.destinations WHERE name = $1"
        # A redeployed app may subscribe its group to other event types: the latest filter wins.
        self.declare_subscription = (
            f"INSERT INTO {s}.subscriptions AS t (name, destination, kind, grp, types) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO UPDATE SET types = excluded.types "
            "RETURNING t.id, t.destination"
        )
        self.subscription_id = f"SELECT id FROM {s}.subscriptions WHERE name = $1"
        self.known_destinations = f"SELECT name FROM {s}.destinations WHERE name = ANY ($1::text[])"
        # MATERIALIZED: the locking subquery runs exactly once. RETURNING has no order of its
        # own, so the rows are sorted again by the due time they were picked in.
        self.claim = f"""
WITH picked AS MATERIALIZED (
    SELECT seq, visible_at AS due FROM {s}.deliveries
    WHERE sub = $1 AND NOT blocked AND visible_at <= $2
    ORDER BY visible_at, seq
    LIMIT $4
    FOR UPDATE SKIP LOCKED
), leased AS (
    UPDATE {s}.deliveries AS d
    SET attempts = d.attempts + 1, claims = d.claims + 1, leased = true, visible_at = $3
    FROM picked WHERE d.seq = picked.seq
    RETURNING d.seq, d.msg_id, d.body, d.pkey, d.published_at, d.attempts, d.claims,
              d.first_failed_at, picked.due
)
SELECT seq, msg_id, body, pkey, published_at, attempts, claims, first_failed_at
FROM leased ORDER BY due, seq"""
        # Leased rows are in this index too (their lease end): waking then redelivers expiries.
        self.next_due = (
            f"SELECT min(visible_at) FROM {s}.deliveries "
            "WHERE sub = $1 AND NOT blocked AND visible_at > $2"
        )
        # SKIP LOCKED: a row locked by an outbox transaction (eventfn_postgresql.transaction)
        # is protected by that lock; waiting for it would stall every other extension.
        self.extend = f"""
UPDATE {s}.deliveries SET visible_at = $3 WHERE seq IN (
    SELECT d.seq FROM {s}.deliveries AS d
    JOIN unnest($1::bigint[], $2::integer[]) AS r (seq, claims)
      ON d.seq = r.seq AND d.claims = r.claims
    WHERE d.leased
    FOR UPDATE OF d SKIP LOCKED
)"""
        self.lock_delivery = (
            f"SELECT 1 FROM {s}.deliveries WHERE seq = $1 AND claims = $2 AND leased FOR UPDATE"
        )
        self.stats = f"""
SELECT count(*) FILTER (WHERE visible_at <= $2),
       count(*) FILTER (WHERE visible_at > $2 AND NOT leased),
       count(*) FILTER (WHERE visible_at > $2 AND leased),
       (SELECT count(*) FROM {s}.dead_letters WHERE sub = $1 AND state = 'dead')
FROM {s}.deliveries WHERE sub = $1"""

    def _dead_letters(self, s: str) -> None:
        self.record = f"""
SELECT dl.id, s.name, dl.msg_id, dl.body, dl.pkey, dl.error_type, dl.error_message,
       dl.traceback, dl.attempts, dl.first_failed_at, dl.last_failed_at, dl.published_at,
       dl.replayed, dl.state
FROM {s}.dead_letters AS dl JOIN {s}.subscriptions AS s ON s.id = dl.sub"""
        self.dead_letters = (
            f"{self.record} WHERE dl.state = 'dead' AND ($1::integer IS NULL OR dl.sub = $1)"
            " AND dl.id > $2 ORDER BY dl.id LIMIT $3"
        )
        self.dead_letter = f"{self.record} WHERE dl.id = $1"
        replayed = f"""replayed AS (
    UPDATE {s}.dead_letters SET state = 'replayed', replayed = replayed + 1
    WHERE id = ANY ($1::bigint[]) AND state = 'dead'
    RETURNING id, sub, msg_id, body, pkey, published_at
)"""
        source = f"""(SELECT r.msg_id AS id, r.body, r.pkey AS key, r.published_at,
        $2::float8 AS visible_at, NULL::text AS type, d.name AS destination, r.id AS ord,
        r.sub AS only_sub
    FROM replayed AS r JOIN {s}.subscriptions AS d ON d.id = r.sub) AS m"""
        # Replay goes to the record's own subscription only, not to every group of a topic.
        fan_out = self.fan_out(source, match="s.id = m.only_sub")
        self.replay = (
            f"WITH {replayed}, woken AS ({fan_out}),\n{self.notify}\n"
            "SELECT (SELECT count(*) FROM replayed)::integer, (SELECT array_agg(sub) FROM notified)"
        )
        self.purge_all = f"DELETE FROM {s}.dead_letters"
        self.purge = f"DELETE FROM {s}.dead_letters WHERE sub = $1"

    def dedupe(self, rows: str, now: str) -> str:
        """The CTEs that keep, of the message rows ``rows``, those to store (as ``kept``)."""
        return _DEDUPE.format(s=self.schema, rows=rows, now=f"{now}::float8")

    def fan_out(self, source: str, match: str = _EVERY_GROUP) -> str:
        """Insert the messages of ``source`` (rows ``m``) into their subscriptions."""
        return _FAN_OUT.format(s=self.schema, source=source, match=match)

    def settle(self, shape: SettleShape) -> str:
        """The one statement that settles a batch of this shape (built once per shape)."""
        sql = self._settle.get(shape)
        if sql is None:
            sql = self._settle[shape] = self._build_settle(shape)
        return sql

    def _build_settle(self, shape: SettleShape) -> str:
        """Parameters, numbered in this order, each part only if the shape has it: deleted
        (acks and dead letters) seq[] and claims[]; dead letters seq[] and failure arrays;
        emitted cause seq[] and message arrays (with dedupe[] and now if the shape is deduped);
        retries seq[], claims[], due[], failed at[]; releases seq[], claims[] and now."""
        s = self.schema
        numbers = _Numbers()
        parts: list[str] = []
        woken = ["SELECT NULL::integer AS sub WHERE false"]
        if shape.delete:
            # The fence: a row is settled only while leased under the receipt's claim, so a
            # stale settle changes nothing, and an emitted message is inserted only with its
            # ack's delete.
            seq, claims = numbers.take(2)
            parts.append(f"""gone AS (
    DELETE FROM {s}.deliveries AS d USING unnest({seq}::bigint[], {claims}::integer[])
        AS r (seq, claims)
    WHERE d.seq = r.seq AND d.claims = r.claims AND d.leased
    RETURNING d.seq, d.sub, d.msg_id, d.body, d.pkey, d.attempts, d.first_failed_at,
              d.published_at
)""")
        else:
            parts.append("gone AS (SELECT NULL::bigint AS seq WHERE false)")
        if shape.dead:
            parts.append(self._dead_part(numbers.take(5)))
        if shape.emitted and shape.deduped:
            # only the emitted messages of acks that still hold their lease are de-duplicated
            cause, *fields, now = numbers.take(10)
            source = f"{_messages(fields, cause)} JOIN gone AS g ON g.seq = m.cause"
            parts.append(f"em AS MATERIALIZED (SELECT m.* FROM {source})")
            parts.append(self.dedupe("em", now))
            parts.append(f"emitted AS ({self.fan_out('kept AS m')})")
            woken.append("SELECT sub FROM emitted")
        elif shape.emitted:
            cause, *fields = numbers.take(8)
            source = f"{_messages(fields, cause)} JOIN gone AS g ON g.seq = m.cause"
            parts.append(f"emitted AS ({self.fan_out(source)})")
            woken.append("SELECT sub FROM emitted")
        if shape.retry:
            seq, claims, due, at = numbers.take(4)
            parts.append(f"""retried AS (
    UPDATE {s}.deliveries AS d
    SET leased = false, visible_at = r.due, first_failed_at = coalesce(d.first_failed_at, r.at)
    FROM unnest({seq}::bigint[], {claims}::integer[], {due}::float8[], {at}::float8[])
        AS r (seq, claims, due, at)
    WHERE d.seq = r.seq AND d.claims = r.claims AND d.leased
    RETURNING d.sub
)""")
            woken.append("SELECT sub FROM retried")
        if shape.release:
            # A released delivery was never started: back to the front, not behind what became
            # due while it was leased (a retry, being a failure, goes behind).
            seq, claims, now = numbers.take(3)
            parts.append(f"""released AS (
    UPDATE {s}.deliveries AS d
    SET attempts = d.attempts - 1, leased = false,
        visible_at = least(d.published_at, {now}::float8)
    FROM unnest({seq}::bigint[], {claims}::integer[]) AS r (seq, claims)
    WHERE d.seq = r.seq AND d.claims = r.claims AND d.leased
    RETURNING d.sub
)""")
            woken.append("SELECT sub FROM released")
        parts.append(f"woken AS ({' UNION ALL '.join(woken)})")
        parts.append(self.notify)
        return (
            "WITH " + ",\n".join(parts) + "\nSELECT (SELECT count(*) FROM gone)::integer, "
            "(SELECT array_agg(sub) FROM notified)"
        )

    def _dead_part(self, params: list[str]) -> str:
        s = self.schema
        seq, error_type, message, traceback, at = params
        # Stored with its original's delete, in one statement, in batch order (record ids are
        # the dead-letter queue's order). A record of the same subscription and message (an
        # earlier failure, since replayed) is overwritten in place: same id, replay count kept.
        # DISTINCT ON: two copies of one message id dying in one batch must not make ON
        # CONFLICT touch the same record twice (an error that would fail the batch).
        return f"""dead AS (
    INSERT INTO {s}.dead_letters AS t (sub, msg_id, body, pkey, error_type, error_message,
        traceback, attempts, first_failed_at, last_failed_at, published_at)
    SELECT sub, msg_id, body, pkey, error_type, message, traceback, attempts,
           first_failed_at, at, published_at
    FROM (
        SELECT DISTINCT ON (g.sub, g.msg_id) g.sub, g.msg_id, g.body, g.pkey, f.error_type,
               f.message, f.traceback, g.attempts,
               coalesce(nullif(g.first_failed_at, 0), f.at) AS first_failed_at, f.at,
               g.published_at, f.ord
        FROM gone AS g
        JOIN unnest({seq}::bigint[], {error_type}::text[], {message}::text[],
                    {traceback}::text[], {at}::float8[]) WITH ORDINALITY
            AS f (seq, error_type, message, traceback, at, ord) ON f.seq = g.seq
        ORDER BY g.sub, g.msg_id, f.ord DESC
    ) AS last_failures
    ORDER BY ord
    ON CONFLICT (sub, msg_id) DO UPDATE SET
        body = excluded.body, pkey = excluded.pkey, error_type = excluded.error_type,
        error_message = excluded.error_message, traceback = excluded.traceback,
        attempts = excluded.attempts, first_failed_at = excluded.first_failed_at,
        last_failed_at = excluded.last_failed_at, published_at = excluded.published_at,
        state = 'dead'
)"""


class SettleShape(NamedTuple):
    """Which kinds of change a settle batch makes (each shape has its own statement)."""

    delete: bool
    dead: bool
    emitted: bool
    retry: bool
    release: bool
    deduped: bool = False  # some emitted message has ``dedupe``


class _Numbers:
    """Hands out ``$n`` parameter names in order."""

    def __init__(self) -> None:
        self.next = 1

    def take(self, count: int) -> list[str]:
        names = [f"${n}" for n in range(self.next, self.next + count)]
        self.next += count
        return names
