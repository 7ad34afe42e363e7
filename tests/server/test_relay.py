"""The relay loses nothing the proxy promises (issue 12): disconnects, slow clients, usage.

Matrix: a client that hangs up mid-stream closes the proxy's connection to vLLM (so vLLM
aborts the request) within one event; a client that stops reading makes the proxy stop
reading from vLLM (vLLM's writes block at socket-buffer size, not the whole response); usage
from the final SSE event is counted once, even when every event carries `"usage": null`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from .helpers import make_settings, manifest_doc, run_server, serve_app

pytestmark = pytest.mark.timeout(60)

EVENT = b'data: {"choices":[{"text":"tok"}],"usage":null}\n\n'
FINAL = (
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":7}}\n\ndata: [DONE]\n\n'
)


@dataclass
class Streamer:
    """A stand-in for vLLM's streaming endpoint that records how its streams ended."""

    events: int = 50
    delay: float = 0.05
    pad: int = 0
    written: int = 0
    ended: list[str] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def completions(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        event = EVENT if not self.pad else b"data: " + b"x" * self.pad + b"\n\n"
        try:
            for _ in range(self.events):
                await resp.write(event)
                self.written += len(event)
                if self.delay:
                    await asyncio.sleep(self.delay)
            await resp.write(FINAL)
            self.ended.append("complete")
        except (ConnectionError, asyncio.CancelledError):
            self.ended.append("client_gone")
            raise
        finally:
            self.done.set()
        return resp

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/completions", self.completions)
        return app


BODY = {"model": "tiny", "prompt": "x", "stream": True}


async def test_client_hangup_closes_the_vllm_request(tmp_path: Path) -> None:
    up = Streamer(events=200, delay=0.05)  # a 10 s stream
    async with serve_app(up.app()) as vurl:
        s = make_settings(tmp_path, vurl, manifest_doc([]), tmp_path)
        async with run_server(s) as srv:
            async with aiohttp.ClientSession() as c:
                r = await c.post(f"{srv.url}/v1/completions", json=BODY)
                await r.content.readline()
                r.close()  # hang up mid-stream
            await asyncio.wait_for(up.done.wait(), 3)
    assert up.ended == ["client_gone"]
    assert up.written < 200 * len(EVENT) // 2


async def test_slow_client_backpressures_vllm(tmp_path: Path) -> None:
    up = Streamer(events=2000, delay=0, pad=64 * 1024)  # 128 MiB, as fast as it can
    async with serve_app(up.app()) as vurl:
        s = make_settings(tmp_path, vurl, manifest_doc([]), tmp_path)
        async with run_server(s) as srv, aiohttp.ClientSession() as c:
            r = await c.post(f"{srv.url}/v1/completions", json=BODY)
            await r.content.readline()
            await asyncio.sleep(2)  # the client reads nothing
            stalled = up.written
            assert stalled < 32 << 20, f"vLLM wrote {stalled >> 20} MiB into a stalled client"
            r.close()
            await asyncio.wait_for(up.done.wait(), 5)


async def test_usage_from_the_final_event_only(tmp_path: Path) -> None:
    up = Streamer(events=20, delay=0)
    async with serve_app(up.app()) as vurl:
        s = make_settings(tmp_path, vurl, manifest_doc([]), tmp_path)
        async with run_server(s) as srv, aiohttp.ClientSession() as c:
            for _ in range(3):
                async with c.post(f"{srv.url}/v1/completions", json=BODY) as r:
                    raw = await r.read()
                assert raw.count(b"data: ") == 22 and raw.endswith(b"data: [DONE]\n\n")
            async with c.get(f"{srv.url}/metrics") as m:
                text = await m.text()
    assert 'loraplex_server_completion_tokens_total{adapter="tiny"} 21.0' in text
    assert 'loraplex_server_prompt_tokens_total{adapter="tiny"} 9.0' in text
