"""The public port's front end (`front`): what it serves itself, what it hands to aiohttp.

- parse: only `POST <inference route> HTTP/1.1` with one plain Content-Length and well-formed
  headers is served by the front; every other shape (query, version, method, a second length,
  Transfer-Encoding, Expect, Upgrade, folded or malformed headers, bare LF, over the body
  cap) is aiohttp's;
- one connection carrying a served request, a handed-over one and another inference request,
  written at once (pipelined): three answers, in order, one hand-over;
- smuggling shapes (Content-Length with Transfer-Encoding, two lengths) go to aiohttp, which
  refuses them: vLLM never sees a request;
- errors: the same status, headers and OpenAI body from the front and from aiohttp;
- `Connection: close` closes after the answer; idle keep-alive connections are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from loraplex_server import front
from loraplex_server.app import create_app

from .helpers import FakeVLLM, free_port, make_settings, manifest_doc, serve_app

pytestmark = pytest.mark.timeout(60)

CAP = 1000


def head(*lines: str) -> bytes:
    return "\r\n".join(lines).encode()


PLAIN = ("POST /v1/completions HTTP/1.1", "Host: x", "Content-Length: 2")


def test_parse_serves_a_plain_inference_request() -> None:
    req = front.parse(
        head(*PLAIN, "Content-Type: application/json; charset=utf-8", "Connection: close"), CAP
    )
    assert req is not None
    assert (req.path, req.length, req.content_type, req.close) == (
        "/v1/completions",
        2,
        "application/json",
        True,
    )
    assert (b"Host", b"x") in req.headers
    chat = front.parse(head("POST /v1/chat/completions HTTP/1.1", "Content-Length: 0"), CAP)
    assert chat is not None and chat.path == "/v1/chat/completions" and not chat.close


@pytest.mark.parametrize(
    "lines",
    [
        ("POST /v1/completions?x=1 HTTP/1.1", "Content-Length: 2"),
        ("POST /v1/completions HTTP/1.0", "Content-Length: 2"),
        ("GET /v1/completions HTTP/1.1", "Content-Length: 2"),
        ("post /v1/completions HTTP/1.1", "Content-Length: 2"),
        ("POST http://x/v1/completions HTTP/1.1", "Content-Length: 2"),
        ("POST /v1//completions HTTP/1.1", "Content-Length: 2"),
        ("POST /v1/load_lora_adapter HTTP/1.1", "Content-Length: 2"),
        ("POST  /v1/completions HTTP/1.1", "Content-Length: 2"),
        (*PLAIN, "Content-Length: 2"),
        ("POST /v1/completions HTTP/1.1", "Content-Length: +2"),
        ("POST /v1/completions HTTP/1.1", "Content-Length: 2, 2"),
        ("POST /v1/completions HTTP/1.1", "Content-Length: 0x2"),
        (*PLAIN, "Transfer-Encoding: chunked"),
        (*PLAIN, "transfer-encoding: identity"),
        (*PLAIN, "Expect: 100-continue"),
        (*PLAIN, "Upgrade: websocket"),
        (*PLAIN, "Connection: keep-alive, Upgrade"),
        (*PLAIN, "X-A: 1", " folded"),
        (*PLAIN, "X-A : 1"),
        (*PLAIN, "X A: 1"),
        (*PLAIN, "X-A: a\tb"),
        (*PLAIN, "X-A: a\x00b"),
        (*PLAIN, "X-A: 1\nX-B: 2"),
        (*PLAIN, ": empty name"),
        ("POST /v1/completions HTTP/1.1",),  # no length
        ("POST /v1/completions HTTP/1.1", f"Content-Length: {CAP + 1}"),
    ],
)
def test_parse_leaves_everything_else_to_aiohttp(lines: tuple[str, ...]) -> None:
    assert front.parse(head(*lines), CAP) is None


@dataclass
class Served:
    port: int
    site: front.PublicSite
    fake: FakeVLLM

    async def talk(self, data: bytes, answers: int) -> list[tuple[int, dict[str, str], bytes]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(data)
            return [await read_answer(reader) for _ in range(answers)]
        finally:
            writer.close()

    @property
    def handed_over(self) -> int:
        assert self.site.front is not None
        return self.site.front.handed_over


@contextlib.asynccontextmanager
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    fake = FakeVLLM()
    async with serve_app(fake.app()) as vurl:
        settings = make_settings(tmp_path, vurl, manifest_doc([]), tmp_path)
        apps = create_app(settings)
        runner = web.AppRunner(apps.public, access_log=None)
        await runner.setup()
        port = free_port()
        site = front.PublicSite(runner, "127.0.0.1", port)
        await site.start()
        try:
            yield Served(port, site, fake)
        finally:
            await runner.cleanup()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer: status, headers (lower-case names), de-chunked body."""
    raw = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = raw.decode("latin-1").split("\r\n")[:-2]
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            body += (await reader.readexactly(size + 2))[:-2]
            if size == 0:
                break
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


def post(path: str, body: bytes, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json", *extra]
    return head(*lines, f"Content-Length: {len(body)}", "", "") + body


STREAM = json.dumps({"model": "tiny", "prompt": "x", "stream": True}).encode()
PLAIN_BODY = json.dumps({"model": "tiny", "prompt": "x"}).encode()


async def test_pipelined_requests_are_answered_in_order_across_the_hand_over(
    tmp_path: Path,
) -> None:
    async with served(tmp_path) as s:
        burst = (
            post("/v1/completions", STREAM)
            + head("GET /healthz HTTP/1.1", "Host: x", "", "")
            + post("/v1/completions", PLAIN_BODY)
        )
        (st1, h1, b1), (st2, _, b2), (st3, _, b3) = await s.talk(burst, 3)
        assert s.handed_over == 1
    assert (st1, st2, st3) == (200, 200, 200)
    assert h1["content-type"] == "text/event-stream" and h1["transfer-encoding"] == "chunked"
    assert b1.endswith(b"data: [DONE]\n\n") and b1.count(b"data:") == 4
    assert json.loads(b2) == {"status": "ok"}
    assert json.loads(b3)["choices"] == [{"text": "tiny!"}]
    assert len(s.fake.seen_bodies) == 2


@pytest.mark.parametrize(
    "extra",
    [
        ("Transfer-Encoding: chunked",),
        ("Content-Length: 0",),  # a second, different length
    ],
)
async def test_smuggling_shapes_are_refused_by_aiohttp(
    tmp_path: Path, extra: tuple[str, ...]
) -> None:
    hidden = post("/v1/completions", STREAM)
    async with served(tmp_path) as s:
        (status, _, _), *_ = await s.talk(post("/v1/completions", b"0\r\n\r\n" + hidden, *extra), 1)
        await asyncio.sleep(0.2)
        assert s.handed_over == 1
    assert status == 400
    assert s.fake.seen_bodies == []


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "model_not_found"),
        (json.dumps({"model": 3}).encode(), 400, "invalid_request"),
    ],
)
async def test_errors_are_the_same_from_the_front_and_from_aiohttp(
    tmp_path: Path, body: bytes, status: int, code: str
) -> None:
    async with served(tmp_path) as s:
        ours, theirs = await s.talk(
            post("/v1/completions", body) + post("/v1/completions?via=aiohttp", body), 2
        )
        assert s.handed_over == 1
    for st, headers, raw in (ours, theirs):
        assert st == status
        assert headers["content-type"] == "application/json; charset=utf-8"
        assert json.loads(raw)["error"]["code"] == code
    assert ours[2] == theirs[2]


async def test_connection_close_and_idle_keep_alive_are_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(front, "KEEPALIVE", 0.3)
    monkeypatch.setattr(front, "_SWEEP_EVERY", 0.1)
    async with served(tmp_path) as s:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(post("/v1/completions", PLAIN_BODY, "Connection: close"))
        status, headers, _ = await read_answer(reader)
        assert (status, headers["connection"]) == (200, "close")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(post("/v1/completions", PLAIN_BODY))
        status, headers, _ = await read_answer(reader)
        assert status == 200 and "connection" not in headers  # kept alive ...
        assert await asyncio.wait_for(reader.read(), 5) == b""  # ... until idle too long
        writer.close()
        assert s.handed_over == 0


async def test_a_slow_upload_is_not_an_idle_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(front, "KEEPALIVE", 0.3)
    monkeypatch.setattr(front, "_SWEEP_EVERY", 0.1)
    request = post("/v1/completions", PLAIN_BODY)
    async with served(tmp_path) as s:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        for i in range(0, len(request), 8):  # about 1.5 s for the whole request
            writer.write(request[i : i + 8])
            await asyncio.sleep(0.1)
        status, _, body = await read_answer(reader)
        writer.close()
    assert status == 200 and json.loads(body)["choices"] == [{"text": "tiny!"}]


async def test_while_draining_requests_go_to_aiohttp_and_get_503(tmp_path: Path) -> None:
    async with served(tmp_path) as s:
        assert s.site.front is not None
        s.site.front.backend.draining = True
        ((status, headers, body),) = await s.talk(post("/v1/completions", PLAIN_BODY), 1)
        assert s.handed_over == 1
    assert (status, headers["retry-after"]) == (503, "1")
    assert json.loads(body)["error"]["code"] == "shutting_down"
    assert s.fake.seen_bodies == []
