"""The public front door: a fixed list of inference routes relayed to vLLM, adapters on demand.

Only the routes in `PUBLIC_ROUTES` exist on the public port, matched on the raw request target
(see `app.path_gate`); the upstream URL is the matched constant, so no spelling of a path can
reach vLLM's admin routes (`/v1/load_lora_adapter`, `/adapters`, `/sleep`, ...).

The body goes through byte for byte unless a `lora_name` field picks the adapter, in which case
`model` is set to it and `lora_name` dropped (vLLM does not know that field). Adapters are
registered in vLLM under their servedName, so responses and `/v1/models` show the names clients
use. This module decides (route, body, adapter, waiting bounds); `relay` then carries the
answer from vLLM's socket to the client's in a protocol callback, without looking inside it:
usage is read once, from the tail of the answer, so the cost per streamed token is one `recv`
and one `send`.

Every failure on this path is an `errors.Problem`, turned into a response by `app.problems`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from yarl import URL

from loraplex_server import errors, relay
from loraplex_server.metrics import Metrics
from loraplex_server.settings import Settings
from loraplex_server.workers import Gate

log = logging.getLogger(__name__)

# The inference routes relayed to vLLM: the three OpenAI calls that take a `model` (so adapters
# apply) and that vLLM serves for generative and embedding models. Deliberately left out:
# /v1/responses (stores responses retrievable by id across tenants), /v1/audio/*, /v1/score,
# /v1/rerank (other model kinds), and every root-level route (/tokenize, /pooling, /sleep,
# /adapters, /invocations, ...), which are either admin routes or not part of the OpenAI API.
INFERENCE_ROUTES: tuple[str, ...] = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")

# Everything the public port answers: path -> allowed method. /v1/models and /v1/adapters are
# ours (built from the registry), the rest are health and metrics.
PUBLIC_ROUTES: dict[str, str] = {
    "/healthz": "GET",
    "/readyz": "GET",
    "/metrics": "GET",
    "/v1/models": "GET",
    "/v1/adapters": "GET",
    **dict.fromkeys(INFERENCE_ROUTES, "POST"),
}

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
_HOP_BY_HOP_RAW = frozenset(h.encode() for h in HOP_BY_HOP | {"expect"})
_USAGE_PARSE_LIMIT = relay.USAGE_LIMIT
_FRAMING_BYTES = b"\r\n0123456789abcdefABCDEF"
# A chunk-size line between relayed pieces (SSE payloads never hold a raw CR LF).
_CHUNK_FRAMING = re.compile(rb"(?:\A|\r\n)[0-9A-Fa-f]+(?:;[^\r\n]*)?\r\n")


def upstream_url(base: str, path: str) -> URL:
    """vLLM's URL for one route constant, built without any normalization of a client path."""
    b = URL(base)
    assert b.host is not None, f"vLLM URL without a host: {base}"
    return URL.build(scheme=b.scheme, host=b.host, port=b.port, path=path, encoded=True)


def usage_event(tail: bytes) -> tuple[bytes, bytes] | None:
    """The JSON of the last SSE data event that mentions `usage` in `tail`, and what follows
    it; None if there is none."""
    at = tail.rfind(b'"usage"')
    if at < 0:
        return None
    start = tail.rfind(b"data:", 0, at)
    if start < 0:
        return None
    end = tail.find(b"\n", at)
    if end < 0:
        return tail[start + 5 :], b""
    return tail[start + 5 : end], tail[end:]


def usage_of(tail: bytes, sse: bool) -> tuple[int, int]:
    """(prompt, completion) tokens from the last `usage` vLLM reported, or (0, 0).

    For SSE only the final events are scanned: vLLM sends the totals in the last data event
    before `[DONE]` (with `stream_options.include_usage`), so no per-event work is needed.
    """
    if sse:
        found = usage_event(tail)
        if found is None:
            return 0, 0
        tail = found[0]
    try:
        usage = json.loads(tail).get("usage")
    except (ValueError, AttributeError, RecursionError):
        return 0, 0
    if not isinstance(usage, dict):
        return 0, 0
    try:
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    except (TypeError, ValueError):
        return 0, 0


def _whole_and_last(event: bytes, rest: bytes) -> bool:
    """`event` is the usage event the framed tail would give with its framing stripped: it
    holds no chunk framing (framing always has a CR, an SSE line never does), and nothing
    after it but framing, blank lines and `[DONE]` (no later event split by framing)."""
    if b"\r" in event:
        return False
    return not rest.replace(b"data: [DONE]", b"").translate(None, _FRAMING_BYTES)


def pick_model(raw: bytes, content_type: str) -> tuple[str | None, bytes]:
    """The model a body asks for, and the body to send (rewritten only for `lora_name`).

    The parsed document is dropped before returning, so a request that then waits for its
    adapter holds only its bytes.
    """
    is_json = content_type == "application/json"
    if not raw or not (is_json or raw.lstrip()[:1] == b"{"):
        return None, raw
    try:
        body = json.loads(raw)
    except RecursionError:
        raise errors.Problem("request body is nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        if is_json:
            raise errors.Problem(
                f"request body is not valid JSON: {str(exc)[:200]}", code="invalid_json"
            ) from None
        return None, raw
    if not isinstance(body, dict) or not ("model" in body or "lora_name" in body):
        return None, raw
    name = body.get("lora_name") or body.get("model")
    if not isinstance(name, str):
        raise errors.Problem("`model` must be a string", param="model")
    if "lora_name" in body:
        del body["lora_name"]
        body["model"] = name
        raw = json.dumps(body).encode()
    return name, raw


class Proxy:
    def __init__(
        self,
        gate: Gate,
        metrics: Metrics,
        session: aiohttp.ClientSession,
        settings: Settings,
    ) -> None:
        self.gate = gate
        self.metrics = metrics
        self.session = session
        self.settings = settings
        self.urls = {
            p: upstream_url(settings.vllm_url, p) for p in ("/v1/models", *INFERENCE_ROUTES)
        }
        self.upstream = relay.UpstreamPool(settings.vllm_url)
        self.inflight = 0
        self.idle = asyncio.Event()  # set while no inference request is in flight (drain)
        self.idle.set()

    async def models(self, request: web.Request) -> web.StreamResponse:
        """vLLM's base card plus every declared adapter: they load on first use."""
        try:
            async with self.session.get(
                self.urls["/v1/models"], timeout=aiohttp.ClientTimeout(total=10)
            ) as resp:
                body = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            raise errors.Unavailable() from None
        base = self.gate.base()
        cards = [c for c in body.get("data", []) if c.get("id") == base]
        template = cards[0] if cards else {"object": "model", "owned_by": "vllm"}
        keep = ("object", "created", "owned_by", "max_model_len")
        for name in self.gate.served_names()[1:]:
            cards.append(
                {
                    **{k: template[k] for k in keep if k in template},
                    "id": name,
                    "root": name,
                    "parent": base,
                    "permission": [],
                }
            )
        return web.json_response({"object": "list", "data": cards})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """One inference request that came through aiohttp (`front` hands over what it does
        not serve itself: HTTP/1.0, chunked or `Expect` bodies, query strings, draining)."""
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise errors.Problem(
                f"request body is larger than {self.settings.max_body_bytes} bytes "
                "(--max-body-bytes)",
                status=413,
                code="body_too_large",
            ) from None
        client = _AiohttpClient(request)
        path = self.urls[request.path].raw_path  # app.path_gate let only INFERENCE_ROUTES in
        await self.serve(client, path, raw, request.content_type)
        return client.out

    async def serve(self, client: Client, path: str, raw: bytes, content_type: str) -> None:
        """One inference request: pick the adapter, wait for it if needed, relay the answer.

        Failures before an answer started raise `errors.Problem`; the caller writes it.
        """
        t0 = time.monotonic()
        self.inflight += 1
        self.idle.clear()
        label = "none"
        try:
            name, raw = pick_model(raw, content_type)
            if name is None or name == self.gate.base():
                label = "none" if name is None else name
                await self._forward(client, path, raw, label, t0)
                return
            if not self.gate.declared(name):
                raise errors.model_not_found(name, self.gate.served_names())
            label = name
            async with self.gate.hold(name, len(raw)) as release:
                await self._forward(client, path, raw, label, t0, release)
        except errors.Problem as exc:
            if isinstance(exc, errors.ModelNotFound):
                label = "unknown"  # one label for every undeclared name: bounded series
            if label != "none":  # an adapter was chosen (or "unknown"): count its refusal
                self.metrics.requests.labels(label, str(exc.status)).inc()
                if label != "unknown":
                    self.metrics.request_errors.labels(label).inc()
            raise
        finally:
            self.inflight -= 1
            if not self.inflight:
                self.idle.set()

    async def _forward(
        self,
        client: Client,
        path: str,
        raw: bytes,
        label: str,
        t0: float,
        accepted: Callable[[], None] | None = None,
    ) -> None:
        """Send the request to vLLM and relay its answer (`relay`: bytes socket to socket)."""
        http10 = client.http10
        headers = [(k, v) for k, v in client.raw_headers if k.lower() not in _HOP_BY_HOP_RAW]
        head = self.upstream.request_head(path, headers, len(raw), http10)
        code = "502"
        ex: relay.Exchange | None = None
        try:
            try:
                ex, answer = await self.upstream.exchange(head, raw, client.transport, http10)
            except relay.UpstreamError as exc:
                log.warning("vLLM did not answer %s: %s", path, exc)
                raise errors.Unavailable(status=502) from None
            except ConnectionResetError:
                code = "client_gone"  # hung up while vLLM had not answered yet
                client.gone()
                return
            code = str(answer.status)
            if accepted is not None:
                accepted()  # vLLM holds the request now; its adapter may be evicted
            if not answer.chunked and answer.length is None and not http10:
                # close-delimited: cannot be relayed as is inside a chunked response
                log.warning("vLLM answered %s without length or chunked framing", path)
                code = "502"
                raise errors.Unavailable(status=502)
            if answer.chunked and http10:
                log.warning("vLLM answered an HTTP/1.0 request %s with chunks", path)
                code = "502"
                raise errors.Unavailable(status=502)
            prefix = await client.start(answer)
            transport = client.transport
            if prefix is None or transport is None or transport.is_closing():
                code = "client_gone"
                return
            ex.attach(transport, prefix, client.writes_last_chunk)
            outcome = await ex.wait(client.drain)
            if ex.first_body_at is not None:
                self.metrics.ttfb.labels(label).observe(ex.first_body_at - t0)
            if outcome is relay.Outcome.CLIENT_GONE:
                code = "client_gone"  # leaving closes vLLM's connection: it aborts the request
                return
            if outcome is relay.Outcome.BROKEN:
                code = "broken"
                self._cut(transport, ex, answer)
                return
            self._count_usage(ex, answer, label)
            self.upstream.release(ex)
            ex = None
            await client.end()
        except ConnectionError:
            code = "client_gone"
            raise
        finally:
            if ex is not None:
                self.upstream.release(ex)  # not complete: aborts vLLM's request
            self.metrics.requests.labels(label, code).inc()
            if not code.isdigit() or code.startswith(("4", "5")):
                self.metrics.request_errors.labels(label).inc()
            self.metrics.duration.labels(label).observe(time.monotonic() - t0)

    def _count_usage(self, ex: relay.Exchange, answer: relay.Head, label: str) -> None:
        """Usage from the last pieces relayed: parsed once, after the answer is complete."""
        tail = ex.usage_bytes()
        sse = answer.content_type == "text/event-stream"
        if answer.chunked:
            found = usage_event(tail) if sse else None
            if found is not None and _whole_and_last(*found):
                tail, sse = found[0], False  # no need to strip the framing from all the tail
            else:
                tail = _CHUNK_FRAMING.sub(b"", tail)
        elif not sse and ex.kept >= _USAGE_PARSE_LIMIT:
            return
        prompt, completion = usage_of(tail, sse)
        if prompt or completion:
            self.metrics.prompt_tokens.labels(label).inc(prompt)
            self.metrics.completion_tokens.labels(label).inc(completion)

    @staticmethod
    def _cut(client: asyncio.Transport, ex: relay.Exchange, answer: relay.Head) -> None:
        """vLLM broke off mid-answer: say so in the stream if the framing allows, then close.

        Closing is the honest signal once headers are out; for SSE it also tells clients that
        ignore error events that the stream is cut.
        """
        log.warning("vLLM broke off a response")
        if answer.content_type == "text/event-stream" and answer.chunked and ex.at_boundary:
            err = errors.error_body(
                "vLLM stopped mid-stream", "ServiceUnavailable", "vllm_unavailable"
            )
            event = b"data: " + json.dumps(err).encode() + b"\n\n"
            with contextlib.suppress(ConnectionError, RuntimeError):
                client.write(b"%x\r\n%s\r\n" % (len(event), event))
        client.close()

    def close(self) -> None:
        """Drop the pooled connections to vLLM (at shutdown)."""
        self.upstream.close()


class Client(Protocol):
    """The client side of one relayed request: aiohttp's (`_AiohttpClient`) or `front`'s."""

    http10: bool
    writes_last_chunk: bool  # the relay passes vLLM's last chunk on (else `end` writes one)

    @property
    def transport(self) -> asyncio.Transport | None: ...

    @property
    def raw_headers(self) -> Iterable[tuple[bytes, bytes]]: ...

    async def start(self, answer: relay.Head) -> bytes | None:
        """Get ready to relay `answer`: the bytes to send before its body, None if gone."""

    async def drain(self) -> None: ...

    async def end(self) -> None: ...

    def gone(self) -> None:
        """The client hung up before vLLM answered."""


class _AiohttpClient:
    """A request aiohttp parsed: its response writer sends the head and the last chunk."""

    writes_last_chunk = False

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.http10 = request.version < aiohttp.HttpVersion11
        self.out = web.StreamResponse()
        self._writer: AbstractStreamWriter | None = None

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.request.transport

    @property
    def raw_headers(self) -> Iterable[tuple[bytes, bytes]]:
        return self.request.raw_headers

    async def start(self, answer: relay.Head) -> bytes | None:
        out = self.out = web.StreamResponse(status=answer.status, reason=answer.reason)
        for k, v in answer.headers:
            if k.lower() not in HOP_BY_HOP:
                out.headers.add(k, v)
        if answer.length is not None:
            out.content_length = answer.length
        writer = await out.prepare(self.request)
        transport = self.request.transport
        if writer is None or transport is None or transport.is_closing():
            return None
        writer.send_headers()  # the body bypasses the writer: its head goes first
        self._writer = writer
        return b""

    async def drain(self) -> None:
        assert self._writer is not None
        await self._writer.drain()

    async def end(self) -> None:
        await self.out.write_eof()

    def gone(self) -> None:
        self.out = web.Response(status=499)
