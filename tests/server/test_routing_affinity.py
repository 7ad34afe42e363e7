"""Adapter-affinity routing shown without a cluster (issue 13.3).

Three real adapter-servers, each in front of the compiled GPU-paced vLLM stand-in (two
adapter slots each), are scraped the way the endpoint picker scrapes them; requests are
routed by the lora-affinity scorer's published rule (`loraplex.devtools.epp`) over what the
servers' `/metrics` say. Shown: requests for an adapter go to the pod that holds it, new
adapters spread by free capacity, and no adapter is loaded twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.devtools.epp import Picker
from loraplex.devtools.processes import Managed, start_server
from loraplex.devtools.ssebench import start_upstream

ADAPTERS = [f"ad{i}" for i in range(6)]
SLOTS = 2


@pytest.fixture
def pods(tmp_path: Path, tiny_adapters: dict[str, Path]) -> Iterator[list[str]]:
    pvc_root = next(iter(tiny_adapters.values())).parent.parent
    procs: list[Managed] = []
    urls: list[str] = []
    try:
        for i in range(3):
            d = tmp_path / f"pod{i}"
            d.mkdir()
            upstream = start_upstream(d / "upstream.log", base="tiny", load_ms=20)
            procs.append(upstream)
            manifest = {
                "generation": 1,
                "baseServedName": "tiny",
                "maxLoras": SLOTS,
                "maxLoraRank": 8,
                "maxCpuLoras": SLOTS,
                # The compiled stand-in answers without logprobs, so it cannot be probed; the
                # probe is shown against real vLLM (tests/server/test_vllm_probe.py).
                "checks": {"probe": False},
                "adapters": [
                    {"name": a, "servedName": a, "source": f"pvc://adapters/{a}"} for a in ADAPTERS
                ],
            }
            (d / "manifest.json").write_text(json.dumps(manifest))
            (d / "token").write_text("t0ken\n")
            server, _ = start_server(
                vllm_url=upstream.url,
                manifest=d / "manifest.json",
                cache_dir=d / "cache",
                pvc_root=pvc_root,
                admin_token_file=d / "token",
                log_path=d / "server.log",
            )
            procs.append(server)
            urls.append(server.url)
        yield urls
    finally:
        for p in procs:
            p.stop()


async def complete(session: aiohttp.ClientSession, pod: str, adapter: str) -> None:
    body = {"model": adapter, "prompt": "hi", "max_tokens": 4}
    async with session.post(pod + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()


async def loads(session: aiohttp.ClientSession, pod: str) -> float:
    async with session.get(pod + "/metrics") as resp:
        text = await resp.text()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == "loraplex_server_adapter_loads"
        for s in f.samples
        if s.name.endswith("_total")
    )


async def test_requests_follow_their_adapter_and_new_adapters_spread(pods: list[str]) -> None:
    picker = Picker(pods, seed=7)
    placed: dict[str, str] = {}
    async with aiohttp.ClientSession() as s:
        await picker.scrape(s)
        assert all(m.max_lora == SLOTS and not m.running for m in picker.metrics.values())
        for adapter in ADAPTERS:
            await picker.scrape(s)
            placed[adapter] = picker.pick(adapter)
            await complete(s, placed[adapter], adapter)

        await picker.scrape(s)
        for pod in pods:
            mine = {a for a, p in placed.items() if p == pod}
            # Spread by free capacity: a full pod scores 0 for a new adapter, a pod with room 0.8.
            assert len(mine) == SLOTS, placed
            # Loaded but idle adapters are reported as running (vLLM's own series would not).
            assert picker.metrics[pod].running == mine

        for _ in range(3):
            for adapter in ADAPTERS:
                await picker.scrape(s)
                pod = picker.pick(adapter)
                assert pod == placed[adapter], f"{adapter} went to {pod}, held by {placed[adapter]}"
                await complete(s, pod, adapter)

        # Every adapter was loaded exactly once, on its own pod: no thrash.
        assert sum([await loads(s, pod) for pod in pods]) == len(ADAPTERS)
