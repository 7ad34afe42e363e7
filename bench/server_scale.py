"""The adapter-server with 10,000 declared adapters: memory per adapter and list latency.

Starts the real server process twice against a stand-in vLLM (the tests' FakeVLLM, served in
this process on loopback): once with 0 declared adapters, once with N (default 10,000), all
`pvc://` sources pointing at one small generated PEFT adapter, the manifest mounted as index
+ gzip shards as the operator writes it. Once every adapter is `cached`, it reads the
process's RSS and times `/v1/models`, `GET /v1/adapters` (whole, and one page of 1,000) and
`/metrics`; then again with `--workers 2` (fresh connections land on the owner or the
follower: pages come from the owner either way). Prints a JSON line; run:

    python bench/server_scale.py --adapters 10000 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from loraplex.devtools.processes import start_server
from loraplex.devtools.tinymodel import make_adapter, make_model
from loraplex_server import manifest_shards
from loraplex_server.manifest import AdapterManifest
from tests.server.helpers import FakeVLLM, serve_app


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def manifest(n: int) -> AdapterManifest:
    return AdapterManifest.model_validate(
        {
            "generation": 1,
            "baseServedName": "tiny",
            "maxLoras": 2,
            "maxLoraRank": 8,
            "maxCpuLoras": 4,
            # The stand-in vLLM returns no logprobs to probe with: with probes on (the
            # default since adapters are proven before Ready) every adapter would fail.
            "checks": {"probe": False},
            "adapters": [
                {"name": f"t-{i:05d}", "servedName": f"t-{i:05d}", "source": "pvc://adapters/a"}
                for i in range(n)
            ],
        }
    )


async def timed(s: aiohttp.ClientSession, url: str, repeat: int = 5) -> float:
    """Median seconds of `repeat` GETs, each on a fresh connection (with several workers the
    kernel spreads connections over all of them)."""
    times = []
    fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
    async with fresh:
        for _ in range(repeat):
            t0 = time.monotonic()
            async with fresh.get(url) as r:
                assert r.status == 200, (url, r.status)
                await r.read()
            times.append(time.monotonic() - t0)
    return sorted(times)[len(times) // 2]


async def one_run(root: Path, pvc: Path, vllm_url: str, n: int, workers: int = 1) -> dict[str, Any]:
    folder = root / f"run-{n}-{workers}"
    (folder / "manifest").mkdir(parents=True)
    index, chunks = manifest_shards.split(manifest(n), lambda i: f"bench-manifest-{i}")
    for ref, chunk in zip(index.shards, chunks, strict=True):
        (folder / "manifest" / ref.key).write_bytes(chunk)
    (folder / "manifest" / "manifest.json").write_text(index.model_dump_json(by_alias=True))
    (folder / "token").write_text("bench-token")
    t0 = time.monotonic()
    proc, _ = await asyncio.to_thread(
        start_server,
        vllm_url=vllm_url,
        manifest=folder / "manifest" / "manifest.json",
        cache_dir=folder / "cache",
        pvc_root=pvc,
        admin_token_file=folder / "token",
        log_path=folder / "server.log",
        extra_args=["--workers", str(workers)],
        wait=120.0,
    )
    try:
        url = proc.url
        async with aiohttp.ClientSession() as s:
            while True:
                async with s.get(f"{url}/metrics") as r:
                    text = await r.text()
                m = re.search(r'loraplex_server_adapters\{state="cached"\} (\S+)', text)
                if m and float(m.group(1)) >= n:
                    break
                failed = re.search(r'loraplex_server_adapters\{state="failed"\} (\S+)', text)
                if failed and float(failed.group(1)) > 0:  # never settles: say so, not hang
                    raise RuntimeError(f"{failed.group(1)} adapters failed; see {folder}")
                await asyncio.sleep(0.25)
            settled = time.monotonic() - t0
            await asyncio.sleep(1.0)
            rss = rss_bytes(proc.pid)
            return {
                "adapters": n,
                "workers": workers,
                "settled_s": round(settled, 2),
                "rss_mb": round(rss / 1e6, 1),
                "models_ms": round(1000 * await timed(s, f"{url}/v1/models"), 1),
                "adapters_all_ms": round(1000 * await timed(s, f"{url}/v1/adapters"), 1),
                "adapters_page_ms": round(
                    1000 * await timed(s, f"{url}/v1/adapters?limit=1000"), 1
                ),
                "metrics_ms": round(1000 * await timed(s, f"{url}/metrics"), 1),
                "manifest_shards": len(index.shards),
            }
    finally:
        await asyncio.to_thread(proc.stop)


async def main(n: int, workers: int) -> None:
    with tempfile.TemporaryDirectory(prefix="loraplex-server-scale-") as tmp:
        root = Path(tmp)
        base = await asyncio.to_thread(make_model, root / "tiny")
        await asyncio.to_thread(make_adapter, base, root / "pvc" / "adapters" / "a")
        vllm = FakeVLLM()
        async with serve_app(vllm.app()) as vllm_url:
            empty = await one_run(root, root / "pvc", vllm_url, 0)
            full = await one_run(root, root / "pvc", vllm_url, n)
            # Several workers: pages and scrapes answered by followers too (the owner's RSS).
            many = await one_run(root, root / "pvc", vllm_url, n, workers) if workers > 1 else None
        per = (full["rss_mb"] - empty["rss_mb"]) * 1e6 / max(n, 1)
        out = {"empty": empty, "full": full, "rss_bytes_per_adapter": round(per)}
        print(json.dumps(out | ({"workers": many} if many else {})))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2, help="also run with this many workers")
    args = ap.parse_args()
    asyncio.run(main(args.adapters, args.workers))
