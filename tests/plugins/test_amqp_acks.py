"""Which acks of a batch may go out as one ``multiple`` frame (no server needed)."""

from __future__ import annotations

import random

from eventfn_amqp._acks import Acks


def _delivered(count: int) -> Acks:
    acks = Acks()
    for tag in range(1, count + 1):
        acks.arrived(tag)
    return acks


def test_a_leading_run_is_one_multiple_ack() -> None:
    acks = _delivered(5)
    assert acks.plan([2, 1, 3]) == (3, [])
    assert acks.plan([5]) == (0, [5])  # 4 is still being handled: 5 alone
    assert acks.plan([4]) == (4, [])  # covers 4 only: 5 is no longer outstanding


def test_acks_behind_an_unsettled_delivery_go_one_by_one() -> None:
    acks = _delivered(6)
    assert acks.plan([1, 2, 4, 6]) == (2, [4, 6])
    assert acks.plan([3, 5]) == (5, [])


def test_a_nack_does_not_hold_the_run_back() -> None:
    acks = _delivered(4)
    acks.settled(1)  # returned to the queue by a frame of its own
    assert acks.plan([2, 3]) == (3, [])
    acks.settled(4)
    acks.arrived(5)
    assert acks.plan([5]) == (5, [])


def test_the_multiple_tag_is_always_one_acked_now() -> None:
    """RabbitMQ closes the channel on an unknown tag: ``multiple`` names an outstanding one."""
    acks = _delivered(3)
    assert acks.plan([3]) == (0, [3])
    assert acks.plan([2]) == (0, [2])
    assert acks.plan([1]) == (1, [])


def test_after_a_gap_every_ack_goes_alone() -> None:
    acks = Acks()
    acks.arrived(1)
    acks.arrived(3)  # 2 was never handed over: a multiple ack could take it unseen
    assert not acks.contiguous
    assert acks.plan([1, 3]) == (0, [1, 3])
    acks.arrived(4)
    assert acks.plan([4]) == (0, [4])


def test_a_random_order_never_acks_anything_unsettled() -> None:
    rng = random.Random(7)
    for _ in range(200):
        count = rng.randint(1, 40)
        acks = _delivered(count)
        order = list(range(1, count + 1))
        rng.shuffle(order)
        settled: set[int] = set()
        acked: set[int] = set()  # what RabbitMQ has taken as acked so far
        while order:
            size = rng.randint(1, 5)
            batch, order = order[:size], order[size:]
            settled.update(batch)
            multiple, single = acks.plan(batch)
            covered = {tag for tag in range(1, multiple + 1) if tag not in acked}
            assert covered <= settled  # nothing unsettled is acked
            assert multiple == 0 or multiple not in acked  # the tag is outstanding
            assert not set(single) & acked and not set(single) & covered  # never twice
            acked |= covered | set(single)
            assert acked == settled
        assert acked == set(range(1, count + 1))
