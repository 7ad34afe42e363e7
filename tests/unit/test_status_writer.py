"""The adapter status writer: pending statuses coalesce, writes are bounded, failures are
left to the next pass, and what a pass decides from is always the latest decision."""

from __future__ import annotations

import asyncio
from typing import Any

from loraplex.errors import KubeError
from loraplex.statuswriter import StatusWriter

NS = "default"


class Api:
    """Records PATCHes; each waits for `gate` (so a test can hold writes in flight)."""

    def __init__(self, fail: dict[str, int] | None = None) -> None:
        self.writes: list[tuple[str, dict[str, Any]]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = fail or {}

    async def patch(self, ns: str, name: str, status: dict[str, Any]) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
            await asyncio.sleep(0)
            if name in self.fail:
                raise KubeError(self.fail[name], f"refused {name}")
            self.writes.append((name, status))
        finally:
            self.in_flight -= 1


def meta(name: str, rv: str = "1") -> dict[str, Any]:
    return {"name": name, "resourceVersion": rv}


async def test_a_burst_of_decisions_is_one_write_each_and_bounded_in_flight() -> None:
    api = Api()
    writer = StatusWriter(api.patch, in_flight=3)
    api.gate.clear()
    for i in range(20):
        writer.submit(NS, "b", meta(f"a{i}"), None, {"phase": "Pending"})
    for i in range(20):  # a later pass decides again before anything was written
        writer.submit(NS, "b", meta(f"a{i}"), None, {"phase": "Ready"})
    assert writer.pending() == 20
    await asyncio.sleep(0.01)
    assert api.in_flight == 3  # the rest wait for a slot
    api.gate.set()
    await asyncio.wait_for(writer.flush(), 5)
    assert api.most_in_flight == 3
    phases = {name: s["phase"] for name, s in api.writes}
    assert len(phases) == 20
    # The three already in flight carried the first decision; each was written once more.
    assert all(p == "Ready" for p in phases.values())
    assert len(api.writes) <= 23
    await writer.close()


async def test_unchanged_status_is_not_written() -> None:
    api = Api()
    writer = StatusWriter(api.patch)
    writer.submit(NS, "b", meta("a"), {"phase": "Ready"}, {"phase": "Ready"})
    assert writer.pending() == 0
    await writer.flush()
    assert api.writes == []


async def test_a_pass_decides_from_the_pending_then_the_written_status() -> None:
    api = Api()
    writer = StatusWriter(api.patch)
    api.gate.clear()
    writer.submit(NS, "b", meta("a", "7"), None, {"phase": "Pending"})
    # Queued: the next pass sees it, not the cache's stale copy.
    assert writer.known(NS, "b", meta("a", "7"), {"phase": "stale"}) == {"phase": "Pending"}
    await asyncio.sleep(0.01)  # now in flight
    assert writer.known(NS, "b", meta("a", "7"), {"phase": "stale"}) == {"phase": "Pending"}
    api.gate.set()
    await writer.flush()
    # Written, and the cache still shows the resourceVersion it was decided from.
    assert writer.known(NS, "b", meta("a", "7"), {"phase": "stale"}) == {"phase": "Pending"}
    # The watch delivered our write (a new resourceVersion): the cache is the truth again.
    assert writer.known(NS, "b", meta("a", "8"), {"phase": "Pending"}) == {"phase": "Pending"}
    assert writer.known(NS, "b", meta("a", "7"), {"phase": "x"}) == {"phase": "x"}
    await writer.close()


async def test_a_failed_write_is_dropped_and_decided_again_by_the_next_pass() -> None:
    api = Api(fail={"gone": 404, "flaky": 500})
    writer = StatusWriter(api.patch)
    for name in ("gone", "flaky", "fine"):
        writer.submit(NS, "b", meta(name), None, {"phase": "Ready"})
    await asyncio.wait_for(writer.flush(), 5)
    assert [n for n, _ in api.writes] == ["fine"]
    # Nothing remembered for the failed write: the next pass compares with the cache's copy
    # (still without status) and hands it over again.
    assert writer.known(NS, "b", meta("flaky"), None) is None
    del api.fail["flaky"]
    writer.submit(NS, "b", meta("flaky"), None, {"phase": "Ready"})
    await asyncio.wait_for(writer.flush(), 5)
    assert [n for n, _ in api.writes] == ["fine", "flaky"]
    await writer.close()


async def test_one_base_flood_does_not_hold_back_another_base() -> None:
    api = Api()
    writer = StatusWriter(api.patch, in_flight=2)
    for i in range(200):
        writer.submit(NS, "big", meta(f"big-{i}"), None, {"phase": "Ready"})
    writer.submit(NS, "small", meta("small-0"), None, {"phase": "Ready"})
    await asyncio.wait_for(writer.flush(), 5)
    order = [n for n, _ in api.writes]
    # Each base has its own drain: the small base's one write is among the first few.
    assert order.index("small-0") < 10, order[:12]
    await writer.close()


async def test_a_forgotten_adapter_is_not_written() -> None:
    api = Api()
    writer = StatusWriter(api.patch, in_flight=1)
    api.gate.clear()
    writer.submit(NS, "b", meta("first"), None, {"phase": "Ready"})
    writer.submit(NS, "b", meta("deleted"), None, {"phase": "Ready"})
    writer.forget(NS, "deleted")
    api.gate.set()
    await asyncio.wait_for(writer.flush(), 5)
    assert [n for n, _ in api.writes] == ["first"]
    await writer.close()
