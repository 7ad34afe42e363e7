"""What the planner returns: the flags chosen for vLLM, the memory they imply, and why.

`plan.py` computes a `Plan`; the renderer, the CLI and the status read it. `vllm_flags` is the
one definition of the flags a plan decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplex.api.plan import PlanBreakdown, PlanStatus


@dataclass(frozen=True)
class AdapterDemand:
    """What the planner needs to know about one adapter of the base model.

    `target_modules` does not change the plan: vLLM preallocates slot buffers for every
    LoRA-capable module whatever modules an adapter targets. It is carried so callers can pass
    what they know without filtering it.
    """

    name: str
    rank: int | None  # None = unknown yet
    pinned: bool = False
    target_modules: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Breakdown:
    """GiB per GPU, by use. `headroom` is what nobody uses: outside vLLM's budget, beyond the
    CUDA context and (before vLLM 0.21) the graph pool."""

    weights: float
    lora_slots: float
    activations: float
    kv_cache: float
    other: float
    cuda_graphs: float
    cuda_graphs_in_budget: bool
    cuda_context: float
    headroom: float
    total: float

    def to_status(self) -> PlanBreakdown:
        return PlanBreakdown(
            weights=round(self.weights, 3),
            lora_slots=round(self.lora_slots, 3),
            activations=round(self.activations, 3),
            kv_cache=round(self.kv_cache, 3),
            other=round(self.other, 3),
            cuda_graphs=round(self.cuda_graphs, 3),
            cuda_graphs_in_budget=self.cuda_graphs_in_budget,
            cuda_context=round(self.cuda_context, 3),
            headroom=round(self.headroom, 3),
            total=round(self.total, 3),
        )


@dataclass(frozen=True)
class Plan:
    """The flags chosen for vLLM, the memory they imply, and why."""

    feasible: bool
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int
    gpu_memory_utilization: float
    tensor_parallel_size: int
    max_model_len: int
    dtype: str
    breakdown: Breakdown | None
    kv_cache_tokens: int
    kv_cache_sequences: float
    message: str
    architecture_known: bool
    reasons: list[str] = field(default_factory=list)
    fix: str | None = None
    rank_exceeded: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def reason_for(self, flag: str) -> str | None:
        """Why a planned flag (`--max-lora-rank`) has its value: the reason naming it."""
        word = _FLAG_WORDS.get(flag)
        return next((r for r in self.reasons if word and r.startswith(word + " ")), None)

    def to_status(self) -> PlanStatus:
        return PlanStatus(
            feasible=self.feasible,
            max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank,
            max_cpu_loras=self.max_cpu_loras,
            gpu_memory_utilization=self.gpu_memory_utilization,
            tensor_parallel_size=self.tensor_parallel_size,
            max_model_len=self.max_model_len,
            breakdown_gi_b=self.breakdown.to_status() if self.breakdown else None,
            kv_cache_tokens=self.kv_cache_tokens,
            kv_cache_sequences=round(self.kv_cache_sequences, 2),
            reasons=[self.message, *self.reasons],
            warnings=list(self.warnings),
        )


_FLAG_WORDS = {
    "--max-loras": "maxLoras",
    "--max-lora-rank": "maxLoraRank",
    "--max-cpu-loras": "maxCpuLoras",
    "--gpu-memory-utilization": "gpuMemoryUtilization",
    "--max-model-len": "maxModelLen",
}


def vllm_flags(plan: Plan) -> list[str]:
    """vLLM command-line flags for a plan: the one definition the renderer and CLI share.

    Only what the plan decides; `--enable-lora`, the model and the port are the renderer's.
    """
    return [
        "--max-loras",
        str(plan.max_loras),
        "--max-lora-rank",
        str(plan.max_lora_rank),
        "--max-cpu-loras",
        str(plan.max_cpu_loras),
        "--gpu-memory-utilization",
        f"{plan.gpu_memory_utilization:.4f}",
        "--tensor-parallel-size",
        str(plan.tensor_parallel_size),
        "--max-model-len",
        str(plan.max_model_len),
        "--dtype",
        plan.dtype,
    ]
