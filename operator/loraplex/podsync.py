"""The operator's side of the adapter-server contract: push manifests, poll adapter state.

`PodSync` is the seam the reconciler calls. It reaches each ready pod on its admin port (for
`PUT /admin/manifest`) and public port (for `GET /v1/adapters`), by pod IP. Failures are
expected (a pod restarting, a network blip) and never fail a reconcile: the next poll
retries, and a pod always also reads the mounted ConfigMap.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from loraplex import naming
from loraplex.metrics import MANIFEST_PUSHES
from loraplex_server import manifest_shards
from loraplex_server.manifest import AdapterManifest, AdaptersResponse

log = logging.getLogger("loraplex.podsync")


def admin_token(key: bytes, namespace: str, name: str, uid: str) -> str:
    """The BaseModel's admin token, derived so the operator never has to read it back.

    Deriving it from the operator's key and the object's identity lets the operator push to
    pods while holding only create/patch rights on Secrets (no cluster-wide Secret reads).
    """
    msg = f"{namespace}/{name}/{uid}".encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class PodTarget:
    """A ready pod of a BaseModel and where its server listens."""

    name: str
    ip: str
    public_port: int
    admin_port: int


def _port(pod: Mapping[str, Any], port_name: str, default: int) -> int:
    for c in pod.get("spec", {}).get("containers", []):
        for p in c.get("ports", []) or []:
            if p.get("name") == port_name:
                return int(p.get("containerPort", default))
    return default


def ready_pods(pods: Sequence[Mapping[str, Any]]) -> list[PodTarget]:
    """Pods that are Running, Ready, have an IP, and are not terminating."""
    out = []
    for pod in pods:
        meta, status = pod.get("metadata", {}), pod.get("status", {}) or {}
        if meta.get("deletionTimestamp") or not status.get("podIP"):
            continue
        conds = {c.get("type"): c.get("status") for c in status.get("conditions", []) or []}
        if conds.get("Ready") != "True":
            continue
        out.append(
            PodTarget(
                name=meta.get("name", ""),
                ip=status["podIP"],
                public_port=_port(pod, "http", naming.PUBLIC_PORT),
                admin_port=_port(pod, "admin", naming.ADMIN_PORT),
            )
        )
    return sorted(out, key=lambda p: p.name)


POLL_PAGE = 1000  # adapters per GET /v1/adapters page (the server's maximum)
SEEN_PODS = 4096  # pods whose last reported generation is remembered


class PodSync:
    """Talks to adapter-servers; one aiohttp session shared by all pods."""

    def __init__(
        self, *, timeout: float = 5.0, trace_configs: Sequence[aiohttp.TraceConfig] = ()
    ) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._traces = list(trace_configs)  # aiohttp's request hooks, for tracing
        self._session: aiohttp.ClientSession | None = None
        # pod (ip, name) -> the manifest generation it last reported; the generation last
        # pushed to it (by `push_behind`, so `sync` does not push it again).
        self._seen: dict[tuple[str, str], int] = {}
        self._pushed: dict[tuple[str, str], int] = {}
        # pod (ip, name) -> (the version the pod gave its last full report, that report): the
        # next poll asks "changed since?" and an unchanged pod answers 304 with no body.
        self._reports: dict[tuple[str, str], tuple[str, AdaptersResponse]] = {}

    async def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, trace_configs=self._traces or None
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def push(self, pod: PodTarget, manifest: AdapterManifest, token: str) -> bool:
        """PUT the manifest; True when the pod holds this generation (409 = already newer)."""
        url = f"http://{pod.ip}:{pod.admin_port}/admin/manifest"
        headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Prefer": "return=minimal",  # the report is polled page by page after a push
        }
        body = manifest_shards.manifest_bytes(manifest)  # serialised once for every pod
        try:
            sess = await self._sess()
            async with sess.put(url, data=body, headers=headers) as resp:
                if resp.status in (200, 202, 204, 409):
                    MANIFEST_PUSHES.labels("ok").inc()
                    return True
                log.warning("push to pod %s failed: HTTP %s", pod.name, resp.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("push to pod %s failed: %s", pod.name, type(exc).__name__)
        MANIFEST_PUSHES.labels("failed").inc()
        return False

    async def poll(self, pod: PodTarget) -> AdaptersResponse | None:
        """GET /v1/adapters from one pod, page by page; None when it cannot be read whole.

        Pages bound each response (10,000 adapters are ~3 MB in one); a generation that moves
        between pages makes the result None, and the next pass polls again. A server without
        paging ignores `limit` and answers in one page.

        The first page carries the version of the report we hold (If-None-Match): a pod with
        nothing changed answers 304 and the same report object comes back, which also lets
        the reconciler see every adapter's inputs as unchanged without comparing them."""
        key = (pod.ip, pod.name)
        url = f"http://{pod.ip}:{pod.public_port}/v1/adapters"
        params = {"limit": str(POLL_PAGE)}
        held = self._reports.pop(key, None)
        headers = {"If-None-Match": f'"{held[0]}"'} if held is not None else {}
        whole: AdaptersResponse | None = None
        version = ""
        try:
            sess = await self._sess()
            while True:
                async with sess.get(url, params=params, headers=headers) as resp:
                    if resp.status == 304 and held is not None:
                        self._hold(key, held)
                        return held[1]
                    if resp.status != 200:
                        return None
                    if whole is None:  # the version of the report as it was at page one
                        version = resp.headers.get("ETag", "").strip('"')
                    page = AdaptersResponse.model_validate(await resp.json())
                headers = {}
                if whole is None:
                    whole = page
                elif page.generation != whole.generation:
                    return None
                else:
                    whole = whole.model_copy(update={"adapters": whole.adapters + page.adapters})
                if not page.continue_:
                    whole = whole.model_copy(update={"continue_": None})
                    if version:
                        self._hold(key, (version, whole))
                    return whole
                params = {"limit": str(POLL_PAGE), "continue": page.continue_}
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.info("poll of pod %s failed: %s", pod.name, type(exc).__name__)
            return None

    def _hold(self, key: tuple[str, str], report: tuple[str, AdaptersResponse]) -> None:
        if len(self._reports) >= SEEN_PODS:  # pods come and go: forgetting costs one full poll
            self._reports.clear()
        self._reports[key] = report

    async def push_behind(
        self, pods: Sequence[PodTarget], manifest: AdapterManifest, token: str
    ) -> None:
        """Push `manifest` to the pods known to be behind it (the manifest changed since their
        last report: a hot add), before any poll. A pass calls this while it still holds its
        BaseModel and `sync` after letting go, so a new adapter waits neither for this pass's
        polls (ten pages per pod at 10,000 adapters) nor for another pass's."""

        async def one(pod: PodTarget) -> None:
            key = (pod.ip, pod.name)
            if await self.push(pod, manifest, token):
                self._pushed[key] = manifest.generation

        await asyncio.gather(*(one(p) for p in pods if self._behind((p.ip, p.name), manifest)))

    def _behind(self, key: tuple[str, str], manifest: AdapterManifest) -> bool:
        """Known to hold an older generation, and not yet pushed this one."""
        known = self._seen.get(key)
        return (
            known is not None
            and known < manifest.generation
            and self._pushed.get(key) != manifest.generation
        )

    async def sync(
        self, pods: Sequence[PodTarget], manifest: AdapterManifest, token: str
    ) -> dict[str, AdaptersResponse | None]:
        """Poll every pod; push the manifest to those behind it, then poll them again.

        A pod known to be behind (the manifest changed since its last report: a hot add) is
        pushed to first, without the poll before: at 10,000 adapters that poll is ten pages,
        and the new adapter would wait for them. One `push_behind` already pushed to is only
        polled."""

        async def one(pod: PodTarget) -> AdaptersResponse | None:
            key = (pod.ip, pod.name)
            pushed = self._pushed.get(key) == manifest.generation  # by this pass's push_behind
            report = None
            if not self._behind(key, manifest):
                report = await self.poll(pod)
            behind = report is None or report.generation < manifest.generation
            if behind and not pushed and await self.push(pod, manifest, token):
                report = await self.poll(pod)
            # Forgotten now: a pod that restarted behind is pushed to again by the next pass.
            self._pushed.pop(key, None)
            if report is not None:
                if len(self._seen) >= SEEN_PODS:  # pods come and go: forgetting costs one poll
                    self._seen.clear()
                    self._pushed.clear()
                self._seen[key] = report.generation
            return report

        results = await asyncio.gather(*(one(p) for p in pods))
        return {p.name: r for p, r in zip(pods, results, strict=True)}
