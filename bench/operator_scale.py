"""Operator scale benchmark: 1,000 LoRAAdapters across 20 BaseModels against the API stand-in.

Reports the time from the first apply until every BaseModel's manifest holds every one of
its adapters, the operator process's peak RSS, and the API calls the operator made per
adapter. The operator runs as a real process (as in its container), the emulator in this one.

    python -m bench.operator_scale [--bases 20] [--adapters 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from loraplex import naming
from loraplex.devtools.emulator import running_emulator
from loraplex.devtools.operator_proc import OperatorProcess
from loraplex.kube import Connection, KubeClient
from loraplex_server import manifest_shards


def _bm(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "loraplex.io/v1alpha1",
        "kind": "BaseModel",
        "metadata": {"name": f"base-{i:02d}", "namespace": "default"},
        "spec": {
            "model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct"},
            "gpu": {"product": "H100-80GB"},
        },
    }


def _lora(i: int, bases: int) -> dict[str, Any]:
    return {
        "apiVersion": "loraplex.io/v1alpha1",
        "kind": "LoRAAdapter",
        "metadata": {"name": f"adapter-{i:04d}", "namespace": "default"},
        "spec": {
            "baseModel": f"base-{i % bases:02d}",
            "source": f"hf://org/adapter-{i:04d}",
            "rank": 8 if i % 2 else 16,
        },
    }


async def run(
    bases: int = 20, adapters: int = 1000, timeout: float = 600, preload: bool = False
) -> dict[str, Any]:
    """One scenario. `preload`: the objects exist before the operator starts (a restart, or
    an install into a busy cluster); otherwise they are applied over HTTP while it runs."""
    with tempfile.TemporaryDirectory() as tmp:
        async with running_emulator(Path(tmp)) as cluster:
            if preload:
                for i in range(bases):
                    cluster.emulator.preload("loraplex.io/v1alpha1/basemodels", _bm(i))
                for i in range(adapters):
                    cluster.emulator.preload("loraplex.io/v1alpha1/loraadapters", _lora(i, bases))
            start = time.monotonic()
            op = OperatorProcess(cluster.kubeconfig, Path(tmp)).start()
            client = KubeClient(Connection(server=cluster.url), user_agent="loraplex-bench")
            peak = 0
            try:
                if not preload:
                    await asyncio.sleep(2)  # let the operator start watching
                    start = time.monotonic()
                    for i in range(bases):
                        await client.apply(_bm(i))
                    sem = asyncio.Semaphore(16)

                    async def create(i: int) -> None:
                        async with sem:
                            await client.apply(_lora(i, bases))

                    await asyncio.gather(*(create(i) for i in range(adapters)))
                applied = time.monotonic() - start
                expected = {
                    f"base-{b:02d}": adapters // bases + (1 if b < adapters % bases else 0)
                    for b in range(bases)
                }
                done_at = None
                while time.monotonic() - start < timeout:
                    peak = max(peak, op.rss_bytes())
                    counts = {}
                    cms = cluster.emulator.objects_of("v1/configmaps", "default")
                    by_name = {cm["metadata"]["name"]: cm for cm in cms}
                    for cm in cms:
                        if naming.MANIFEST_KEY not in (cm.get("data") or {}):
                            continue  # a shard; read through its index
                        base = cm["metadata"]["labels"][naming.BASE_LABEL]
                        try:
                            manifest = manifest_shards.from_configmaps(cm, by_name)
                        except (manifest_shards.TornManifest, ValueError):
                            continue
                        counts[base] = len(manifest.adapters)
                    if counts == expected:
                        done_at = time.monotonic() - start
                        break
                    await asyncio.sleep(0.25)
                # Let status writes settle, then keep sampling memory for a moment.
                for _ in range(8):
                    peak = max(peak, op.rss_bytes())
                    await asyncio.sleep(0.25)
            finally:
                await client.close()
                await asyncio.to_thread(op.stop)
            calls: Counter[str] = Counter(
                r.method for r in cluster.requests(exclude_agent="loraplex-bench")
            )
    total = sum(calls.values())
    return {
        "scenario": "preloaded, operator started" if preload else "applied while running",
        "bases": bases,
        "adapters": adapters,
        "apply_seconds": round(applied, 2),
        "converged_seconds": None if done_at is None else round(done_at, 2),
        "operator_peak_rss_mb": round(peak / 2**20, 1),
        "api_calls_total": total,
        "api_calls_per_adapter": round(total / adapters, 2),
        "api_calls_by_method": dict(calls),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bases", type=int, default=20)
    ap.add_argument("--adapters", type=int, default=1000)
    args = ap.parse_args()
    results = [asyncio.run(run(args.bases, args.adapters, preload=p)) for p in (True, False)]
    print(json.dumps(results, indent=2))
    print()
    print(
        "| scenario | BaseModels | LoRAAdapters | all manifests complete (s) | "
        "operator peak RSS (MB) | API calls / adapter |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['scenario']} | {r['bases']} | {r['adapters']} | {r['converged_seconds']} | "
            f"{r['operator_peak_rss_mb']} | {r['api_calls_per_adapter']} |"
        )


if __name__ == "__main__":
    main()
