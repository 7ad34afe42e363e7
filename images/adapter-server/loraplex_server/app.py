"""Builds the two aiohttp applications: public (:8000) and admin (:8090).

They share one `Server`; the public app's cleanup context starts and stops it, so start the
public app first. Routes stay thin: each reads the request, asks the registry or the proxy,
and writes JSON.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiohttp import web

from loraplex_server import admin, epp_metrics, errors, pages
from loraplex_server.proxy import Proxy
from loraplex_server.server import SERVER, Server
from loraplex_server.settings import Settings


@dataclass
class Apps:
    public: web.Application
    admin: web.Application
    server: Server


@web.middleware
async def json_errors(request: web.Request, handler: admin.Handler) -> web.StreamResponse:
    """Unknown routes and wrong methods answer in the same JSON shape as everything else."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return errors.json_error(413, "request body is too large", code="body_too_large")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return errors.json_error(exc.status, exc.reason, code=exc.reason.lower().replace(" ", "_"))


def _server(request: web.Request) -> Server:
    return request.app[SERVER]


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    reg = _server(request).registry
    ready = reg.ready()
    pinned = {e.spec.name: e.state.value for e in reg.entries.values() if e.spec.pinned}
    return web.json_response(
        {"ready": ready, "vllmHealthy": reg.vllm_healthy, "pinned": pinned},
        status=200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.StreamResponse:
    """loraplex's families, then vLLM's as the endpoint picker reads them (epp_metrics)."""
    server = _server(request)
    vllm_text = await server.vllm_metrics.get()
    epp = epp_metrics.merge(vllm_text, epp_metrics.lora_state(server.registry), time.time())
    return web.Response(
        body=server.metrics.render() + epp.encode(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


async def adapters(request: web.Request) -> web.StreamResponse:
    try:
        limit, after = pages.page_args(request.query)
    except pages.BadPage as exc:
        return errors.json_error(400, str(exc), param=exc.param, code="invalid_page")
    report = pages.adapters_page(_server(request).registry, limit, after)
    return web.json_response(report.model_dump(mode="json", by_alias=True))


async def models(request: web.Request) -> web.StreamResponse:
    return await _proxy(request).models(request)


async def forward(request: web.Request) -> web.StreamResponse:
    return await _proxy(request).handle(request)


def _proxy(request: web.Request) -> Proxy:
    return _server(request).proxy


def create_app(settings: Settings) -> Apps:
    server = Server(settings)
    public = web.Application(client_max_size=settings.max_body_bytes, middlewares=[json_errors])
    public[SERVER] = server
    public.cleanup_ctx.append(server.cleanup_ctx)
    r = public.router
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    r.add_get("/v1/adapters", adapters)
    r.add_get("/v1/models", models)
    r.add_route("*", "/v1/{tail:.*}", forward)

    adm = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[json_errors, admin.auth_middleware(settings.admin_token_file)],
    )
    adm[SERVER] = server
    admin.add_routes(adm)
    return Apps(public, adm, server)
