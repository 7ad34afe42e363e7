"""Download slots: the limit holds, turns are first come first served, a hurried fetch goes
next, a cancelled waiter leaks no slot, and a grown limit lets waiters in at once."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from loraplex_server.download_slots import DownloadSlots

pytestmark = pytest.mark.timeout(10)


async def test_turns_are_in_order_within_the_limit_and_a_hurried_fetch_goes_next() -> None:
    slots = DownloadSlots()
    names = [f"t-{i}" for i in range(12)]
    order: list[str] = []
    most = 0
    gates = {n: asyncio.Event() for n in names}

    async def fetch(name: str) -> None:
        nonlocal most
        async with slots.slot(name, 3):
            order.append(name)
            most = max(most, slots.active)
            await gates[name].wait()

    tasks = {n: asyncio.create_task(fetch(n)) for n in names}
    await asyncio.sleep(0)
    assert order == ["t-0", "t-1", "t-2"]
    for n in names:  # release one at a time, in the order granted
        if n == "t-2":
            assert slots.hurry("t-9")  # a request waits for t-9: the next free slot is its
        gates[n].set()
        await tasks[n]
        await asyncio.sleep(0)  # the granted task records its turn
    assert order == [f"t-{i}" for i in (0, 1, 2, 3, 4, 9, 5, 6, 7, 8, 10, 11)]
    assert most == 3 and slots.active == 0


async def test_hurry_names_only_a_waiting_fetch() -> None:
    slots = DownloadSlots()
    held = asyncio.Event()

    async def hold() -> None:
        async with slots.slot("a", 1):
            held.set()
            await asyncio.sleep(0.05)

    task = asyncio.create_task(hold())
    await held.wait()
    assert not slots.hurry("a")  # it holds a slot: nothing to move
    assert not slots.hurry("nobody")
    await task


async def test_a_cancelled_waiter_leaks_no_slot_even_when_granted_in_the_same_turn() -> None:
    slots = DownloadSlots()
    release = asyncio.Event()

    async def take(name: str) -> None:
        async with slots.slot(name, 1):
            await release.wait()

    first = slots.slot("first", 1)  # held by the test itself, to release it at a chosen moment
    await first.__aenter__()
    queued = asyncio.create_task(take("queued"))
    await asyncio.sleep(0)
    queued.cancel()  # cancelled while waiting: it leaves the queue
    granted = asyncio.create_task(take("granted-then-cancelled"))
    await asyncio.sleep(0)
    await first.__aexit__(None, None, None)  # hands the slot to `granted`...
    granted.cancel()  # ...which is cancelled before it runs: it must hand the slot on
    for t in (queued, granted):
        with contextlib.suppress(asyncio.CancelledError):
            await t
    assert slots.active == 0
    async with asyncio.timeout(1), slots.slot("after", 1):  # the slot is free again
        assert slots.active == 1


async def test_a_grown_limit_lets_waiters_in_without_waiting_for_a_release() -> None:
    slots = DownloadSlots()
    release = asyncio.Event()
    inside: list[str] = []

    async def take(name: str, limit: int) -> None:
        async with slots.slot(name, limit):
            inside.append(name)
            await release.wait()

    tasks = [asyncio.create_task(take(f"t-{i}", 1)) for i in range(3)]
    await asyncio.sleep(0)
    assert inside == ["t-0"]
    tasks.append(asyncio.create_task(take("t-3", 4)))  # a new manifest: four at once
    for _ in range(2):
        await asyncio.sleep(0)
    assert sorted(inside) == ["t-0", "t-1", "t-2", "t-3"] and slots.active == 4
    release.set()
    await asyncio.gather(*tasks)
    assert slots.active == 0
