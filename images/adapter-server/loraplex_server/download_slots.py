"""Download slots: at most N fetches at once, first come first served, unless a request waits.

With 10,000 adapters declared at a pod's start, fetches queue for the manifest's
`maxConcurrentDownloads` slots and the last one is cached ~40 s later (a `pvc://` copy costs a
few milliseconds of file-system work here). A request for an adapter still in that queue
would wait all that time, so `hurry` moves its fetch to the front: the next free slot is its.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class DownloadSlots:
    """A counting semaphore whose limit may change with each manifest, and whose waiters can
    be moved to the front by name."""

    def __init__(self) -> None:
        self.active = 0
        self.limit = 1
        # Waiting fetches in arrival order, by their future (one name may wait twice for a
        # moment: a fetch cancelled for a changed spec, and its successor).
        self._waiting: dict[asyncio.Future[None], str] = {}
        self._hurried: dict[asyncio.Future[None], str] = {}

    @contextlib.asynccontextmanager
    async def slot(self, name: str, limit: int) -> AsyncIterator[None]:
        self.limit = limit
        turn = asyncio.get_running_loop().create_future()
        self._waiting[turn] = name
        self._grant()  # the limit may have grown: not only a release hands out slots
        try:
            await turn
        except asyncio.CancelledError:
            self._waiting.pop(turn, None)
            self._hurried.pop(turn, None)
            if turn.done() and not turn.cancelled():
                self._release()  # granted and cancelled in the same turn: pass it on
            raise
        try:
            yield
        finally:
            self._release()

    def hurry(self, name: str) -> bool:
        """Give `name`'s waiting fetch the next free slot; whether it was waiting for one."""
        for turn, waiting in self._waiting.items():  # once per request for a queued adapter
            if waiting == name:
                del self._waiting[turn]
                self._hurried[turn] = name
                return True
        return False

    def _release(self) -> None:
        self.active -= 1
        self._grant()

    def _grant(self) -> None:
        while self.active < self.limit and (queue := self._hurried or self._waiting):
            turn = next(iter(queue))
            del queue[turn]
            if not turn.done():  # (a cancelled waiter not yet run: it removes itself)
                self.active += 1
                turn.set_result(None)
