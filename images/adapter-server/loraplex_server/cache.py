"""The adapter cache's byte accounting: one running total, a budget, and per-attempt quotas.

The cache is usually an emptyDir with a sizeLimit, and the kubelet evicts a pod that goes
over it; the restarted pod would fetch the same adapters again and be evicted again. So every
byte written into the cache is charged here first: against the attempt's own quota (one
adapter may not exceed spec.adapterLimits.maxAdapterSize / maxAdapterFiles) and against the
whole-cache budget (cacheSize), which makes room by evicting least-recently-used, unpinned,
idle adapters from disk. The running total also answers `cache_size()` without walking the
cache on the event loop.

Downloads charge from the event loop (`charge`) and from worker threads (`charge_sync`, for
tar extraction, s3 and pvc copies); the total is guarded by a thread lock, and eviction always
runs on the loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

from loraplex_server import errors
from loraplex_server.manifest import AdapterLimits

Evictor = Callable[[int], Awaitable[int]]


def too_many_bytes(limit: int) -> errors.AdapterError:
    return errors.AdapterError(
        errors.ADAPTER_TOO_LARGE,
        f"the adapter is larger than {limit} bytes (spec.adapterLimits.maxAdapterSize); "
        "raise that field on the BaseModel if this adapter is meant to be this big",
    )


def too_many_files(limit: int) -> errors.AdapterError:
    return errors.AdapterError(
        errors.ADAPTER_TOO_LARGE,
        f"the adapter has more than {limit} files or archive members "
        "(spec.adapterLimits.maxAdapterFiles); raise that field on the BaseModel if needed",
    )


def deadline_passed(seconds: float) -> errors.TransientError:
    return errors.TransientError(
        f"the download did not finish within {seconds:g} s "
        "(spec.adapterLimits.downloadTimeoutSeconds); raise that field on the BaseModel for "
        "a slow origin",
        reason=errors.DOWNLOAD_TIMEOUT,
    )


class CacheBudget:
    """Bytes on the cache volume, and the most it may hold."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()
        self._room = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.evictor: Evictor | None = None

    def bind(self) -> None:
        """Remember the running loop, where worker threads send eviction work."""
        self._loop = asyncio.get_running_loop()

    @property
    def used(self) -> int:
        return self._used

    def add(self, n: int) -> None:
        """Count bytes already on disk (an installed adapter, or what a restart found)."""
        with self._lock:
            self._used += n

    def release(self, n: int) -> None:
        with self._lock:
            self._used = max(0, self._used - n)

    def _try_take(self, n: int) -> bool:
        with self._lock:
            if self._used + n > self.limit:
                return False
            self._used += n
            return True

    async def take(self, n: int) -> None:
        """Reserve `n` bytes, evicting cached adapters when full; CacheFull if it cannot."""
        if self._try_take(n):
            return
        async with self._room:
            while not self._try_take(n):
                need = self._used + n - self.limit
                freed = await self.evictor(need) if self.evictor is not None else 0
                if freed <= 0:
                    raise errors.AdapterError(
                        errors.CACHE_FULL,
                        f"the adapter cache budget of {self.limit} bytes "
                        "(spec.adapterLimits.cacheSize) is taken by pinned, loaded or "
                        "downloading adapters; raise it together with "
                        "spec.adapterCache.sizeLimit, or unpin adapters",
                    )

    def take_sync(self, n: int) -> None:
        """`take` from a worker thread: the fast path here, eviction on the loop."""
        if self._try_take(n):
            return
        if self._loop is None:
            raise RuntimeError("CacheBudget.bind() was not called on the loop")
        asyncio.run_coroutine_threadsafe(self.take(n), self._loop).result()


class Quota:
    """What one download attempt may still write, and by when.

    `expect` refuses before a write when the size is known up front (Content-Length, a tar
    header, an S3 listing); `charge` counts what is actually written, so a stream without a
    length stops at the cap as well.
    """

    def __init__(self, limits: AdapterLimits, budget: CacheBudget, deadline: float) -> None:
        self.max_bytes = limits.max_adapter_bytes
        self.max_files = limits.max_adapter_files
        self.timeout = limits.download_timeout_seconds
        self.deadline = deadline
        self.budget = budget
        self.bytes = 0
        self.files = 0
        self.charged = 0

    def add_file(self) -> None:
        self.files += 1
        if self.files > self.max_files:
            raise too_many_files(self.max_files)

    def expect(self, n: int) -> None:
        if self.bytes + n > self.max_bytes:
            raise too_many_bytes(self.max_bytes)

    def _count(self, n: int) -> None:
        self.expect(n)
        if time.monotonic() > self.deadline:
            raise deadline_passed(self.timeout)
        self.bytes += n

    async def charge(self, n: int) -> None:
        self._count(n)
        await self.budget.take(n)
        self.charged += n

    def charge_sync(self, n: int) -> None:
        self._count(n)
        self.budget.take_sync(n)
        self.charged += n

    def release(self) -> None:
        """Give back what this attempt charged (its temp files are gone)."""
        self.budget.release(self.charged)
        self.charged = 0
