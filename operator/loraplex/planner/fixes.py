"""The cheapest change that makes an infeasible plan fit.

Settings come first, in order of what they cost the user (utilization, slots, rank, context,
dtype), hardware last. Each candidate is the same `Sizing` with one field replaced, and fits
when vLLM would start: one full-length sequence in the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from loraplex.planner.sizing import Sizing
from loraplex_server.manifest import ALLOWED_MAX_LORA_RANKS

FIT_SEQUENCES = 1  # vLLM refuses to start below one full-length sequence


@dataclass(frozen=True)
class Limits:
    """The slot and rank settings of the failed plan, and how far they may move."""

    max_loras: int
    floor_loras: int  # pinned adapters need a slot each
    rank: int
    needed_rank: int  # what the adapters require
    user_dtype: str


def cheapest_fix(sizing: Sizing, limits: Limits) -> str:
    """The first change, in order of what it costs the user, that makes the plan fit."""
    m, rank = limits.max_loras, limits.rank

    def fits(s: Sizing, loras: int = m, r: int = rank) -> bool:
        return s.fits(s.costs(loras, r), FIT_SEQUENCES)

    auto = replace(sizing, fixed_utilization=None)
    if sizing.fixed_utilization is not None and fits(auto):
        return "raise spec.memory.gpuMemoryUtilization, or omit it for the planner to choose"
    if m > limits.floor_loras and fits(sizing, limits.floor_loras):
        best = max(k for k in range(limits.floor_loras, m) if fits(sizing, k))
        return f"fewer LoRA slots: set spec.lora.maxLoras to {best}"
    for r in reversed(ALLOWED_MAX_LORA_RANKS):  # the largest rank that fits
        if limits.needed_rank <= r < rank and fits(sizing, m, r):
            return f"lower rank: set spec.lora.maxLoraRank to {r}"
    length = sizing.max_model_len
    while length > 512:
        length //= 2
        if fits(replace(sizing, max_model_len=length)):
            return f"shorter context: set spec.maxModelLen to {length}"
    if limits.user_dtype == "float32" and fits(replace(sizing, dtype_bytes=2)):
        return "smaller dtype: set spec.model.dtype to bfloat16"
    for more in (2, 4, 8, 16):
        bigger = replace(sizing, tp=more)
        if more > sizing.tp and sizing.shape.num_heads % more == 0 and fits(bigger):
            return f"{more} GPUs per replica: set spec.gpu.count to {more} (tensor parallel {more})"
    return "a GPU with more memory, or a smaller model or quantized weights"
