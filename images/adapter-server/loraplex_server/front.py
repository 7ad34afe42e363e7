"""The public port's front end: the common inference request, parsed and answered in one protocol.

aiohttp costs about 120 us of CPU per request here (request and response objects, router,
middleware chain, a task per connection, a keep-alive timer, the response writer), which at a
GPU's pace is most of what the proxy spends per request (issue 12). This protocol takes each
connection first and serves the requests that are plainly inference calls itself:

    POST /v1/completions HTTP/1.1 (or /v1/chat/completions, /v1/embeddings), exactly that
    request target, a `Content-Length` body within --max-body-bytes, and headers that are
    well-formed tokens and values, without Transfer-Encoding, Expect or Upgrade.

Its head is checked in full before anything is decided, the body is read by that one length,
and the request goes to `Proxy.serve` like aiohttp's (same decisions, metrics and errors). The
response head is written here and goes out with the first piece of vLLM's answer, and vLLM's
last chunk with its last piece: one send each instead of three.

Everything else — any other route, another method or version, a query string, a chunked or
oversized body, an odd header, a server that is draining — is handed over: the connection
becomes aiohttp's (`set_protocol`), with the bytes of that request, and aiohttp answers it and
everything after it on that connection exactly as before (route allowlist, path gate, body
limits, error shapes). A request is handed over only before any of it was acted on, and
requests on one connection are served one at a time, so nothing is parsed twice or twice
differently: the only requests this parser accepts are ones it reads unambiguously.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from loraplex_server import errors, relay
from loraplex_server.app import BACKEND
from loraplex_server.proxy import HOP_BY_HOP, INFERENCE_ROUTES, Proxy

log = logging.getLogger(__name__)

HEAD_LIMIT = 8190  # aiohttp's own line limit: a longer head goes to aiohttp, which refuses it
KEEPALIVE = 75.0  # an idle client connection is closed after this long (aiohttp's default)
_SWEEP_EVERY = 5.0
_REQUEST_LINES = {f"POST {p} HTTP/1.1".encode(): p for p in INFERENCE_ROUTES}
# A header field: a token name; a value of visible characters, inner spaces and obs-text (anything
# else, a tab inside a value too, is left to aiohttp).
_FIELD = re.compile(
    rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*((?:[^\x00-\x1f\x7f]*[^\x00-\x20\x7f])?)[ \t]*"
)
_REFUSED = frozenset({b"transfer-encoding", b"expect", b"upgrade"})


@dataclass(slots=True)
class Request:
    """One request head this front serves; `None` from `parse` means aiohttp's."""

    path: str
    length: int
    headers: list[tuple[bytes, bytes]]
    content_type: str
    close: bool  # the client asked to close after this answer


def parse(head: bytes, max_body: int) -> Request | None:
    """The request in `head` (up to, without, its blank line) if it is one this front serves."""
    lines = head.split(b"\r\n")
    path = _REQUEST_LINES.get(lines[0])
    if path is None:
        return None
    length = -1
    ctype = "application/octet-stream"  # aiohttp's `content_type` when none is given
    close = False
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        m = _FIELD.fullmatch(line)
        if m is None:
            return None
        name, value = m.group(1, 2)
        key = name.lower()
        if key == b"content-length":
            if length >= 0 or not value.isdigit() or len(value) > 18:
                return None  # a second length, a sign, spaces: aiohttp's to judge
            length = int(value)
        elif key in _REFUSED:
            return None
        elif key == b"connection":
            tokens = {t.strip() for t in value.lower().split(b",")}
            if b"upgrade" in tokens:
                return None
            close = b"close" in tokens
        elif key == b"content-type":
            ctype = value.split(b";", 1)[0].strip().lower().decode("latin-1")
        headers.append((name, value))
    if length < 0 or length > max_body:
        return None
    return Request(path, length, headers, ctype, close)


def response_head(status: int, reason: str, headers: list[tuple[str, str]], close: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    lines += [f"{k}: {v}\r\n" for k, v in headers]
    if close:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def problem_bytes(exc: errors.Problem, close: bool) -> bytes:
    """`exc` as aiohttp's `problems` middleware would answer it (the OpenAI error shape)."""
    resp = exc.response()
    body = resp.body
    assert isinstance(body, bytes)
    headers = [(k, v) for k, v in resp.headers.items() if k.lower() != "content-length"]
    headers.append(("Content-Length", str(len(body))))
    return response_head(resp.status, resp.reason, headers, close) + body


class Front:
    """Shared by the connections of one public listener: the backend and the open connections."""

    def __init__(self, backend: Any, make_aiohttp: Callable[[], asyncio.Protocol]) -> None:
        self.backend = backend  # app.Backend (not imported: app imports this module)
        self.make_aiohttp = make_aiohttp
        self.max_body: int = backend.settings.max_body_bytes
        self.conns: set[Connection] = set()
        self.handed_over = 0  # connections given to aiohttp (tests read it)
        self._sweep: asyncio.TimerHandle | None = None

    def __call__(self) -> Connection:
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(_SWEEP_EVERY, self.sweep)
        return Connection(self)

    def sweep(self) -> None:
        """Close connections idle past KEEPALIVE: one timer for all, not one per request."""
        now = time.monotonic()
        for conn in [c for c in self.conns if c.idle_since and now - c.idle_since > KEEPALIVE]:
            conn.close()
        self._sweep = asyncio.get_running_loop().call_later(_SWEEP_EVERY, self.sweep)

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self.conns):
            conn.close()


class Connection(asyncio.Protocol):
    """One client connection, until it is closed or handed to aiohttp. Implements the
    `proxy.Client` side of the request it is serving."""

    http10 = False
    writes_last_chunk = True

    def __init__(self, front: Front) -> None:
        self.front = front
        self._transport: asyncio.Transport | None = None
        self.buf = b""
        self.busy = False  # a request is being served: later bytes wait in `buf`
        self.request: Request | None = None
        self.idle_since = time.monotonic()
        self.answer: relay.Head | None = None
        self._paused_writing = False
        self._paused_reading = False
        self._drained: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.front.conns.add(self)

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        if not self.busy:
            self.idle_since = time.monotonic()  # a slow upload is not an idle connection
            self._next()
        elif len(self.buf) > HEAD_LIMIT + self.front.max_body and self._transport is not None:
            self._transport.pause_reading()  # a pipelining client waits for its answers
            self._paused_reading = True

    def eof_received(self) -> bool | None:
        return None  # the client is done: close (an exchange in flight sees it and aborts)

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.conns.discard(self)
        self.idle_since = 0.0
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionResetError("the client hung up"))

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- proxy.Client ------------------------------------------------------------------------

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._transport

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        assert self.request is not None
        return self.request.headers

    async def start(self, answer: relay.Head) -> bytes | None:
        assert self.request is not None
        headers = [(k, v) for k, v in answer.headers if k.lower() not in HOP_BY_HOP]
        if answer.chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        elif answer.length is not None:
            headers.append(("Content-Length", str(answer.length)))
        self.answer = answer
        return response_head(answer.status, answer.reason, headers, self.request.close)

    async def drain(self) -> None:
        if self._transport is None or self._transport.is_closing():
            raise ConnectionResetError("the client hung up")
        if not self._paused_writing:
            return
        self._drained = asyncio.get_running_loop().create_future()
        try:
            await self._drained
        finally:
            self._drained = None

    async def end(self) -> None:
        return None  # the relay wrote vLLM's last chunk (or the whole Content-Length body)

    def gone(self) -> None:
        self.close()

    # -- serving -----------------------------------------------------------------------------

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def _next(self) -> None:
        """Serve the request at the head of `buf` once it is complete, or hand over."""
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > HEAD_LIMIT:
                self._hand_over()
            return
        request = parse(buf[:end], self.front.max_body)
        if request is None or self.front.backend.draining:
            self._hand_over()  # draining: aiohttp's path gate answers 503 shutting_down
            return
        total = end + 4 + request.length
        if len(buf) < total:
            return  # the rest of the body is on its way (bounded by --max-body-bytes)
        self.buf = buf[total:]
        self.busy = True
        self.idle_since = 0.0
        self.request = request
        self._task = asyncio.ensure_future(self._serve(request, buf[end + 4 : total]))

    async def _serve(self, request: Request, body: bytes) -> None:
        transport = self._transport
        assert transport is not None
        proxy: Proxy = self.front.backend.proxy
        try:
            await proxy.serve(self, request.path, body, request.content_type)
        except errors.Problem as exc:
            if self.answer is not None:
                transport.close()  # (not raised once an answer started; if it were: cut)
            elif not transport.is_closing():
                transport.write(problem_bytes(exc, request.close))
        except ConnectionError:
            pass  # the client left: the transport is closing
        except Exception:
            log.exception("request to %s failed", request.path)
            if self.answer is None and not transport.is_closing():
                transport.write(problem_bytes(errors.Problem("internal error", status=500), True))
            transport.close()
        finally:
            self.request = None
            self._task = None
        self.answer = None
        if request.close:
            transport.close()  # (an answer cut short closed it already: `Proxy._cut`, gone)
        if transport.is_closing():
            return
        self.busy = False
        self.idle_since = time.monotonic()
        if self._paused_reading:
            self._paused_reading = False
            transport.resume_reading()
        if self.buf:
            self._next()  # a pipelined request

    def _hand_over(self) -> None:
        """Make this connection aiohttp's, starting with the request at the head of `buf`."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self.front.conns.discard(self)
        self.front.handed_over += 1
        protocol = self.front.make_aiohttp()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        buf, self.buf = self.buf, b""
        self._transport = None
        if self._paused_reading:
            transport.resume_reading()
        if buf:
            protocol.data_received(buf)


class PublicSite(web.TCPSite):
    """aiohttp's TCP site with `Front` taking each connection first (the public port only)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, **kw: Any) -> None:
        kw.setdefault("backlog", 1024)  # a wave of new streams must not overflow the SYN queue
        super().__init__(runner, host, port, **kw)
        self.front: Front | None = None

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None and isinstance(self._runner, web.AppRunner)
        self.front = Front(self._runner.app[BACKEND], server)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.front,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        if self._server.sockets:
            self._bound_port = self._server.sockets[0].getsockname()[1]
        else:
            self._bound_port = self._port

    async def stop(self) -> None:
        await super().stop()
        if self.front is not None:
            self.front.close()
