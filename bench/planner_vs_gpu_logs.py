"""The memory planner against real vLLM start-up logs on NVIDIA GPUs (issue 11).

Replays every case of tests/fixtures/gpu_truth_cases.json (vLLM 0.6.5 to 0.19, H100 at TP 1
and 2, A100-40GB, L40S with LoRA; quoted log lines and sources in the file) through the
planner with the calibration of the logged release, and prints:

1. each term planned vs logged at the logged utilization (weights, activation, other, graphs,
   KV GiB, KV tokens), with the relative error;
2. leave-one-model-out errors of the two fitted constants (sampler copies, graph line);
3. the auto utilization for each log's setup vs what vLLM did/would accept (start check,
   graph capture, one full-length sequence, idle beyond context and graphs <= 10%);
4. auto utilization and headroom for every GPU product in the catalog, with the deployed
   release's calibration (loraplex.versions.VLLM_VERSION) and LoRA on.

    .venv/bin/python bench/planner_vs_gpu_logs.py [--markdown]

No GPU or vLLM needed; under a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from loraplex.api.basemodel import BaseModelSpec
from loraplex.planner import GPUS, AdapterDemand, plan_base_model
from loraplex.planner.replay import check_auto, leave_one_out, load_cases, replay_case
from loraplex.versions import VLLM_VERSION

CATALOG_MODELS = (
    ("meta-llama/Llama-3.1-8B-Instruct", 1),
    ("Qwen/Qwen2.5-7B-Instruct", 2),
    ("Qwen/Qwen2.5-32B-Instruct", 2),
)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [head, *rows])


def _num(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.1f}%"


def terms_table(markdown: bool) -> str:
    rows = []
    for case in load_cases():
        for r in replay_case(case):
            rows.append([r.case, r.term, _num(r.logged), _num(r.planned), _pct(r.error)])
    return _table(["case", "term", "logged", "planned", "error"], rows, markdown)


def loo_table(markdown: bool) -> str:
    rows = [
        [r.case, r.term, _num(r.logged), _num(r.planned), _pct(r.error)]
        for r in leave_one_out(load_cases())
    ]
    return _table(
        ["case", "term (fit without this model)", "logged", "predicted", "error"], rows, markdown
    )


def auto_table(markdown: bool) -> str:
    rows = []
    for case in load_cases():
        a = check_auto(case)
        rows.append(
            [
                a.case,
                case["vllm_version"].split()[0],
                f"{a.logged_util:.2f}",
                f"{a.auto:.4f}",
                f"{a.start_limit:.4f}",
                "yes" if a.survives_graphs else "NO",
                f"{a.sequences:.1f}",
                f"{a.idle_fraction * 100:.1f}%",
                "ok" if a.ok else "FAIL",
            ]
        )
    head = ["case", "vLLM", "logged util", "auto util", "start limit", "graphs fit",
            "full-length seqs", "idle", "verdict"]  # fmt: skip
    return _table(head, rows, markdown)


def catalog_table(markdown: bool) -> str:
    rows = []
    for model, tp in CATALOG_MODELS:
        for gpu in GPUS.values():
            spec = BaseModelSpec.model_validate(
                {"model": {"source": f"hf://{model}"}, "gpu": {"product": gpu.name, "count": tp}}
            )
            p = plan_base_model(spec, [AdapterDemand("a", 16)])
            b = p.breakdown
            assert b is not None
            rows.append(
                [
                    model.split("/")[1],
                    str(tp),
                    gpu.name,
                    f"{gpu.memory_gib:.2f}",
                    f"{p.gpu_memory_utilization:.4f}" if p.feasible else "infeasible",
                    f"{b.cuda_context:.2f}",
                    f"{b.cuda_graphs:.2f}",
                    f"{b.headroom:.2f} ({b.headroom / b.total * 100:.1f}%)",
                    f"{b.kv_cache:.1f}",
                    f"{p.kv_cache_sequences:.1f}",
                    f"{p.max_loras}x{p.max_lora_rank}",
                ]
            )
    head = ["model", "TP", "GPU", "GiB", "auto util", "context", "graphs (in budget)",
            "idle GiB", "KV GiB", "seqs x 4096", "slots"]  # fmt: skip
    return _table(head, rows, markdown)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    args = parser.parse_args(argv)
    md = args.markdown
    out = sys.stdout
    out.write("## Planned vs logged, at the logged utilization (GiB; tokens for kv_tokens)\n\n")
    out.write(terms_table(md) + "\n\n")
    out.write("## Fitted constants, leave one model out\n\n" + loo_table(md) + "\n\n")
    out.write("## Auto utilization vs what vLLM accepts (logged numbers where logged)\n\n")
    out.write(auto_table(md) + "\n\n")
    out.write(f"## Auto utilization per catalog GPU (vLLM {VLLM_VERSION}, LoRA on)\n\n")
    out.write(catalog_table(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
