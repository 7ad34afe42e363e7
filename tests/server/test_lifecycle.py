"""Shutdown and liveness of the server process (issue 9, points 9 and 10, server side).

Matrix: SIGTERM during a stream -> /readyz 503 (draining), new inference requests 503
`shutting_down` with Retry-After, the stream finishes whole, the process exits 0; a stream
longer than --drain-timeout is cut and the process still exits in time. /healthz: 200 while
vLLM starts (it never answered yet), 200 while it answers, 503 once it has hung longer than
--vllm-dead-after, 200 again when it is back.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from .helpers import FakeVLLM, make_settings, manifest_doc, run_server, serve_app
from .server_process import server_process

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def pvc_root(tmp_path: Path) -> Path:
    (tmp_path / "pvc").mkdir()
    return tmp_path / "pvc"


STREAM = {"model": "tiny", "prompt": "x", "max_tokens": 2, "stream": True}


async def test_sigterm_drains_in_flight_streams(tmp_path: Path, pvc_root: Path) -> None:
    fake = FakeVLLM(chunk_delay=0.7)  # a stream of ~2 s
    async with (
        serve_app(fake.app()) as vurl,
        server_process(tmp_path, vurl, pvc_root, "--drain-timeout", "20") as p,
        aiohttp.ClientSession() as c,
    ):
        async with c.post(f"{p.url}/v1/completions", json=STREAM) as r:
            first = await r.content.readline()
            p.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            async with c.get(f"{p.url}/readyz") as ready:
                assert ready.status == 503
                assert (await ready.json())["draining"] is True
            async with c.post(f"{p.url}/v1/completions", json=STREAM) as late:
                assert late.status == 503
                assert (await late.json())["error"]["code"] == "shutting_down"
                assert late.headers["Retry-After"] == "1"
            rest = await r.read()
        assert first.startswith(b"data: ")
        assert rest.rstrip().endswith(b"data: [DONE]")
        assert await p.exited(10) == 0


async def test_drain_timeout_cuts_long_streams(tmp_path: Path, pvc_root: Path) -> None:
    fake = FakeVLLM(chunk_delay=5)  # far longer than the 1 s drain
    async with (
        serve_app(fake.app()) as vurl,
        server_process(tmp_path, vurl, pvc_root, "--drain-timeout", "1") as p,
        aiohttp.ClientSession() as c,
    ):
        stream = asyncio.create_task(c.post(f"{p.url}/v1/completions", json=STREAM))
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        assert await p.exited(8) == 0
        assert 0.9 < time.monotonic() - t0 < 8
        r = await stream
        with pytest.raises(aiohttp.ClientError):
            await r.read()


@dataclass
class HangingVLLM:
    """/health that answers, or hangs like a wedged engine."""

    answering: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def hang(self) -> bool:
        return not self.answering.is_set()

    @hang.setter
    def hang(self, value: bool) -> None:
        if value:
            self.answering.clear()
        else:
            self.answering.set()  # releases the held requests too

    async def health(self, request: web.Request) -> web.Response:
        await self.answering.wait()
        return web.Response()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        return app


async def healthz(url: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as c, c.get(f"{url}/healthz") as r:
        return r.status, await r.json()


async def test_liveness_fails_when_vllm_hangs_past_the_bound(tmp_path: Path) -> None:
    vllm = HangingVLLM()  # hung from the start
    async with serve_app(vllm.app()) as vurl:
        s = make_settings(
            tmp_path, vurl, manifest_doc([]), tmp_path, health_interval=0.1, vllm_dead_after=1.0
        )
        async with run_server(s) as srv:
            await asyncio.sleep(1.5)
            assert (await healthz(srv.url))[0] == 200  # never answered: still starting
            vllm.hang = False
            await asyncio.sleep(1.5)
            assert (await healthz(srv.url))[0] == 200
            vllm.hang = True
            await asyncio.sleep(0.6)
            assert (await healthz(srv.url))[0] == 200  # silent, but not for long yet
            await asyncio.sleep(1.5)
            status, body = await healthz(srv.url)
            assert status == 503 and body["status"] == "vllm_unresponsive"
            vllm.hang = False
            await asyncio.sleep(1.5)
            assert (await healthz(srv.url))[0] == 200
