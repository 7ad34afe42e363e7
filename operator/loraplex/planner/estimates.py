"""The estimated terms of the memory plan: activation peak, non-torch, CUDA graphs, context.

Weights, LoRA slot buffers and KV cache per token are exact (checked against vLLM). What vLLM
measures at start-up (the activation peak of its profiling run, memory outside PyTorch, the
CUDA graph pool) can only be estimated before the pod runs. The constants and their sources
are in calibration.py; this module is the arithmetic.
"""

from __future__ import annotations

from loraplex.planner.architecture import ModelShape
from loraplex.planner.calibration import (
    CONTEXT_TP1_GIB,
    CONTEXT_TP_GIB,
    GIB,
    GRAPH_BASE_GIB,
    GRAPH_PER_LAYER_GIB,
    OTHER_TP1_GIB,
    OTHER_TP_GIB,
    SAMPLER_LOGIT_COPIES,
    Batch,
    Calibration,
)

__all__ = [
    "GIB",
    "activation_bytes",
    "context_bytes",
    "forward_peak_bytes",
    "graph_bytes",
    "other_bytes",
    "sampler_peak_bytes",
]


def forward_peak_bytes(
    shape: ModelShape, dtype_bytes: int, tp: int, max_lora_rank: int, batch: Batch
) -> int:
    """One decoder layer's live tensors for the whole profiling batch, on one GPU.

    Residual and normed hidden states, qkv output, attention output, gate_up output and its
    activation, plus LoRA's fp32 shrink buffers. This peak shrinks with tensor parallel; it
    sets the activation term only when the sampler's peak is smaller (small max_num_seqs with
    many batched tokens, e.g. the offline LLM class on an A100 [B2]).
    """
    h = shape.hidden_size
    qkv = (shape.num_heads // tp + 2 * shape.kv_heads_per_rank(tp)) * shape.head_dim
    inter = shape.intermediate_size // tp
    per_token = (3 * h + qkv + 3 * inter) * dtype_bytes + 3 * max_lora_rank * 4
    return batch.tokens * per_token


def sampler_peak_bytes(shape: ModelShape, dtype_bytes: int, batch: Batch) -> int:
    """The sampler step of the profiling run, on every GPU alike (logits are gathered whole
    on each rank, so this does not shrink with tensor parallel, as the logs show: 1.89 GiB
    for Llama-3.1-8B at TP 1 and TP 2 [A1, A2])."""
    logits = batch.seqs * shape.padded_vocab * 4
    hidden = batch.tokens * shape.hidden_size * dtype_bytes
    return int(SAMPLER_LOGIT_COPIES * logits) + hidden


def activation_bytes(
    shape: ModelShape, dtype_bytes: int, tp: int, max_lora_rank: int, batch: Batch
) -> int:
    """vLLM's "torch peak memory increase": the larger of the forward and sampler peaks."""
    return max(
        forward_peak_bytes(shape, dtype_bytes, tp, max_lora_rank, batch),
        sampler_peak_bytes(shape, dtype_bytes, batch),
    )


def other_bytes(tp: int, cal: Calibration) -> int:
    """Non-torch memory inside the budget; in V0 the budget also held the CUDA context."""
    gib = OTHER_TP1_GIB if tp == 1 else OTHER_TP_GIB
    if cal.context_in_budget:
        gib += CONTEXT_TP1_GIB if tp == 1 else CONTEXT_TP_GIB
    return int(gib * GIB)


def context_bytes(tp: int) -> int:
    """The CUDA context and NCCL communicators present before vLLM's memory snapshot."""
    return int((CONTEXT_TP1_GIB if tp == 1 else CONTEXT_TP_GIB) * GIB)


def graph_bytes(shape: ModelShape, *, lora: bool, eager: bool = False) -> int:
    """The CUDA graph pool vLLM captures after sizing the KV cache (0 with enforce_eager)."""
    if eager:
        return 0
    per_layer = GRAPH_PER_LAYER_GIB * (2 if lora else 1)
    return int((GRAPH_BASE_GIB + per_layer * shape.num_layers) * GIB)
