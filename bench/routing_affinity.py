"""Round-robin vs adapter-affinity routing over three pods, on one skewed trace (issue 13.3).

    python -m bench.routing_affinity [--requests 1500] [--adapters 50] [--zipf 1.1]

Three real loraplex-servers, each in front of the compiled GPU-paced vLLM stand-in
(`shared/bench/sse`: `maxLoras` GPU slots with a swap delay, a delay per adapter load), serve
the same Zipf-skewed multi-adapter trace twice from a cold start: once routed round-robin (a
plain Service), once by the endpoint picker's lora-affinity rule over the pods' scraped
`/metrics` (`loraplex.devtools.epp`, scraped every 50 ms like the EPP). Reported per mode:
adapter loads and evictions per 1,000 requests (the servers' own counters), GPU slot swaps
(the stand-in's), and request latency p50/p99; then the ratios. Results go to
bench/results/routing_affinity.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from loraplex.devtools.epp import Picker
from loraplex.devtools.processes import Managed, start_server
from loraplex.devtools.ssebench import start_upstream
from loraplex.devtools.tinymodel import make_adapter, make_model

RESULTS = Path(__file__).resolve().parent / "results"
PODS = 3
MAX_LORAS = 4  # GPU slots per pod (the stand-in's -slots)
RESIDENT = 8  # adapters each server keeps loaded (maxCpuLoras)
LOAD_MS = 150  # one /v1/load_lora_adapter
SWAP_MS = 30  # a request whose adapter is not in a GPU slot
ITL_MS = 5
TOKENS = 16
CONCURRENCY = 12


def make_claim(root: Path, adapters: int) -> Path:
    """`adapters` copies of one tiny PEFT adapter as pvc://adapters/a<i>; returns the pvc root."""
    base = make_model(root / "tiny-llama")
    one = make_adapter(base, root / "one", seed=3)
    claim = root / "pvc" / "adapters"
    for i in range(adapters):
        if not (claim / f"a{i}").exists():
            shutil.copytree(one, claim / f"a{i}")
    return root / "pvc"


def trace(requests: int, adapters: int, zipf: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    weights = [1 / (k**zipf) for k in range(1, adapters + 1)]
    return rng.choices([f"a{i}" for i in range(adapters)], weights=weights, k=requests)


@contextlib.contextmanager
def pods(work: Path, pvc_root: Path, adapters: int) -> Iterator[tuple[list[str], list[str]]]:
    """Three cold pods: (server URLs, stand-in URLs)."""
    procs: list[Managed] = []
    servers: list[str] = []
    upstreams: list[str] = []
    try:
        for i in range(PODS):
            d = work / f"pod{i}"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            up = start_upstream(
                d / "upstream.log",
                base="tiny",
                itl_ms=ITL_MS,
                slots=MAX_LORAS,
                swap_ms=SWAP_MS,
                load_ms=LOAD_MS,
            )
            procs.append(up)
            manifest = {
                "generation": 1,
                "baseServedName": "tiny",
                "maxLoras": MAX_LORAS,
                "maxLoraRank": 8,
                "maxCpuLoras": RESIDENT,
                # The compiled stand-in answers without logprobs, so it cannot be probed; the
                # probe is shown against real vLLM (tests/server/test_vllm_probe.py).
                "checks": {"probe": False},
                "adapters": [
                    {"name": f"a{j}", "servedName": f"a{j}", "source": f"pvc://adapters/a{j}"}
                    for j in range(adapters)
                ],
            }
            (d / "manifest.json").write_text(json.dumps(manifest))
            (d / "token").write_text("bench\n")
            server, _ = start_server(
                vllm_url=up.url,
                manifest=d / "manifest.json",
                cache_dir=d / "cache",
                pvc_root=pvc_root,
                admin_token_file=d / "token",
                log_path=d / "server.log",
                extra_args=["--load-timeout", "120"],
            )
            procs.append(server)
            servers.append(server.url)
            upstreams.append(up.url)
        yield servers, upstreams
    finally:
        for p in procs:
            p.stop()


async def counter(session: aiohttp.ClientSession, url: str, family: str) -> float:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == family
        for s in f.samples
        if not s.name.endswith("_created")
    )


async def run_mode(
    mode: str, servers: list[str], upstreams: list[str], names: list[str]
) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    rr = itertools.cycle(servers)
    queue = list(reversed(names))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        picker = Picker(servers, seed=11)
        if mode == "affinity":
            await picker.scrape(s)
            picker.start(s)

        async def worker() -> None:
            nonlocal errors
            while queue:
                adapter = queue.pop()
                pod = picker.pick(adapter) if mode == "affinity" else next(rr)
                body = {"model": adapter, "prompt": "hi", "max_tokens": TOKENS, "stream": True}
                t0 = time.perf_counter()
                async with s.post(pod + "/v1/completions", json=body) as resp:
                    async for _ in resp.content.iter_any():
                        pass
                    if resp.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        wall = time.perf_counter() - t0
        await picker.stop()
        loads = sum([await counter(s, u, "loraplex_server_adapter_loads") for u in servers])
        evictions = sum([await counter(s, u, "loraplex_server_adapter_evictions") for u in servers])
        swaps = sum([await counter(s, u, "standin_slot_swaps") for u in upstreams])
    latencies.sort()
    per_k = 1000 / len(names)
    return {
        "mode": mode,
        "requests": len(names),
        "errors": errors,
        "seconds": round(wall, 2),
        "loads_per_1k": round(loads * per_k, 1),
        "evictions_per_1k": round(evictions * per_k, 1),
        "gpu_slot_swaps_per_1k": round(swaps * per_k, 1),
        "latency_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "latency_p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1000, 1),
    }


def markdown(result: dict[str, Any]) -> str:
    rr, aff = result["round_robin"], result["affinity"]
    keys = [
        ("loads_per_1k", "adapter loads / 1k requests"),
        ("evictions_per_1k", "evictions / 1k requests"),
        ("gpu_slot_swaps_per_1k", "GPU slot swaps / 1k requests"),
        ("latency_p50_ms", "request latency p50 (ms)"),
        ("latency_p99_ms", "request latency p99 (ms)"),
        ("seconds", "wall time (s)"),
    ]
    lines = [
        "| metric | round-robin | lora-affinity | ratio (rr / affinity) |",
        "|---|---|---|---|",
    ]
    for key, label in keys:
        ratio = rr[key] / aff[key] if aff[key] else float("inf")
        lines.append(f"| {label} | {rr[key]} | {aff[key]} | {ratio:.1f}x |")
    lines.append(f"| errors | {rr['errors']} | {aff['errors']} | |")
    return "\n".join(lines)


def run(requests: int, adapters: int, zipf: float, seed: int = 5) -> dict[str, Any]:
    names = trace(requests, adapters, zipf, seed)
    result: dict[str, Any] = {
        "pods": PODS,
        "adapters": adapters,
        "zipf": zipf,
        "max_loras": MAX_LORAS,
        "resident": RESIDENT,
        "load_ms": LOAD_MS,
        "swap_ms": SWAP_MS,
        "concurrency": CONCURRENCY,
    }
    with tempfile.TemporaryDirectory(prefix="loraplex-routing-") as tmp:
        work = Path(tmp)
        pvc_root = make_claim(work / "fixtures", adapters)
        for mode in ("round_robin", "affinity"):
            with pods(work / mode, pvc_root, adapters) as (servers, upstreams):
                result[mode] = asyncio.run(run_mode(mode, servers, upstreams, names))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1500)
    p.add_argument("--adapters", type=int, default=50)
    p.add_argument("--zipf", type=float, default=1.1)
    args = p.parse_args()
    result = run(args.requests, args.adapters, args.zipf)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "routing_affinity.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
