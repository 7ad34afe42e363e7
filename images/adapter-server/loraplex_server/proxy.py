"""The public front door: every /v1/* request streamed to vLLM, adapters loaded on demand.

The body goes through byte for byte unless a `lora_name` field picks the adapter, in which case
`model` is set to it and `lora_name` dropped (vLLM does not know that field). Adapters are
registered in vLLM under their servedName, so responses and `/v1/models` show the names
clients use. Responses are relayed chunk by chunk, so SSE streams arrive as vLLM sends them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from loraplex_server import errors
from loraplex_server.metrics import Metrics
from loraplex_server.registry import Entry, Registry

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
RETRY_AFTER_SECONDS = "5"
_USAGE_PARSE_LIMIT = 1 << 20


class UsageScanner:
    """Picks `usage` out of a JSON body or out of the SSE events, without holding the stream."""

    def __init__(self, sse: bool) -> None:
        self.sse = sse
        self.buf = b""
        self.prompt = 0
        self.completion = 0

    def feed(self, chunk: bytes) -> None:
        if not self.sse:
            if len(self.buf) < _USAGE_PARSE_LIMIT:
                self.buf += chunk
            return
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            if line.startswith(b"data:") and b'"usage"' in line:
                self._take(line[5:])

    def finish(self) -> None:
        if not self.sse and len(self.buf) < _USAGE_PARSE_LIMIT:
            self._take(self.buf)

    def _take(self, raw: bytes) -> None:
        try:
            usage = json.loads(raw).get("usage")
        except (ValueError, AttributeError):
            return
        if isinstance(usage, dict):
            self.prompt = int(usage.get("prompt_tokens") or 0)
            self.completion = int(usage.get("completion_tokens") or 0)


def not_found(name: str, served: list[str]) -> web.Response:
    return errors.json_error(
        404,
        f"The model `{name}` does not exist. Served models: {', '.join(served)}",
        err_type="NotFoundError",
        code="model_not_found",
        param="model",
    )


class Proxy:
    def __init__(
        self,
        registry: Registry,
        metrics: Metrics,
        session: aiohttp.ClientSession,
        vllm_url: str,
        load_timeout: float,
        max_body: int,
    ) -> None:
        self.max_body = max_body
        self.registry = registry
        self.metrics = metrics
        self.session = session
        self.vllm_url = vllm_url
        self.load_timeout = load_timeout

    async def models(self, request: web.Request) -> web.StreamResponse:
        """vLLM's base card plus every declared adapter: they load on first use."""
        try:
            async with self.session.get(
                f"{self.vllm_url}/v1/models", timeout=aiohttp.ClientTimeout(total=10)
            ) as resp:
                body = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return errors.json_error(
                503,
                "vLLM is not available",
                err_type="ServiceUnavailable",
                code="vllm_unavailable",
                headers={"Retry-After": "5"},
            )
        base = self.registry.manifest.base_served_name
        cards = [c for c in body.get("data", []) if c.get("id") == base]
        template = cards[0] if cards else {"object": "model", "owned_by": "vllm"}
        for name in self.registry.served_names()[1:]:
            cards.append(
                {
                    **{
                        k: template[k]
                        for k in ("object", "created", "owned_by", "max_model_len")
                        if k in template
                    },
                    "id": name,
                    "root": name,
                    "parent": base,
                    "permission": [],
                }
            )
        return web.json_response({"object": "list", "data": cards})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        t0 = time.monotonic()
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return errors.json_error(
                413, f"request body is larger than {self.max_body} bytes", code="body_too_large"
            )
        body: Any = None
        is_json = request.content_type == "application/json"
        if raw and (is_json or raw.lstrip()[:1] == b"{"):
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                if is_json:
                    return errors.json_error(
                        400, f"request body is not valid JSON: {exc}", code="invalid_json"
                    )
        entry: Entry | None = None
        label = "none"
        if isinstance(body, dict) and ("model" in body or "lora_name" in body):
            name = body.get("lora_name") or body.get("model")
            if not isinstance(name, str):
                return errors.json_error(400, "`model` must be a string", param="model")
            base = self.registry.manifest.base_served_name
            if name != base:
                entry = self.registry.by_served_name(name)
                if entry is None:
                    self.metrics.requests.labels("unknown", "404").inc()
                    return not_found(name, self.registry.served_names())
            label = name
            if "lora_name" in body:
                body = {**body, "model": name}
                del body["lora_name"]
                raw = json.dumps(body).encode()
        if entry is None:
            return await self._forward(request, raw, label, t0)
        async with self.registry.use(entry) as release:
            refused = await self._load(entry)
            if refused is not None:
                self.metrics.requests.labels(label, str(refused.status)).inc()
                self.metrics.request_errors.labels(label).inc()
                return refused
            return await self._forward(request, raw, label, t0, release)

    async def _load(self, entry: Entry) -> web.Response | None:
        try:
            await self.registry.ensure_loaded(entry, self.load_timeout)
        except TimeoutError:
            return errors.json_error(
                503,
                f"adapter `{entry.spec.served_name}` is still loading ({entry.state}); "
                "retry shortly",
                err_type="ServiceUnavailable",
                code="adapter_loading",
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        except errors.AdapterError as exc:
            return errors.json_error(
                503,
                f"adapter `{entry.spec.served_name}` failed: {exc.reason}: {exc.message}",
                err_type="ServiceUnavailable",
                code="adapter_failed",
            )
        except errors.VLLMUnavailable:
            return errors.json_error(
                503,
                "vLLM is not available",
                err_type="ServiceUnavailable",
                code="vllm_unavailable",
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        return None

    async def _forward(
        self,
        request: web.Request,
        raw: bytes,
        label: str,
        t0: float,
        accepted: Callable[[], None] | None = None,
    ) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        url = f"{self.vllm_url}{request.rel_url}"
        code = "502"
        prepared = False
        try:
            async with self.session.request(
                request.method,
                url,
                data=raw or None,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            ) as upstream:
                code = str(upstream.status)
                if accepted is not None:
                    accepted()  # vLLM holds the request now; its adapter may be evicted
                out = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for k, v in upstream.headers.items():
                    if k.lower() not in HOP_BY_HOP:
                        out.headers[k] = v
                sse = upstream.content_type == "text/event-stream"
                scan = UsageScanner(sse)
                first = True
                await out.prepare(request)
                prepared = True
                try:
                    async for chunk in upstream.content.iter_any():
                        if first:
                            self.metrics.ttfb.labels(label).observe(time.monotonic() - t0)
                            first = False
                        scan.feed(chunk)
                        try:
                            await out.write(chunk)
                        except ConnectionError:
                            code = "client_gone"  # the client left; stop reading vLLM too
                            return out
                except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
                    code = "broken"
                    log.warning("vLLM broke off a response: %s", exc)
                    if sse:
                        err = errors.error_body(
                            "vLLM stopped mid-stream", "ServiceUnavailable", "vllm_unavailable"
                        )
                        with contextlib.suppress(ConnectionError):
                            await out.write(b"data: " + json.dumps(err).encode() + b"\n\n")
                    # Closing the connection is the honest signal once headers are out; for SSE
                    # it also tells clients that ignore error events that the stream is cut.
                    if request.transport is not None:
                        request.transport.close()
                    return out
                scan.finish()
                if scan.prompt or scan.completion:
                    self.metrics.prompt_tokens.labels(label).inc(scan.prompt)
                    self.metrics.completion_tokens.labels(label).inc(scan.completion)
                await out.write_eof()
                return out
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            if prepared:
                raise
            log.warning("vLLM did not answer %s: %s", request.rel_url.path, exc)
            return errors.json_error(
                502,
                "vLLM is not available",
                err_type="ServiceUnavailable",
                code="vllm_unavailable",
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        finally:
            self.metrics.requests.labels(label, code).inc()
            if not code.isdigit() or code.startswith(("4", "5")):
                self.metrics.request_errors.labels(label).inc()
            self.metrics.duration.labels(label).observe(time.monotonic() - t0)
