"""The planner's choices (`plan_base_model`).

| rule                      | cases                                                              |
|---------------------------|--------------------------------------------------------------------|
| maxLoraRank               | none/unknown/known ranks, rounding up + one step of headroom when  |
|                           | it fits, > 512, user-fixed + exceeded, running rank kept           |
| maxLoras                  | adapter count, pinned + working set, KV floor bound, user-fixed    |
| maxCpuLoras               | all adapters, host budget bound, >= maxLoras, user-fixed           |
| gpuMemoryUtilization      | auto = highest safe (start check, context, graphs, headroomGiB),   |
|                           | 24 GB infeasible -> TP 2, fixed, start refusal / headroom warnings |
| feasibility               | one full-length sequence (vLLM's rule); fewer than minKvSequences  |
|                           | is a warning with the numbers                                      |
| maxModelLen               | default min(context, 4096), user value, beyond context             |
| infeasible fixes          | each suggested fix, applied, makes the plan feasible               |
| architecture resolution   | spec.architecture > config.json > catalog > unknown (usable plan)  |
| output                    | vllm_flags, to_status                                              |
"""

from __future__ import annotations

from typing import Any

import pytest

from loraplex.api.basemodel import BaseModelSpec
from loraplex.api.plan import PlanStatus
from loraplex.planner import AdapterDemand, Plan, lora_slot_bytes, plan_base_model, vllm_flags
from loraplex.planner.catalog import find_model
from loraplex.planner.plan import HOST_LORA_BUDGET_GIB

QWEN14 = "hf://Qwen/Qwen2.5-14B-Instruct"
LLAMA8 = "hf://meta-llama/Llama-3.1-8B-Instruct"


def spec(source: str = QWEN14, **extra: Any) -> BaseModelSpec:
    raw: dict[str, Any] = {"model": {"source": source}, "gpu": {"memoryGiB": 47.54}}
    for key, value in extra.items():
        if isinstance(value, dict) and key != "gpu" and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return BaseModelSpec.model_validate(raw)


def adapters(*ranks: int | None, pinned: int = 0) -> list[AdapterDemand]:
    return [AdapterDemand(f"a{i}", r, pinned=i < pinned) for i, r in enumerate(ranks)]


def plan(s: BaseModelSpec, ads: list[AdapterDemand], **kw: Any) -> Plan:
    return plan_base_model(s, ads, **kw)


# --- maxLoraRank ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ranks", "fixed", "expected", "exceeded"),
    [
        # Auto: the smallest allowed rank >= the largest adapter, then one allowed step of
        # headroom when the KV cache still holds minKvSequences (issue 9.9).
        pytest.param((), "auto", 32, (), id="no-adapters-vllm-default-16-plus-headroom"),
        pytest.param((None,), "auto", 32, (), id="unknown-rank-16-plus-headroom"),
        pytest.param((8,), "auto", 16, (), id="known-8-plus-headroom"),
        pytest.param((4,), "auto", 16, (), id="round-up-4-to-8-plus-headroom"),
        pytest.param((1,), "auto", 8, (), id="rank-1-plus-headroom"),
        pytest.param((8, None), "auto", 32, (), id="unknown-counts-as-16"),
        pytest.param((64, None), "auto", 128, (), id="known-above-unknown"),
        pytest.param((17, 8), "auto", 64, (), id="round-up-17-to-32-plus-headroom"),
        # 4 slots of rank 512 would leave fewer than 4 sequences: no headroom taken.
        pytest.param((300,), "auto", 320, (), id="320-no-room-for-512"),
        pytest.param((321,), "auto", 512, (), id="321-to-512"),
        pytest.param((600, 8), "auto", 512, ("a0",), id="above-512-exceeded"),
        pytest.param((8, 32, None), 16, 16, ("a1",), id="user-fixed-keeps-and-reports"),
        pytest.param((8,), 64, 64, (), id="user-fixed-larger-kept"),
    ],
)
def test_max_lora_rank(
    ranks: tuple[int | None, ...], fixed: int | str, expected: int, exceeded: tuple[str, ...]
) -> None:
    p = plan(spec(lora={"maxLoraRank": fixed}), adapters(*ranks))
    assert (p.max_lora_rank, p.rank_exceeded) == (expected, exceeded)


# --- maxLoras -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "pinned", "expected"),
    [
        pytest.param(0, 0, 4, id="no-adapters"),
        pytest.param(1, 0, 4, id="one"),
        pytest.param(10, 0, 4, id="ten-unpinned"),
        pytest.param(10, 3, 4, id="three-pinned-fit-the-first-step"),
        pytest.param(10, 4, 8, id="four-pinned-next-step"),
        pytest.param(9, 8, 12, id="eight-pinned"),
    ],
)
def test_max_loras_auto(count: int, pinned: int, expected: int) -> None:
    s = spec(source=LLAMA8, gpu={"product": "H100-80GB"})
    p = plan(s, adapters(*[16] * count, pinned=pinned))
    assert p.feasible
    assert p.max_loras == expected
    assert p.max_loras > pinned  # every pinned adapter resident, and a slot to spare


@pytest.mark.parametrize("ranks", [(16,), (8, 16), (None, 8, 16)], ids=["16", "8-16", "mixed"])
def test_adding_unpinned_adapters_keeps_the_flags(ranks: tuple[int | None, ...]) -> None:
    """Flags feed the pod template: if they moved, adding an adapter would roll the pods."""
    s = spec()
    first = vllm_flags(plan(s, adapters(*ranks, pinned=1)))
    for extra in (1, 5, 50):
        more = adapters(*ranks, *[16] * extra, pinned=1)
        assert vllm_flags(plan(s, more)) == first, extra


def test_max_loras_reduced_to_keep_kv_floor() -> None:
    """Rank-512 slots of a 14B model cost 1 GiB each: only 3 leave room for 4 sequences."""
    s = spec(lora={"maxLoraRank": 512})
    p = plan(s, adapters(*[16] * 10))
    assert p.feasible and not p.warnings
    assert p.max_loras == 3
    assert p.kv_cache_sequences >= s.memory.min_kv_sequences
    assert any("reduced from 4" in r for r in p.reasons)
    # One more slot leaves less than one sequence: vLLM would refuse, and so does the plan.
    four = plan(spec(lora={"maxLoraRank": 512, "maxLoras": 4}), adapters(*[16] * 10))
    assert not four.feasible and four.fix == "fewer LoRA slots: set spec.lora.maxLoras to 3"
    # More sequences expected than fit: vLLM still starts, so the plan is feasible and warns
    # with the numbers.
    busy = plan(
        spec(lora={"maxLoraRank": 512, "maxLoras": 3}, memory={"minKvSequences": 8}),
        adapters(*[16] * 10),
    )
    assert busy.feasible
    assert 1 <= busy.kv_cache_sequences < 8
    (warning,) = busy.warnings
    assert f"holds {busy.kv_cache_sequences:.1f} full-length sequences of 4096" in warning
    assert "fewer than minKvSequences 8" in warning


def test_slots_shrink_to_one_sequence_before_refusing() -> None:
    """When even one slot cannot keep minKvSequences, slots shrink to what vLLM starts with."""
    p = plan(spec(lora={"maxLoraRank": 512}, memory={"minKvSequences": 64}), adapters(16))
    assert p.feasible and p.max_loras < 4
    assert any("so the KV cache holds 1 sequence(s)" in r for r in p.reasons)
    assert p.warnings


def test_rank_headroom_only_where_it_fits() -> None:
    """Rank 64 adapters on a 48 GB card: 4 slots of 128 still leave 4 sequences, so auto takes
    the step; with 16 sequences expected it does not."""
    assert plan(spec(), adapters(64)).max_lora_rank == 128
    tight = plan(spec(memory={"minKvSequences": 17}), adapters(64))
    assert tight.feasible and tight.max_lora_rank == 64
    assert any("one step above" in r for r in plan(spec(), adapters(64)).reasons)


@pytest.mark.parametrize(
    ("running", "ranks", "expected"),
    [
        pytest.param(32, (16, 32), 32, id="adapter-within-headroom-keeps-running-rank"),
        pytest.param(64, (8,), 64, id="smaller-adapters-keep-running-rank"),
        pytest.param(32, (64,), 128, id="larger-adapter-replans-with-headroom"),
        pytest.param(None, (16, 32), 64, id="first-plan-takes-headroom"),
    ],
)
def test_running_rank_is_kept_while_it_covers_every_adapter(
    running: int | None, ranks: tuple[int, ...], expected: int
) -> None:
    """The rank the pods run with (from the published manifest) stays while it covers every
    adapter: adding one within it does not roll the pods (issue 9.9)."""
    p = plan_base_model(spec(), adapters(*ranks), running_rank=running)
    assert p.max_lora_rank == expected


def test_max_loras_user_fixed_kept() -> None:
    p = plan(spec(lora={"maxLoras": 6}), adapters(16, 16))
    assert p.max_loras == 6
    q = plan(spec(lora={"maxLoras": 1}), adapters(16, 16, pinned=2))
    assert q.max_loras == 1
    assert any("below the 2 pinned" in r for r in q.reasons)


# --- maxCpuLoras ----------------------------------------------------------------------------


def test_max_cpu_loras_independent_of_adapter_count() -> None:
    few, many = (plan(spec(), adapters(*[16] * n)) for n in (2, 200))
    # 8 GiB host budget / 0.256 GiB per rank-32 (16 + headroom) Qwen2.5-14B adapter = 31.
    assert few.max_cpu_loras == many.max_cpu_loras == 31 >= few.max_loras
    small = plan(spec(source=LLAMA8), adapters(8))
    assert small.max_cpu_loras == 64  # the cap, when the budget holds more
    assert any("reloaded from disk" in r for r in many.reasons)


def test_max_cpu_loras_bounded_by_host_budget() -> None:
    shape = find_model(LLAMA8)
    assert shape is not None
    per_adapter = lora_slot_bytes(shape, 1, 512, 2, 1)
    budget = int(HOST_LORA_BUDGET_GIB * 1024**3 // per_adapter)
    p = plan(spec(source=LLAMA8, gpu={"product": "H100-80GB"}), adapters(*[512] * 500))
    assert p.max_cpu_loras == max(budget, p.max_loras)
    assert p.max_cpu_loras < 500


def test_max_cpu_loras_never_below_max_loras() -> None:
    p = plan(spec(lora={"maxLoras": 8}), adapters(16))
    assert p.max_cpu_loras >= 8
    q = plan(spec(lora={"maxLoras": 2, "maxCpuLoras": 3}), adapters(16))
    assert q.max_cpu_loras == 3


# --- gpuMemoryUtilization and feasibility ---------------------------------------------------


@pytest.mark.parametrize(
    "gpu",
    [
        pytest.param({"memoryGiB": 47.54}, id="47.54GiB"),
        pytest.param({"product": "A6000"}, id="A6000"),
        pytest.param({"product": "L40S"}, id="L40S"),
    ],
)
def test_seed_qwen14b_on_48gb_uses_the_gpu(gpu: dict[str, Any]) -> None:
    """Auto is the highest safe utilization (issue 11): the KV cache sets throughput, so a pod
    that owns its GPU uses it, leaving the CUDA context and headroomGiB outside vLLM's budget
    and no more than 10% of the GPU idle."""
    p = plan(spec(gpu=gpu), adapters(16, 16))
    assert p.feasible, p.message
    b = p.breakdown
    assert b is not None
    assert 0.93 <= p.gpu_memory_utilization <= 0.95 + b.cuda_graphs / b.total
    assert (p.max_loras, p.max_lora_rank, p.dtype) == (4, 32, "bfloat16")
    assert p.kv_cache_sequences >= 4
    assert b.weights == pytest.approx(27.5, abs=0.1)
    assert b.headroom >= 1.0 - 1e-3  # headroomGiB stays free beyond the context
    assert b.headroom <= 0.10 * b.total
    outside = b.total * (1 - p.gpu_memory_utilization)
    assert outside >= b.cuda_context + b.headroom - 1e-3  # vLLM's start check holds


@pytest.mark.parametrize("gpu", [{"memoryGiB": 24}, {"product": "RTX-4090"}, {"product": "L4"}])
def test_seed_qwen14b_on_24gb_needs_two_gpus(gpu: dict[str, Any]) -> None:
    p = plan(spec(gpu=gpu), adapters(16, 16))
    assert not p.feasible
    assert p.fix is not None and "spec.gpu.count to 2" in p.fix and "tensor parallel 2" in p.fix
    assert "27.5" in p.message and "cheapest fix" in p.message
    fixed = plan(spec(gpu={**gpu, "count": 2}), adapters(16, 16))
    assert fixed.feasible, fixed.message
    assert fixed.tensor_parallel_size == 2


def test_headroom_gib_lowers_auto_utilization() -> None:
    """headroomGiB is kept free beyond the CUDA context: more of it, lower utilization."""
    base, roomy = (plan(spec(memory={"headroomGiB": h}), adapters(16)) for h in (1.0, 4.0))
    assert roomy.feasible and roomy.breakdown is not None
    assert roomy.gpu_memory_utilization < base.gpu_memory_utilization
    assert roomy.breakdown.headroom == pytest.approx(4.0, abs=0.01)


@pytest.mark.parametrize(
    ("version", "graphs_in_budget"), [("0.19.0", False), ("0.21.0", True), ("0.32.0", True)]
)
def test_auto_utilization_keyed_on_vllm_version(version: str, graphs_in_budget: bool) -> None:
    """Before vLLM 0.21 the CUDA graph pool is allocated outside the budget, so auto leaves
    room for it there; from 0.21 vLLM takes it out of the KV cache instead."""
    p = plan_base_model(spec(), adapters(16), vllm_version=version)
    b = p.breakdown
    assert b is not None and b.cuda_graphs_in_budget is graphs_in_budget
    outside = b.total * (1 - p.gpu_memory_utilization)
    graphs_outside = 0.0 if graphs_in_budget else b.cuda_graphs
    assert outside >= b.cuda_context + graphs_outside + 1.0 - 1e-3
    assert any(f"vLLM {version} calibration" in r for r in p.reasons)


def test_engine_image_tag_picks_the_calibration() -> None:
    old = spec(engine={"image": "vllm/vllm-openai:v0.19.0"})
    assert plan(old, adapters(16)).breakdown.cuda_graphs_in_budget is False  # type: ignore[union-attr]
    assert plan(spec(), adapters(16)).breakdown.cuda_graphs_in_budget is True  # type: ignore[union-attr]


def test_fixed_utilization_sets_kv() -> None:
    low, high = (plan(spec(memory={"gpuMemoryUtilization": u}), adapters(16)) for u in (0.8, 0.9))
    assert low.feasible and high.feasible
    assert (low.gpu_memory_utilization, high.gpu_memory_utilization) == (0.8, 0.9)
    assert low.breakdown is not None and high.breakdown is not None
    assert high.breakdown.kv_cache - low.breakdown.kv_cache == pytest.approx(0.1 * 47.54, abs=1e-3)


def test_fixed_utilization_too_small_is_infeasible() -> None:
    p = plan(spec(memory={"gpuMemoryUtilization": 0.5}), adapters(16))
    assert not p.feasible
    assert p.fix is not None and "gpuMemoryUtilization" in p.fix
    assert plan(spec(), adapters(16)).feasible  # auto, as the fix says


def test_lower_rank_fix_when_pinned_slots_cannot_shrink() -> None:
    """Four pinned adapters need four slots; rank 512 is the setting to give up, as little
    as possible (the largest allowed rank that fits)."""
    four = adapters(16, 16, 16, 16, pinned=4)
    p = plan(spec(lora={"maxLoras": 4, "maxLoraRank": 512}), four)
    assert not p.feasible
    assert p.fix is not None and p.fix.startswith("lower rank: set spec.lora.maxLoraRank to ")
    suggested = int(p.fix.split()[-1])
    assert suggested == 320
    fixed = plan(spec(lora={"maxLoras": 4, "maxLoraRank": suggested}), four)
    assert fixed.feasible, fixed.message


@pytest.mark.parametrize(
    ("util", "says"),
    [
        pytest.param(0.99, "vLLM refuses to start above", id="above-free-at-start"),
        pytest.param(0.985, "less than headroomGiB", id="eats-headroom"),
    ],
)
def test_fixed_utilization_risks_are_warnings(util: float, says: str) -> None:
    """A user-set utilization is kept; what it risks is a warning with the numbers."""
    p = plan(spec(memory={"gpuMemoryUtilization": util}), adapters(16))
    assert p.feasible and p.gpu_memory_utilization == util
    assert any(says in w for w in p.warnings), p.warnings
    old = plan_base_model(
        spec(memory={"gpuMemoryUtilization": 0.975}), adapters(16), vllm_version="0.19.0"
    )
    assert any("graph capture may run out of memory" in w for w in old.warnings), old.warnings


def test_tensor_parallel_must_divide_heads() -> None:
    for gpu in ({"count": 8, "memoryGiB": 80}, {"count": 8}):
        p = plan(spec(source="hf://Qwen/Qwen2.5-7B-Instruct", gpu=gpu), adapters(16))
        assert not p.feasible
        assert "28 attention heads" in p.message


# --- infeasible: the fix, applied, fits ----------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "fix_says", "apply"),
    [
        pytest.param(
            {"lora": {"maxLoras": 16, "maxLoraRank": 256}},
            "maxLoras",
            lambda r, fix: {**r, "lora": {**r["lora"], "maxLoras": int(fix.split()[-1])}},
            id="fewer-slots",
        ),
        pytest.param(
            {"source": LLAMA8, "gpu": {"product": "L4"}, "maxModelLen": 32768},
            "maxModelLen",
            lambda r, fix: {**r, "maxModelLen": int(fix.split()[-1])},
            id="shorter-context",
        ),
        pytest.param(
            {"source": LLAMA8, "gpu": {"product": "L4"}, "dtype": "float32"},
            "bfloat16",
            lambda r, fix: {**r, "dtype": "bfloat16"},
            id="smaller-dtype",
        ),
        pytest.param(
            {"source": "hf://Qwen/Qwen2.5-72B-Instruct", "gpu": {"product": "H100-80GB"}},
            "spec.gpu.count to",
            lambda r, fix: {**r, "gpu": {"product": "H100-80GB", "count": int(fix.split()[0])}},
            id="more-gpus",
        ),
    ],
)
def test_cheapest_fix_makes_it_fit(raw: dict[str, Any], fix_says: str, apply: Any) -> None:
    def build(r: dict[str, Any]) -> BaseModelSpec:
        model = {"source": r.get("source", QWEN14), "dtype": r.get("dtype", "auto")}
        body = {k: v for k, v in r.items() if k not in ("source", "dtype")}
        return spec(model=model, **body)

    p = plan(build(raw), adapters(16, 16))
    assert not p.feasible
    assert p.fix is not None and fix_says in p.fix, p.fix
    fixed = plan(build(apply(raw, p.fix)), adapters(16, 16))
    assert fixed.feasible, fixed.message


# --- maxModelLen ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "user", "expected"),
    [
        pytest.param(LLAMA8, None, 4096, id="long-context-capped"),
        pytest.param("hf://microsoft/Phi-3-mini-4k-instruct", None, 4096, id="phi3-4k"),
        pytest.param("hf://google/gemma-2-9b-it", None, 4096, id="gemma2-8k"),
        pytest.param(LLAMA8, 16384, 16384, id="user-value"),
    ],
)
def test_max_model_len(source: str, user: int | None, expected: int) -> None:
    extra = {} if user is None else {"maxModelLen": user}
    p = plan(spec(source=source, gpu={"product": "H100-80GB"}, **extra), adapters(16))
    assert p.max_model_len == expected


def test_max_model_len_from_short_config() -> None:
    cfg = {
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 1024,
    }
    p = plan(spec(source="/models/tiny"), adapters(8), config_json=cfg)
    assert p.max_model_len == 1024
    too_long = plan(spec(source="/models/tiny", maxModelLen=2048), adapters(8), config_json=cfg)
    assert not too_long.feasible
    assert "1024" in too_long.message


# --- architecture resolution ----------------------------------------------------------------


def test_unknown_architecture_gives_usable_unchecked_plan() -> None:
    p = plan(spec(source="hf://someone/mystery-13b"), adapters(8, 32, None, 16, 16, 16))
    assert p.feasible and not p.architecture_known
    assert (p.gpu_memory_utilization, p.max_lora_rank, p.max_loras) == (0.9, 32, 4)
    assert p.max_cpu_loras == 64
    assert "not checked" in p.message and "spec.model.architecture" in p.message
    assert p.breakdown is None
    vllm_flags(p)  # still renders


def test_unknown_gpu_gives_unchecked_plan() -> None:
    s = BaseModelSpec.model_validate({"model": {"source": QWEN14}, "gpu": {"product": "TPU-v9"}})
    p = plan(s, adapters(16))
    assert p.feasible and p.architecture_known
    assert "spec.gpu.memoryGiB" in p.message


def test_spec_architecture_overrides_catalog_and_config() -> None:
    arch = {
        "hiddenSize": 128,
        "intermediateSize": 256,
        "numHiddenLayers": 2,
        "numAttentionHeads": 2,
        "vocabSize": 512,
    }
    p = plan(spec(model={"source": QWEN14, "architecture": arch}), adapters(8))
    assert p.breakdown is not None and p.breakdown.weights < 0.01
    assert "spec.model.architecture" in p.reasons[0]


def test_config_json_beats_catalog() -> None:
    cfg = {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    p = plan(spec(), adapters(8), config_json=cfg)
    assert p.breakdown is not None and p.breakdown.weights < 1.0
    assert p.dtype == "bfloat16"  # vLLM downcasts float32 checkpoints


def test_broken_config_json_falls_back_to_unchecked() -> None:
    p = plan(spec(source="/models/x"), adapters(8), config_json={"model_type": "llama"})
    assert p.feasible and not p.architecture_known
    assert "config.json" in p.message


# --- output ---------------------------------------------------------------------------------


def test_vllm_flags() -> None:
    p = plan(spec(), adapters(16, 16))
    flags = vllm_flags(p)
    pairs = dict(zip(flags[::2], flags[1::2], strict=True))
    assert pairs == {
        "--max-loras": "4",
        "--max-lora-rank": "32",
        "--max-cpu-loras": "31",
        "--gpu-memory-utilization": f"{p.gpu_memory_utilization:.4f}",
        "--tensor-parallel-size": "1",
        "--max-model-len": "4096",
        "--dtype": "bfloat16",
    }


def test_to_status_round_trips_through_the_api_model() -> None:
    p = plan(spec(), adapters(16, 16))
    dumped = p.to_status().dump()
    again = PlanStatus.model_validate(dumped)
    assert again.feasible and again.max_loras == 4
    assert dumped["breakdownGiB"]["weights"] == pytest.approx(27.511, abs=1e-3)
    assert dumped["reasons"][0] == p.message
