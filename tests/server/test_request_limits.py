"""Every resource a public request can make the server take has a bound (issue 8, point 3).

Matrix: requests waiting for a loading adapter, per adapter / in total / in bytes held -> 503
with Retry-After at once, the waiting ones still served; the attack of six 7.7 MiB bodies
waiting on a slow adapter, in a server process whose RSS is measured; JSON nested 200,000 deep
-> 400 and no traceback; an oversized body -> 413; an adapter_config.json over the cap -> a
Failed adapter with a reason, the server's memory untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from loraplex_server.verify import MAX_CONFIG_BYTES

from .helpers import (
    FakeVLLM,
    make_settings,
    manifest_doc,
    pvc_adapter,
    run_server,
    serve_app,
    wait_for,
)
from .server_process import server_process

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pvc_root(tiny_adapters: dict[str, Path]) -> Path:
    return tiny_adapters["ad0"].parent.parent


async def post(
    session: aiohttp.ClientSession, url: str, body: bytes
) -> tuple[int, dict[str, Any], dict[str, str], float]:
    t0 = time.monotonic()
    async with session.post(
        f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    ) as r:
        doc = await r.json(content_type=None)
        return r.status, doc, dict(r.headers), time.monotonic() - t0


def body(model: str, pad: int = 0) -> bytes:
    return json.dumps({"model": model, "prompt": "x" * pad, "max_tokens": 1}).encode()


async def test_waiting_is_bounded_per_adapter_and_in_total(tmp_path: Path, pvc_root: Path) -> None:
    fake = FakeVLLM(load_delay=1.5)
    adapters = [pvc_adapter(f"ad{i}") for i in (1, 2, 3)]
    async with serve_app(fake.app()) as vurl:
        s = make_settings(
            tmp_path,
            vurl,
            manifest_doc(adapters, max_loras=4),
            pvc_root,
            max_waiting_per_adapter=2,
            max_waiting=3,
        )
        async with run_server(s) as srv, aiohttp.ClientSession() as c:
            await wait_for(lambda: srv.server.registry.entries["ad3"].state.value == "cached")
            waiters = [asyncio.create_task(post(c, srv.url, body("ad1"))) for _ in range(2)]
            await wait_for(lambda: srv.server.gate.waiting.count == 2)
            st, err, headers, took = await post(c, srv.url, body("ad1"))
            assert (st, err["error"]["code"]) == (503, "too_many_waiting")
            assert "--max-waiting-per-adapter" in err["error"]["message"]
            assert headers["Retry-After"] == "5" and took < 0.5
            waiters.append(asyncio.create_task(post(c, srv.url, body("ad2"))))
            await wait_for(lambda: srv.server.gate.waiting.count == 3)
            st, err, headers, took = await post(c, srv.url, body("ad3"))
            assert (st, err["error"]["code"]) == (503, "too_many_waiting")
            assert "--max-waiting)" in err["error"]["message"] and took < 0.5
            assert [r[0] for r in await asyncio.gather(*waiters)] == [200, 200, 200]
            assert srv.server.gate.waiting.count == 0 and srv.server.gate.waiting.nbytes == 0
            metrics = await (await c.get(f"{srv.url}/metrics")).text()
            assert 'loraplex_server_requests_total{adapter="ad1",code="503"} 1.0' in metrics
            # loaded adapters do not wait, so the bound no longer applies to them
            results = await asyncio.gather(*[post(c, srv.url, body("ad1")) for _ in range(8)])
            assert [r[0] for r in results] == [200] * 8


async def test_bytes_held_by_waiters_are_bounded(tmp_path: Path, pvc_root: Path) -> None:
    fake = FakeVLLM(load_delay=1.0)
    async with serve_app(fake.app()) as vurl:
        s = make_settings(
            tmp_path,
            vurl,
            manifest_doc([pvc_adapter("ad1")]),
            pvc_root,
            max_waiting_bytes=100_000,
        )
        async with run_server(s) as srv, aiohttp.ClientSession() as c:
            first = asyncio.create_task(post(c, srv.url, body("ad1", pad=60_000)))
            await wait_for(lambda: srv.server.gate.waiting.count == 1)
            assert srv.server.gate.waiting.nbytes > 60_000
            st, err, _, _ = await post(c, srv.url, body("ad1", pad=60_000))
            assert (st, err["error"]["code"]) == (503, "too_many_waiting")
            assert "--max-waiting-bytes" in err["error"]["message"]
            small = await post(c, srv.url, body("ad1", pad=10))
            assert small[0] == 200
            assert (await first)[0] == 200


async def test_json_too_deep_is_a_400_without_traceback(
    tmp_path: Path, pvc_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeVLLM()
    deep = b'{"model": "tiny", "prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    async with serve_app(fake.app()) as vurl:
        s = make_settings(tmp_path, vurl, manifest_doc([]), pvc_root, max_body_bytes=1 << 20)
        async with run_server(s) as srv, aiohttp.ClientSession() as c:
            with caplog.at_level(logging.WARNING):
                for _ in range(3):
                    st, err, _, _ = await post(c, srv.url, deep)
                    assert (st, err["error"]["code"]) == (400, "invalid_json")
                    assert "nested too deeply" in err["error"]["message"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert fake.seen_bodies == []


async def test_body_over_cap_is_413(tmp_path: Path, pvc_root: Path) -> None:
    fake = FakeVLLM()
    async with serve_app(fake.app()) as vurl:
        s = make_settings(tmp_path, vurl, manifest_doc([]), pvc_root, max_body_bytes=1000)
        async with run_server(s) as srv, aiohttp.ClientSession() as c:
            st, err, _, _ = await post(c, srv.url, body("tiny", pad=2000))
    assert (st, err["error"]["code"]) == (413, "body_too_large")
    assert "--max-body-bytes" in err["error"]["message"]
    assert fake.seen_bodies == []


async def test_oversized_adapter_config_fails_that_adapter(
    tmp_path: Path, tiny_adapters: dict[str, Path]
) -> None:
    claim = tmp_path / "pvc" / "adapters"
    shutil.copytree(tiny_adapters["ad1"], claim / "big")
    cfg = json.loads((claim / "big" / "adapter_config.json").read_text())
    cfg["padding"] = "x" * (MAX_CONFIG_BYTES + 1)
    (claim / "big" / "adapter_config.json").write_text(json.dumps(cfg))
    shutil.copytree(tiny_adapters["ad2"], claim / "ad2")
    fake = FakeVLLM()
    async with serve_app(fake.app()) as vurl:
        doc = manifest_doc([pvc_adapter("big"), pvc_adapter("ad2")])
        s = make_settings(tmp_path, vurl, doc, tmp_path / "pvc")
        async with run_server(s) as srv, aiohttp.ClientSession() as c:
            big = srv.server.registry.entries["big"]
            await wait_for(lambda: big.state.value == "failed")
            assert big.reason == "UnsupportedAdapter"
            assert f"larger than {MAX_CONFIG_BYTES} bytes" in (big.message or "")
            assert (await post(c, srv.url, body("ad2")))[0] == 200


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_six_large_bodies_waiting_do_not_blow_memory(tmp_path: Path, pvc_root: Path) -> None:
    """Issue 8's attack against a server process: RSS grew from 50 MiB to 1.2 GiB before."""
    fake = FakeVLLM(load_delay=4.0)
    # 7.7 MiB of small JSON numbers: cheap as bytes, ~30x larger once parsed into objects
    prompt = list(range(1000, 1000 + 960_000))
    big = json.dumps({"model": "ad1", "prompt": prompt, "max_tokens": 1}).encode()
    assert 7 << 20 < len(big) < 8 << 20
    app = web.Application(client_max_size=16 << 20)  # the fake's 1 MiB default is too small
    for method, path, handler in [
        ("GET", "/health", fake.health),
        ("POST", "/v1/load_lora_adapter", fake.load),
        ("POST", "/v1/completions", fake.completions),
    ]:
        app.router.add_route(method, path, handler)
    async with (
        serve_app(app) as vurl,
        server_process(tmp_path, vurl, pvc_root, adapters=[pvc_adapter("ad1")]) as p,
        aiohttp.ClientSession() as c,
    ):
        before = rss_kib(p.proc.pid)
        tasks = [asyncio.create_task(post(c, p.url, big)) for _ in range(6)]
        await asyncio.sleep(2.5)  # all six are parsed and waiting for the slow load
        during = rss_kib(p.proc.pid)
        results = await asyncio.gather(*tasks)
    assert [r[0] for r in results] == [200] * 6
    growth_mib = (during - before) / 1024
    assert growth_mib < 150, f"RSS grew {growth_mib:.0f} MiB while six bodies waited"
