"""Per-adapter lifecycle on one pod: the state machine, LRU slots, pinning, single-flight loads.

All state lives on the event loop (no threads touch it), so plain attributes are enough; the
one asyncio.Condition guards the slot count and wakes loads waiting for a slot to go idle.
An adapter is not evicted while a request that chose it has not yet been accepted by vLLM
(see `use`): vLLM's unload only drops the name, so such a request would get vLLM's 404.

    declared -> downloading -> cached -> loading -> loaded -> evicted (-> loading ...)
                     \\-> failed (reason, message, attempts)
    cached or evicted -> uncached (files removed for cache room) -> downloading ... on demand
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loraplex_server import errors
from loraplex_server.fetch import Fetcher
from loraplex_server.manifest import (
    AdapterManifest,
    AdapterReport,
    AdaptersResponse,
    AdapterState,
    ManifestAdapter,
    ProbeResult,
)
from loraplex_server.metrics import Metrics
from loraplex_server.probe import Prober
from loraplex_server.verify import AdapterInfo
from loraplex_server.vllm_client import VLLMClient

log = logging.getLogger(__name__)
S = AdapterState
_SLOT_STATES = (S.LOADING, S.LOADED)
_LOADABLE = (S.CACHED, S.EVICTED)


# Every assignment to any Entry's fields counts here, so a report's version (`Registry.version`)
# changes whenever anything a report shows may have: catching every write at one place is what
# makes "unchanged" safe to answer without building the report.
_entry_writes = 0


@dataclass(eq=False)
class Entry:
    """One declared adapter and everything this pod knows about it."""

    spec: ManifestAdapter
    state: AdapterState = S.DECLARED
    path: Path | None = None
    info: AdapterInfo | None = None
    last_used: datetime | None = None
    last_used_mono: float = 0.0
    load_seconds: float | None = None
    attempts: int = 0
    reason: str | None = None
    message: str | None = None
    detail: str | None = None  # the full error, for logs and the admin port only
    inflight: int = 0
    reload_wanted: bool = False
    removed: bool = False
    fetch_task: asyncio.Task[None] | None = field(default=None, repr=False)
    load_task: asyncio.Task[None] | None = field(default=None, repr=False)
    proof: ProbeResult | None = None
    # The registry's count of its entries by state, kept while the entry is one of them.
    tally: collections.Counter[AdapterState] | None = field(default=None, repr=False)

    def __setattr__(self, name: str, value: Any) -> None:
        global _entry_writes
        _entry_writes += 1
        if name == "state" and (tally := self.__dict__.get("tally")) is not None:
            tally[self.state] -= 1
            tally[value] += 1
        object.__setattr__(self, name, value)

    def touch(self) -> None:
        self.last_used = datetime.now(UTC)
        self.last_used_mono = time.monotonic()

    def report(self) -> AdapterReport:
        info = self.info
        return AdapterReport(
            name=self.spec.name,
            served_name=self.spec.served_name,
            state=self.state,
            pinned=self.spec.pinned,
            rank=info.rank if info else self.spec.rank,
            target_modules=info.target_modules if info else [],
            size_bytes=info.size_bytes if info else None,
            digest=info.digest if info else None,
            last_used=self.last_used,
            load_seconds=self.load_seconds,
            attempts=self.attempts,
            reason=self.reason,
            message=self.message,
            warnings=list(info.warnings) if info else [],
            proof=self.proof,
        )


def _same_content(a: ManifestAdapter, b: ManifestAdapter) -> bool:
    """Whether an update can keep the installed files and the vLLM name."""
    keep = {"pinned", "uid"}
    return a.model_dump(exclude=keep) == b.model_dump(exclude=keep)


class Registry:
    """What the pod serves, and the only code that changes adapter states."""

    def __init__(
        self,
        manifest: AdapterManifest,
        metrics: Metrics,
        fetcher: Fetcher,
        vllm: VLLMClient,
        prober: Prober | None = None,
    ) -> None:
        self.manifest = manifest
        self.metrics = metrics
        self.fetcher = fetcher
        self.vllm = vllm
        self.prober = prober
        # Probe results by adapter digest: the same files are never probed twice on this pod.
        self.proofs: dict[str, ProbeResult] = {}
        self._proving = asyncio.Lock()
        self.vllm_healthy = False
        self.entries: dict[str, Entry] = {}
        self._served: dict[str, Entry] = {}  # served name -> entry, rebuilt by each apply
        self._cond = asyncio.Condition()
        self._apply_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        fetcher.budget.evictor = self._evict_from_cache
        self._gauges_due = False
        self._tally: collections.Counter[AdapterState] = collections.Counter()
        # Versions name this registry's reports only: a restarted pod never repeats one.
        self._boot = secrets.token_hex(6)
        metrics.generation.set(manifest.generation)

    # -- lookups and reports ---------------------------------------------------------------

    def by_served_name(self, served: str) -> Entry | None:
        """The entry serving `served`: every inference request asks, so a dict, not a scan
        (10,000 declared adapters made the scan a millisecond per request).

        The index never lags the entries: `apply` adds entries and rebuilds it with no await
        in between, and an entry it removes is marked `removed` first. (A scan of the entries
        while an apply ran used to back this up; it could find nothing the index lacked, and
        cost every request a millisecond during a push at 10,000 adapters.)"""
        e = self._served.get(served)
        if e is not None and not e.removed and e.spec.served_name == served:
            return e
        return None

    def _index_served(self) -> None:
        self._served = {e.spec.served_name: e for e in self.entries.values()}

    def served_names(self) -> list[str]:
        return [
            self.manifest.base_served_name,
            *sorted(e.spec.served_name for e in self.entries.values()),
        ]

    def version(self) -> str:
        """Names the report as it is now: equal versions, equal reports. A poller that holds
        the current one is told "unchanged" (HTTP 304) instead of being sent 10,000 adapters
        again; at 10,000 the operator's 10-second poll of ten pages was half of each pass.

        Over-counts (a request's in-flight count also moves it), never under-counts: every
        field a report shows is an Entry field or the generation or vLLM's health."""
        return f"{self._boot}-{self.manifest.generation}-{int(self.vllm_healthy)}-{_entry_writes}"

    def report(self) -> AdaptersResponse:
        return AdaptersResponse(
            generation=self.manifest.generation,
            base_served_name=self.manifest.base_served_name,
            vllm_healthy=self.vllm_healthy,
            adapters=[e.report() for e in sorted(self.entries.values(), key=lambda e: e.spec.name)],
        )

    def ready(self) -> bool:
        """vLLM is up and every pinned adapter that can be loaded is loaded.

        A pinned adapter that failed for good (say, rank too large) does not hold the pod
        unready: it is reported as failed, and the other adapters keep being served.
        """
        if not self.vllm_healthy:
            return False
        return all(e.state in (S.LOADED, S.FAILED) for e in self.entries.values() if e.spec.pinned)

    # -- manifest --------------------------------------------------------------------------

    async def apply(self, manifest: AdapterManifest, *, initial: bool = False) -> bool:
        """Serve `manifest` if it is newer than the one held; return whether it was applied."""
        async with self._apply_lock:
            if not initial and manifest.generation <= self.manifest.generation:
                return False
            self.manifest = manifest
            self.metrics.generation.set(manifest.generation)
            self.metrics.series.base = {manifest.base_served_name}
            wanted = {a.name: a for a in manifest.adapters}
            for name, e in list(self.entries.items()):
                spec = wanted.get(name)
                if spec is None or (spec is not e.spec and not _same_content(e.spec, spec)):
                    await self._remove(e)
            for name, spec in wanted.items():
                old = self.entries.get(name)
                if old is None:
                    e = self.entries[name] = Entry(spec=spec)
                    self._tally[e.state] += 1
                    e.tally = self._tally
                    e.fetch_task = self._spawn(self._fetch(e))
                else:
                    e = old
                    if e.spec is not spec:  # (an unchanged entry is the same object)
                        e.spec = spec
                    if spec.pinned and e.state in _LOADABLE and self.vllm_healthy:
                        self._spawn(self.ensure_loaded(e, None))
                    elif e.state == S.LOADED and self._needs_probe(e):
                        self._spawn(self._prove_loaded(e), quiet=True)  # probes just turned on
                    elif e.state in _LOADABLE and self._needs_probe(e):
                        self._spawn(self._background_proof(e), quiet=True)
            self._index_served()
            async with self._cond:
                self._cond.notify_all()
            self._update_gauges()
            return True

    async def _remove(self, e: Entry) -> None:
        e.removed = True
        if self.entries.pop(e.spec.name, None) is e:
            e.tally = None
            self._tally[e.state] -= 1
        if e.fetch_task is not None and not e.fetch_task.done():
            e.fetch_task.cancel()
        await self._notify()  # a load of `e` waiting for a slot gives up
        if e.load_task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(e.load_task)
        async with self._cond:
            if e.state in _SLOT_STATES:
                with contextlib.suppress(errors.VLLMUnavailable):
                    await self.vllm.unload(e.spec.served_name)
            e.state = S.EVICTED
            self._cond.notify_all()
        await self.fetcher.remove(e.spec.name)
        self.metrics.cache_size.set(self.fetcher.cache_size())
        log.info("adapter %s removed", e.spec.name)

    # -- fetching --------------------------------------------------------------------------

    async def _fetch(self, e: Entry) -> None:
        self._set(e, S.DOWNLOADING)

        def attempt(n: int) -> None:
            e.attempts = n

        try:
            e.path, e.info = await self.fetcher.fetch(e.spec, self.manifest, attempt)
        except errors.AdapterError as exc:
            self._fail(e, exc)
            return
        except Exception as exc:  # a bug or an odd source must fail one adapter, not the pod
            log.exception("adapter %s: unexpected fetch error", e.spec.name)
            self._fail(
                e,
                errors.AdapterError(
                    errors.DOWNLOAD_FAILED,
                    "unexpected error while fetching; the server log has the details",
                    f"{type(exc).__name__}: {exc}",
                ),
            )
            return
        if e.removed:
            return
        self._set(e, S.CACHED)
        self.metrics.cache_size.set(self.fetcher.cache_size())
        log.info("adapter %s cached at %s (%s)", e.spec.name, e.path, e.info.digest)
        e.proof = self.proofs.get(e.info.digest)
        if e.spec.pinned and self.vllm_healthy:
            self._spawn(self.ensure_loaded(e, None))
        elif self._needs_probe(e):
            self._spawn(self._background_proof(e), quiet=True)

    def _evictable(self, e: Entry) -> bool:
        return (
            e.state in _LOADABLE
            and not e.spec.pinned
            and not e.removed
            and e.inflight == 0
            and (e.load_task is None or e.load_task.done())
        )

    async def _evict_from_cache(self, need: int) -> int:
        """Free at least `need` bytes of the cache (the budget's evictor); return bytes freed.

        Folders no longer declared go first, then cached adapters that are not pinned, not
        loaded and not in use, least recently used first. An evicted adapter goes back to
        `uncached` and is fetched again when a request needs it.
        """
        freed = 0
        for name in set(self.fetcher.installed()) - set(self.entries):
            if freed >= need:
                return freed
            freed += await self.fetcher.remove(name)
        for e in sorted(self.entries.values(), key=lambda x: x.last_used_mono):
            if freed >= need:
                break
            if not self._evictable(e):  # re-checked here: earlier removals awaited
                continue
            e.path = None
            self._set(e, S.UNCACHED)
            freed += await self.fetcher.remove(e.spec.name)
            log.info("adapter %s removed from the cache to make room", e.spec.name)
        self.metrics.cache_size.set(self.fetcher.cache_size())
        return freed

    async def refetch(self, e: Entry) -> None:
        """Give a failed adapter another go (admin load); requests alone never retry a failure."""
        if e.state != S.FAILED or (e.fetch_task is not None and not e.fetch_task.done()):
            return
        retry_load = e.reason == errors.LOAD_FAILED and e.path is not None
        e.reason = e.message = e.detail = None
        if retry_load:
            self._set(e, S.CACHED)
        else:
            e.attempts = 0
            e.fetch_task = self._spawn(self._fetch(e))

    # -- loading ---------------------------------------------------------------------------

    async def ensure_loaded(self, e: Entry, wait: float | None) -> None:
        """Load `e` into vLLM, sharing one load among all callers.

        Raises AdapterError (failed for good), VLLMUnavailable, or TimeoutError after
        `wait` seconds; the load itself carries on after a timeout.
        """
        if e.state == S.LOADED:
            return
        if e.state == S.FAILED:
            raise errors.AdapterError(e.reason or errors.DOWNLOAD_FAILED, e.message or "failed")
        if e.load_task is None or e.load_task.done():
            e.load_task = self._spawn(self._bring_up(e), quiet=True)
        await asyncio.wait_for(asyncio.shield(e.load_task), wait)

    async def _bring_up(self, e: Entry) -> None:
        if e.state == S.UNCACHED and e.fetch_task is not None and e.fetch_task.done():
            e.fetch_task = self._spawn(self._fetch(e))  # its files were evicted from the cache
        if e.fetch_task is not None:
            self.fetcher.slots.hurry(e.spec.name)  # someone waits for it: next free slot
            try:
                await asyncio.shield(e.fetch_task)
            except asyncio.CancelledError:
                if not e.removed:
                    raise
                # the fetch was cancelled because the adapter was removed meanwhile
        if e.state == S.FAILED:
            raise errors.AdapterError(e.reason or errors.DOWNLOAD_FAILED, e.message or "failed")
        if e.removed:
            raise errors.AdapterError(errors.INVALID_SOURCE, "adapter was removed")
        assert e.path is not None
        async with self._cond:
            await self._claim_slot(e)
            self._set(e, S.LOADING)
        t0 = time.monotonic()
        try:
            await self.vllm.load(e.spec.served_name, e.path)
        except errors.AdapterError as exc:
            self._fail(e, exc)
            raise
        except BaseException:
            self._set(e, S.CACHED)
            raise
        finally:
            async with self._cond:
                self._cond.notify_all()
        e.load_seconds = time.monotonic() - t0
        if self._needs_probe(e):
            await self._prove(e)
        e.reload_wanted = False
        e.reason = e.message = e.detail = None
        e.touch()
        self._set(e, S.LOADED)
        self.metrics.loads.labels(e.spec.served_name).inc()
        self.metrics.load_seconds.labels(e.spec.served_name).observe(e.load_seconds)
        log.info("adapter %s loaded in %.3fs", e.spec.name, e.load_seconds)

    def _needs_probe(self, e: Entry) -> bool:
        return (
            self.prober is not None
            and self.manifest.checks.probe
            and e.info is not None
            and e.info.digest not in self.proofs
        )

    async def _prove(self, e: Entry) -> None:
        """Probe `e` (loaded, slot held); an adapter without effect is unloaded and failed."""
        assert self.prober is not None and e.info is not None
        checks = self.manifest.checks
        try:
            result = await self.prober.probe(
                e.spec.served_name,
                self.manifest.base_served_name,
                e.info.digest,
                checks.probe_tolerance,
            )
        except errors.AdapterError as exc:
            await self._unload_quietly(e)
            self._fail(e, exc)
            raise
        except errors.VLLMUnavailable as exc:
            # The probe could not run (a cold vLLM's first requests can be slow): the adapter
            # loaded fine and stays, unproven (not Ready upstream), and is probed again later.
            log.warning("adapter %s: probe deferred: %s", e.spec.name, exc)
            self._spawn(self._prove_later(e), quiet=True)
            return
        except BaseException:
            await self._unload_quietly(e)
            self._set(e, S.CACHED)
            raise
        self.proofs[e.info.digest] = e.proof = result
        outcome = "effect" if result.effect else "no_effect"
        self.metrics.probes.labels(outcome).inc()
        self.metrics.probe_seconds.observe(result.seconds)
        if result.effect or checks.no_effect == "Allow":
            return
        delta = "diverged" if result.max_logprob_delta is None else result.max_logprob_delta
        refused = errors.AdapterError(
            errors.NO_EFFECT,
            f"the adapter does not change the model's output: top logprobs differ from the "
            f"base's by at most {delta} (tolerance {result.tolerance}); an untrained adapter "
            "(lora_B all zero) or target modules vLLM ignores. spec.adapterChecks.noEffect: "
            "Allow serves it anyway",
        )
        await self._unload_quietly(e)
        self._fail(e, refused)
        raise refused

    async def _background_proof(self, e: Entry) -> None:
        """Prove a new on-demand adapter now if a slot is free, one at a time.

        Never evicts for it: an adapter that serves traffic must not be pushed out for a
        proof. With every slot taken, the proof happens at the adapter's first load instead,
        and until then the adapter is reported unproven (not Ready).
        """
        async with self._proving:
            if not (self._needs_probe(e) and e.state in _LOADABLE and self.vllm_healthy):
                return
            busy = sum(1 for x in self.entries.values() if x.state in _SLOT_STATES)
            if busy >= self.manifest.max_cpu_loras:
                return
            await self.ensure_loaded(e, None)

    async def _prove_later(self, e: Entry, delay: float = 10.0) -> None:
        await asyncio.sleep(delay)
        if not e.removed and e.state == S.LOADED and self._needs_probe(e):
            await self._prove_loaded(e)

    async def _prove_loaded(self, e: Entry) -> None:
        """Prove an adapter that was loaded before probes were asked for, or whose probe
        could not run (held against eviction meanwhile)."""
        async with self._proving, self.use(e):
            if e.state != S.LOADED or not self._needs_probe(e):
                return
            with contextlib.suppress(errors.AdapterError, errors.VLLMUnavailable):
                await self._prove(e)

    async def _unload_quietly(self, e: Entry) -> None:
        with contextlib.suppress(errors.VLLMUnavailable):
            await self.vllm.unload(e.spec.served_name)

    async def _claim_slot(self, e: Entry) -> None:
        """Wait (holding the condition) until `e` fits, evicting idle LRU ones.

        The cap is maxCpuLoras, not maxLoras: vLLM itself multiplexes its maxLoras GPU slots,
        batch by batch, among the adapters it holds in its CPU cache (maxCpuLoras of them), so
        unloading at maxLoras would only force needless reloads when traffic rotates.
        """
        while True:
            if e.removed:
                raise errors.AdapterError(errors.INVALID_SOURCE, "adapter was removed")
            busy = [x for x in self.entries.values() if x.state in _SLOT_STATES and x is not e]
            if len(busy) < self.manifest.max_cpu_loras:
                return
            idle = [
                x for x in busy if x.state == S.LOADED and not x.spec.pinned and x.inflight == 0
            ]
            if idle:
                victim = min(idle, key=lambda x: x.last_used_mono)
                await self._unload_locked(victim)
                self.metrics.evictions.labels(victim.spec.served_name).inc()
                log.info("adapter %s evicted for %s", victim.spec.name, e.spec.name)
                continue
            await self._cond.wait()

    async def _unload_locked(self, e: Entry) -> None:
        # Evicted before the call, not after: a request arriving meanwhile must see that it
        # needs a (re)load, instead of being sent to vLLM for a name it is dropping.
        self._set(e, S.EVICTED)
        try:
            await self.vllm.unload(e.spec.served_name)
        except errors.VLLMUnavailable:
            log.warning("adapter %s: vLLM did not answer the unload", e.spec.name)

    async def unload(self, e: Entry) -> None:
        """Unload on request (admin); waits for in-flight requests of the adapter to finish."""
        async with self._cond:
            while e.inflight > 0:
                await self._cond.wait()
            if e.state == S.LOADED:
                await self._unload_locked(e)
            self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def use(self, e: Entry) -> AsyncIterator[Callable[[], None]]:
        """Hold `e` against eviction until the returned release() is called (or the block ends).

        The proxy releases as soon as vLLM answers with headers: vLLM's unload only drops the
        name, so a request already inside vLLM finishes with its adapter; only a request that
        has not reached vLLM yet would get a 404. Holding no longer than that keeps busy
        adapters from starving loads that wait for a slot.
        """
        e.inflight += 1
        e.touch()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                e.inflight -= 1
                e.touch()
                self._spawn(self._notify())

        try:
            yield release
        finally:
            release()

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    # -- vLLM health -----------------------------------------------------------------------

    async def vllm_down(self) -> None:
        """vLLM lost every adapter: remember which to load again when it is back."""
        self.vllm_healthy = False
        if self.prober is not None:
            self.prober.forget_base()
        self.metrics.vllm_healthy.set(0)
        for e in self.entries.values():
            if e.state in _SLOT_STATES:
                e.reload_wanted = True
                if e.state == S.LOADED:
                    self._set(e, S.CACHED)
        async with self._cond:
            self._cond.notify_all()

    async def vllm_up(self) -> None:
        self.vllm_healthy = True
        self.metrics.vllm_healthy.set(1)
        for e in self.entries.values():
            if (e.reload_wanted or e.spec.pinned) and e.state in _LOADABLE:
                self._spawn(self.ensure_loaded(e, None))
            elif self._needs_probe(e) and e.state in _LOADABLE:
                self._spawn(self._background_proof(e), quiet=True)

    # -- helpers ---------------------------------------------------------------------------

    def _set(self, e: Entry, state: AdapterState) -> None:
        if not e.removed:
            e.state = state
        self._update_gauges()

    def _fail(self, e: Entry, exc: errors.AdapterError) -> None:
        e.reason, e.message, e.detail = exc.reason, exc.message, exc.detail
        self._set(e, S.FAILED)
        self.metrics.failures.labels(e.spec.served_name, exc.reason).inc()
        log.error("adapter %s failed: %s: %s", e.spec.name, exc.reason, exc.detail)

    def _update_gauges(self) -> None:
        """Set the per-state gauge once per event-loop turn, however many adapters changed
        state in it, from the tally every state write keeps (`Entry.__setattr__`).

        Counting the entries instead is quadratic: 10,000 adapters starting took minutes when
        each change recounted, and a recount per turn still cost settling them 42 -> 36 s,
        because the fetches finish a few per turn."""
        if self._gauges_due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._set_gauges()
            return
        self._gauges_due = True
        loop.call_soon(self._set_gauges)

    def _set_gauges(self) -> None:
        self._gauges_due = False
        for s in S:
            self.metrics.adapters.labels(s.value).set(self._tally[s])

    def _spawn(self, coro: Coroutine[Any, Any, None], quiet: bool = False) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if t.cancelled():
                return
            exc = t.exception()  # retrieved here so asyncio never warns about it
            if exc is not None and not quiet:
                log.warning("background adapter task failed: %s: %s", type(exc).__name__, exc)

        task.add_done_callback(done)
        return task

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
