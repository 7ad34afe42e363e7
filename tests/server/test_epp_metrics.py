"""The metric families the endpoint picker reads (issue 13.2), built by `epp_metrics.merge`.

| case | checks |
|---|---|
| vLLM text present | all vLLM families but two pass unchanged; prometheus_client parses it |
| lora_requests_info | ours: loaded = running, loading for a request = waiting, max_lora |
| num_requests_waiting | vLLM's queue plus the requests we hold while an adapter loads |
| vLLM unreachable | the two families are still exported |
| cost | a merge of a realistic exposition stays well under the EPP's 50 ms scrape period |
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loraplex_server.epp_metrics import LoraState, merge

from .helpers import (
    FakeVLLM,
    make_settings,
    manifest_doc,
    pvc_adapter,
    run_server,
    serve_app,
    wait_for,
)

STATE = LoraState(max_lora=4, running=("sql", "chat"), waiting=("legal",), held_requests=3)


def vllm_exposition(waiting: float = 2, lora_running: str = "sql") -> str:
    """What vLLM's prometheus_client registry writes (same library, same text format)."""
    r = CollectorRegistry()
    labels = {"engine": "0", "model_name": "base"}
    Gauge("vllm:num_requests_running", "Running.", list(labels), registry=r).labels(**labels).set(5)
    Gauge("vllm:num_requests_waiting", "Waiting.", list(labels), registry=r).labels(**labels).set(
        waiting
    )
    Gauge("vllm:kv_cache_usage_perc", "KV usage.", list(labels), registry=r).labels(**labels).set(
        0.42
    )
    info = ["max_lora", "running_lora_adapters", "waiting_lora_adapters"]
    Gauge("vllm:lora_requests_info", "LoRA.", info, registry=r).labels(
        max_lora="2", running_lora_adapters=lora_running, waiting_lora_adapters=""
    ).set(1.7e9)
    Counter("vllm:prompt_tokens", "Prompt tokens.", list(labels), registry=r).labels(**labels).inc(
        1234
    )
    h = Histogram("vllm:time_to_first_token_seconds", "TTFT.", list(labels), registry=r)
    h.labels(**labels).observe(0.05)
    return generate_latest(r).decode()


def families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        assert fam.name not in out, f"family {fam.name} exported twice"
        out[fam.name] = [(s.labels, s.value) for s in fam.samples]
    return out


def test_lora_info_is_ours_and_lists_loaded_adapters_as_running() -> None:
    fams = families(merge(vllm_exposition(), STATE, now=1.8e9))
    ((labels, value),) = fams["vllm:lora_requests_info"]
    assert labels == {
        "max_lora": "4",
        "running_lora_adapters": "sql,chat",
        "waiting_lora_adapters": "legal",
    }
    assert value == 1.8e9  # a timestamp: the EPP keeps the newest series


def test_waiting_counts_requests_held_for_a_load() -> None:
    fams = families(merge(vllm_exposition(waiting=2), STATE, now=1.0))
    ((labels, value),) = fams["vllm:num_requests_waiting"]
    assert value == 2 + 3
    assert labels == {"engine": "0", "model_name": "base"}


def test_other_vllm_families_pass_through_unchanged() -> None:
    text = vllm_exposition()
    original = families(text)
    merged = families(merge(text, STATE, now=1.0))
    for name, samples in original.items():
        if name in ("vllm:lora_requests_info", "vllm:num_requests_waiting"):
            continue
        assert merged[name] == samples, name
    assert merged["vllm:kv_cache_usage_perc"] == [({"engine": "0", "model_name": "base"}, 0.42)]


def test_vllm_unreachable_still_exports_adapters_and_queue() -> None:
    fams = families(merge(None, STATE, now=1.0))
    assert fams["vllm:num_requests_waiting"] == [({}, 3.0)]
    assert fams["vllm:lora_requests_info"][0][0]["running_lora_adapters"] == "sql,chat"


def test_nothing_held_leaves_vllm_waiting_as_is() -> None:
    idle = LoraState(max_lora=2, running=(), waiting=(), held_requests=0)
    fams = families(merge(vllm_exposition(waiting=7), idle, now=1.0))
    assert fams["vllm:num_requests_waiting"][0][1] == 7
    assert fams["vllm:lora_requests_info"][0][0]["running_lora_adapters"] == ""


def test_merge_is_cheap_enough_for_a_50ms_scrape() -> None:
    # A large exposition: vLLM's families plus many histogram series, about 200 kB.
    big = vllm_exposition() + "".join(f"vllm:filler_{i} {i}\n" for i in range(8000))
    t0 = time.perf_counter()
    for _ in range(50):
        merge(big, STATE, now=1.0)
    per_scrape = (time.perf_counter() - t0) / 50
    assert per_scrape < 0.002, f"{per_scrape * 1e3:.2f} ms per scrape"


async def test_a_running_server_reports_waiting_while_loading_then_running(
    tmp_path: Path, tiny_adapters: dict[str, Path]
) -> None:
    """The real server: requests held for a slow load show as waiting, then as running."""
    pvc_root = tiny_adapters["ad0"].parent.parent
    fake = FakeVLLM(load_delay=1.0)
    ads = [pvc_adapter("ad1"), pvc_adapter("ad2")]
    async with serve_app(fake.app()) as vurl:
        s = make_settings(tmp_path, vurl, manifest_doc(ads, max_loras=2), pvc_root)
        async with run_server(s) as srv, aiohttp.ClientSession() as http:

            async def scrape() -> dict[str, list[tuple[dict[str, str], float]]]:
                async with http.get(f"{srv.url}/metrics") as resp:
                    return families(await resp.text())

            body = {"model": "ad1", "prompt": "x", "max_tokens": 2}
            held = [
                asyncio.create_task(http.post(f"{srv.url}/v1/completions", json=body))
                for _ in range(3)
            ]
            await wait_for(lambda: fake.load_calls == ["ad1"])
            during = await scrape()
            ((info, _),) = during["vllm:lora_requests_info"]
            assert info["waiting_lora_adapters"] == "ad1"
            assert info["running_lora_adapters"] == ""
            assert info["max_lora"] == "2"
            assert during["vllm:num_requests_waiting"] == [({}, 3.0)]
            for resp in await asyncio.gather(*held):
                assert resp.status == 200
                resp.release()
            after = await scrape()
            ((info, _),) = after["vllm:lora_requests_info"]
            assert (info["running_lora_adapters"], info["waiting_lora_adapters"]) == ("ad1", "")
            assert after["vllm:num_requests_waiting"] == [({}, 0.0)]
            # loraplex's own families are still there, in the same scrape.
            assert "loraplex_server_adapter_loads" in after
