"""Bytes vLLM preallocates for LoRA slots, mirroring vllm/lora/layers (vLLM 0.32).

vLLM allocates these buffers once, at start-up, for `max_loras` slots of `max_lora_rank`, in
every LoRA-capable module of the model, whatever modules the adapters later target (the only
restriction is the deployment-wide `target_modules` of vLLM's LoRAConfig). The memory is taken
out of what would otherwise be KV cache, which is why the planner has to count it exactly.

Per module, `create_lora_weights` allocates, in `lora_dtype` (= the model dtype by default):
- column-parallel (qkv_proj, gate_up_proj): A [slots, 1, rank, in] per packed slice (full input),
  B [slots, 1, out/tp, rank] per slice;
- row-parallel (o_proj, down_proj): A [slots, 1, rank, in/tp], B [slots, 1, out, rank];
- lm_head (LogitsProcessorWithLoRA): A [slots, 1, rank, hidden], B [slots, 1, vocab, rank],
  not sharded;
- embed_tokens (VocabParallelEmbeddingWithLoRA): A [slots, vocab, rank], B [slots, 1, hidden,
  rank], not sharded.
The last two exist only for model classes with `embedding_modules` (see architecture.py).
The tests in tests/vllm/test_planner_vllm.py compare this with the tensors of a running vLLM.
"""

from __future__ import annotations

from collections.abc import Iterable

from loraplex.planner.architecture import ModelShape

SUPPORTED_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head")
# What an adapter's PEFT target_modules name, mapped to the vLLM module holding their buffers.
_PACKED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def vllm_modules(target_modules: Iterable[str]) -> frozenset[str]:
    """vLLM module names for PEFT-style target module names (q_proj -> qkv_proj)."""
    return frozenset(_PACKED.get(m, m) for m in target_modules)


def module_slot_elements(shape: ModelShape, rank: int, tp: int) -> dict[str, int]:
    """Elements of A plus B for one slot, per module kind, summed over layers, on one GPU."""
    h, d = shape.hidden_size, shape.head_dim
    q_out = shape.num_heads // tp * d
    kv_out = shape.kv_heads_per_rank(tp) * d
    inter = shape.intermediate_size // tp
    qkv_slices = 1 if shape.fused_checkpoint else 3
    gate_up_slices = 1 if shape.fused_checkpoint else 2
    per_layer = {
        "qkv_proj": qkv_slices * rank * h + (q_out + 2 * kv_out) * rank,
        "o_proj": rank * (shape.num_heads * d // tp) + h * rank,
        "gate_up_proj": gate_up_slices * rank * h + 2 * inter * rank,
        "down_proj": rank * inter + h * rank,
    }
    elements = {name: n * shape.num_layers for name, n in per_layer.items()}
    if shape.lora_embeddings:
        elements["embed_tokens"] = shape.vocab_size * rank + h * rank
        elements["lm_head"] = rank * h + shape.vocab_size * rank
    return elements


def lora_slot_bytes(
    shape: ModelShape,
    max_loras: int,
    max_lora_rank: int,
    dtype_bytes: int,
    tp: int = 1,
    target_modules: Iterable[str] | None = None,
) -> int:
    """Bytes of LoRA slot buffers on one GPU.

    `target_modules` is vLLM's deployment-wide restriction (LoRAConfig.target_modules), not an
    adapter's: vLLM sizes buffers for every supported module unless told otherwise.
    """
    per_module = module_slot_elements(shape, max_lora_rank, tp)
    if target_modules is not None:
        wanted = vllm_modules(target_modules)
        per_module = {k: v for k, v in per_module.items() if k in wanted}
    return max_loras * sum(per_module.values()) * dtype_bytes
