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
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from loraplex.errors import KubeError

log = logging.getLogger("loraplex.statuswriter")

Key = tuple[str, str]  # (namespace, adapter name)
# (namespace, name, status): one PATCH of the status subresource.
Patch = Callable[[str, str, dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class _Write:
    resource_version: Any  # of the adapter copy the status was decided from
    status: dict[str, Any]


class StatusWriter:
    """Pending adapter statuses, written by one drain task per BaseModel."""

    def __init__(self, patch: Patch, *, in_flight: int = 8) -> None:
        self._patch = patch
        self._slots = asyncio.Semaphore(in_flight)
        # (ns, BaseModel) -> its adapters' statuses not yet written, oldest first.
        self._pending: dict[Key, OrderedDict[str, _Write]] = {}
        self._writing: dict[Key, _Write] = {}
        # (ns, adapter) -> (resourceVersion the last write was decided from, what it wrote).
        self._written: dict[Key, tuple[Any, dict[str, Any]]] = {}
        self._drains: dict[Key, asyncio.Task[None]] = {}
        self._idle = asyncio.Condition()

    def known(self, ns: str, base: str, meta: Mapping[str, Any], cached: Any) -> Any:
        """An adapter's status as our writes will leave it: a pending or in-flight one, or the
        one we last wrote while the cache (fed by the watch, which learns of a write only
        later) still shows the resourceVersion that write was decided from. Deciding from the
        older copy would stamp new transition times on unchanged conditions, and write twice."""
        name = meta["name"]
        key = (ns, name)
        write = self._pending.get((ns, base), {}).get(name) or self._writing.get(key)
        if write is not None:
            return write.status
        written = self._written.get(key)
        if written is not None and written[0] == meta.get("resourceVersion"):
            return written[1]
        if written is not None:  # the cache has caught up: no need to keep a copy
            del self._written[key]
        return cached

    def submit(
        self, ns: str, base: str, meta: Mapping[str, Any], current: Any, status: dict[str, Any]
    ) -> None:
        """Queue `status` unless `current` (see `known`) already is it."""
        if status == (current or {}):
            return
        queue = self._pending.setdefault((ns, base), OrderedDict())
        queue[meta["name"]] = _Write(meta.get("resourceVersion"), status)
        drain = self._drains.get((ns, base))
        if drain is None or drain.done():
            self._drains[(ns, base)] = asyncio.create_task(
                self._drain(ns, base), name=f"adapter statuses of {ns}/{base}"
            )

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
        for task in self._drains.values():
            task.cancel()
        await asyncio.gather(*self._drains.values(), return_exceptions=True)
        self._drains.clear()

    async def _drain(self, ns: str, base: str) -> None:
        queue = self._pending[(ns, base)]
        writes: set[asyncio.Task[None]] = set()
        while queue:
            await self._slots.acquire()
            if not queue:  # forgotten while we waited for a slot
                self._slots.release()
                break
            name, write = queue.popitem(last=False)
            self._writing[(ns, name)] = write
            task = asyncio.create_task(self._write((ns, name), write))
            writes.add(task)
            task.add_done_callback(writes.discard)
        await asyncio.gather(*writes)

    async def _write(self, key: Key, write: _Write) -> None:
        try:
            await self._patch(key[0], key[1], write.status)
            self._written[key] = (write.resource_version, write.status)
        except KubeError as exc:
            if exc.status != 404:  # 404: deleted meanwhile, its DELETED event forgets it
                log.warning("LoRAAdapter %s/%s: status not written: %s", *key, exc)
        finally:
            self._slots.release()
            if self._writing.get(key) is write:
                del self._writing[key]
            async with self._idle:
                self._idle.notify_all()
