"""The admin API on its own port: manifest push and per-adapter load/unload.

It is reached only by the operator, with the bearer token from the BaseModel's Secret. The token
file is read on every request so a rotated Secret takes effect without a restart; an empty or
missing file refuses everything rather than letting everyone in.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import ValidationError

from loraplex_server import errors
from loraplex_server.manifest import ADAPTER_NAME_RE, AdapterState, validate_against
from loraplex_server.registry import Entry, Registry
from loraplex_server.server import SERVER

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _token(path: Path) -> bytes:
    try:
        return path.read_bytes().strip()
    except OSError:
        return b""


def auth_middleware(token_file: Path) -> Middleware:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        expected = _token(token_file)
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        ok = (
            bool(expected)
            and scheme.lower() == "bearer"
            and hmac.compare_digest(value.strip().encode(), expected)
        )
        if not ok:
            return errors.json_error(
                401,
                "missing or wrong bearer token",
                err_type="AuthenticationError",
                code="unauthorized",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    return check


def _registry(request: web.Request) -> Registry:
    return request.app[SERVER].registry


async def put_manifest(request: web.Request) -> web.StreamResponse:
    start = time.monotonic()
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return errors.json_error(413, "manifest is too large", code="body_too_large")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return errors.json_error(400, f"manifest is not valid JSON: {exc}", code="invalid_json")
    reg = _registry(request)
    try:
        manifest = validate_against(doc, reg.manifest)
    except ValidationError as exc:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
        )
        return errors.json_error(422, f"invalid manifest: {detail}", code="invalid_manifest")
    if not await reg.apply(manifest):
        return errors.json_error(
            409,
            f"manifest generation {manifest.generation} is not newer than the one served "
            f"({reg.manifest.generation})",
            code="stale_generation",
            param="generation",
        )
    log.info(
        "manifest generation %d applied from admin API in %.3f s (%d bytes)",
        manifest.generation,
        time.monotonic() - start,
        len(raw),
    )
    if "return=minimal" in request.headers.get("Prefer", ""):
        # RFC 7240: the caller polls the paged report anyway (the operator does); building
        # 10,000 adapters' report here held the event loop while the new adapter waited.
        return web.Response(status=204, headers={"Preference-Applied": "return=minimal"})
    return web.json_response(reg.report().model_dump(mode="json", by_alias=True))


async def get_manifest(request: web.Request) -> web.StreamResponse:
    return web.json_response(_registry(request).manifest.model_dump(mode="json", by_alias=True))


def _entry(request: web.Request) -> Entry | web.Response:
    name = request.match_info["name"]
    if not ADAPTER_NAME_RE.fullmatch(name):
        return errors.json_error(
            400, "adapter name must be a DNS-1123 label", param="name", code="invalid_name"
        )
    e = _registry(request).entries.get(name)
    if e is None:
        return errors.json_error(
            404,
            f"adapter {name!r} is not declared",
            code="not_found",
            err_type="NotFoundError",
            param="name",
        )
    return e


async def load(request: web.Request) -> web.StreamResponse:
    e = _entry(request)
    if isinstance(e, web.Response):
        return e
    reg = _registry(request)
    await reg.refetch(e)
    try:
        await reg.ensure_loaded(e, request.app[SERVER].settings.load_timeout)
    except TimeoutError:
        return errors.json_error(
            503,
            "adapter is still loading",
            code="adapter_loading",
            headers={"Retry-After": "5"},
            err_type="ServiceUnavailable",
        )
    except errors.AdapterError as exc:
        return errors.json_error(409, f"{exc.reason}: {exc.message}", code="adapter_failed")
    except errors.VLLMUnavailable:
        return errors.json_error(
            503,
            "vLLM is not available",
            code="vllm_unavailable",
            headers={"Retry-After": "5"},
            err_type="ServiceUnavailable",
        )
    return web.json_response(e.report().model_dump(mode="json", by_alias=True))


async def detail(request: web.Request) -> web.StreamResponse:
    """One adapter's report plus its full error (URL, address, exception), for operators only.

    The public `GET /v1/adapters` and LoRAAdapter status carry only the sanitized message:
    the full one would tell anyone on the public port which internal hosts and ports answer.
    """
    e = _entry(request)
    if isinstance(e, web.Response):
        return e
    body = e.report().model_dump(mode="json", by_alias=True)
    body["detail"] = e.detail
    return web.json_response(body)


async def unload(request: web.Request) -> web.StreamResponse:
    e = _entry(request)
    if isinstance(e, web.Response):
        return e
    if e.spec.pinned:
        return errors.json_error(
            409, "pinned adapters stay loaded; unpin it in the manifest", code="pinned"
        )
    if e.state == AdapterState.LOADED:
        await _registry(request).unload(e)
    return web.json_response(e.report().model_dump(mode="json", by_alias=True))


def add_routes(app: web.Application) -> None:
    app.router.add_put("/admin/manifest", put_manifest)
    app.router.add_get("/admin/manifest", get_manifest)
    app.router.add_get("/admin/adapters/{name}", detail)
    app.router.add_post("/admin/adapters/{name}/load", load)
    app.router.add_post("/admin/adapters/{name}/unload", unload)
