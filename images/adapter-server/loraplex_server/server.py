"""The running server's shared state and its background watchers.

One `Server` is shared by the public and the admin app. It owns the HTTP session, the registry,
and two loops: one polls vLLM's /health (so /readyz turns false within about a second of vLLM
dying, and adapters are loaded again when it is back), one polls the mounted manifest file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Collection
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from loraplex_server import manifest_shards, pages
from loraplex_server.epp_metrics import LoraState, VLLMMetrics, lora_state
from loraplex_server.fetch import Fetcher
from loraplex_server.manifest import AdapterManifest
from loraplex_server.metrics import Metrics
from loraplex_server.probe import Prober
from loraplex_server.proxy import Proxy
from loraplex_server.registry import Registry
from loraplex_server.settings import Settings
from loraplex_server.vllm_client import VLLMClient
from loraplex_server.workers import Holds, LocalGate, Status

log = logging.getLogger(__name__)


class Server:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics(settings.max_adapter_series, idle_after=settings.adapter_series_idle)
        self.fetcher = Fetcher(settings, self.metrics)
        self._session: aiohttp.ClientSession | None = None
        self._registry: Registry | None = None
        self._proxy: Proxy | None = None
        self._vllm_metrics: VLLMMetrics | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._manifest_digest = ""
        self.draining = False
        self.vllm_last_ok: float | None = None  # monotonic time of vLLM's last good /health

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "server not started"
        return self._session

    @property
    def vllm_metrics(self) -> VLLMMetrics:
        if self._vllm_metrics is None:
            self._vllm_metrics = VLLMMetrics(self.session, self.settings.vllm_url)
        return self._vllm_metrics

    @property
    def registry(self) -> Registry:
        assert self._registry is not None, "server not started"
        return self._registry

    @property
    def proxy(self) -> Proxy:
        assert self._proxy is not None, "server not started"
        return self._proxy

    def read_manifest(self) -> tuple[str, AdapterManifest]:
        """The mounted manifest; once serving, adapters unchanged since the held manifest keep
        their validated entries (the read runs in a thread, and validation holds the GIL)."""
        held = self._registry.manifest if self._registry is not None else None
        return manifest_shards.read_mounted(self.settings.manifest, held)

    async def _first_manifest(self) -> tuple[str, AdapterManifest]:
        """A complete generation: while the kubelet has refreshed only some of the shards,
        wait for the rest (bounded by manifest_wait), never start on half of one."""
        deadline = time.monotonic() + self.settings.manifest_wait
        while True:
            try:
                return self.read_manifest()
            except manifest_shards.TornManifest as exc:
                if time.monotonic() >= deadline:
                    raise
                log.info("mounted manifest not consistent yet (%s); waiting", exc)
            await asyncio.sleep(self.settings.manifest_interval)

    async def start(self) -> None:
        """Read the mounted manifest (a bad one stops the process: the operator wrote it)."""
        digest, manifest = await self._first_manifest()
        self._manifest_digest = digest
        await asyncio.to_thread(self.fetcher.clean_temp)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
        )
        self._registry = Registry(
            manifest,
            self.metrics,
            self.fetcher,
            VLLMClient(self.settings.vllm_url, self._session),
            Prober(self.settings.vllm_url, self._session),
        )
        self.gate = LocalGate(self._registry, self.settings)
        self.holds = Holds(self.gate, lease=self.settings.load_timeout + 60)
        self._proxy = Proxy(self.gate, self.metrics, self._session, self.settings)
        await self._registry.apply(manifest, initial=True)
        self._tasks = [
            asyncio.create_task(self._watch_vllm()),
            asyncio.create_task(self._watch_manifest()),
        ]
        log.info(
            "serving manifest generation %d with %d adapters",
            manifest.generation,
            len(manifest.adapters),
        )

    def lora_state(self) -> LoraState:
        """Live, for /metrics (the EPP scrapes every ~50 ms: no full report built here)."""
        return lora_state(self.registry)

    async def current_lora_state(self) -> LoraState:
        return self.lora_state()

    async def current_status(self) -> Status:
        return self.status()

    async def adapters_page(
        self, limit: int | None, after: str | None, unless: Collection[str] = ()
    ) -> tuple[str, dict[str, Any] | None]:
        version = self.registry.version()
        if pages.unchanged(version, unless):  # the caller holds it: nothing to build or send
            return version, None
        page = pages.adapters_page(self.registry, limit, after)
        return version, page.model_dump(mode="json", by_alias=True)

    def status(self) -> Status:
        """For health routes and followers' polls: small (no adapter report) except `served`,
        which a follower takes only when the generation changed (see app.internal_status)."""
        reg = self.registry
        return Status(
            ready=reg.ready(),
            vllm_healthy=reg.vllm_healthy,
            vllm_silent=self.vllm_dead_for(),
            pinned={e.spec.name: e.state.value for e in reg.entries.values() if e.spec.pinned},
            served=reg.served_names(),
            generation=reg.manifest.generation,
            series=self.metrics.series.own(),
            lora=lora_state(reg).to_json(),
        )

    async def stop(self) -> None:
        if self._registry is not None:
            await self.holds.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._registry is not None:
            await self._registry.close()
        if self._session is not None:
            await self._session.close()

    async def _watch_vllm(self) -> None:
        vllm = self.registry.vllm
        first = True
        while True:
            ok = await vllm.healthy(seconds=1.0)
            if ok:
                self.vllm_last_ok = time.monotonic()
            if ok and (first or not self.registry.vllm_healthy):
                log.info("vLLM is healthy")
                await self.registry.vllm_up()
            elif not ok and (first or self.registry.vllm_healthy):
                log.warning("vLLM is not healthy")
                await self.registry.vllm_down()
            first = False
            await asyncio.sleep(self.settings.health_interval)

    def vllm_dead_for(self) -> float:
        """Seconds since vLLM last answered /health, 0 if it never has (still starting: the
        startup probe, not liveness, bounds that)."""
        if self.vllm_last_ok is None:
            return 0.0
        return time.monotonic() - self.vllm_last_ok

    async def _watch_manifest(self) -> None:
        """Poll the mounted file; kubelet swaps ConfigMap files by symlink, so compare bytes."""
        while True:
            await asyncio.sleep(self.settings.manifest_interval)
            try:
                raw = await asyncio.to_thread(self.settings.manifest.read_bytes)
            except OSError as exc:
                log.error("mounted manifest unreadable, keeping the current one: %s", exc)
                continue
            digest = _digest(raw)
            if digest == self._manifest_digest:
                continue
            if self._held_already(raw):
                # The push brought this generation first (the usual order): joining and
                # validating 10,000 adapters again would hold the loop for nothing.
                self._manifest_digest = digest
                continue
            try:
                _, manifest = await asyncio.to_thread(self.read_manifest)
            except manifest_shards.TornManifest as exc:
                # Some shards are not refreshed yet: keep serving, look again next poll.
                log.debug("mounted manifest not consistent yet: %s", exc)
                continue
            except (OSError, ValueError, ValidationError) as exc:
                self._manifest_digest = digest  # report a bad file once, not every poll
                log.error("mounted manifest is invalid, keeping the current one: %s", exc)
                continue
            self._manifest_digest = digest
            if await self.registry.apply(manifest):
                log.info("manifest generation %d applied from file", manifest.generation)

    def _held_already(self, raw: bytes) -> bool:
        """Whether `raw` is an index of a generation no newer than the one served (a plain
        manifest is read in full below)."""
        generation = manifest_shards.index_generation(raw)
        return generation is not None and generation <= self.registry.manifest.generation

    async def cleanup_ctx(self, app: web.Application) -> Any:
        """aiohttp cleanup context: start with the public app, stop with it."""
        await self.start()
        yield
        with contextlib.suppress(Exception):
            await self.stop()


def _digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


SERVER = web.AppKey("server", Server)
