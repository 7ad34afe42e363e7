"""`loraplex plan` (loraplex.planner.cli).

| case                               | expect                                              |
|------------------------------------|-----------------------------------------------------|
| catalog model, GPU product, table  | exit 0, flags and breakdown printed                 |
| -o json                            | parseable, same numbers as plan_base_model          |
| model does not fit                 | exit 2, why and the cheapest fix on stderr          |
| local directory                    | config.json read (its context length shows)         |
| 48GiB style sizes, int-or-auto     | parsed into the spec                                |
| bad input (GPU, pinned, rank)      | exit 2 with a message, no traceback                 |
| python -m loraplex.planner.cli     | runs as a program                                   |
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.devtools.tinymodel import TINY_SHAPE
from loraplex.planner import plan_base_model
from loraplex.planner.cli import main, plan_cli_inputs


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        ["--model", "Qwen/Qwen2.5-14B-Instruct", "--gpu", "A6000", "--adapters", "2"], capsys
    )
    assert code == 0
    assert "--max-loras               4" in out
    assert "weights                    27.51" in out
    assert "inside vLLM's budget" in out and "CUDA context (est.)" in out
    assert "vllm --max-loras 4 --max-lora-rank 32" in out  # rank 16 + one step of headroom


def test_json_matches_planner(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "hf://meta-llama/Llama-3.1-8B-Instruct", "--gpu", "L40S", "--adapters"]
    code, out, _ = run([*argv, "12", "--pinned", "2", "--max-rank", "64", "-o", "json"], capsys)
    assert code == 0
    data = json.loads(out)
    inputs = plan_cli_inputs(
        model="hf://meta-llama/Llama-3.1-8B-Instruct",
        gpu="L40S",
        adapters=12,
        pinned=2,
        max_rank=64,
    )
    plan = plan_base_model(inputs.spec, inputs.adapters)
    assert data["maxLoras"] == plan.max_loras == 4
    assert data["maxLoraRank"] == plan.max_lora_rank == 128  # 64 + one step of headroom
    assert data["gpuMemoryUtilization"] == plan.gpu_memory_utilization
    assert data["feasible"] is True and data["vllmFlags"][0] == "--max-loras"


def test_infeasible_exit_2_with_fix(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        ["--model", "Qwen/Qwen2.5-14B-Instruct", "--gpu", "24GiB", "--adapters", "2"], capsys
    )
    assert code == 2
    assert "feasible                  NO" in out
    assert "does not fit" in err and "spec.gpu.count to 2" in err


def test_local_model_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = {"model_type": "llama", **TINY_SHAPE}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, out, _ = run(["--model", str(tmp_path), "--gpu", "L4", "-o", "json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["maxModelLen"] == 1024
    assert data["architectureKnown"] is True


def test_sizes_and_overrides_reach_the_spec() -> None:
    inputs = plan_cli_inputs(
        model="Qwen/Qwen2.5-7B-Instruct",
        gpu="48GiB",
        gpus=2,
        max_loras=3,
        max_lora_rank=32,
        gpu_memory_utilization=0.8,
        headroom_gib=2,
        min_kv_sequences=8,
        max_model_len=8192,
        dtype="float16",
    )
    s = inputs.spec
    assert (s.gpu.memory_gi_b, s.gpu.count, s.model.source) == (
        48.0,
        2,
        "hf://Qwen/Qwen2.5-7B-Instruct",
    )
    assert (s.lora.max_loras, s.lora.max_lora_rank, s.lora.max_cpu_loras) == (3, 32, "auto")
    assert (s.memory.gpu_memory_utilization, s.memory.headroom_gi_b) == (0.8, 2)
    assert (s.max_model_len, s.model.dtype, s.memory.min_kv_sequences) == (8192, "float16", 8)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        pytest.param(["--gpu", "B9000"], "unknown GPU", id="unknown-gpu"),
        pytest.param(["--adapters", "1", "--pinned", "2"], "--pinned", id="pinned-over-count"),
        pytest.param(["--max-lora-rank", "24"], "maxLoraRank", id="rank-not-allowed"),
        pytest.param(["--model", "/no/such/dir"], "config.json", id="missing-local-model"),
    ],
)
def test_bad_input(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--model", "Qwen/Qwen2.5-7B-Instruct"]
    if "--model" in argv:
        base = []
    code, _, err = run([*base, *argv], capsys)
    assert code == 2
    assert says in err


def test_module_runs_as_program() -> None:
    argv = ["plan", "--model", "Qwen/Qwen2.5-7B", "--gpu", "H100-80GB", "-o", "json"]
    proc = subprocess.run(
        [sys.executable, "-m", "loraplex.planner.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["feasible"] is True


def test_run_plan_writes_to_given_stream() -> None:
    import argparse

    from loraplex.planner.cli import add_plan_parser

    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers())
    args = parser.parse_args(["plan", "--model", "Qwen/Qwen2.5-7B", "--gpu", "H100-80GB"])
    buf = io.StringIO()
    assert args.func(args, buf) == 0
    assert "--max-lora-rank" in buf.getvalue()
