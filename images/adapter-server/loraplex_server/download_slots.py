"""Download slots: at most N fetches at once, first come first served, unless a request waits.

With 10,000 adapters declared at a pod's start, fetches queue for the manifest's
`maxConcurrentDownloads` slots and the last one is cached ~40 s later (a `pvc://` copy costs a
few milliseconds of file-system work here). A request for an adapter still in that queue
would wait all that time, so `hurry` moves its fetch to the front: the next free slot is its.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator


class DownloadSlots:
    """A counting semaphore whose limit may change with each manifest, and whose waiters can
    be moved to the front by name.

    Queues are deques, so a grant is O(1) however many wait: a cancelled waiter is not taken
    out (its turn is skipped when reached), and a hurried one is queued again in front (its
    old place is skipped once its turn is done). Only `hurry` walks the queue.
    """

    def __init__(self) -> None:
        self.active = 0
        self.limit = 1
        self._waiting: collections.deque[tuple[asyncio.Future[None], str]] = collections.deque()
        self._hurried: collections.deque[asyncio.Future[None]] = collections.deque()

    @contextlib.asynccontextmanager
    async def slot(self, name: str, limit: int) -> AsyncIterator[None]:
        self.limit = limit
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append((turn, name))
        self._grant()  # the limit may have grown: not only a release hands out slots
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release()  # granted and cancelled in the same turn: pass it on
            raise
        try:
            yield
        finally:
            self._release()

    def hurry(self, name: str) -> bool:
        """Give `name`'s waiting fetch the next free slot; whether it was waiting for one."""
        for turn, waiting in self._waiting:  # once per request for a queued adapter
            if waiting == name and not turn.done():
                self._hurried.append(turn)
                return True
        return False

    def _release(self) -> None:
        self.active -= 1
        self._grant()

    def _grant(self) -> None:
        while self.active < self.limit and (self._hurried or self._waiting):
            turn = self._hurried.popleft() if self._hurried else self._waiting.popleft()[0]
            if not turn.done():  # (cancelled, or granted already from the hurried queue)
                self.active += 1
                turn.set_result(None)
