"""Benchmark of the adapter-switching server against the vLLM it fronts.

`python -m bench.server_bench` (or `run()` from Python) starts one CPU vLLM with a tiny
generated model and eight adapters, puts loraplex-server in front of it, and measures, in one
run and against the same vLLM:

1. the server's added latency and throughput cost: the same streamed completions sent
   straight to vLLM and through the server, alternating rounds so drift hits both alike;
2. the time from a manifest push (admin PUT) to the first successful request for a new
   adapter read from a local (pvc) path;
3. throughput when 8 adapters rotate over vLLM's 2 LoRA slots versus 1 adapter.

It prints a markdown table and the JSON behind it. Numbers from a 2-core CPU box with a tiny
model measure the server's overhead, not GPU serving speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from loraplex.devtools.processes import Managed, start_server, start_vllm, wait_http
from loraplex.devtools.tinymodel import make_adapter, make_model

TOKEN = "bench-token"
PROMPT = "select name from users where"
ADAPTERS = [f"bench-{i}" for i in range(8)]


@dataclass
class Load:
    """Results of one load-generator phase."""

    ttfb: list[float]
    total: list[float]
    seconds: float
    errors: int
    statuses: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        n = len(self.total)
        return {
            "requests": n,
            "errors": self.errors,
            "error_statuses": sorted(set(self.statuses)),
            "ttfb_p50_ms": 1000 * _pct(self.ttfb, 50),
            "ttfb_p95_ms": 1000 * _pct(self.ttfb, 95),
            "total_p50_ms": 1000 * _pct(self.total, 50),
            "req_per_s": n / self.seconds if self.seconds else 0.0,
        }


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


async def _one(
    session: aiohttp.ClientSession, url: str, model: str, max_tokens: int, out: Load
) -> None:
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    first = None
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                out.errors += 1
                out.statuses.append(resp.status)
                await resp.read()
                return
            async for _chunk in resp.content.iter_any():
                if first is None:
                    first = time.perf_counter() - t0
            out.ttfb.append(first or 0.0)
            out.total.append(time.perf_counter() - t0)
    except aiohttp.ClientError:
        out.errors += 1


async def load(
    url: str, models: list[str], requests: int, concurrency: int, max_tokens: int
) -> Load:
    """`requests` streamed completions, `concurrency` at a time, models round-robin."""
    out = Load([], [], 0.0, 0)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(models[i % len(models)])
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker() -> None:
            while not queue.empty():
                await _one(session, url, queue.get_nowait(), max_tokens, out)

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        out.seconds = time.perf_counter() - t0
    return out


def _merge(a: Load, b: Load) -> Load:
    return Load(
        a.ttfb + b.ttfb,
        a.total + b.total,
        a.seconds + b.seconds,
        a.errors + b.errors,
        a.statuses + b.statuses,
    )


def _manifest(generation: int, names: list[str], pinned: str | None = None) -> dict[str, Any]:
    return {
        "generation": generation,
        "baseServedName": "tiny",
        "maxLoras": 2,
        "maxLoraRank": 8,
        "maxCpuLoras": 4,
        "adapters": [
            {"name": n, "servedName": n, "source": f"pvc://adapters/{n}", "pinned": n == pinned}
            for n in names
        ],
    }


def _put(admin: str, doc: dict[str, Any]) -> None:
    req = urllib.request.Request(
        f"{admin}/admin/manifest",
        data=json.dumps(doc).encode(),
        method="PUT",
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30):
        pass


async def _first_success(url: str, model: str, t0: float, limit: float = 60.0) -> float:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    async with aiohttp.ClientSession() as s:
        while time.perf_counter() - t0 < limit:
            async with s.post(f"{url}/v1/completions", json=body) as resp:
                await resp.read()
                if resp.status == 200:
                    return time.perf_counter() - t0
            await asyncio.sleep(0.005)
    raise TimeoutError(f"{model} not served {limit}s after the push")


def _cpu_seconds(pid: int) -> float:
    """User+system CPU of one process (Linux /proc), to show what the server itself costs."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _phases(
    vllm_url: str,
    url: str,
    admin: str,
    server_pid: int,
    requests: int,
    concurrency: int,
    max_tokens: int,
) -> dict[str, Any]:
    # Warm both paths (and load the pinned adapter) so the first phase is not penalised.
    await load(url, ["tiny", ADAPTERS[0]], 8, 4, max_tokens)
    await load(vllm_url, ["tiny", ADAPTERS[0]], 8, 4, max_tokens)
    direct, proxied = Load([], [], 0.0, 0), Load([], [], 0.0, 0)
    models = ["tiny", ADAPTERS[0]]  # ADAPTERS[0] is pinned, so vLLM direct knows it too
    rounds = 6
    ratios = []
    cpu0 = _cpu_seconds(server_pid)
    for _ in range(rounds):
        part = requests // rounds
        d_round = await load(vllm_url, models, part, concurrency, max_tokens)
        p_round = await load(url, models, part, concurrency, max_tokens)
        direct, proxied = _merge(direct, d_round), _merge(proxied, p_round)
        ratios.append(p_round.summary()["req_per_s"] / d_round.summary()["req_per_s"])
    server_cpu = _cpu_seconds(server_pid) - cpu0
    d, p = direct.summary(), proxied.summary()
    overhead = {
        "direct": d,
        "server": p,
        "ttfb_p50_added_ms": p["ttfb_p50_ms"] - d["ttfb_p50_ms"],
        "throughput_ratio": p["req_per_s"] / d["req_per_s"] if d["req_per_s"] else 0.0,
        "throughput_ratio_per_round": [round(r, 3) for r in ratios],
        "throughput_ratio_median": statistics.median(ratios),
        "server_cpu_ms_per_request": 1000 * server_cpu / max(1, len(proxied.total)),
    }
    # Manifest push -> first success, for adapters the pod has never seen.
    push_times = []
    generation = 10
    for name in ADAPTERS[5:8]:
        generation += 1
        t0 = time.perf_counter()
        await asyncio.to_thread(
            _put, admin, _manifest(generation, [*ADAPTERS[:5], name], ADAPTERS[0])
        )
        push_times.append(await _first_success(url, name, t0))
    await asyncio.to_thread(_put, admin, _manifest(generation + 1, ADAPTERS))
    # Rotation: 8 adapters over 2 slots vs 1 adapter, same request count and concurrency.
    one = (await load(url, [ADAPTERS[1]], requests, concurrency, max_tokens)).summary()
    eight = (await load(url, ADAPTERS, requests, concurrency, max_tokens)).summary()
    return {
        "overhead": overhead,
        "push_to_first_success_ms": {
            "runs": [round(1000 * t, 1) for t in push_times],
            "median": 1000 * statistics.median(push_times),
        },
        "rotation": {
            "one_adapter": one,
            "eight_adapters_two_slots": eight,
            "throughput_ratio": eight["req_per_s"] / one["req_per_s"] if one["req_per_s"] else 0,
        },
    }


def run(
    requests: int = 192, concurrency: int = 8, max_tokens: int = 16, workdir: Path | None = None
) -> dict[str, Any]:
    """Start vLLM + server, run every phase, stop both; return the numbers."""
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-") as tmp:
        root = workdir or Path(tmp)
        base = make_model(root / "models" / "tiny")
        for i, name in enumerate(ADAPTERS):
            make_adapter(base, root / "pvc" / "adapters" / name, seed=200 + i)
        (root / "token").write_text(TOKEN)
        (root / "manifest.json").write_text(json.dumps(_manifest(1, ADAPTERS[:5], ADAPTERS[0])))
        t0 = time.perf_counter()
        vllm = start_vllm(base, "tiny", log_path=root / "vllm.log")
        vllm_start = time.perf_counter() - t0
        server: Managed | None = None
        try:
            server, admin = start_server(
                vllm_url=vllm.url,
                manifest=root / "manifest.json",
                cache_dir=root / "cache",
                pvc_root=root / "pvc",
                admin_token_file=root / "token",
                log_path=root / "server.log",
                extra_args=["--log-level", "WARNING"],
            )

            wait_http(server, "/readyz", 60)
            result = asyncio.run(
                _phases(vllm.url, server.url, admin, server.pid, requests, concurrency, max_tokens)
            )
        finally:
            if server is not None:
                server.stop()
            vllm.stop()
    result["setup"] = {
        "requests_per_phase": requests,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "vllm_start_s": round(vllm_start, 1),
        "max_loras": 2,
        "adapters": len(ADAPTERS),
    }
    return result


def markdown(r: dict[str, Any]) -> str:
    o, rot, push = r["overhead"], r["rotation"], r["push_to_first_success_ms"]
    d, s = o["direct"], o["server"]
    rows = [
        (
            "TTFB p50, vLLM direct / via server (ms)",
            f"{d['ttfb_p50_ms']:.1f} / {s['ttfb_p50_ms']:.1f} (+{o['ttfb_p50_added_ms']:.1f})",
        ),
        (
            "TTFB p95, vLLM direct / via server (ms)",
            f"{d['ttfb_p95_ms']:.1f} / {s['ttfb_p95_ms']:.1f}",
        ),
        (
            "Request p50, vLLM direct / via server (ms)",
            f"{d['total_p50_ms']:.1f} / {s['total_p50_ms']:.1f}",
        ),
        (
            "Throughput, vLLM direct / via server (req/s)",
            f"{d['req_per_s']:.2f} / {s['req_per_s']:.2f} (ratio {o['throughput_ratio']:.3f}; "
            f"median of per-round ratios {o['throughput_ratio_median']:.3f})",
        ),
        ("Server CPU per proxied request (ms)", f"{o['server_cpu_ms_per_request']:.2f}"),
        (
            "Manifest push -> first success, new pvc adapter (ms)",
            f"median {push['median']:.0f} (runs {push['runs']})",
        ),
        (
            "Throughput, 1 adapter / 8 adapters over 2 slots (req/s)",
            f"{rot['one_adapter']['req_per_s']:.2f} / "
            f"{rot['eight_adapters_two_slots']['req_per_s']:.2f} "
            f"(ratio {rot['throughput_ratio']:.3f})",
        ),
        (
            "Errors (direct, server, 1 adapter, 8 adapters)",
            f"{d['errors']}, {s['errors']}, {rot['one_adapter']['errors']}, "
            f"{rot['eight_adapters_two_slots']['errors']}",
        ),
    ]
    out = ["| measure | result |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--requests", type=int, default=192)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--workdir", type=Path, help="keep models and logs here (default: temp)")
    a = p.parse_args()
    result = run(a.requests, a.concurrency, a.max_tokens, a.workdir)
    print(markdown(result))
    print()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
