"""`loraplex plan`: the operator's memory plan, from the command line.

The flags are turned into the same `BaseModelSpec` and adapter list the operator builds from
Kubernetes objects (`plan_cli_inputs`), so what this prints is what the operator would choose.
Exit status: 0 feasible, 2 infeasible (or bad input), so scripts can gate on it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from loraplex.api.basemodel import BaseModelSpec
from loraplex.planner.catalog import GPUS, MODELS, find_gpu
from loraplex.planner.plan import plan_base_model
from loraplex.planner.result import AdapterDemand, Plan, vllm_flags

_GIB = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gib|gb|g)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class PlanInputs:
    """What `plan_base_model` takes, built from CLI-style values."""

    spec: BaseModelSpec
    adapters: list[AdapterDemand]
    config_json: Mapping[str, Any] | None


def _int_or_auto(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from None


def _float_or_auto(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction or 'auto', got {value!r}") from None


def plan_cli_inputs(
    *,
    model: str,
    gpu: str | None = None,
    gpus: int = 1,
    adapters: int = 1,
    pinned: int = 0,
    max_rank: int | None = None,
    max_model_len: int | None = None,
    dtype: str = "auto",
    max_loras: int | str = "auto",
    max_lora_rank: int | str = "auto",
    max_cpu_loras: int | str = "auto",
    gpu_memory_utilization: float | str = "auto",
    headroom_gib: float = 1.0,
    min_kv_sequences: int = 4,
) -> PlanInputs:
    """Build the planner's inputs; `model` is a local directory, `hf://org/repo` or `org/repo`.

    Raises ValueError with a user-facing message for input the spec would reject.
    """
    config_json: Mapping[str, Any] | None = None
    local = Path(model).expanduser()
    if local.is_dir() or model.startswith(("/", "./", "../", "~")):
        cfg = local / "config.json"
        try:
            config_json = json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read {cfg}: {exc}") from exc
        source = str(local.resolve())
    else:
        source = model if "://" in model else f"hf://{model}"
    gpu_spec: dict[str, Any] = {"count": gpus}
    if gpu:
        match = _GIB.match(gpu)
        if match and match.group(2):
            gpu_spec["memoryGiB"] = float(match.group(1))
        elif find_gpu(gpu) is None:
            known = ", ".join(g.name for g in GPUS.values())
            raise ValueError(f"unknown GPU {gpu!r}: use one of {known}, or a size like 48GiB")
        else:
            gpu_spec["product"] = gpu
    raw: dict[str, Any] = {
        "model": {"source": source, "dtype": dtype},
        "gpu": gpu_spec,
        "lora": {"maxLoras": max_loras, "maxLoraRank": max_lora_rank, "maxCpuLoras": max_cpu_loras},
        "memory": {"headroomGiB": headroom_gib, "minKvSequences": min_kv_sequences},
    }
    if max_model_len is not None:
        raw["maxModelLen"] = max_model_len
    if gpu_memory_utilization != "auto":
        raw["memory"]["gpuMemoryUtilization"] = gpu_memory_utilization
    try:
        spec = BaseModelSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(problems) from None
    if pinned > adapters:
        raise ValueError(f"--pinned {pinned} is more than --adapters {adapters}")
    demands = [
        AdapterDemand(name=f"adapter-{i + 1}", rank=max_rank, pinned=i < pinned)
        for i in range(adapters)
    ]
    return PlanInputs(spec=spec, adapters=demands, config_json=config_json)


def plan_to_json(plan: Plan) -> dict[str, Any]:
    status = plan.to_status().dump()
    status.update(
        dtype=plan.dtype,
        message=plan.message,
        fix=plan.fix,
        rankExceeded=list(plan.rank_exceeded),
        architectureKnown=plan.architecture_known,
        vllmFlags=vllm_flags(plan),
    )
    return status


def format_table(plan: Plan, model: str) -> str:
    rows: list[tuple[str, str]] = [
        ("model", model),
        ("feasible", "yes" if plan.feasible else "NO"),
        ("--max-loras", str(plan.max_loras)),
        ("--max-lora-rank", str(plan.max_lora_rank)),
        ("--max-cpu-loras", str(plan.max_cpu_loras)),
        ("--gpu-memory-utilization", f"{plan.gpu_memory_utilization:.4f}"),
        ("--tensor-parallel-size", str(plan.tensor_parallel_size)),
        ("--max-model-len", str(plan.max_model_len)),
        ("--dtype", plan.dtype),
    ]
    if plan.breakdown is not None:
        b = plan.breakdown
        rows += [
            ("GiB per GPU", ""),
            ("  weights", f"{b.weights:8.2f}"),
            ("  LoRA slots", f"{b.lora_slots:8.2f}"),
            ("  activations (est.)", f"{b.activations:8.2f}"),
            ("  other (est.)", f"{b.other:8.2f}"),
            (
                "  CUDA graphs (est.)",
                f"{b.cuda_graphs:8.2f}  {'inside' if b.cuda_graphs_in_budget else 'outside'} "
                "vLLM's budget",
            ),
            ("  KV cache", f"{b.kv_cache:8.2f}"),
            ("  CUDA context (est.)", f"{b.cuda_context:8.2f}  outside vLLM's budget"),
            ("  headroom (free)", f"{b.headroom:8.2f}"),
            ("  total", f"{b.total:8.2f}"),
            (
                "KV cache",
                f"{plan.kv_cache_tokens} tokens = {plan.kv_cache_sequences:.1f} x "
                f"{plan.max_model_len}",
            ),
        ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}".rstrip() for k, v in rows]
    lines.append("")
    lines.append(plan.message)
    if plan.rank_exceeded:
        lines.append(f"adapters above maxLoraRank: {', '.join(plan.rank_exceeded)}")
    lines += [f"warning: {w}" for w in plan.warnings]
    lines += [f"  - {r}" for r in plan.reasons]
    lines.append("vllm " + " ".join(vllm_flags(plan)))
    return "\n".join(lines) + "\n"


def add_plan_parser(subparsers: Any) -> None:
    """Register `plan` on the `loraplex` command's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "plan",
        help="print the GPU memory plan (vLLM flags) for a model, GPU and adapters",
        description="Compute vLLM's LoRA and memory flags the way the operator does. "
        "Exit status 2 when the model does not fit.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="a local model directory (reads config.json), hf://org/repo, or org/repo; "
        f"known: {', '.join(sorted({k.split('/')[1] for k in MODELS})[:6])}, ...",
    )
    p.add_argument("--gpu", help="GPU product (H100-80GB, L40S, ...) or memory per GPU (48GiB)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per replica (tensor parallel)")
    p.add_argument("--adapters", type=int, default=1, help="number of adapters")
    p.add_argument("--pinned", type=int, default=0, help="how many adapters are pinned")
    p.add_argument("--max-rank", type=int, help="largest adapter rank (default: unknown, 16)")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--max-loras", type=_int_or_auto, default="auto")
    p.add_argument("--max-lora-rank", type=_int_or_auto, default="auto")
    p.add_argument("--max-cpu-loras", type=_int_or_auto, default="auto")
    p.add_argument("--gpu-memory-utilization", type=_float_or_auto, default="auto")
    p.add_argument("--headroom-gib", type=float, default=1.0)
    p.add_argument("--min-kv-sequences", type=int, default=4)
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """The `plan` subcommand; returns the exit status."""
    out = out or sys.stdout
    try:
        inputs = plan_cli_inputs(
            model=args.model,
            gpu=args.gpu,
            gpus=args.gpus,
            adapters=args.adapters,
            pinned=args.pinned,
            max_rank=args.max_rank,
            max_model_len=args.max_model_len,
            dtype=args.dtype,
            max_loras=args.max_loras,
            max_lora_rank=args.max_lora_rank,
            max_cpu_loras=args.max_cpu_loras,
            gpu_memory_utilization=args.gpu_memory_utilization,
            headroom_gib=args.headroom_gib,
            min_kv_sequences=args.min_kv_sequences,
        )
    except ValueError as exc:
        print(f"loraplex plan: {exc}", file=sys.stderr)
        return 2
    plan = plan_base_model(inputs.spec, inputs.adapters, config_json=inputs.config_json)
    if args.output == "json":
        out.write(json.dumps(plan_to_json(plan), indent=2) + "\n")
    else:
        out.write(format_table(plan, args.model))
    if not plan.feasible:
        print(f"loraplex plan: {plan.message}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraplex")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
