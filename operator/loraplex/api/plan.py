"""The memory plan as it appears in `BaseModel.status.plan`.

The planner (`loraplex.planner`) computes a richer object; this is the part users read with
`kubectl get bm -o yaml` and that dashboards can scrape.
"""

from __future__ import annotations

from pydantic import Field

from loraplex.api.common import Wire


class PlanBreakdown(Wire):
    """Per-GPU memory in GiB, by what uses it."""

    weights: float = Field(description="Model weights on one GPU (after tensor-parallel split).")
    lora_slots: float = Field(description="Preallocated LoRA A/B buffers for all GPU slots.")
    activations: float = Field(description="Peak activation estimate for one profiling batch.")
    kv_cache: float = Field(description="KV cache left for sequences.")
    other: float = Field(
        default=0.0, description="Non-torch memory inside vLLM's budget (cuBLAS, NCCL buffers)."
    )
    cuda_graphs: float = Field(default=0.0, description="CUDA graph pool (estimated).")
    cuda_graphs_in_budget: bool = Field(
        default=True,
        description="Whether the vLLM release counts CUDA graphs inside its budget (>= 0.21).",
    )
    cuda_context: float = Field(
        default=0.0, description="CUDA context and NCCL communicators, outside vLLM's budget."
    )
    headroom: float = Field(
        description="Left unused: outside vLLM's budget, beyond the CUDA context and graphs."
    )
    total: float = Field(description="GPU memory per device.")


class PlanStatus(Wire):
    """The flags loraplex chose for vLLM and why."""

    feasible: bool = Field(description="False when the model cannot fit; see reasons.")
    max_loras: int = Field(description="--max-loras: adapters resident on the GPU at once.")
    max_lora_rank: int = Field(description="--max-lora-rank.")
    max_cpu_loras: int = Field(description="--max-cpu-loras: adapters cached in host memory.")
    gpu_memory_utilization: float = Field(description="--gpu-memory-utilization.")
    tensor_parallel_size: int = Field(description="--tensor-parallel-size (GPUs per replica).")
    max_model_len: int = Field(description="--max-model-len.")
    breakdown_gi_b: PlanBreakdown | None = Field(
        default=None, alias="breakdownGiB", description="Per-GPU memory by use, in GiB."
    )
    kv_cache_tokens: int = Field(default=0, description="Tokens the KV cache can hold.")
    kv_cache_sequences: float = Field(
        default=0.0, description="Full-length (maxModelLen) sequences the KV cache can hold."
    )
    reasons: list[str] = Field(default_factory=list, description="Why each value was chosen.")
    warnings: list[str] = Field(
        default_factory=list,
        description="What vLLM survives but users should know (e.g. fewer full-length "
        "sequences fit than minKvSequences); also in the Planned condition's message.",
    )
