"""Several processes on the public port, one owner of vLLM's adapters.

With `--workers N` the process the pod starts is the owner: it runs everything a single
process runs (manifest, registry, downloads, loads and evictions, the admin port) and also
serves the public port; it starts N-1 followers that serve only the public port. The kernel
spreads connections over all N with SO_REUSEPORT, so relaying, the per-token cost, scales with
cores, while adapter state keeps one writer: no two processes ever load or unload against each
other in vLLM.

A follower relays base-model requests on its own. For an adapter it asks the owner for a hold
(`POST /internal/holds`, on the admin port with the admin token): the owner brings the adapter
up exactly as for its own requests (single-flight load, the same wait bounds) and keeps it from
eviction until the follower releases the hold, which it does as soon as vLLM has accepted the
request, as the owner does for its own (`Registry.use`). A hold that is never released expires
after a lease, so a crashed follower cannot pin adapters. Health, readiness, /v1/adapters and
/v1/models in a follower come from the owner's status, polled every --health-interval.

Metrics use prometheus-client's multiprocess mode (a shared directory of mmap files), so a
scrape that lands on any process shows every process's counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from loraplex_server import errors, pages
from loraplex_server.epp_metrics import LoraState, VLLMMetrics
from loraplex_server.manifest import AdapterState
from loraplex_server.metrics import Metrics
from loraplex_server.registry import Registry
from loraplex_server.settings import Settings

log = logging.getLogger(__name__)
Release = Callable[[], None]


@dataclass
class Status:
    """What the public health routes show; the owner's, copied to followers every
    --health-interval. Small on purpose: no adapter report (a follower asks the owner for a
    page of `GET /v1/adapters`), and the served names only when the generation changed."""

    ready: bool = False
    vllm_healthy: bool = False
    vllm_silent: float = 0.0
    pinned: dict[str, str] = field(default_factory=dict)
    served: list[str] = field(default_factory=list)
    generation: int = -1
    series: list[str] = field(default_factory=list)  # adapters with metric series of their own
    lora: dict[str, Any] = field(default_factory=dict)  # epp_metrics.LoraState, for /metrics

    def to_json(self, *, served: bool = True) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "vllmHealthy": self.vllm_healthy,
            "vllmSilent": self.vllm_silent,
            "pinned": self.pinned,
            "served": self.served if served else None,
            "generation": self.generation,
            "series": self.series,
            "lora": self.lora,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], previous: Status | None = None) -> Status:
        """`previous` supplies the served names when the owner left them out (unchanged)."""
        served = d.get("served")
        return cls(
            ready=bool(d["ready"]),
            vllm_healthy=bool(d["vllmHealthy"]),
            vllm_silent=float(d["vllmSilent"]),
            pinned=dict(d["pinned"]),
            served=list(served) if served is not None else list((previous or cls()).served),
            generation=int(d.get("generation", -1)),
            series=list(d.get("series") or []),
            lora=dict(d.get("lora") or {}),
        )


class Gate(Protocol):
    """How the proxy gets an adapter loaded and held: in this process, or from the owner."""

    def base(self) -> str: ...

    def served_names(self) -> list[str]: ...

    def declared(self, served: str) -> bool: ...

    def hold(self, served: str, size: int) -> contextlib.AbstractAsyncContextManager[Release]: ...


@dataclass
class WaitRoom:
    """Bounds the requests that wait for an adapter to load: per adapter, in total, in bytes.

    A waiting request holds its body; without a bound, a burst of large requests for an adapter
    still downloading holds them all (issue 8: six 7.7 MiB bodies took the pod to 1.2 GiB).
    Past a bound the request is refused at once with 503 and Retry-After.
    """

    per_adapter: int
    total: int
    max_bytes: int
    count: int = 0
    nbytes: int = 0
    by_adapter: dict[str, int] = field(default_factory=dict)

    @contextlib.contextmanager
    def enter(self, name: str, size: int) -> Any:
        mine = self.by_adapter.get(name, 0)
        if mine >= self.per_adapter:
            why = f"{mine} requests already wait for adapter `{name}` (--max-waiting-per-adapter)"
        elif self.count >= self.total:
            why = f"{self.count} requests already wait for adapters (--max-waiting)"
        elif self.nbytes + size > self.max_bytes:
            why = f"waiting requests already hold {self.nbytes} bytes (--max-waiting-bytes)"
        else:
            why = ""
        if why:
            raise errors.Unavailable(f"too many requests waiting: {why}", code="too_many_waiting")
        self.by_adapter[name] = mine + 1
        self.count += 1
        self.nbytes += size
        try:
            yield
        finally:
            self.count -= 1
            self.nbytes -= size
            left = self.by_adapter[name] - 1
            if left:
                self.by_adapter[name] = left
            else:
                del self.by_adapter[name]

    @classmethod
    def of(cls, s: Settings) -> WaitRoom:
        return cls(s.max_waiting_per_adapter, s.max_waiting, s.max_waiting_bytes)


class LocalGate:
    """The owner's gate: the registry itself."""

    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings
        self.waiting = WaitRoom.of(settings)

    def base(self) -> str:
        return self.registry.manifest.base_served_name

    def served_names(self) -> list[str]:
        return self.registry.served_names()

    def declared(self, served: str) -> bool:
        return self.registry.by_served_name(served) is not None

    @contextlib.asynccontextmanager
    async def hold(self, served: str, size: int) -> AsyncIterator[Release]:
        entry = self.registry.by_served_name(served)
        if entry is None:  # removed since a worker's copy of the status said otherwise
            raise errors.model_not_found(served, self.served_names())
        # A use, for metric series (every adapter request of the pod passes here, a
        # follower's through its hold): before the load, so the load is counted under it.
        self.registry.metrics.series.label(served)
        async with self.registry.use(entry) as release:
            if entry.state != AdapterState.LOADED:
                with self.waiting.enter(served, size):
                    await self._load(served)
            yield release

    async def _load(self, served: str) -> None:
        entry = self.registry.by_served_name(served)
        assert entry is not None
        try:
            await self.registry.ensure_loaded(entry, self.settings.load_timeout)
        except TimeoutError:
            raise errors.Unavailable(
                f"adapter `{served}` is still loading ({entry.state}); retry shortly",
                code="adapter_loading",
            ) from None
        except errors.AdapterError as exc:
            raise errors.Unavailable(
                f"adapter `{served}` failed: {exc.reason}: {exc.message}",
                code="adapter_failed",
                retry_after=None,
            ) from None
        except errors.VLLMUnavailable:
            raise errors.Unavailable() from None


class Holds:
    """The owner's side of follower holds: each an open `LocalGate.hold`, with a lease."""

    def __init__(self, gate: LocalGate, lease: float) -> None:
        self.gate = gate
        self.lease = lease
        self.open: dict[str, tuple[contextlib.AsyncExitStack, asyncio.TimerHandle]] = {}
        self._ids = itertools.count(1)
        self._expiring: set[asyncio.Future[None]] = set()

    async def take(self, served: str, size: int) -> str:
        stack = contextlib.AsyncExitStack()
        await stack.enter_async_context(self.gate.hold(served, size))
        hold = str(next(self._ids))
        timer = asyncio.get_running_loop().call_later(self.lease, self._expire, hold)
        self.open[hold] = (stack, timer)
        return hold

    def _expire(self, hold: str) -> None:
        log.warning("hold %s not released within %.0fs: released", hold, self.lease)
        self._expiring.add(t := asyncio.ensure_future(self.release(hold)))
        t.add_done_callback(self._expiring.discard)

    async def release(self, hold: str) -> None:
        item = self.open.pop(hold, None)
        if item is not None:
            item[1].cancel()
            await item[0].aclose()

    async def close(self) -> None:
        for hold in list(self.open):
            await self.release(hold)


class RemoteGate:
    """A follower's gate: holds come from the owner; names from the owner's last status."""

    def __init__(
        self, follower: Follower, session: aiohttp.ClientSession, settings: Settings
    ) -> None:
        self.follower = follower
        self.session = session
        self.settings = settings
        self.waiting = WaitRoom.of(settings)

    def base(self) -> str:
        if not self.follower.status_.served:
            raise errors.Unavailable("this worker has not heard from the owner process yet")
        return self.follower.status_.served[0]

    def served_names(self) -> list[str]:
        return self.follower.status_.served

    def declared(self, served: str) -> bool:
        """Always: the owner decides (its hold answers 404 with the served list). A copy of its
        status may predate a manifest just pushed, and must not turn a new adapter away."""
        return True

    @contextlib.asynccontextmanager
    async def hold(self, served: str, size: int) -> AsyncIterator[Release]:
        with self.waiting.enter(served, size):
            doc = await self._call("/internal/holds", {"served": served, "size": size})
        hold = str(doc.get("hold", ""))
        if doc.get("series"):  # the owner counts `served` among the recent: label it so here
            self.follower.metrics.series.admit(served)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.follower.spawn(self._call(f"/internal/holds/{hold}/release", {}))

        try:
            yield release
        finally:
            release()

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            async with self.session.post(
                f"{self.follower.owner_url}{path}",
                json=body,
                headers={"Authorization": f"Bearer {self.follower.token()}"},
                timeout=aiohttp.ClientTimeout(total=self.settings.load_timeout + 10),
            ) as r:
                doc = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            raise errors.Unavailable("the adapter owner process is not answering") from None
        if r.status != 200:
            err = doc.get("error", {}) if isinstance(doc, dict) else {}
            retry = r.headers.get("Retry-After")
            raise errors.Problem(
                str(err.get("message", "adapter unavailable")),
                status=r.status,
                code=err.get("code"),
                err_type=err.get("type"),
                retry_after=float(retry) if retry else None,
            )
        return doc if isinstance(doc, dict) else {}


class Follower:
    """A worker process that serves only the public port; everything stateful is the owner's."""

    def __init__(self, settings: Settings) -> None:
        from loraplex_server.proxy import Proxy

        self.settings = settings
        self.metrics = Metrics(settings.max_adapter_series, decides=False)
        self.draining = False
        self.status_ = Status()
        self.owner_url = f"http://127.0.0.1:{settings.admin_port}"
        self._owner_ok = time.monotonic()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._proxy_cls = Proxy
        self._proxy: Proxy | None = None
        self._vllm_metrics: VLLMMetrics | None = None
        self._lora_at = -1.0
        self._heard = asyncio.Event()

    def token(self) -> str:
        try:
            return self.settings.admin_token_file.read_text().strip()
        except OSError:
            return ""

    @property
    def proxy(self) -> Any:
        assert self._proxy is not None, "follower not started"
        return self._proxy

    def status(self) -> Status:
        return self.status_

    def lora_state(self) -> LoraState:
        """The owner's adapters as of its last status (polled every --health-interval)."""
        return LoraState.from_json(self.status_.lora)

    async def current_lora_state(self) -> LoraState:
        """The owner's adapters now (a scrape is what the EPP routes by: a copy polled every
        --health-interval would send requests for a just-loaded adapter elsewhere). One small
        call per scrape at most every 25 ms; the last copy if the owner does not answer."""
        if time.monotonic() - self._lora_at < 0.025:
            return self.lora_state()
        assert self._session is not None
        asked_at = time.monotonic()
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with self._session.get(
                f"{self.owner_url}/internal/lora",
                headers={"Authorization": f"Bearer {self.token()}"},
                timeout=aiohttp.ClientTimeout(total=1),
            ) as r:
                if r.status == 200:
                    doc = await r.json()
                    own, base = doc.pop("series", []), doc.pop("base", [])
                    self.metrics.series.mirror(own, base, asked_at)
                    self.status_.lora = doc
                    self._lora_at = time.monotonic()
        return self.lora_state()

    @property
    def vllm_metrics(self) -> VLLMMetrics:
        """vLLM's own /metrics, fetched by this worker (the owner's copy would be stale)."""
        if self._vllm_metrics is None:
            assert self._session is not None, "follower not started"
            self._vllm_metrics = VLLMMetrics(self._session, self.settings.vllm_url)
        return self._vllm_metrics

    def vllm_dead_for(self) -> float:
        """vLLM's silence as the owner last saw it, plus the owner's own silence since."""
        return self.status_.vllm_silent + max(0.0, time.monotonic() - self._owner_ok - 5)

    def spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def current_status(self) -> Status:
        """The owner's status now, for listings a client just changed by its own request (the
        copy polled every --health-interval may predate it); the copy if the owner is silent."""
        await self._fetch_owner_status()
        return self.status_

    async def _fetch_owner_status(self) -> None:
        assert self._session is not None
        asked_at = time.monotonic()
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            async with self._session.get(
                f"{self.owner_url}/internal/status",
                params={"generation": str(self.status_.generation)},
                headers={"Authorization": f"Bearer {self.token()}"},
                timeout=aiohttp.ClientTimeout(total=2),
            ) as r:
                if r.status == 200:
                    self.status_ = Status.from_json(await r.json(), self.status_)
                    base = self.status_.served[:1]
                    self.metrics.series.mirror(self.status_.series, base, asked_at)
                    self._owner_ok = time.monotonic()
                    self._heard.set()

    async def adapters_page(
        self, limit: int | None, after: str | None, unless: Collection[str] = ()
    ) -> tuple[str, dict[str, Any] | None]:
        """The owner's page, so paging reads one registry whichever worker answers; the
        caller's versions go along, so an unchanged report is not built there either."""
        assert self._session is not None
        params = {k: v for k, v in (("limit", limit), ("continue", after)) if v is not None}
        headers = {"Authorization": f"Bearer {self.token()}"}
        if unless:
            headers["If-None-Match"] = pages.if_none_match(unless)
        doc: Any = None
        try:
            async with self._session.get(
                f"{self.owner_url}/internal/adapters",
                params={k: str(v) for k, v in params.items()},
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=10),
            ) as r:
                version = r.headers.get("ETag", "").strip('"')
                if r.status == 304:
                    return version, None
                doc = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            raise errors.Unavailable("the adapter owner process is not answering") from None
        if r.status != 200 or not isinstance(doc, dict) or not version:
            raise errors.Unavailable("the adapter owner process could not list adapters")
        return version, doc

    async def wait_for_owner(self, seconds: float = 300.0) -> None:
        """Until the first status from the owner arrived (it polls from cleanup_ctx)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._heard.wait(), seconds)

    async def _poll_owner(self) -> None:
        parent = os.getppid()
        assert self._session is not None
        while True:
            if os.getppid() != parent:
                log.error("owner process is gone; exiting")
                os.kill(os.getpid(), 15)
                return
            await self._fetch_owner_status()
            await asyncio.sleep(self.settings.health_interval)

    async def cleanup_ctx(self, app: web.Application) -> Any:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
        )
        self._proxy = self._proxy_cls(
            RemoteGate(self, self._session, self.settings),
            self.metrics,
            self._session,
            self.settings,
        )
        poll = asyncio.create_task(self._poll_owner())
        yield
        poll.cancel()
        await asyncio.gather(poll, *self._tasks, return_exceptions=True)
        await self._session.close()
