"""Byte counts of the planner: LoRA slot buffers, weights, KV per token, and the catalog.

| function            | cases                                                               |
|---------------------|---------------------------------------------------------------------|
| lora_slot_bytes     | tiny llama/qwen2 as measured in vLLM 0.32, tp 2, phi3 fused, 14B,   |
|                     | deployment target_modules, linear in slots and rank                 |
| weight_bytes        | catalog models vs their published parameter counts (1%), tp split   |
| shape_from_config   | config.json keys, defaults, text_config, missing keys               |
| catalog             | case-insensitive hf:// lookup, Gemma 2 / Qwen tie and head_dim, GPUs|
"""

from __future__ import annotations

from typing import Any

import pytest

from loraplex.api.basemodel import Architecture
from loraplex.devtools.tinymodel import TINY_SHAPE
from loraplex.planner import find_gpu, find_model, lora_slot_bytes, weight_bytes
from loraplex.planner.architecture import (
    ArchitectureError,
    ModelShape,
    shape_from_architecture,
    shape_from_config,
)

TINY: dict[str, Any] = {
    "model_type": "llama",
    **TINY_SHAPE,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
TINY_LLAMA = shape_from_config(TINY)
TINY_QWEN_TIED = shape_from_config({**TINY, "model_type": "qwen2", "tie_word_embeddings": True})


def _catalog(name: str) -> ModelShape:
    shape = find_model(f"hf://{name}")
    assert shape is not None, name
    return shape


@pytest.mark.parametrize(
    ("shape", "slots", "rank", "tp", "expected"),
    [
        # Measured in vLLM 0.32 (tests/vllm): 28 linear buffers + embed_tokens + lm_head.
        pytest.param(TINY_LLAMA, 2, 8, 1, 172_032, id="tiny-llama-2x8-measured"),
        # Qwen2 declares no embedding_modules: linear buffers only.
        pytest.param(TINY_QWEN_TIED, 2, 8, 1, 131_072, id="tiny-qwen2-2x8-measured"),
        # By hand from create_lora_weights: per layer qkv 3*8*128 + (64+64+64)*8 (the single
        # KV head is replicated), o 8*64 + 128*8, gate_up 2*8*128 + 2*128*8, down 8*128 + 128*8
        # = 12288; x2 layers + embed (512*8 + 128*8) + lm_head (8*128 + 512*8), x2 bytes.
        pytest.param(TINY_LLAMA, 1, 8, 2, 69_632, id="tiny-llama-1x8-tp2"),
        # Qwen2.5-14B, 2 slots of rank 16: 1,433,600 elements per slot per layer x 48 layers.
        pytest.param(
            _catalog("Qwen/Qwen2.5-14B-Instruct"), 2, 16, 1, 275_251_200, id="qwen14b-2x16"
        ),
    ],
)
def test_lora_slot_bytes(shape: ModelShape, slots: int, rank: int, tp: int, expected: int) -> None:
    assert lora_slot_bytes(shape, slots, rank, 2, tp) == expected


def test_lora_slot_bytes_is_linear_in_slots_rank_and_dtype() -> None:
    one = lora_slot_bytes(TINY_LLAMA, 1, 8, 2)
    assert lora_slot_bytes(TINY_LLAMA, 3, 8, 2) == 3 * one
    assert lora_slot_bytes(TINY_LLAMA, 1, 32, 2) == 4 * one
    assert lora_slot_bytes(TINY_LLAMA, 1, 8, 4) == 2 * one


def test_phi3_fused_checkpoint_has_one_a_slice() -> None:
    """Phi-3 ships qkv_proj/gate_up_proj fused: one A buffer each instead of three and two."""
    phi = _catalog("microsoft/Phi-3-mini-4k-instruct")
    as_llama = ModelShape(**{**phi.__dict__, "model_type": "llama"})
    saved_a = (2 * 8 * 3072 + 1 * 8 * 3072) * 32  # qkv: 2 fewer slices, gate_up: 1 fewer
    assert lora_slot_bytes(as_llama, 1, 8, 2) - lora_slot_bytes(phi, 1, 8, 2) == saved_a * 2


def test_deployment_target_modules_restrict_buffers() -> None:
    """Only vLLM's deployment-wide target_modules shrink buffers; PEFT names map to packed."""
    full = lora_slot_bytes(TINY_LLAMA, 1, 8, 2)
    attn = lora_slot_bytes(TINY_LLAMA, 1, 8, 2, target_modules=["q_proj", "v_proj", "o_proj"])
    assert attn == lora_slot_bytes(TINY_LLAMA, 1, 8, 2, target_modules=["qkv_proj", "o_proj"])
    assert 0 < attn < full
    assert attn == (3 * 8 * 128 + 256 * 8 + 8 * 128 + 128 * 8) * 2 * 2


# Published parameter counts (model cards / safetensors metadata).
PUBLISHED = {
    "meta-llama/Llama-3.1-8B-Instruct": 8.03e9,
    "meta-llama/Llama-3.1-70B-Instruct": 70.55e9,
    "meta-llama/Llama-3.2-1B-Instruct": 1.236e9,
    "meta-llama/Llama-3.2-3B-Instruct": 3.213e9,
    "Qwen/Qwen2.5-0.5B-Instruct": 0.494e9,
    "Qwen/Qwen2.5-7B-Instruct": 7.616e9,
    "Qwen/Qwen2.5-14B-Instruct": 14.77e9,
    "Qwen/Qwen2.5-32B-Instruct": 32.76e9,
    "Qwen/Qwen2.5-72B-Instruct": 72.71e9,
    "mistralai/Mistral-7B-Instruct-v0.3": 7.248e9,
    "google/gemma-2-9b-it": 9.242e9,
    "google/gemma-2-27b-it": 27.23e9,
    "microsoft/Phi-3-mini-4k-instruct": 3.821e9,
    "Qwen/Qwen3-32B": 32.76e9,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": 14.77e9,
}


@pytest.mark.parametrize(("name", "params"), PUBLISHED.items(), ids=list(PUBLISHED))
def test_weight_bytes_match_published_sizes(name: str, params: float) -> None:
    shape = _catalog(name)
    assert weight_bytes(shape, 2, 1) == pytest.approx(params * 2, rel=0.01)


def test_weight_bytes_split_across_tensor_parallel_ranks() -> None:
    shape = _catalog("Qwen/Qwen2.5-72B-Instruct")
    one, four = weight_bytes(shape, 2, 1), weight_bytes(shape, 2, 4)
    assert one / 4 < four < one / 4 * 1.01  # norms are replicated, everything else splits


def test_num_parameters_raises_weights_when_shape_undercounts() -> None:
    arch = Architecture(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=512,
        num_parameters=10_000_000,
    )
    assert weight_bytes(shape_from_architecture(arch), 2, 2) == 10_000_000


def test_kv_bytes_per_token() -> None:
    qwen14 = _catalog("Qwen/Qwen2.5-14B-Instruct")
    assert qwen14.kv_bytes_per_token(2, 1) == 2 * 48 * 8 * 128 * 2
    assert qwen14.kv_bytes_per_token(2, 2) == 2 * 48 * 4 * 128 * 2
    # 8 KV heads on 16 GPUs: vLLM replicates, so each GPU still holds one head.
    assert qwen14.kv_bytes_per_token(2, 16) == 2 * 48 * 1 * 128 * 2


@pytest.mark.parametrize(
    ("cfg", "field", "value"),
    [
        pytest.param({**TINY, "head_dim": None}, "head_dim", 64, id="head-dim-default"),
        pytest.param(
            {k: v for k, v in TINY.items() if k != "num_key_value_heads"},
            "num_kv_heads",
            2,
            id="kv-heads-default",
        ),
        pytest.param(
            {"model_type": "llava", "text_config": {**TINY, "vocab_size": 1000}},
            "vocab_size",
            1000,
            id="text-config",
        ),
        pytest.param(
            {**TINY, "dtype": "float16", "torch_dtype": None},
            "torch_dtype",
            "float16",
            id="transformers5-dtype-key",
        ),
    ],
)
def test_shape_from_config(cfg: dict[str, Any], field: str, value: Any) -> None:
    assert getattr(shape_from_config(cfg), field) == value


def test_shape_from_config_names_what_is_missing() -> None:
    with pytest.raises(ArchitectureError, match="vocab_size"):
        shape_from_config({k: v for k, v in TINY.items() if k != "vocab_size"})


@pytest.mark.parametrize(
    ("source", "tied", "head_dim"),
    [
        ("hf://Qwen/Qwen2.5-14B-Instruct", False, 128),
        ("hf://qwen/qwen2.5-14b-instruct", False, 128),
        ("Qwen/Qwen2.5-7B-Instruct", False, 128),
        ("hf://Qwen/Qwen2.5-1.5B-Instruct", True, 128),
        ("hf://google/gemma-2-9b-it", True, 256),
        ("hf://google/gemma-2-27b-it", True, 128),
        ("hf://meta-llama/Llama-3.2-1B-Instruct", True, 64),
        ("hf://meta-llama/Llama-3.1-70B-Instruct", False, 128),
    ],
)
def test_catalog_lookup(source: str, tied: bool, head_dim: int) -> None:
    shape = find_model(source)
    assert shape is not None
    assert (shape.tie_word_embeddings, shape.head_dim) == (tied, head_dim)


def test_catalog_unknown_model() -> None:
    assert find_model("hf://someone/unknown-model") is None
    assert find_model("pvc://models/qwen") is None


@pytest.mark.parametrize(
    ("name", "gib"),
    [
        ("H100-80GB", 79.19),
        ("h100", 79.19),
        ("H200", 139.8),
        ("A100-40GB", 39.39),
        ("A100-80GB", 79.15),
        ("L40S", 44.52),
        ("L4", 22.05),
        ("A10G", 22.07),
        ("RTX 4090", 23.65),
        ("A6000", 47.54),
    ],
)
def test_gpu_catalog(name: str, gib: float) -> None:
    gpu = find_gpu(name)
    assert gpu is not None and gpu.memory_gib == gib
