"""The AMQP broker's lease timer heap does not keep settled leases (and their messages)."""

from __future__ import annotations

from eventfn_amqp._leases import Timers


class _Item:
    def __init__(self) -> None:
        self.finished = False

    async def due(self, now: float) -> None:
        return None


def test_settled_entries_are_dropped_once_the_heap_doubles() -> None:
    timers = Timers()
    live = [_Item() for _ in range(100)]
    for number, item in enumerate(live):
        timers.add(1000.0 + number, item)
    for number in range(100_000):  # acked right after being leased: finished at once
        settled = _Item()
        timers.add(30.0 + number, settled)
        settled.finished = True
    assert len(timers) < 2 * 4096  # not 100,100
    for item in live:
        item.finished = True
    for number in range(5000):
        timers.add(2000.0 + number, _Item())
    assert 5000 <= len(timers) < 2 * 5000 + 4096


def test_live_entries_survive_compaction_in_deadline_order() -> None:
    timers = Timers()
    keep = []
    for number in range(5000):
        item = _Item()
        timers.add(float(5000 - number), item)
        if number % 2:
            item.finished = True
        else:
            keep.append(item)
    assert len(timers) >= len(keep)
    heap = timers._heap
    assert {id(entry[2]) for entry in heap} >= {id(item) for item in keep}
    assert heap[0][0] == min(entry[0] for entry in heap)
