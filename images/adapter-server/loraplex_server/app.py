"""Builds the two aiohttp applications: public (:8000) and admin (:8090).

They share one `Server`; the public app's cleanup context starts and stops it, so start the
public app first. Routes stay thin: each reads the request, asks the registry or the proxy,
and writes JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from loraplex_server import admin, epp_metrics, errors, pages
from loraplex_server.metrics import Metrics
from loraplex_server.proxy import INFERENCE_ROUTES, PUBLIC_ROUTES, Proxy
from loraplex_server.server import SERVER, Server
from loraplex_server.settings import Settings
from loraplex_server.workers import Status

log = logging.getLogger(__name__)

# A request target the public port considers at all: one or more plain segments, nothing else.
# No dot segments, no percent-encoding, no backslashes, no empty segments, no absolute-form.
_PLAIN_PATH = re.compile(r"(?:/[A-Za-z0-9_-]+)+")


@dataclass
class Apps:
    public: web.Application
    admin: web.Application
    server: Server


@web.middleware
async def problems(request: web.Request, handler: admin.Handler) -> web.StreamResponse:
    """The one place request failures become responses, all in the OpenAI error shape."""
    try:
        return await handler(request)
    except errors.Problem as exc:
        return exc.response()
    except web.HTTPRequestEntityTooLarge:
        return errors.json_error(413, "request body is too large", code="body_too_large")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return errors.json_error(exc.status, exc.reason, code=exc.reason.lower().replace(" ", "_"))


@web.middleware
async def path_gate(request: web.Request, handler: admin.Handler) -> web.StreamResponse:
    """Let through only the exact spellings of `PUBLIC_ROUTES`, checked on the raw target.

    Checking the raw bytes (not aiohttp's decoded, possibly normalized path) means that no
    encoding or dot segment can make two spellings mean one route here and another in vLLM.
    """
    path, _, _ = request.raw_path.partition("?")
    if not _PLAIN_PATH.fullmatch(path):
        raise errors.Problem(
            "the request path must be a plain route such as /v1/completions: no dot segments, "
            "percent-encoding, backslashes or empty segments",
            code="invalid_path",
        )
    method = PUBLIC_ROUTES.get(path)
    if method is None:
        raise errors.Problem(
            f"no route {path[:100]}; the public port serves {', '.join(PUBLIC_ROUTES)}",
            status=404,
            err_type="NotFoundError",
            code="not_found",
        )
    if request.method != method:
        raise errors.Problem(f"{path} takes {method}", status=405, code="method_not_allowed")
    if _server(request).draining and path in INFERENCE_ROUTES:
        raise errors.Unavailable(
            "this server is shutting down; retry on another replica",
            code="shutting_down",
            retry_after=1,
        )
    return await handler(request)


class Backend(Protocol):
    """What the public routes need: the owner `Server`, or a `workers.Follower`."""

    settings: Settings
    metrics: Metrics
    draining: bool

    @property
    def proxy(self) -> Proxy: ...

    def status(self) -> Status: ...

    def vllm_dead_for(self) -> float: ...

    @property
    def vllm_metrics(self) -> epp_metrics.VLLMMetrics: ...

    def lora_state(self) -> epp_metrics.LoraState: ...

    async def current_lora_state(self) -> epp_metrics.LoraState: ...

    async def current_status(self) -> Status: ...

    async def adapters_page(
        self, limit: int | None, after: str | None, unless: Collection[str] = ()
    ) -> tuple[str, dict[str, Any] | None]:
        """The report's version and the page, or None for the page when the version is one
        of `unless` (the caller's If-None-Match)."""
        ...

    def cleanup_ctx(self, app: web.Application) -> AsyncIterator[None]: ...


BACKEND = web.AppKey("backend", Backend)


def _server(request: web.Request) -> Backend:
    return request.app[BACKEND]


async def healthz(request: web.Request) -> web.StreamResponse:
    """Liveness: fails once vLLM, having answered before, has been silent past the bound, so
    the kubelet restarts the pod's containers instead of leaving a hung vLLM in place."""
    srv = _server(request)
    dead = srv.vllm_dead_for()
    if dead > srv.settings.vllm_dead_after:
        return web.json_response(
            {
                "status": "vllm_unresponsive",
                "vllmSilentSeconds": round(dead, 1),
                "limit": srv.settings.vllm_dead_after,
            },
            status=503,
        )
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    srv = _server(request)
    st = srv.status()
    ready = st.ready and not srv.draining
    return web.json_response(
        {
            "ready": ready,
            "vllmHealthy": st.vllm_healthy,
            "draining": srv.draining,
            "pinned": st.pinned,
        },
        status=200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.StreamResponse:
    """loraplex's families, then vLLM's as the endpoint picker reads them (epp_metrics)."""
    server = _server(request)
    vllm_text = await server.vllm_metrics.get()
    epp = epp_metrics.merge(vllm_text, await server.current_lora_state(), time.time())
    return web.Response(
        body=server.metrics.render() + epp.encode(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


async def adapters(request: web.Request) -> web.StreamResponse:
    """One page (`?limit=&continue=`) or, without `limit`, every adapter: built by the owner
    from its registry whichever process answers, so pages are the same on every worker."""
    return await _adapters_page(_server(request), request)


async def _adapters_page(backend: Backend, request: web.Request) -> web.StreamResponse:
    try:
        limit, after = pages.page_args(request.query)
    except pages.BadPage as exc:
        return errors.json_error(400, str(exc), param=exc.param, code="invalid_page")
    unless = pages.etags(request.headers.get("If-None-Match", ""))
    version, doc = await backend.adapters_page(limit, after, unless)
    headers = {"ETag": f'"{version}"'}
    if doc is None:
        return web.Response(status=304, headers=headers)
    return web.json_response(doc, headers=headers)


async def models(request: web.Request) -> web.StreamResponse:
    return await _proxy(request).models(request)


async def forward(request: web.Request) -> web.StreamResponse:
    return await _proxy(request).handle(request)


def _proxy(request: web.Request) -> Proxy:
    return _server(request).proxy


async def take_hold(request: web.Request) -> web.StreamResponse:
    """A follower's adapter request: load it if needed and keep it until released."""
    try:
        body = await request.json()
        served, size = str(body["served"]), int(body.get("size", 0))
    except (ValueError, KeyError, TypeError):
        raise errors.Problem("expected {served, size}", code="invalid_hold") from None
    server = request.app[SERVER]
    hold = await server.holds.take(served, size)
    # Every adapter request passes here or through the owner's own proxy: the owner's
    # metric-series order is the pod's, and the follower labels this request by its answer.
    own = server.metrics.series.label(served) == served
    return web.json_response({"hold": hold, "series": own})


async def release_hold(request: web.Request) -> web.StreamResponse:
    await request.app[SERVER].holds.release(request.match_info["hold"])
    return web.json_response({})


async def internal_lora(request: web.Request) -> web.StreamResponse:
    """For follower workers' /metrics: the owner's adapters as the EPP should see them, live
    and small (the full status would cost a report of every adapter per scrape)."""
    server = request.app[SERVER]
    series = {"series": server.metrics.series.own(), "base": sorted(server.metrics.series.base)}
    return web.json_response({**server.lora_state().to_json(), **series})


async def internal_status(request: web.Request) -> web.StreamResponse:
    """For follower workers (admin port, token): the owner's view of vLLM and adapters. The
    served names (10,000 with 10,000 adapters) only when `?generation=` is not the current one."""
    have = request.query.get("generation", "")
    status = request.app[SERVER].status()
    with_names = not have.isdigit() or int(have) != status.generation
    return web.json_response(status.to_json(served=with_names))


async def internal_adapters(request: web.Request) -> web.StreamResponse:
    """A follower's `GET /v1/adapters`: the same page, from the owner's registry."""
    return await _adapters_page(request.app[SERVER], request)


async def drain(server: Backend) -> None:
    """Stop taking inference requests, fail readiness, and wait for in-flight ones to finish.

    Returns when none is left or after `--drain-timeout` seconds, whichever comes first; the
    caller then closes the listeners (cutting what is still open).
    """
    server.draining = True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.proxy.idle.wait(), server.settings.drain_timeout)
    if server.proxy.inflight:
        log.warning("drain timeout: cutting %d in-flight requests", server.proxy.inflight)


async def _close_relay(app: web.Application) -> None:
    """Close the pooled connections to vLLM (after the backend's own cleanup)."""
    with contextlib.suppress(AssertionError):  # a backend that never started has no proxy
        app[BACKEND].proxy.close()


def public_app(backend: Backend) -> web.Application:
    settings = backend.settings
    public = web.Application(
        client_max_size=settings.max_body_bytes, middlewares=[problems, path_gate]
    )
    public[BACKEND] = backend
    public.cleanup_ctx.append(backend.cleanup_ctx)
    public.on_cleanup.append(_close_relay)
    handlers = {
        "/healthz": healthz,
        "/readyz": readyz,
        "/metrics": metrics,
        "/v1/adapters": adapters,
        "/v1/models": models,
        **dict.fromkeys(INFERENCE_ROUTES, forward),
    }
    for path, method in PUBLIC_ROUTES.items():
        public.router.add_route(method, path, handlers[path])
    return public


def create_app(settings: Settings) -> Apps:
    server = Server(settings)
    public = public_app(server)

    adm = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[problems, admin.auth_middleware(settings.admin_token_file)],
    )
    adm[SERVER] = server
    admin.add_routes(adm)
    adm.router.add_get("/internal/status", internal_status)
    adm.router.add_get("/internal/lora", internal_lora)
    adm.router.add_get("/internal/adapters", internal_adapters)
    adm.router.add_post("/internal/holds", take_hold)
    adm.router.add_post("/internal/holds/{hold}/release", release_hold)
    return Apps(public, adm, server)
