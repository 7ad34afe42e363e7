"""LoRAAdapter status writes, off the reconcile pass.

A pass decides every adapter's status, but writing them is one PATCH per adapter that
changed: when a pod first reports 10,000 adapters Ready, that is 10,000 PATCHes. Done inside
the pass, they held the BaseModel's lock for minutes, and the apply of the next adapter (whose
pass publishes and pushes the manifest) waited behind them. So a pass only hands its statuses
here and returns; one drain task per BaseModel writes them, with a bound on writes in flight
shared by all BaseModels (so a flood on one base neither floods the API server nor starves
another base's writes).

Pending statuses coalesce: a newer status for an adapter replaces the one not yet written, so
a write always carries the latest decision and a burst of passes costs one write per adapter.
A write that fails is dropped, not retried here: the next pass sees the adapter's status still
differs from its decision and hands it over again (level-based, as the rest of the operator).

A pass decides from the status it believes stored, and the watch-fed cache can lag far behind
our own writes (10,000 writes are 10,000 events for kopf to process). Comparing with a cached
copy one write old made every pass rewrite every adapter, whose events made the lag longer:
at 10,000 adapters the operator never settled. So after a write we remember what it stored and
the resourceVersion it produced, and a pass decides from that until the cache shows that
version or that status. Measured at 10,000 adapters on two cores, kopf's processing of the
events of our own writes fell minutes behind; `STALE_AFTER` is longer than that, and only
bounds how long a status someone else wrote over ours can go uncorrected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from loraplex.errors import KubeError
from loraplex.metrics import STATUS_PENDING, STATUS_WRITES

log = logging.getLogger("loraplex.statuswriter")

Key = tuple[str, str]  # (namespace, adapter name)
# (namespace, name, status) -> the resourceVersion the PATCH produced (None: no such object).
Patch = Callable[[str, str, dict[str, Any]], Awaitable[str | None]]
# Seconds a written status stands in for a cache that has not shown it yet.
STALE_AFTER = 900.0


@dataclass(frozen=True)
class _Write:
    status: dict[str, Any]


@dataclass(frozen=True)
class _Written:
    resource_version: str  # the one our write produced
    status: dict[str, Any]
    at: float


class StatusWriter:
    """Pending adapter statuses, written by one drain task per BaseModel."""

    def __init__(self, patch: Patch, *, in_flight: int = 8) -> None:
        self._patch = patch
        self._slots = asyncio.Semaphore(in_flight)
        # (ns, BaseModel) -> its adapters' statuses not yet written, oldest first.
        self._pending: dict[Key, OrderedDict[str, _Write]] = {}
        self._writing: dict[Key, _Write] = {}
        self._written: dict[Key, _Written] = {}
        self._drains: dict[Key, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # writes in flight
        self._idle = asyncio.Condition()

    def known(self, ns: str, base: str, meta: Mapping[str, Any], cached: Any) -> Any:
        """An adapter's status as our writes will leave it: a pending or in-flight one, or the
        one we last wrote until the cache shows the version that write produced (or a copy
        with that status: the same decision either way)."""
        name = meta["name"]
        key = (ns, name)
        write = self._pending.get((ns, base), {}).get(name) or self._writing.get(key)
        if write is not None:
            return write.status
        written = self._written.get(key)
        if written is None:
            return cached
        caught_up = meta.get("resourceVersion") == written.resource_version or (
            cached == written.status
        )
        if caught_up or time.monotonic() - written.at > STALE_AFTER:
            del self._written[key]
            return cached
        return written.status

    def submit(
        self, ns: str, base: str, meta: Mapping[str, Any], current: Any, status: dict[str, Any]
    ) -> bool:
        """Queue `status` unless `current` (see `known`) already is it; True when queued."""
        if status == (current or {}):
            return False
        queue = self._pending.setdefault((ns, base), OrderedDict())
        queue[meta["name"]] = _Write(status)
        STATUS_PENDING.set(self.pending())
        drain = self._drains.get((ns, base))
        if drain is None or drain.done():
            self._drains[(ns, base)] = asyncio.create_task(
                self._drain(ns, base), name=f"adapter statuses of {ns}/{base}"
            )
        return True

    def forget(self, ns: str, name: str) -> None:
        """The adapter is gone: nothing to write for it, nothing to remember."""
        for (queue_ns, _), queue in self._pending.items():
            if queue_ns == ns:
                queue.pop(name, None)
        self._written.pop((ns, name), None)

    def pending(self) -> int:
        """Statuses not written yet."""
        return sum(len(q) for q in self._pending.values()) + len(self._writing)

    async def flush(self) -> None:
        """Until every pending status is written (for tests and benches)."""
        async with self._idle:
            await self._idle.wait_for(lambda: self.pending() == 0)

    async def close(self) -> None:
        tasks = [*self._drains.values(), *self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._drains.clear()

    async def _drain(self, ns: str, base: str) -> None:
        """Start a write per pending status, as slots free up. Returns as soon as the queue is
        empty, without awaiting after that check, so a `submit` that finds this task still
        running knows it will see the new entry."""
        queue = self._pending[(ns, base)]
        while queue:
            await self._slots.acquire()
            if not queue:  # forgotten while we waited for a slot
                self._slots.release()
                break
            name, write = queue.popitem(last=False)
            self._writing[(ns, name)] = write
            task = asyncio.create_task(self._write((ns, name), write))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _write(self, key: Key, write: _Write) -> None:
        try:
            produced = await self._patch(key[0], key[1], write.status)
            STATUS_WRITES.labels("ok" if produced is not None else "gone").inc()
            if produced is not None:  # None: deleted meanwhile, its DELETED event forgets it
                self._written[key] = _Written(produced, write.status, time.monotonic())
        except KubeError as exc:
            STATUS_WRITES.labels("failed").inc()
            log.warning("LoRAAdapter %s/%s: status not written: %s", *key, exc)
        finally:
            self._slots.release()
            if self._writing.get(key) is write:
                del self._writing[key]
            STATUS_PENDING.set(self.pending())
            async with self._idle:
                self._idle.notify_all()
