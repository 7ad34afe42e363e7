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
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from loraplex_server import manifest_shards
from loraplex_server.epp_metrics import VLLMMetrics
from loraplex_server.fetch import Fetcher
from loraplex_server.manifest import AdapterManifest
from loraplex_server.metrics import Metrics
from loraplex_server.proxy import Proxy
from loraplex_server.registry import Registry
from loraplex_server.settings import Settings
from loraplex_server.vllm_client import VLLMClient

log = logging.getLogger(__name__)


class Server:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.fetcher = Fetcher(settings, self.metrics)
        self._session: aiohttp.ClientSession | None = None
        self._registry: Registry | None = None
        self._proxy: Proxy | None = None
        self._vllm_metrics: VLLMMetrics | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._manifest_digest = ""

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
        return manifest_shards.read_mounted(self.settings.manifest)

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
        self.fetcher.clean_temp()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
        )
        self._registry = Registry(
            manifest, self.metrics, self.fetcher, VLLMClient(self.settings.vllm_url, self._session)
        )
        self._proxy = Proxy(
            self._registry,
            self.metrics,
            self._session,
            self.settings.vllm_url,
            self.settings.load_timeout,
            self.settings.max_body_bytes,
        )
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

    async def stop(self) -> None:
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
            if ok and (first or not self.registry.vllm_healthy):
                log.info("vLLM is healthy")
                await self.registry.vllm_up()
            elif not ok and (first or self.registry.vllm_healthy):
                log.warning("vLLM is not healthy")
                await self.registry.vllm_down()
            first = False
            await asyncio.sleep(self.settings.health_interval)

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

    async def cleanup_ctx(self, app: web.Application) -> Any:
        """aiohttp cleanup context: start with the public app, stop with it."""
        await self.start()
        yield
        with contextlib.suppress(Exception):
            await self.stop()


def _digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


SERVER = web.AppKey("server", Server)
