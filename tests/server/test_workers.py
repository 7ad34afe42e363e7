"""Several worker processes on one public port, one owner of vLLM's adapters (issue 12).

Matrix: with --workers 2, requests on fresh connections land on both processes (each writes
its own metrics file); twenty concurrent first requests for an adapter make one vLLM load; two
adapters rotating through one resident slot from both workers never reach vLLM unloaded (the
follower's hold keeps the owner from evicting under it); every scrape, whichever process
answers, shows all requests and tokens; SIGTERM to the owner drains and stops every worker.
Bounded per-adapter series (issue 14): whichever process answers, a scrape shows the owner's
one set of adapters with series of their own and "other" holding the rest, every request
counted once; an adapter that lost its slot is not shown (its values stay in the multiprocess
files) and resumes, never lower, when it is back. `GET /v1/adapters` pages are the owner's,
the same on every worker.
"""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loraplex_server.settings import default_workers

from .helpers import FakeVLLM, manifest_doc, pvc_adapter, serve_app
from .server_process import ServerProcess, server_process

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pvc_root(tiny_adapters: dict[str, Path]) -> Path:
    return tiny_adapters["ad0"].parent.parent


async def fresh_post(url: str, model: str, stream: bool = False) -> int:
    """One request on its own connection, so SO_REUSEPORT may pick either worker."""
    body = {"model": model, "prompt": "x", "max_tokens": 2, "stream": stream}
    async with aiohttp.ClientSession() as c, c.post(f"{url}/v1/completions", json=body) as r:
        await r.read()
        return r.status


async def scrape(p: ServerProcess) -> str:
    async with aiohttp.ClientSession() as c, c.get(f"{p.url}/metrics") as r:
        return await r.text()


async def test_two_workers_one_owner(tmp_path: Path, pvc_root: Path) -> None:
    fake = FakeVLLM(load_delay=0.5)
    doc = manifest_doc([pvc_adapter("ad1"), pvc_adapter("ad2")], max_loras=1)
    metrics_tmp = tmp_path / "mp"
    metrics_tmp.mkdir()
    async with (
        serve_app(fake.app()) as vurl,
        server_process(
            tmp_path,
            vurl,
            pvc_root,
            "--workers",
            "2",
            manifest=doc,
            env={"TMPDIR": str(metrics_tmp)},
        ) as p,
    ):
        for _ in range(200):  # the follower starts after the owner: wait for its metrics file
            if len({f.name for f in metrics_tmp.glob("loraplex-metrics-*/gauge_*.db")}) == 2:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # ... and for it to listen and hear from the owner
        statuses = await asyncio.gather(*[fresh_post(p.url, "ad1") for _ in range(20)])
        assert statuses == [200] * 20
        assert fake.load_calls == ["ad1"]
        # both processes served some: each writes its own counter file
        files = {f.name for f in metrics_tmp.glob("loraplex-metrics-*/counter_*.db")}
        assert len(files) == 2, files
        # rotate two adapters through one slot from both workers: never unloaded under a request
        for _ in range(2):  # two waves: each adapter has to come back into the slot
            rotating = [fresh_post(p.url, f"ad{1 + i % 2}", stream=i % 3 == 0) for i in range(40)]
            assert await asyncio.gather(*rotating) == [200] * 40
        assert len(fake.load_calls) >= 3  # they did take turns in the slot
        assert [b["model"] for b in fake.seen_bodies].count("ad2") == 40
        for _ in range(6):  # whichever process answers, the scrape shows all 100 requests
            text = await scrape(p)
            assert 'loraplex_server_requests_total{adapter="ad1",code="200"} 60.0' in text
            assert 'loraplex_server_requests_total{adapter="ad2",code="200"} 40.0' in text
            assert 'loraplex_server_completion_tokens_total{adapter="ad1"} 120.0' in text
        p.proc.send_signal(signal.SIGTERM)
        assert await p.exited(15) == 0
    assert not list(metrics_tmp.glob("loraplex-metrics-*"))  # the owner cleans up


def test_default_workers_follow_the_cpu_limit(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    for text, want in [("200000 100000\n", 2), ("150000 100000", 2), ("50000 100000", 1)]:
        cpu_max.write_text(text)
        assert default_workers(cpu_max) == want
    cpu_max.write_text("max 100000")
    assert default_workers(cpu_max) >= 1
    assert default_workers(tmp_path / "missing") >= 1


def test_workers_flag_parses() -> None:
    from loraplex_server.settings import parse_args

    base = ["--vllm-url", "http://x", "--manifest", "m", "--cache-dir", "c", "--pvc-root", "p"]
    s = parse_args([*base, "--admin-token-file", "t", "--workers", "3"])
    assert (s.workers, s.role) == (3, "owner")


def test_operator_renders_workers_and_cpu_request() -> None:
    """`--workers` follows the server container's CPU limit; the CPU request follows workers."""
    from loraplex.api.basemodel import BaseModelSpec
    from loraplex.render import server_args, server_resources, server_workers

    def spec(resources: dict[str, object] | None) -> BaseModelSpec:
        return BaseModelSpec.model_validate(
            {"model": {"source": "hf://org/m"}, "server": {"resources": resources}}
        )

    assert server_workers(spec(None)) == 2
    assert server_workers(spec({"limits": {"cpu": "3"}})) == 3
    assert server_workers(spec({"limits": {"cpu": "1500m"}})) == 2
    assert server_workers(spec({"limits": {"cpu": "junk"}})) == 2
    assert server_resources(4)["requests"]["cpu"] == "2000m"
    from loraplex_server.settings import parse_args

    assert parse_args(server_args(3)).workers == 3


def _requests_by_adapter(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in re.finditer(
        r'^loraplex_server_requests_total\{adapter="([^"]+)",code="200"\} (\S+)$', text, re.M
    ):
        out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def _labels(text: str, family: str) -> set[str]:
    return set(re.findall(rf'^{family}[_a-z]*\{{adapter="([^"]+)"', text, re.M))


async def _two_workers(tmp_path: Path, pvc_root: Path, vurl: str, *extra: str) -> Any:
    metrics_tmp = tmp_path / "mp"
    metrics_tmp.mkdir()
    doc = manifest_doc([pvc_adapter(f"ad{i}") for i in range(1, 6)], max_loras=2)
    return server_process(
        tmp_path,
        vurl,
        pvc_root,
        "--workers",
        "2",
        *extra,
        manifest=doc,
        env={"TMPDIR": str(metrics_tmp)},
    )


def _metric_files(tmp_path: Path, kind: str) -> set[str]:
    return {f.name for f in tmp_path.glob(f"mp/loraplex-metrics-*/{kind}_*.db")}


async def _both_listening(p: ServerProcess, tmp_path: Path) -> None:
    for _ in range(200):  # the follower starts after the owner: wait for its metrics file
        if len(_metric_files(tmp_path, "gauge")) == 2:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # ... and for it to listen and hear from the owner


async def test_bounded_series_are_one_set_across_workers(tmp_path: Path, pvc_root: Path) -> None:
    """Two slots, a long idle window: ad1 and ad2 keep series, ad3..ad5 count under "other",
    in every scrape whichever process writes or answers, and no request is lost."""
    fake = FakeVLLM()
    async with serve_app(fake.app()) as vurl:
        server = await _two_workers(
            tmp_path, pvc_root, vurl, "--max-adapter-series", "2", "--adapter-series-idle", "3600"
        )
        async with server as p:
            await _both_listening(p, tmp_path)
            sent = {"ad1": 7, "ad2": 5, "ad3": 4, "ad4": 3, "ad5": 2}
            for name, n in sent.items():
                for _ in range(n):
                    assert await fresh_post(p.url, name) == 200
            files = _metric_files(tmp_path, "counter")
            assert len(files) == 2, files  # both processes relayed (and wrote) some
            for _ in range(8):  # scrapes land on both processes
                text = await scrape(p)
                assert _requests_by_adapter(text) == {"ad1": 7, "ad2": 5, "other": 9}
                for family in (
                    "loraplex_server_request_duration_seconds",
                    "loraplex_server_completion_tokens_total",
                ):
                    assert _labels(text, family) == {"ad1", "ad2", "other"}, family


async def test_an_adapter_that_lost_its_slot_is_hidden_and_resumes(
    tmp_path: Path, pvc_root: Path
) -> None:
    """No idle window: each newcomer takes the least recently used slot. The adapter that lost
    it disappears from every scrape (its values stay in the files) and comes back no lower."""
    fake = FakeVLLM()
    async with serve_app(fake.app()) as vurl:
        server = await _two_workers(
            tmp_path, pvc_root, vurl, "--max-adapter-series", "2", "--adapter-series-idle", "0"
        )
        async with server as p:
            await _both_listening(p, tmp_path)
            for name in ("ad1", "ad1", "ad1", "ad2", "ad3"):
                assert await fresh_post(p.url, name) == 200
            await asyncio.sleep(0.1)
            for _ in range(6):
                text = await scrape(p)
                assert _requests_by_adapter(text) == {"ad2": 1, "ad3": 1}
                assert _labels(text, "loraplex_server_request_duration_seconds") == {"ad2", "ad3"}
            assert await fresh_post(p.url, "ad1") == 200  # back: takes ad2's slot
            await asyncio.sleep(0.1)  # a follower's scrape reuses a set fetched < 25 ms ago
            for _ in range(6):
                assert _requests_by_adapter(await scrape(p)) == {"ad1": 4, "ad3": 1}


async def test_adapter_pages_are_the_owners_on_every_worker(tmp_path: Path, pvc_root: Path) -> None:
    fake = FakeVLLM()
    async with serve_app(fake.app()) as vurl, await _two_workers(tmp_path, pvc_root, vurl) as p:
        await _both_listening(p, tmp_path)
        seen = []
        for _ in range(10):  # fresh connections: both processes answer some
            names, token = [], None
            async with aiohttp.ClientSession() as c:
                while True:
                    q = "?limit=2" + (f"&continue={token}" if token else "")
                    async with c.get(f"{p.url}/v1/adapters{q}") as r:
                        assert r.status == 200
                        page = await r.json()
                    assert len(page["adapters"]) <= 2
                    names += [a["name"] for a in page["adapters"]]
                    token = page["continue"]
                    if not token:
                        break
            seen.append(names)
            async with (
                aiohttp.ClientSession() as c,
                c.get(f"{p.url}/v1/adapters?limit=0") as r,
            ):
                assert r.status == 400
                assert (await r.json())["error"]["param"] == "limit"
        assert seen == [[f"ad{i}" for i in range(1, 6)]] * 10
        # The report's version is the owner's too: either process answers 304 to it.
        async with aiohttp.ClientSession() as c, c.get(f"{p.url}/v1/adapters") as r:
            tag = r.headers["ETag"]
        statuses = []
        for header in [tag] * 5 + ["*"] * 5:
            async with (
                aiohttp.ClientSession() as c,
                c.get(f"{p.url}/v1/adapters", headers={"If-None-Match": header}) as r,
            ):
                statuses.append(r.status)
                assert r.headers["ETag"] == tag
        assert statuses == [304] * 10
