"""The adapter status writer: pending statuses coalesce, writes are bounded, failures are
left to the next pass, and what a pass decides from is always the latest decision."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from loraplex import statuswriter
from loraplex.errors import KubeError
from loraplex.metrics import REGISTRY
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

    async def patch(self, ns: str, name: str, status: dict[str, Any]) -> str | None:
        """Returns the resourceVersion the write produced, None when the object is gone."""
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
            await asyncio.sleep(0)
            if self.fail.get(name) == 404:
                return None
            if name in self.fail:
                raise KubeError(self.fail[name], f"refused {name}")
            self.writes.append((name, status))
            return f"rv{len(self.writes)}"
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
    assert REGISTRY.get_sample_value("loraplex_operator_status_writes_pending") == 20
    await asyncio.sleep(0.01)
    assert api.in_flight == 3  # the rest wait for a slot
    api.gate.set()
    await asyncio.wait_for(writer.flush(), 5)
    assert api.most_in_flight == 3
    assert REGISTRY.get_sample_value("loraplex_operator_status_writes_pending") == 0
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
    writer.submit(NS, "b", meta("a", "7"), None, {"phase": "Downloading"})
    # Queued: the next pass sees it, not the cache's stale copy.
    assert writer.known(NS, "b", meta("a", "7"), {"phase": "stale"}) == {"phase": "Downloading"}
    await asyncio.sleep(0.01)  # now in flight
    assert writer.known(NS, "b", meta("a", "7"), {"phase": "stale"}) == {"phase": "Downloading"}
    api.gate.set()
    await writer.flush()  # stored as rv1
    writer.submit(NS, "b", meta("a", "7"), {"phase": "Downloading"}, {"phase": "Ready"})
    await writer.flush()  # stored as rv2
    # The cache lags: it shows the version before our writes, then the one between them.
    # Both are older than what is stored, so a pass keeps deciding from our last write (at
    # 10,000 adapters, deciding from the in-between copy rewrote every adapter every pass).
    for lagging in ("7", "rv1"):
        seen = writer.known(NS, "b", meta("a", lagging), {"phase": "Downloading"})
        assert seen == {"phase": "Ready"}, lagging
    # The cache shows the version our write produced: it is the truth again.
    assert writer.known(NS, "b", meta("a", "rv2"), {"phase": "Ready"}) == {"phase": "Ready"}
    assert writer.known(NS, "b", meta("a", "rv3"), {"phase": "x"}) == {"phase": "x"}
    # Or a later version (a spec edit) that shows the status we wrote.
    writer.submit(NS, "b", meta("a", "rv3"), {"phase": "x"}, {"phase": "Failed"})
    await writer.flush()  # stored as rv3
    assert writer.known(NS, "b", meta("a", "rv9"), {"phase": "Failed"}) == {"phase": "Failed"}
    assert writer.known(NS, "b", meta("a", "rv1"), {"phase": "old"}) == {"phase": "old"}
    await writer.close()


async def test_a_written_status_stands_in_for_the_cache_only_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A watch that relisted may never show the version our write produced: after
    STALE_AFTER seconds the cache's copy is trusted again (and a wrong one rewritten)."""
    api = Api()
    writer = StatusWriter(api.patch)
    writer.submit(NS, "b", meta("a", "7"), None, {"phase": "Ready"})
    await writer.flush()
    assert writer.known(NS, "b", meta("a", "9"), {"phase": "x"}) == {"phase": "Ready"}
    now = time.monotonic()
    monkeypatch.setattr(statuswriter.time, "monotonic", lambda: now + statuswriter.STALE_AFTER + 1)
    assert writer.known(NS, "b", meta("a", "9"), {"phase": "x"}) == {"phase": "x"}
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
