"""Choose vLLM's LoRA and memory flags for one BaseModel, or explain why it cannot fit.

Pure: the inputs are the BaseModel spec, what is known about its adapters, and (when the
operator can read it) the model's config.json. The memory model per GPU is

    utilization x total = weights + LoRA slot buffers + activations + other + KV cache

with `headroom` GiB kept free outside vLLM's share. Rules (each has a unit test):
- maxLoraRank auto: the smallest vLLM-allowed value >= the largest adapter rank (unknown ranks
  count as 16, vLLM's default); a user-fixed rank is kept and larger adapters are reported.
- maxLoras auto: room for the pinned adapters plus a working set, in steps of 4 slots, reduced
  while the KV cache would hold fewer than `minKvSequences` full-length sequences.
- maxCpuLoras auto: as many max-rank adapters as a host-memory budget holds (at most 64), never
  below maxLoras.
- gpuMemoryUtilization auto: what the plan needs, with a KV target of twice the KV floor,
  capped so `headroomGiB` stays free. Asking only for what is needed (not the whole GPU) is
  deliberate: vLLM refuses to start when less than utilization x total is free, which is what
  users hit when another process still holds memory.

The flags must not move when an unpinned adapter is added or removed: a flag change rewrites
the pod template, and the rollout reloads the base model, which is what loraplex exists to
avoid. So maxLoras and maxCpuLoras do not follow the adapter count; only an adapter of a
larger rank, or more pinned adapters than the slots hold, change the flags (set maxLoraRank
to avoid the first).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loraplex.api.basemodel import BaseModelSpec
from loraplex.api.plan import PlanBreakdown, PlanStatus
from loraplex.planner.architecture import (
    ArchitectureError,
    ModelShape,
    shape_from_architecture,
    shape_from_config,
    weight_bytes,
)
from loraplex.planner.catalog import find_gpu, find_model
from loraplex.planner.estimates import GIB, activation_bytes, other_bytes
from loraplex.planner.lora_memory import lora_slot_bytes
from loraplex_server.manifest import ALLOWED_MAX_LORA_RANKS

DEFAULT_RANK = 16  # vLLM's --max-lora-rank default, assumed for adapters of unknown rank
MAX_RANK = ALLOWED_MAX_LORA_RANKS[-1]
DEFAULT_MAX_MODEL_LEN = 4096
SLOT_STEP = 4  # auto maxLoras: pinned + at least one free slot, rounded up to this step
MAX_AUTO_CPU_LORAS = 64  # auto maxCpuLoras ceiling (vLLM's host LRU cache of adapters)
KV_TARGET_FACTOR = 2  # auto utilization sizes the KV cache for this many times the floor
HOST_LORA_BUDGET_GIB = 8.0  # host RAM assumed available for vLLM's CPU LoRA cache
UNKNOWN_UTILIZATION = 0.9  # vLLM's default, used when memory cannot be checked
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


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
    """GiB per GPU, by use."""

    weights: float
    lora_slots: float
    activations: float
    kv_cache: float
    other: float
    headroom: float
    total: float

    def to_status(self) -> PlanBreakdown:
        return PlanBreakdown(
            weights=round(self.weights, 3),
            lora_slots=round(self.lora_slots, 3),
            activations=round(self.activations, 3),
            kv_cache=round(self.kv_cache, 3),
            other=round(self.other, 3),
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
        )


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


def allowed_rank_at_least(rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that fits `rank` (None above 512)."""
    return next((r for r in ALLOWED_MAX_LORA_RANKS if r >= rank), None)


def _gib(n: float) -> float:
    return n / GIB


# --- inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    shape: ModelShape | None
    origin: str


def _resolve_shape(spec: BaseModelSpec, config_json: Mapping[str, Any] | None) -> _Shape:
    if spec.model.architecture is not None:
        return _Shape(shape_from_architecture(spec.model.architecture), "spec.model.architecture")
    if config_json is not None:
        try:
            return _Shape(shape_from_config(config_json), "config.json")
        except ArchitectureError as exc:
            return _Shape(None, f"config.json unusable ({exc})")
    found = find_model(spec.model.source)
    if found is not None:
        return _Shape(found, "the built-in catalog")
    return _Shape(None, "")


def _resolve_dtype(spec: BaseModelSpec, shape: ModelShape | None) -> str:
    """vLLM's `--dtype auto`: the checkpoint's dtype, float32 downcast to bfloat16."""
    if spec.model.dtype != "auto":
        return spec.model.dtype
    declared = shape.torch_dtype if shape else None
    if declared in ("float16", "bfloat16"):
        return declared
    return "bfloat16"


def _gpu_total_gib(spec: BaseModelSpec) -> tuple[float | None, bool]:
    if spec.gpu.memory_gi_b is not None:
        large = spec.gpu.memory_gi_b >= 70 and "a100" not in (spec.gpu.product or "").lower()
        return spec.gpu.memory_gi_b, large
    if spec.gpu.product:
        gpu = find_gpu(spec.gpu.product)
        if gpu is not None:
            return gpu.memory_gib, gpu.large_batch_defaults
    return None, False


@dataclass(frozen=True)
class _Rank:
    value: int
    exceeded: tuple[str, ...]
    reason: str
    needed: int  # the smallest allowed rank that fits every adapter (capped at 512)


def _choose_rank(spec: BaseModelSpec, adapters: Sequence[AdapterDemand]) -> _Rank:
    unknown = [a.name for a in adapters if a.rank is None]
    known = [a.rank for a in adapters if a.rank is not None]
    largest = max([*known, *([DEFAULT_RANK] if unknown or not adapters else [])])
    needed = allowed_rank_at_least(largest) or MAX_RANK
    fixed = spec.lora.max_lora_rank
    if isinstance(fixed, int):
        exceeded = tuple(a.name for a in adapters if a.rank is not None and a.rank > fixed)
        why = f"maxLoraRank {fixed} set by the user"
        if exceeded:
            why += f"; adapters above it: {', '.join(exceeded)}"
        return _Rank(fixed, exceeded, why, needed)
    chosen = allowed_rank_at_least(largest)
    if chosen is None:
        exceeded = tuple(a.name for a in adapters if a.rank is not None and a.rank > MAX_RANK)
        return _Rank(
            MAX_RANK,
            exceeded,
            f"maxLoraRank {MAX_RANK}, vLLM's largest; adapters above it: {', '.join(exceeded)}",
            MAX_RANK,
        )
    why = f"maxLoraRank {chosen}: smallest vLLM value >= the largest adapter rank {largest}"
    if unknown:
        why += f" (rank unknown for {len(unknown)} adapter(s), assumed {DEFAULT_RANK})"
    return _Rank(chosen, (), why, chosen)


def _desired_loras(spec: BaseModelSpec, adapters: Sequence[AdapterDemand]) -> int:
    if isinstance(spec.lora.max_loras, int):
        return spec.lora.max_loras
    pinned = sum(a.pinned for a in adapters)
    return SLOT_STEP * math.ceil((pinned + 1) / SLOT_STEP)


def _cpu_loras(
    spec: BaseModelSpec,
    adapters: Sequence[AdapterDemand],
    max_loras: int,
    adapter_bytes: int | None,
) -> tuple[int, str]:
    if isinstance(spec.lora.max_cpu_loras, int):
        value = max(spec.lora.max_cpu_loras, max_loras)
        return value, f"maxCpuLoras {value} set by the user"
    value = max(max_loras, MAX_AUTO_CPU_LORAS)
    why = f"maxCpuLoras {value}: host LRU cache of adapters, independent of the adapter count"
    if adapter_bytes:
        budget = int(HOST_LORA_BUDGET_GIB * GIB // adapter_bytes)
        if budget < value:
            value = max(max_loras, budget)
            why = (
                f"maxCpuLoras {value}: {HOST_LORA_BUDGET_GIB:g} GiB host cache budget at "
                f"{_gib(adapter_bytes):.3f} GiB per max-rank adapter"
            )
    if len(adapters) > value:
        why += f" ({len(adapters)} adapters: the least recently used are reloaded from disk)"
    return value, why


# --- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Costs:
    """Bytes per GPU for one candidate configuration."""

    weights: int
    lora: int
    activations: int
    other: int
    kv_per_token: int
    max_model_len: int

    @property
    def fixed(self) -> int:
        return self.weights + self.lora + self.activations + self.other

    @property
    def sequence(self) -> int:
        return self.kv_per_token * self.max_model_len


def _costs(
    shape: ModelShape,
    dtype_bytes: int,
    tp: int,
    max_loras: int,
    rank: int,
    max_model_len: int,
    large: bool,
) -> _Costs:
    return _Costs(
        weights=weight_bytes(shape, dtype_bytes, tp),
        lora=lora_slot_bytes(shape, max_loras, rank, dtype_bytes, tp),
        activations=activation_bytes(shape, dtype_bytes, tp, rank, large_batch=large),
        other=other_bytes(tp),
        kv_per_token=shape.kv_bytes_per_token(dtype_bytes, tp),
        max_model_len=max_model_len,
    )


def plan_base_model(
    spec: BaseModelSpec,
    adapters: Sequence[AdapterDemand],
    *,
    config_json: Mapping[str, Any] | None = None,
) -> Plan:
    """The plan for `spec` serving `adapters`; never raises for a valid spec."""
    resolved = _resolve_shape(spec, config_json)
    shape = resolved.shape
    dtype = _resolve_dtype(spec, shape)
    dtype_bytes = _DTYPE_BYTES[dtype]
    tp = spec.gpu.count
    rank = _choose_rank(spec, adapters)
    reasons = [rank.reason]
    max_pos = shape.max_position_embeddings if shape else None
    if spec.max_model_len is not None:
        max_model_len = spec.max_model_len
    else:
        max_model_len = min(max_pos or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)
        reasons.append(f"maxModelLen {max_model_len}: min(model context, {DEFAULT_MAX_MODEL_LEN})")
    total_gib, large = _gpu_total_gib(spec)
    adapter_bytes = (
        lora_slot_bytes(shape, 1, rank.value, dtype_bytes, 1) if shape is not None else None
    )
    if shape is None or total_gib is None:
        return _unchecked(spec, adapters, shape, resolved, dtype, rank, max_model_len, reasons)

    reasons.insert(0, f"architecture from {resolved.origin}")
    structural: list[str] = []  # problems no amount of memory fixes
    if shape.num_heads % tp:
        structural.append(
            f"tensor parallel {tp} does not divide the model's {shape.num_heads} attention heads"
        )
    if max_pos is not None and max_model_len > max_pos:
        structural.append(
            f"maxModelLen {max_model_len} exceeds the model's context of {max_pos} tokens"
        )
    total = int(total_gib * GIB)
    headroom = int(spec.memory.headroom_gi_b * GIB)
    budget = total - headroom
    fixed_util = spec.memory.gpu_memory_utilization
    usable = int(fixed_util * total) if fixed_util is not None else budget
    min_seqs = spec.memory.min_kv_sequences

    def costs(
        m: int, r: int = rank.value, length: int = max_model_len, t: int = tp, db: int = dtype_bytes
    ) -> _Costs:
        return _costs(shape, db, t, m, r, length, large)

    pinned = sum(a.pinned for a in adapters)
    floor_loras = max(1, pinned)
    desired = _desired_loras(spec, adapters)
    max_loras = desired
    if not isinstance(spec.lora.max_loras, int):
        while max_loras > floor_loras:
            c = costs(max_loras)
            if c.fixed + min_seqs * c.sequence <= usable:
                break
            max_loras -= 1
        c = costs(max_loras)
        if c.fixed + min_seqs * c.sequence > usable:
            max_loras = desired  # fewer slots do not make it fit; report the real demand
        if max_loras < desired:
            reasons.append(
                f"maxLoras {max_loras}: reduced from {desired} so the KV cache holds "
                f"{min_seqs} sequences of {max_model_len} tokens"
            )
        else:
            reasons.append(
                f"maxLoras {max_loras}: room for {pinned} pinned adapter(s) and a working set, "
                f"in steps of {SLOT_STEP} so adding adapters does not change the flags"
            )
    else:
        reasons.append(f"maxLoras {max_loras} set by the user")
        if max_loras < pinned:
            reasons.append(
                f"maxLoras {max_loras} is below the {pinned} pinned adapters: they cannot all "
                "stay resident"
            )
    c = costs(max_loras)
    floor_bytes = min_seqs * c.sequence
    if fixed_util is None:
        need = c.fixed + KV_TARGET_FACTOR * floor_bytes
        cap = math.floor(budget / total * 10_000) / 10_000
        utilization = min(math.ceil(need / total * 10_000) / 10_000, cap)
        fits_memory = c.fixed + floor_bytes <= budget
        reasons.append(
            f"gpuMemoryUtilization {utilization:.4f}: weights + LoRA slots + activations + "
            f"other + KV for {KV_TARGET_FACTOR * min_seqs} sequences, capped to leave "
            f"{spec.memory.headroom_gi_b:g} GiB free"
        )
    else:
        utilization = fixed_util
        if usable > budget:
            reasons.append(
                f"gpuMemoryUtilization {fixed_util} leaves {_gib(total - usable):.2f} GiB free, "
                f"less than headroomGiB {spec.memory.headroom_gi_b:g}"
            )
        # vLLM refuses to start below one full-length sequence; below the floor it only warns.
        fits_memory = c.fixed + c.sequence <= usable
        if fits_memory and c.fixed + floor_bytes > usable:
            reasons.append(
                f"KV cache holds fewer than minKvSequences {min_seqs} full-length sequences"
            )
    kv = max(0, int(utilization * total) - c.fixed)
    kv_tokens = kv // c.kv_per_token
    breakdown = Breakdown(
        weights=_gib(c.weights),
        lora_slots=_gib(c.lora),
        activations=_gib(c.activations),
        kv_cache=_gib(kv),
        other=_gib(c.other),
        headroom=_gib(headroom),
        total=total_gib,
    )
    max_cpu, cpu_reason = _cpu_loras(spec, adapters, max_loras, adapter_bytes)
    reasons.append(cpu_reason)
    feasible = fits_memory and not structural
    fix = None
    if feasible:
        message = (
            f"fits: {breakdown.weights:.1f} GiB weights + {breakdown.lora_slots:.2f} GiB for "
            f"{max_loras} LoRA slot(s) of rank {rank.value} + {breakdown.kv_cache:.1f} GiB KV "
            f"({kv_tokens} tokens, {kv_tokens / max_model_len:.1f} x {max_model_len}) at "
            f"utilization {utilization:.4f} of {total_gib:g} GiB per GPU"
        )
    else:
        fix_cost = _gib(c.fixed + floor_bytes)
        if structural:
            message = "; ".join(structural)
            fix = (
                "set spec.gpu.count to a divisor of the attention heads"
                if shape.num_heads % tp
                else f"set spec.maxModelLen <= {max_pos}"
            )
        else:
            fix = _cheapest_fix(
                spec,
                shape,
                costs,
                _Limits(max_loras, floor_loras, rank.value, rank.needed),
                usable,
                budget,
                min_seqs,
            )
            message = (
                f"does not fit: needs {fix_cost:.1f} GiB per GPU (weights "
                f"{breakdown.weights:.1f} + LoRA slots {breakdown.lora_slots:.2f} + activations "
                f"{breakdown.activations:.1f} + other {breakdown.other:.1f} + KV for {min_seqs} x "
                f"{max_model_len} tokens {_gib(floor_bytes):.1f}) but {_gib(usable):.1f} of "
                f"{total_gib:g} GiB is usable"
            )
        message += f"; cheapest fix: {fix}"
    return Plan(
        feasible=feasible,
        max_loras=max_loras,
        max_lora_rank=rank.value,
        max_cpu_loras=max_cpu,
        gpu_memory_utilization=utilization,
        tensor_parallel_size=tp,
        max_model_len=max_model_len,
        dtype=dtype,
        breakdown=breakdown,
        kv_cache_tokens=kv_tokens,
        kv_cache_sequences=kv_tokens / max_model_len,
        message=message,
        architecture_known=True,
        reasons=reasons,
        fix=fix,
        rank_exceeded=rank.exceeded,
    )


@dataclass(frozen=True)
class _Limits:
    max_loras: int
    floor_loras: int  # pinned adapters need a slot each
    rank: int
    needed_rank: int  # what the adapters require


def _cheapest_fix(
    spec: BaseModelSpec,
    shape: ModelShape,
    costs: Any,
    limits: _Limits,
    usable: int,
    budget: int,
    min_seqs: int,
) -> str:
    """The first change, in order of what it costs the user, that makes the plan fit.

    Settings come first (utilization, slots, rank, context, dtype), hardware last.
    """

    def fits(c: _Costs, room: int = usable) -> bool:
        return bool(c.fixed + min_seqs * c.sequence <= room)

    m, rank = limits.max_loras, limits.rank
    if usable < budget and fits(costs(m), budget):
        return "raise spec.memory.gpuMemoryUtilization, or omit it for the planner to choose"
    if m > limits.floor_loras and fits(costs(limits.floor_loras)):
        best = max(k for k in range(limits.floor_loras, m) if fits(costs(k)))
        return f"fewer LoRA slots: set spec.lora.maxLoras to {best}"
    for r in reversed(ALLOWED_MAX_LORA_RANKS):  # the largest rank that fits
        if limits.needed_rank <= r < rank and fits(costs(m, r)):
            return f"lower rank: set spec.lora.maxLoraRank to {r}"
    length = costs(m).max_model_len
    while length > 512:
        length //= 2
        if fits(costs(m, rank, length)):
            return f"shorter context: set spec.maxModelLen to {length}"
    if spec.model.dtype == "float32" and fits(costs(m, db=2)):
        return "smaller dtype: set spec.model.dtype to bfloat16"
    tp = spec.gpu.count
    for more in (2, 4, 8, 16):
        if more > tp and shape.num_heads % more == 0 and fits(costs(m, rank, t=more)):
            return f"{more} GPUs per replica: set spec.gpu.count to {more} (tensor parallel {more})"
    return "a GPU with more memory, or a smaller model or quantized weights"


def _unchecked(
    spec: BaseModelSpec,
    adapters: Sequence[AdapterDemand],
    shape: ModelShape | None,
    resolved: _Shape,
    dtype: str,
    rank: _Rank,
    max_model_len: int,
    reasons: list[str],
) -> Plan:
    """Flags vLLM will accept when memory cannot be checked, and how to let the planner check."""
    if shape is None:
        what = "architecture unknown"
        how = (
            "set spec.model.architecture (hidden_size, layers, heads, vocab) or use a model "
            "source the planner knows"
        )
        if resolved.origin:
            what += f": {resolved.origin}"
    else:
        what = "GPU memory unknown"
        how = "set spec.gpu.memoryGiB or a known spec.gpu.product (e.g. H100-80GB, L40S)"
    max_loras = _desired_loras(spec, adapters)
    adapter_bytes = lora_slot_bytes(shape, 1, rank.value, _DTYPE_BYTES[dtype], 1) if shape else None
    max_cpu, cpu_reason = _cpu_loras(spec, adapters, max_loras, adapter_bytes)
    utilization = spec.memory.gpu_memory_utilization or UNKNOWN_UTILIZATION
    message = f"memory not checked ({what}); to check it, {how}"
    feasible = True
    if shape is not None and shape.num_heads % spec.gpu.count:
        feasible = False
        how = "set spec.gpu.count to a divisor of the attention heads"
        message = (
            f"tensor parallel {spec.gpu.count} does not divide the model's {shape.num_heads} "
            f"attention heads; {message}"
        )
    return Plan(
        feasible=feasible,
        max_loras=max_loras,
        max_lora_rank=rank.value,
        max_cpu_loras=max_cpu,
        gpu_memory_utilization=utilization,
        tensor_parallel_size=spec.gpu.count,
        max_model_len=max_model_len,
        dtype=dtype,
        breakdown=None,
        kv_cache_tokens=0,
        kv_cache_sequences=0.0,
        message=message,
        architecture_known=shape is not None,
        reasons=[*reasons, f"maxLoras {max_loras}", cpu_reason],
        fix=how,
        rank_exceeded=rank.exceeded,
    )
