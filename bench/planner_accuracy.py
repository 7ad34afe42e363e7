"""How close the memory planner is to what vLLM really allocates.

Builds two tiny random models (Llama-style untied, Qwen2-style with tied embeddings), starts a
CPU vLLM with LoRA for each (max_loras, max_lora_rank) pair, one process per engine, and compares
the bytes of LoRA slot buffers and weights vLLM holds with `lora_slot_bytes` / `weight_bytes`.
Then prints the plans for the catalog models on common GPUs (no vLLM needed).

    .venv/bin/python bench/planner_accuracy.py [--pairs 1x8,2x8,4x16,8x64] [--markdown]

About 30 s per engine on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loraplex.api.basemodel import BaseModelSpec
from loraplex.devtools.tinymodel import make_model
from loraplex.planner import (
    MODELS,
    AdapterDemand,
    lora_slot_bytes,
    plan_base_model,
    shape_from_config,
    weight_bytes,
)


def probe(model: Path, loras: int, rank: int) -> dict[str, Any]:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "loraplex.planner.vllm_probe", str(model), str(loras), str(rank)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    if proc.returncode or not lines:
        raise RuntimeError(proc.stderr[-3000:])
    result: dict[str, Any] = json.loads(lines[-1][len("PROBE ") :])
    return result


def table(rows: list[list[str]], markdown: bool) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    if markdown:
        fmt = [f"| {line} |" for line in fmt]
        fmt.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(fmt)


def accuracy(pairs: list[tuple[int, int]], markdown: bool) -> str:
    root = Path(tempfile.mkdtemp(prefix="planner-bench-"))
    models = {
        "llama (untied)": make_model(root / "llama", "llama"),
        "qwen2 (tied)": make_model(root / "qwen2", "qwen2", tie=True),
    }
    head = ["model", "max_loras", "rank", "vLLM LoRA B", "planner B", "diff", "tensors"]
    rows = [[*head, "vLLM weights B", "planner B", "diff", "start s"]]
    for label, path in models.items():
        shape = shape_from_config(json.loads((path / "config.json").read_text()))
        for loras, rank in pairs:
            t0 = time.monotonic()
            got = probe(path, loras, rank)
            secs = time.monotonic() - t0
            lora = lora_slot_bytes(shape, loras, rank, 2, 1)
            weights = weight_bytes(shape, 2, 1)
            rows.append(
                [
                    label,
                    str(loras),
                    str(rank),
                    f"{got['lora_bytes']:,}",
                    f"{lora:,}",
                    f"{(lora - got['lora_bytes']) / got['lora_bytes']:+.2%}",
                    str(got["lora_tensor_count"]),
                    f"{got['weight_bytes']:,}",
                    f"{weights:,}",
                    f"{(weights - got['weight_bytes']) / got['weight_bytes']:+.2%}",
                    f"{secs:.0f}",
                ]
            )
            print(" ".join(rows[-1]), file=sys.stderr, flush=True)
    return table(rows, markdown)


def catalog_plans(markdown: bool) -> str:
    rows = [
        ["model", "GPU", "fits", "util", "max-loras", "KV tokens", "weights GiB", "fix"],
    ]
    adapters = [AdapterDemand(f"a{i}", 16) for i in range(8)]
    shown: list[Any] = []
    for name in sorted(MODELS):
        if not name.endswith(("instruct", "-it")) or MODELS[name] in shown:
            continue  # one row set per distinct shape
        shown.append(MODELS[name])
        for gpu in ("H100-80GB", "L40S", "L4"):
            spec = BaseModelSpec.model_validate(
                {"model": {"source": f"hf://{name}"}, "gpu": {"product": gpu}}
            )
            p = plan_base_model(spec, adapters)
            b = p.breakdown
            rows.append(
                [
                    name,
                    gpu,
                    "yes" if p.feasible else "no",
                    f"{p.gpu_memory_utilization:.3f}",
                    str(p.max_loras),
                    str(p.kv_cache_tokens),
                    f"{b.weights:.1f}" if b else "-",
                    (p.fix or "").replace("|", "/"),
                ]
            )
    return table(rows, markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="1x8,2x8,4x16,8x64")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--skip-vllm", action="store_true", help="only the catalog plans")
    args = parser.parse_args()
    pairs = [(int(a), int(b)) for a, b in (p.split("x") for p in args.pairs.split(","))]
    if not args.skip_vllm:
        print(accuracy(pairs, args.markdown))
        print()
    print("Plans for 8 rank-16 adapters (defaults: maxModelLen <= 4096, 1 GiB headroom):\n")
    print(catalog_plans(args.markdown))


if __name__ == "__main__":
    main()
