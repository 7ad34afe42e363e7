"""The token path: vLLM's response bytes go from its socket to the client's in one callback.

At a GPU's pace every SSE event arrives alone, so what a relay costs is what it does per
wakeup. Through aiohttp's client and response writer an event took about 40 us of CPU: a
parser callback, a StreamReader future, a task step, a writer call and a drain check. Here
the proxy decides everything a request needs in its aiohttp handler (route, body, adapter,
wait bounds), then sends the request over a pooled keep-alive connection whose
`asyncio.Protocol` writes each piece of the response body straight to the client's
transport: one `recv`, a few bytes of framing arithmetic, one `send`.

- Framing is relayed verbatim. A chunked answer goes to an HTTP/1.1 client as the same chunks;
  only vLLM's terminating chunk is held back, and aiohttp's `write_eof` writes its own, so the
  client connection stays aiohttp's and keep-alive works as before. A Content-Length answer
  goes as is. An HTTP/1.0 client's request goes to vLLM as HTTP/1.0, so the answer comes
  close-delimited and is relayed until vLLM closes.
- A slow client: once the client's transport holds more than `HIGH_WATER` bytes the
  connection stops reading from vLLM (`pause_reading`), so vLLM's writes block at socket-buffer
  size; the handler waits on aiohttp's `drain` and resumes reading.
- A client that hangs up: seen on the next event (the transport is closing) or by a watch
  every `WATCH_INTERVAL` while nothing arrives (a queued request); the connection to vLLM is
  aborted, which is how vLLM learns to abort the request.
- Usage: the last `TAIL_BYTES` of an SSE answer are kept and parsed once at the end.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import cast

import httptools
from yarl import URL

HIGH_WATER = 64 * 1024  # client bytes buffered here before vLLM is paused (aiohttp's limit too)
WATCH_INTERVAL = 0.5  # how often a quiet exchange checks that its client is still there
CONNECT_TIMEOUT = 5.0
IDLE_MAX = 2.0  # a pooled connection idle longer is dropped: vLLM (uvicorn) closes at 5 s
MAX_IDLE = 512  # pooled connections kept; more in flight are closed when they finish
HEAD_LIMIT = 64 * 1024  # a response head from vLLM larger than this is refused
TAIL_BYTES = 4096  # SSE kept for usage: the usage event and [DONE], with room to spare
USAGE_LIMIT = 1 << 20  # a plain JSON body is kept for usage up to this size
_SIZE_LINE_LIMIT = 1024


class UpstreamError(Exception):
    """vLLM could not be reached, or answered with something that is not HTTP."""


class _Stale(UpstreamError):
    """A pooled connection that vLLM had closed: nothing was read, the request may be retried."""


class Outcome(enum.Enum):
    COMPLETE = "complete"
    CLIENT_GONE = "client_gone"
    BROKEN = "broken"


@dataclass
class Head:
    """vLLM's status line and headers, and how its body is framed."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    content_type: str
    length: int | None  # Content-Length; None when chunked or close-delimited
    chunked: bool
    keep_alive: bool


@dataclass
class _HeadParser:
    """httptools callbacks for one response head."""

    reason: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    complete: bool = False

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


def parse_head(raw: bytes) -> Head:
    """The head of one response (`raw` ends with the blank line); UpstreamError if malformed."""
    cb = _HeadParser()
    parser = httptools.HttpResponseParser(cb)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserError as exc:
        raise UpstreamError(f"vLLM sent a malformed response head: {exc}") from None
    if not cb.complete:
        raise UpstreamError("vLLM sent an incomplete response head")
    status = parser.get_status_code()
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in cb.headers]
    length: int | None = None
    chunked = False
    content_type = ""
    for k, v in headers:
        key = k.lower()
        if key == "transfer-encoding":
            chunked = v.lower().rsplit(",", 1)[-1].strip() == "chunked"
        elif key == "content-length":
            try:
                length = int(v)
            except ValueError:
                raise UpstreamError(f"vLLM sent Content-Length {v[:40]!r}") from None
        elif key == "content-type":
            content_type = v.split(";", 1)[0].strip().lower()
    if chunked:
        length = None
    elif status in (204, 304) or 100 <= status < 200:
        length = 0
    if length is not None and length < 0:
        raise UpstreamError(f"vLLM sent Content-Length {length}")
    return Head(
        status=status,
        reason=cb.reason.decode("latin-1"),
        headers=headers,
        content_type=content_type,
        length=length,
        chunked=chunked,
        keep_alive=parser.should_keep_alive(),
    )


class Exchange(asyncio.Protocol):
    """One connection to vLLM, carrying one request at a time (the pool reuses it).

    The handler `start`s a request and awaits its head; it then prepares the client response
    and `attach`es the client transport, from which point `data_received` relays each piece
    of body directly. The handler waits in `wait` for the end, or for a pause to drain.
    """

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.client: asyncio.Transport | None = None  # the client's transport, once attached
        self.watched: asyncio.Transport | None = None  # the client's transport, from start
        self.head_buf = b""
        self.head: Head | None = None
        self.head_waiter: asyncio.Future[Head] | None = None
        self.pending: list[bytes] = []  # body that arrived before attach
        self.pending_size = 0
        self.left = 0  # bytes left in the current chunk (with its CRLF), or of the body
        self.size_line = b""  # an incomplete chunk-size line, held back
        self.trailers = False  # past the last chunk, reading trailers up to the blank line
        self.until_close = False
        self.received = 0  # bytes read on this exchange, head included
        self.first_body_at: float | None = None
        self.sse = False
        self.tail: collections.deque[bytes] = collections.deque()
        self.kept = 0
        self.outcome: Outcome | None = None
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.at_boundary = True  # the bytes relayed so far end between two chunks
        self.high = HIGH_WATER
        self._relay: Callable[[asyncio.Transport, bytes], None] = self._relay_plain
        self.clean = True  # no protocol oddity seen: the connection may carry another request
        self.prefix = b""  # the client's response head, sent with the first piece of body
        self.last_chunk = False  # pass vLLM's last chunk on to the client
        self.delivered = False  # it was passed on: the client may leave, trailers still count

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is not None:  # the hot path: one relayed piece
            if client.is_closing() and not self.delivered:
                self._finish(Outcome.CLIENT_GONE)
            else:
                self._relay(client, data)
            return
        self.received += len(data)
        if self.head_waiter is None or self.outcome is not None:  # unasked-for bytes
            self.clean = False
            if self.transport is not None:
                self.transport.abort()
        elif self.head is None:
            self._read_head(data)
        else:
            self._buffer(data)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost ends the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool.watching.discard(self)
        if self.head_waiter is not None and not self.head_waiter.done():
            err: UpstreamError = (
                _Stale("vLLM closed a pooled connection")
                if self.received == 0 and self.idle_since
                else UpstreamError(f"vLLM closed the connection: {exc or 'EOF'}")
            )
            self.head_waiter.set_exception(err)
        elif self.head is not None and self.outcome is None:
            if self.until_close:
                self._flush_pending()
                self._finish(Outcome.COMPLETE)
            else:
                self._finish(Outcome.BROKEN)
        self.pool.forget(self)

    # -- the handler's side ------------------------------------------------------------------

    def start(self, head: bytes, body: bytes, watched: asyncio.Transport | None) -> None:
        assert self.transport is not None
        self.head_waiter = asyncio.get_running_loop().create_future()
        self.watched = watched
        self.transport.writelines((head, body) if body else (head,))
        self.pool.watch(self)

    async def read_head(self) -> Head:
        assert self.head_waiter is not None
        return await self.head_waiter

    def attach(self, client: asyncio.Transport, prefix: bytes = b"", last: bool = False) -> None:
        """From now on, body goes straight to `client`; what arrived meanwhile goes first.

        `prefix` (the client's response head) goes out with the first piece of body, in one
        send; with `last` vLLM's last chunk is passed on too (else the caller writes its own).
        """
        self.client = client
        self.high = client.get_write_buffer_limits()[1]
        chunked = self.head is not None and self.head.chunked
        self._relay = self._relay_chunked if chunked else self._relay_plain
        self.last_chunk = last
        self.prefix = prefix  # joins the first piece relayed: one send (each write is one)
        self._flush_pending()
        if self.prefix and not client.is_closing():
            client.write(self.prefix)
        self.prefix = b""

    async def wait(self, drain: Callable[[], Awaitable[None]]) -> Outcome:
        """Until the body is relayed (or cut); drains the client while vLLM is paused.

        `drain` is the client response's `drain` coroutine function (aiohttp's writer): it
        returns once the client's socket took the buffered bytes, or raises if it hung up.
        """
        while self.outcome is None:
            if self.paused:
                try:
                    await drain()
                except ConnectionError:
                    self._finish(Outcome.CLIENT_GONE)
                    break
                self.paused = False
                if self.transport is not None and not self.lost:
                    self.transport.resume_reading()
                continue
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        assert self.outcome is not None
        return self.outcome

    def abort(self) -> None:
        """Cut the connection (vLLM aborts the request); the exchange ends as client_gone."""
        if self.outcome is None:
            self._finish(Outcome.CLIENT_GONE)

    def usage_bytes(self) -> bytes:
        return b"".join(self.tail)

    # -- internals ---------------------------------------------------------------------------

    def check_client(self) -> None:
        """The pool's watch: end the exchange if its client hung up (see `UpstreamPool.watch`)."""
        if self.outcome is not None:
            return
        watched = self.watched
        if watched is not None and watched.is_closing() and not self.delivered:
            self._finish(Outcome.CLIENT_GONE)
            if self.head_waiter is not None and not self.head_waiter.done():
                self.head_waiter.set_exception(ConnectionResetError("the client hung up"))

    def _read_head(self, data: bytes) -> None:
        buf = self.head_buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > HEAD_LIMIT:
                self._fail_head(UpstreamError(f"vLLM's response head exceeds {HEAD_LIMIT} bytes"))
            else:
                self.head_buf = buf
            return
        self.head_buf = b""
        try:
            head = parse_head(buf[: end + 4])
        except UpstreamError as exc:
            self._fail_head(exc)
            return
        rest = buf[end + 4 :]
        if 100 <= head.status < 200:  # an interim answer (100 Continue): the real one follows
            if rest:
                self._read_head(rest)
            return
        self.head = head
        self.sse = head.content_type == "text/event-stream"
        if head.chunked:
            self.left = 0
        elif head.length is not None:
            self.left = head.length
        else:
            self.until_close = True
        assert self.head_waiter is not None
        if not self.head_waiter.done():
            self.head_waiter.set_result(head)
        if head.length == 0:
            self.clean = not rest
            self._finish(Outcome.COMPLETE)
            return
        if rest:
            self._buffer(rest)

    def _fail_head(self, exc: UpstreamError) -> None:
        if self.head_waiter is not None and not self.head_waiter.done():
            self.head_waiter.set_exception(exc)
        self._finish(Outcome.BROKEN)

    def _buffer(self, data: bytes) -> None:
        if self.first_body_at is None:
            self.first_body_at = time.monotonic()
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > HIGH_WATER and self.transport is not None and not self.paused:
            self.transport.pause_reading()  # the handler has not attached yet: do not pile up
            self.paused = True

    def _flush_pending(self) -> None:
        client = self.client
        if client is None or not self.pending:
            return
        pending, self.pending = self.pending, []
        self.pending_size = 0
        was_paused, self.paused = self.paused, False
        for piece in pending:
            if self.outcome is not None:
                break
            self._relay(client, piece)
        if was_paused and not self.paused and self.transport is not None and not self.lost:
            self.transport.resume_reading()

    def _relay_plain(self, client: asyncio.Transport, data: bytes) -> None:
        """Content-Length or close-delimited body: forward up to the length."""
        if self.first_body_at is None:
            self.first_body_at = time.monotonic()
        if not self.until_close:
            if len(data) > self.left:
                data = data[: self.left]  # vLLM sent more than it announced: cut and drop
                self.clean = False
            self.left -= len(data)
        self._keep(data)
        if self.prefix:
            data, self.prefix = self.prefix + data, b""
        client.write(data)
        if not self.until_close and self.left == 0:
            self._finish(Outcome.COMPLETE)
        elif client.get_write_buffer_size() > self.high:
            self._pause()

    def _relay_chunked(self, client: asyncio.Transport, data: bytes) -> None:
        """Forward chunks verbatim, holding back a partial size line and the last chunk."""
        if not (self.left or self.size_line or self.trailers or self.prefix) and self.first_body_at:
            # The common piece at a GPU's pace: exactly one whole chunk (one SSE event).
            j = data.find(b"\r\n", 0, _SIZE_LINE_LIMIT)
            if j > 0:
                try:
                    size = int(data[:j], 16)
                except ValueError:
                    size = 0
                if size > 0 and size + j + 4 == len(data):  # (the last chunk is size 0)
                    self._keep(data)
                    client.write(data)
                    if client.get_write_buffer_size() > self.high:
                        self._pause()
                    return
        if self.first_body_at is None:
            self.first_body_at = time.monotonic()
        if self.trailers:
            self._read_trailers(data)
            return
        if self.size_line:
            data = self.size_line + data
            self.size_line = b""
        n = len(data)
        i = 0
        left = self.left
        end = n  # how much of `data` goes to the client
        last_at = -1  # where the last chunk starts, once seen
        while True:
            if left:
                if n - i <= left:
                    left -= n - i
                    break
                i += left
                left = 0
            if i >= n:
                break
            j = data.find(b"\r\n", i)
            if j < 0:
                if n - i > _SIZE_LINE_LIMIT:
                    self._finish(Outcome.BROKEN)
                    return
                self.size_line = data[i:]
                end = i
                break
            line = data[i:j]
            try:
                size = int(line.split(b";", 1)[0], 16)
            except ValueError:
                size = -1
            if size < 0:
                self._finish(Outcome.BROKEN)
                return
            if size == 0:
                last_at = i
                end = i
                break
            left = size + 2
            i = j + 2
        self.left = left
        self.at_boundary = left == 0
        if end or (last_at >= 0 and self.last_chunk):
            out = data if end == n else data[:end]
            self._keep(out)
            if last_at >= 0 and self.last_chunk:
                out += b"0\r\n\r\n"  # no trailers: vLLM sends none, and they are not relayed
                self.delivered = True
            if self.prefix:
                out, self.prefix = self.prefix + out, b""
            client.write(out)
        if last_at >= 0:
            self.trailers = True
            self._read_trailers(data[data.index(b"\r\n", last_at) :])
        elif client.get_write_buffer_size() > self.high:
            self._pause()

    def _read_trailers(self, data: bytes) -> None:
        """After the last chunk: skip trailers up to the blank line, then the body is done."""
        buf = self.size_line + data  # starts at the CRLF that ends the last-chunk line
        if buf.find(b"\r\n\r\n") >= 0:
            self.size_line = b""
            self.clean = len(buf) == buf.find(b"\r\n\r\n") + 4
            self._finish(Outcome.COMPLETE)
        elif len(buf) > HEAD_LIMIT:
            self._finish(Outcome.BROKEN)
        else:
            self.size_line = buf

    def _keep(self, data: bytes) -> None:
        tail = self.tail
        if self.sse:  # at least the last TAIL_BYTES, however TCP split them
            tail.append(data)
            self.kept += len(data)
            if self.kept > 2 * TAIL_BYTES:  # trimmed now and then, not on every piece
                while self.kept > TAIL_BYTES and len(tail) > 1:
                    self.kept -= len(tail.popleft())
        elif self.kept < USAGE_LIMIT:
            tail.append(data)
            self.kept += len(data)

    def _pause(self) -> None:
        if self.transport is not None and not self.paused:
            self.transport.pause_reading()
            self.paused = True
            self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _finish(self, outcome: Outcome) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        self.pool.watching.discard(self)
        self.client = None  # nothing more goes to the client from here
        self._wake()
        if not self.reusable() and self.transport is not None and not self.lost:
            self.transport.abort()

    def reusable(self) -> bool:
        return (
            self.outcome is Outcome.COMPLETE
            and self.clean
            and self.head is not None
            and self.head.keep_alive
            and not self.until_close
            and not self.lost
        )

    def recycle(self) -> None:
        """Ready for the next request on this connection (called by the pool)."""
        if self.paused and self.transport is not None:
            self.transport.resume_reading()
        self._reset()
        self.idle_since = time.monotonic()


class UpstreamPool:
    """Keep-alive connections to vLLM, most recently used first."""

    def __init__(self, vllm_url: str) -> None:
        url = URL(vllm_url)
        assert url.host is not None, f"vLLM URL without a host: {vllm_url}"
        self.host = url.host
        self.port = url.port or 80
        self.authority = f"{url.host}:{self.port}"
        self.idle: list[Exchange] = []
        self.open: set[Exchange] = set()
        self.watching: set[Exchange] = set()  # exchanges in flight, checked every WATCH_INTERVAL
        self._watch: asyncio.TimerHandle | None = None

    async def exchange(
        self, head: bytes, body: bytes, watched: asyncio.Transport | None, http10: bool
    ) -> tuple[Exchange, Head]:
        """Send one request; returns once vLLM's head arrived. UpstreamError if it did not."""
        for _ in range(2):
            ex = None if http10 else self._take()
            if ex is None:
                ex = await self._connect()
            ex.start(head, body, watched)
            try:
                return ex, await ex.read_head()
            except _Stale:
                continue  # the request never reached vLLM: once more on a new connection
            except BaseException:
                ex.abort()
                raise
        raise UpstreamError("vLLM closed two connections in a row")

    def watch(self, ex: Exchange) -> None:
        """Check `ex`'s client every WATCH_INTERVAL until it ends: one timer for all exchanges
        rather than one armed and cancelled per request."""
        self.watching.add(ex)
        if self._watch is None:
            self._watch = asyncio.get_running_loop().call_later(WATCH_INTERVAL, self._check)

    def _check(self) -> None:
        self._watch = None
        for ex in list(self.watching):
            ex.check_client()
        if self.watching:
            self._watch = asyncio.get_running_loop().call_later(WATCH_INTERVAL, self._check)

    def request_head(
        self, path: str, headers: Iterable[tuple[bytes, bytes]], length: int, http10: bool
    ) -> bytes:
        lines = [
            f"POST {path} HTTP/1.{0 if http10 else 1}\r\nHost: {self.authority}\r\n"
            f"Content-Length: {length}\r\n".encode("latin-1")
        ]
        for k, v in headers:
            lines.append(k + b": " + v + b"\r\n")
        lines.append(b"Connection: close\r\n\r\n" if http10 else b"\r\n")
        return b"".join(lines)

    async def _connect(self) -> Exchange:
        loop = asyncio.get_running_loop()
        try:
            _, ex = await asyncio.wait_for(
                loop.create_connection(lambda: Exchange(self), self.host, self.port),
                CONNECT_TIMEOUT,
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to vLLM at {self.authority}: {exc}") from None
        self.open.add(ex)
        return ex

    def _take(self) -> Exchange | None:
        now = time.monotonic()
        while self.idle:
            ex = self.idle.pop()
            if not ex.lost and now - ex.idle_since < IDLE_MAX:
                return ex
            if ex.transport is not None:
                ex.transport.close()
        return None

    def release(self, ex: Exchange) -> None:
        """The handler is done with `ex`: pool it if it can carry another request."""
        if not ex.reusable():
            ex.abort()
            return
        ex.recycle()
        if len(self.idle) < MAX_IDLE:
            self.idle.append(ex)
        elif ex.transport is not None:
            ex.transport.close()

    def forget(self, ex: Exchange) -> None:
        self.open.discard(ex)
        with contextlib.suppress(ValueError):
            self.idle.remove(ex)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        for ex in list(self.open):
            if ex.transport is not None:
                ex.transport.abort()
        self.idle.clear()
