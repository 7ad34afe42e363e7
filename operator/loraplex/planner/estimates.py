"""The approximate terms of the memory plan: activation peak and runtime overhead.

Weights, LoRA slot buffers and KV cache per token are exact (checked against vLLM). What vLLM
measures at start-up by profiling (the activation peak of one maximal batch) and what lives
outside PyTorch (CUDA context, CUDA graphs, NCCL buffers) can only be estimated before the pod
runs. The estimates lean high, because an underestimate makes vLLM fail at start while an
overestimate costs a little KV cache.
"""

from __future__ import annotations

from loraplex.planner.architecture import ModelShape

GIB = 1024**3

# vLLM's OpenAI-server defaults (vllm/engine/arg_utils.py, 0.32): max_num_batched_tokens 2048 and
# max_num_seqs 256, or 8192 and 1024 on >= 70 GB GPUs other than A100 (H100/H200 class).
BATCHED_TOKENS = 2048
BATCHED_TOKENS_LARGE = 8192
MAX_NUM_SEQS = 256
MAX_NUM_SEQS_LARGE = 1024

# CUDA context, allocator reserve and CUDA graphs (vLLM captures graphs for batch sizes up to
# 512, typically 0.3-1 GiB); NCCL / custom all-reduce buffers when tensor parallel.
OTHER_BASE_GIB = 1.0
OTHER_TP_GIB = 0.5


def activation_bytes(
    shape: ModelShape,
    dtype_bytes: int,
    tp: int,
    max_lora_rank: int,
    *,
    large_batch: bool = False,
) -> int:
    """Peak activation memory of vLLM's profiling run, on one GPU.

    One decoder layer's live tensors for a full batch of tokens (residual and normed hidden
    states, qkv output, attention output, gate_up output and its activation), plus LoRA's fp32
    shrink buffers, plus the sampler's fp32 logits and probabilities for max_num_seqs rows
    over the whole vocabulary (gathered on every rank).
    """
    tokens = BATCHED_TOKENS_LARGE if large_batch else BATCHED_TOKENS
    seqs = MAX_NUM_SEQS_LARGE if large_batch else MAX_NUM_SEQS
    h = shape.hidden_size
    qkv = (shape.num_heads // tp + 2 * shape.kv_heads_per_rank(tp)) * shape.head_dim
    inter = shape.intermediate_size // tp
    per_token = (3 * h + qkv + 3 * inter) * dtype_bytes + 3 * max_lora_rank * 4
    sampler = seqs * shape.padded_vocab * 4 * 2
    return tokens * per_token + sampler


def other_bytes(tp: int) -> int:
    """Memory vLLM uses outside its weights, activations and KV cache."""
    gib = OTHER_BASE_GIB + (OTHER_TP_GIB if tp > 1 else 0.0)
    return int(gib * GIB)
