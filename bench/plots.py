"""Plots for docs/benchmarks.md, from bench/results/latest.json (what `bench.run_all` writes).

    python -m bench.plots [--results bench/results/latest.json] [--out docs/img]

Benchmarks missing from the results file are skipped, except the planner's, which falls back
to the numbers published in docs/benchmarks.md (its run takes eight vLLM engines).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend

ROOT = Path(__file__).resolve().parents[1]
DPI = 100

# bench/planner_accuracy.py, 2026-11-23 (model, max_loras, rank, vLLM LoRA B, planner B,
# vLLM weights B, planner weights B): the published run, used when no new one is in results.
PLANNER_PUBLISHED: list[tuple[str, int, int, int, int, int, int]] = [
    ("llama (untied)", 1, 8, 86016, 86016, 853248, 853248),
    ("llama (untied)", 2, 8, 172032, 172032, 853248, 853248),
    ("llama (untied)", 4, 16, 688128, 688128, 853248, 853248),
    ("llama (untied)", 8, 64, 5505024, 5505024, 853248, 853248),
    ("qwen2 (tied)", 1, 8, 65536, 65536, 723200, 723200),
    ("qwen2 (tied)", 2, 8, 131072, 131072, 723200, 723200),
    ("qwen2 (tied)", 4, 16, 524288, 524288, 723200, 723200),
    ("qwen2 (tied)", 8, 64, 4194304, 4194304, 723200, 723200),
]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def chain_plot(r: dict[str, Any], out: Path) -> Path:
    """Seconds until a new adapter answers: hot add vs restarting vLLM (and the cold start)."""
    cold, hot, rs = r["cold_start"], r["hot_add"], r["restart"]
    labels = [
        "hot add\n(apply LoRAAdapter)",
        "restart vLLM\nwith --lora-modules",
        "cold start\n(apply BaseModel)",
    ]
    values = [hot["median"], rs["median"], cold["apply_to_first_completion_s"]]
    colors = ["#2b8a3e", "#c92a2a", "#868e96"]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    bars = ax.barh(labels, values, color=colors)
    for bar, v, runs in zip(bars, values, [hot["runs"], rs["runs"], None], strict=True):
        if runs:
            ax.plot(runs, [bar.get_y() + bar.get_height() / 2] * len(runs), "k|", ms=14)
        right = max([v, *(runs or [])])
        ax.text(right * 1.2, bar.get_y() + bar.get_height() / 2, f"{v:.2f} s", va="center")
    ax.set_xscale("log")
    ax.set_xlim(min(values) / 2, max(values) * 4)
    ax.invert_yaxis()
    ax.set_xlabel("seconds to first completion (median; | = each run; log scale)")
    ax.set_title(
        f"New adapter on a running pod: restart is {r['restart_over_hot_add_median']:.0f}x slower"
    )
    return _save(fig, out / "chain-hot-add-vs-restart.png")


def server_plot(r: dict[str, Any], out: Path) -> Path:
    """TTFB percentiles and throughput, vLLM direct vs through loraplex-server; rotation."""
    o, rot = r["overhead"], r["rotation"]
    d, s = o["direct"], o["server"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
    x = [0, 1, 2]
    w = 0.38
    dv = [d["ttfb_p50_ms"], d["ttfb_p95_ms"], d["total_p50_ms"]]
    sv = [s["ttfb_p50_ms"], s["ttfb_p95_ms"], s["total_p50_ms"]]
    a1.bar([i - w / 2 for i in x], dv, w, label="vLLM direct", color="#1c7ed6")
    a1.bar([i + w / 2 for i in x], sv, w, label="via loraplex-server", color="#f59f00")
    a1.set_xticks(x, ["TTFB p50", "TTFB p95", "request p50"])
    a1.set_ylabel("ms")
    a1.set_title("Latency, same vLLM, alternating rounds")
    a1.legend(fontsize=8)
    names = ["direct", "via server", "1 adapter\n(server)", "8 adapters,\n2 slots"]
    vals = [
        d["req_per_s"],
        s["req_per_s"],
        rot["one_adapter"]["req_per_s"],
        rot["eight_adapters_two_slots"]["req_per_s"],
    ]
    a2.bar(names, vals, color=["#1c7ed6", "#f59f00", "#f59f00", "#e8590c"])
    for i, v in enumerate(vals):
        a2.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    a2.set_ylabel("requests / s")
    a2.set_title("Throughput (16 tokens, 8 concurrent)")
    a2.tick_params(axis="x", labelsize=8)
    return _save(fig, out / "server-overhead.png")


def planner_plot(rows: list[tuple[str, int, int, int, int, int, int]], out: Path) -> Path:
    """Planner bytes vs the bytes vLLM allocated (LoRA slot buffers and weights)."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, marker in (("llama (untied)", "o"), ("qwen2 (tied)", "s")):
        pts = [r for r in rows if r[0] == label]
        ax.scatter(
            [r[3] for r in pts], [r[4] for r in pts], marker=marker, label=f"{label} LoRA slots"
        )
        ax.scatter(
            [r[5] for r in pts[:1]],
            [r[6] for r in pts[:1]],
            marker=marker,
            facecolors="none",
            edgecolors="k",
            label=f"{label} weights",
        )
    values = [v for r in rows for v in r[3:]]
    lo, hi = min(values) / 2, max(values) * 2
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="planner = vLLM")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes vLLM allocated (measured in the worker)")
    ax.set_ylabel("bytes the planner predicted")
    ax.set_title("Memory planner vs CPU vLLM 0.32")
    ax.legend(fontsize=7)
    return _save(fig, out / "planner-predicted-vs-measured.png")


def _planner_rows(result: dict[str, Any]) -> list[tuple[str, int, int, int, int, int, int]]:
    def num(v: str) -> int:
        return int(v.replace(",", ""))

    return [
        (
            r["model"],
            num(r["max_loras"]),
            num(r["rank"]),
            num(r["vLLM LoRA B"]),
            num(r["planner B"]),
            num(r["vLLM weights B"]),
            num(r["vLLM weights B: planner B"]),
        )
        for r in result["accuracy"]
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    a = p.parse_args()
    benches = json.loads(a.results.read_text())["benchmarks"] if a.results.exists() else {}

    def ok(name: str) -> dict[str, Any] | None:
        entry = benches.get(name) or {}
        result: dict[str, Any] | None = entry.get("result") if entry.get("ok") else None
        return result

    a.out.mkdir(parents=True, exist_ok=True)
    made = []
    if chain := ok("chain_bench"):
        made.append(chain_plot(chain, a.out))
    if server := ok("server_bench"):
        made.append(server_plot(server, a.out))
    planner = ok("planner_accuracy")
    made.append(planner_plot(_planner_rows(planner) if planner else PLANNER_PUBLISHED, a.out))
    for path in made:
        print(f"{path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
