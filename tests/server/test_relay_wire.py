"""The relay against a vLLM that writes exact bytes (issue 12): framing, reuse, HTTP/1.0.

The relay forwards vLLM's chunks verbatim and finds the end of a body itself, so these tests
drive it with a raw socket "vLLM" that splits its answer anywhere:

- every split: a chunked SSE answer written one byte at a time (size lines, last chunk,
  trailers) -> the same events and `[DONE]`, usage counted, the next requests on the same
  connections;
- length + interim: `100 Continue`, then a Content-Length JSON body in two writes -> the body,
  usage counted;
- stale: vLLM closes each keep-alive connection after answering -> every request answered (a
  retry on a new connection);
- garbage head: not HTTP -> 502 in the OpenAI error shape;
- cut: vLLM closes mid-stream at a chunk boundary -> the events so far, an error event, EOF;
- HTTP/1.0 client: the proxy asks vLLM in HTTP/1.0 -> a close-delimited answer;
- queued hang-up: vLLM says nothing for 10 s -> its connection is closed within ~1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from .helpers import make_settings, manifest_doc, run_server

pytestmark = pytest.mark.timeout(60)

EVENT = b'data: {"choices":[{"text":"tok"}],"usage":null}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":7}}\n\n'
DONE = b"data: [DONE]\n\n"
BODY = {"model": "tiny", "prompt": "x", "stream": True}


def chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)
SSE_ANSWER = (
    SSE_HEAD
    + chunk(EVENT)
    + chunk(EVENT + EVENT)
    + chunk(USAGE)
    + chunk(DONE)
    + b"0\r\nx-trailer: 1\r\n\r\n"
)

Writer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[None]]


@dataclass
class RawVLLM:
    """A 'vLLM' on a raw socket: answers /health, and POSTs with what `answer` writes."""

    answer: Writer
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    asked: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                if head.startswith(b"GET /health"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    continue
                self.requests.append(head + body)
                self.asked.set()
                await self.answer(reader, writer, head)
                if head.split(b"\r\n", 1)[0].endswith(b"HTTP/1.0"):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.close()


async def byte_by_byte(r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes) -> None:
    for i in range(len(SSE_ANSWER)):
        w.write(SSE_ANSWER[i : i + 1])
        await w.drain()
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def proxied(tmp_path: Path, answer: Writer) -> AsyncIterator[tuple[str, RawVLLM, str]]:
    vllm = RawVLLM(answer)
    async with vllm.running() as vurl:
        s = make_settings(tmp_path, vurl, manifest_doc([]), tmp_path)
        async with run_server(s) as srv:
            yield srv.url, vllm, vurl


async def metrics(url: str) -> str:
    async with aiohttp.ClientSession() as c, c.get(f"{url}/metrics") as r:
        return await r.text()


async def test_chunks_split_anywhere_are_relayed_and_the_connections_reused(
    tmp_path: Path,
) -> None:
    async with proxied(tmp_path, byte_by_byte) as (url, vllm, _):
        async with aiohttp.ClientSession() as c:  # one keep-alive connection to the proxy
            for _ in range(3):
                async with c.post(f"{url}/v1/completions", json=BODY) as r:
                    assert r.status == 200
                    body = await r.read()
                assert body == EVENT * 3 + USAGE + DONE
        text = await metrics(url)
    assert vllm.connections == 2  # one for /health polls, one carrying all three completions
    assert 'loraplex_server_completion_tokens_total{adapter="tiny"} 21.0' in text
    assert 'loraplex_server_requests_total{adapter="tiny",code="200"} 3.0' in text


async def usage_split(r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes) -> None:
    w.write(SSE_HEAD + chunk(EVENT) + chunk(USAGE[:25]) + chunk(USAGE[25:]) + chunk(DONE))
    w.write(b"0\r\n\r\n")
    await w.drain()


async def test_a_usage_event_split_across_chunks_is_counted(tmp_path: Path) -> None:
    async with proxied(tmp_path, usage_split) as (url, _, _):
        async with aiohttp.ClientSession() as c, c.post(f"{url}/v1/completions", json=BODY) as r:
            assert await r.read() == EVENT + USAGE + DONE
        text = await metrics(url)
    assert 'loraplex_server_completion_tokens_total{adapter="tiny"} 7.0' in text
    assert 'loraplex_server_prompt_tokens_total{adapter="tiny"} 3.0' in text


async def test_length_body_and_interim_answers(tmp_path: Path) -> None:
    doc = json.dumps({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 5}})

    async def answer(r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes) -> None:
        w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
        w.write(b"content-length: %d\r\n\r\n%s" % (len(doc), doc[:10].encode()))
        await w.drain()
        await asyncio.sleep(0.05)
        w.write(doc[10:].encode())

    async with proxied(tmp_path, answer) as (url, vllm, _):
        async with aiohttp.ClientSession() as c:
            for _ in range(2):
                async with c.post(f"{url}/v1/completions", json={**BODY, "stream": False}) as r:
                    assert r.status == 200
                    assert r.headers["Content-Length"] == str(len(doc))
                    assert await r.text() == doc
        text = await metrics(url)
    assert vllm.connections == 2
    assert 'loraplex_server_completion_tokens_total{adapter="tiny"} 10.0' in text


async def test_a_closed_pooled_connection_is_retried_on_a_new_one(tmp_path: Path) -> None:
    async def answer_and_hang_up(
        r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes
    ) -> None:
        w.write(SSE_ANSWER)
        await w.drain()
        await asyncio.sleep(0.05)
        w.transport.abort()  # no Connection: close; the proxy pooled the connection

    async with (
        proxied(tmp_path, answer_and_hang_up) as (url, vllm, _),
        aiohttp.ClientSession() as c,
    ):
        for _ in range(4):
            await asyncio.sleep(0.2)  # the pooled connection is closed by now
            async with c.post(f"{url}/v1/completions", json=BODY) as r:
                assert r.status == 200
                assert (await r.read()).endswith(DONE)
    assert len(vllm.requests) == 4


async def test_garbage_head_is_a_502(tmp_path: Path) -> None:
    async def garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes) -> None:
        w.write(b"SSH-2.0-OpenSSH\r\n\r\n")

    async with (
        proxied(tmp_path, garbage) as (url, _, _),
        aiohttp.ClientSession() as c,
        c.post(f"{url}/v1/completions", json=BODY) as r,
    ):
        assert r.status == 502
        assert (await r.json())["error"]["code"] == "vllm_unavailable"


async def test_cut_mid_stream_ends_with_an_error_event_and_eof(tmp_path: Path) -> None:
    async def cut(r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes) -> None:
        w.write(SSE_HEAD + chunk(EVENT))
        await w.drain()
        await asyncio.sleep(0.1)
        w.transport.abort()

    async with proxied(tmp_path, cut) as (url, _, _):
        raw = await raw_request(url, "HTTP/1.1")  # to EOF: the proxy closes after the event
        text = await metrics(url)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert body.startswith(chunk(EVENT))
    assert b"vLLM stopped mid-stream" in body
    assert not body.endswith(b"0\r\n\r\n")  # no last chunk: the client sees a cut stream
    assert 'loraplex_server_requests_total{adapter="tiny",code="broken"} 1.0' in text


async def raw_request(url: str, version: str) -> bytes:
    """One POST on a plain socket; everything read until EOF."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps(BODY).encode()
    writer.write(
        f"POST /v1/completions {version}\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    got = b""
    try:
        async with asyncio.timeout(10):
            while piece := await reader.read(65536):
                got += piece
    finally:
        writer.close()
    return got


async def test_http10_client_gets_a_close_delimited_answer(tmp_path: Path) -> None:
    async def plain(r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes) -> None:
        w.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
        w.write(EVENT + USAGE + DONE)
        await w.drain()

    async with proxied(tmp_path, plain) as (url, vllm, _):
        raw = await raw_request(url, "HTTP/1.0")
        text = await metrics(url)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert b"transfer-encoding" not in head.lower()
    assert body == EVENT + USAGE + DONE
    assert vllm.requests[0].startswith(b"POST /v1/completions HTTP/1.0\r\n")
    assert 'loraplex_server_completion_tokens_total{adapter="tiny"} 7.0' in text


async def test_hang_up_while_queued_closes_the_vllm_connection(tmp_path: Path) -> None:
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes) -> None:
        for _ in range(500):  # vLLM has queued the request: nothing to relay for 10 s
            if r.at_eof():  # the proxy closed the connection: vLLM aborts the request
                return
            await asyncio.sleep(0.02)

    async with proxied(tmp_path, silent) as (url, vllm, _):
        async with aiohttp.ClientSession() as c:
            task = asyncio.create_task(c.post(f"{url}/v1/completions", json=BODY))
            await asyncio.wait_for(vllm.asked.wait(), 5)
            vllm.closed.clear()
            task.cancel()  # the client hangs up
            with contextlib.suppress(asyncio.CancelledError):
                await task
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.wait_for(vllm.closed.wait(), 3)
        assert loop.time() - t0 < 2
        text = await metrics(url)
    assert 'code="client_gone"' in text
