"""Choose vLLM's LoRA and memory flags for one BaseModel, or explain why it cannot fit.

Pure: the inputs are the BaseModel spec, what is known about its adapters, and (when the
operator can read it) the model's config.json. The memory model per GPU follows vLLM's
(sizing.py, calibration.py for each term's source):

    utilization x total = weights + LoRA slots + activations + other [+ CUDA graphs] + KV cache
    (1 - utilization) x total >= CUDA context [+ CUDA graphs] + headroomGiB

(CUDA graphs are inside the budget from vLLM 0.21.0, outside before). Rules (each has a test):
- gpuMemoryUtilization auto: the highest safe value (a pod that owns its GPUs should use
  them: the KV cache sets batch size and throughput), at most 0.95; a user who wants a smaller
  footprint sets a number, or memoryGiB for a shared GPU.
- feasible: what vLLM starts with, one full-length sequence in the KV cache; fewer than
  minKvSequences (the expected concurrency) is a warning with the numbers.
- maxLoraRank auto: the smallest vLLM-allowed value >= the largest adapter rank (unknown ranks
  count as 16, vLLM's default), one allowed step higher when the KV cache still holds
  minKvSequences, and the rank the pods run with while it covers every adapter; a user-fixed
  rank is kept and larger adapters are reported.
- maxLoras auto: room for the pinned adapters plus a working set, in steps of 4 slots, reduced
  while the KV cache would hold fewer than minKvSequences full-length sequences.
- maxCpuLoras auto: as many max-rank adapters as a host-memory budget holds (at most 64), never
  below maxLoras.

The flags must not move when an unpinned adapter is added or removed: a flag change rewrites
the pod template, and the rollout reloads the base model, which is what loraplex exists to
avoid. So maxLoras and maxCpuLoras do not follow the adapter count, and maxLoraRank keeps a
step of headroom; only an adapter above it, or more pinned adapters than the slots hold,
change the flags (set maxLoraRank to avoid the first).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from loraplex.api.basemodel import BaseModelSpec
from loraplex.planner.architecture import (
    ArchitectureError,
    ModelShape,
    shape_from_architecture,
    shape_from_config,
)
from loraplex.planner.calibration import (
    DEFAULT_CALIBRATION,
    GIB,
    MAX_AUTO_UTILIZATION,
    Calibration,
    calibration_for,
    version_from_image,
)
from loraplex.planner.catalog import find_gpu, find_model
from loraplex.planner.fixes import Limits, cheapest_fix
from loraplex.planner.lora_memory import lora_slot_bytes
from loraplex.planner.result import AdapterDemand, Breakdown, Plan
from loraplex.planner.sizing import Costs, Sizing
from loraplex_server.manifest import ALLOWED_MAX_LORA_RANKS

DEFAULT_RANK = 16  # vLLM's --max-lora-rank default, assumed for adapters of unknown rank
MAX_RANK = ALLOWED_MAX_LORA_RANKS[-1]
DEFAULT_MAX_MODEL_LEN = 4096
SLOT_STEP = 4  # auto maxLoras: pinned + at least one free slot, rounded up to this step
MAX_AUTO_CPU_LORAS = 64  # auto maxCpuLoras ceiling (vLLM's host LRU cache of adapters)
HOST_LORA_BUDGET_GIB = 8.0  # host RAM assumed available for vLLM's CPU LoRA cache
UNKNOWN_UTILIZATION = 0.9  # vLLM's default, used when memory cannot be checked
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


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


def _gpu_total_gib(spec: BaseModelSpec) -> float | None:
    if spec.gpu.memory_gi_b is not None:
        return spec.gpu.memory_gi_b
    gpu = find_gpu(spec.gpu.product) if spec.gpu.product else None
    return gpu.memory_gib if gpu is not None else None


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


# --- the plan: named steps over one Sizing ----------------------------------------------------


def plan_base_model(
    spec: BaseModelSpec,
    adapters: Sequence[AdapterDemand],
    *,
    config_json: Mapping[str, Any] | None = None,
    running_rank: int | None = None,
    vllm_version: str | None = None,
) -> Plan:
    """The plan for `spec` serving `adapters`; never raises for a valid spec.

    `running_rank` is the maxLoraRank the pods run with now (from the published manifest):
    kept while it still covers every adapter, so adapter changes do not roll the pods.
    `vllm_version` picks the calibration; by default the release in the engine image tag, or
    loraplex.versions.VLLM_VERSION.
    """
    resolved = _resolve_shape(spec, config_json)
    shape = resolved.shape
    dtype = _resolve_dtype(spec, shape)
    rank = _choose_rank(spec, adapters)
    max_model_len, length_reason = _choose_max_model_len(spec, shape)
    reasons = [rank.reason, *length_reason]
    total_gib = _gpu_total_gib(spec)
    if shape is None or total_gib is None:
        return _unchecked(spec, adapters, shape, resolved, dtype, rank, max_model_len, reasons)
    sizing = Sizing(
        shape=shape,
        dtype_bytes=_DTYPE_BYTES[dtype],
        tp=spec.gpu.count,
        max_model_len=max_model_len,
        total_gib=total_gib,
        product=spec.gpu.product,
        cal=_calibration(spec, vllm_version),
        headroom_gib=spec.memory.headroom_gi_b,
        fixed_utilization=spec.memory.gpu_memory_utilization,
        min_seqs=spec.memory.min_kv_sequences,
    )
    slots = _choose_slots(spec, adapters, sizing, rank.value)
    rank = _rank_headroom(spec, sizing, slots.value, rank, running_rank)
    reasons = [
        f"architecture from {resolved.origin}; {sizing.cal.label}",
        rank.reason,
        *length_reason,
        slots.reason,
        _utilization_reason(sizing),
    ]
    return _assemble(spec, adapters, sizing, slots, rank, dtype, reasons)


def _choose_max_model_len(spec: BaseModelSpec, shape: ModelShape | None) -> tuple[int, list[str]]:
    if spec.max_model_len is not None:
        return spec.max_model_len, []
    max_pos = shape.max_position_embeddings if shape else None
    length = min(max_pos or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)
    return length, [f"maxModelLen {length}: min(model context, {DEFAULT_MAX_MODEL_LEN})"]


def _calibration(spec: BaseModelSpec, vllm_version: str | None) -> Calibration:
    version = vllm_version or version_from_image(spec.engine.image)
    return calibration_for(version) if version else DEFAULT_CALIBRATION


@dataclass(frozen=True)
class _Slots:
    value: int
    floor: int  # pinned adapters need a slot each
    reason: str


def _choose_slots(
    spec: BaseModelSpec, adapters: Sequence[AdapterDemand], sizing: Sizing, rank: int
) -> _Slots:
    """maxLoras: pinned + a working set in steps, fewer while the KV cache would hold fewer
    than minKvSequences full-length sequences (the expected concurrency)."""
    pinned = sum(a.pinned for a in adapters)
    floor = max(1, pinned)
    desired = _desired_loras(spec, adapters)
    if isinstance(spec.lora.max_loras, int):
        why = f"maxLoras {desired} set by the user"
        if desired < pinned:
            why += f"; below the {pinned} pinned adapters: they cannot all stay resident"
        return _Slots(desired, floor, why)
    value, seqs = desired, sizing.min_seqs
    for seqs in dict.fromkeys((sizing.min_seqs, 1)):  # the concurrency, else what vLLM needs
        value = desired
        while value > floor and not sizing.fits(sizing.costs(value, rank), seqs):
            value -= 1
        if sizing.fits(sizing.costs(value, rank), seqs):
            break
    else:
        value = desired  # fewer slots do not make it fit; report the real demand
    if value < desired:
        why = (
            f"maxLoras {value}: reduced from {desired} so the KV cache holds "
            f"{seqs} sequence(s) of {sizing.max_model_len} tokens"
        )
    else:
        why = (
            f"maxLoras {value}: room for {pinned} pinned adapter(s) and a working set, "
            f"in steps of {SLOT_STEP} so adding adapters does not change the flags"
        )
    return _Slots(value, floor, why)


def _rank_headroom(
    spec: BaseModelSpec, sizing: Sizing, slots: int, rank: _Rank, running: int | None
) -> _Rank:
    """Auto maxLoraRank one allowed step above what the adapters need, when the KV cache
    still holds minKvSequences: one larger adapter then loads without restarting vLLM. The
    rank the pods already run with is kept while it covers every adapter and fits."""
    if isinstance(spec.lora.max_lora_rank, int) or rank.exceeded:
        return rank

    def fits(r: int) -> bool:
        return sizing.fits(sizing.costs(slots, r), sizing.min_seqs)

    covers = running in ALLOWED_MAX_LORA_RANKS and running is not None and running >= rank.needed
    if covers and running is not None and (running == rank.value or fits(running)):
        why = f"maxLoraRank {running}: the rank the pods run with covers every adapter"
        return replace(rank, value=running, reason=why)
    bigger = next((r for r in ALLOWED_MAX_LORA_RANKS if r > rank.value), None)
    if bigger is None or not fits(bigger):
        return rank
    why = (
        f"maxLoraRank {bigger}: one step above {rank.value} (what the adapters need), so one "
        "larger adapter does not restart vLLM"
    )
    return replace(rank, value=bigger, reason=why)


def _utilization_reason(sizing: Sizing) -> str:
    if sizing.fixed_utilization is not None:
        return f"gpuMemoryUtilization {sizing.fixed_utilization} set by the user"
    c = sizing.costs(1, 1)
    graphs = "" if c.graphs_in_budget else f" + CUDA graphs {_gib(c.graphs):.2f}"
    net = " net of CUDA graphs" if c.graphs_in_budget else ""
    return (
        f"gpuMemoryUtilization {sizing.auto_utilization():.4f}: the highest safe value, at "
        f"most {MAX_AUTO_UTILIZATION}{net}, leaving CUDA context {_gib(c.context):.2f}"
        f"{graphs} + headroomGiB {sizing.headroom_gib:g} outside vLLM's budget"
    )


def _warnings(sizing: Sizing, c: Costs, kv_tokens: int) -> list[str]:
    """What vLLM would survive but the user should know, with the numbers."""
    out: list[str] = []
    seqs = kv_tokens / sizing.max_model_len
    if 1 <= seqs < sizing.min_seqs:
        out.append(
            f"the KV cache holds {seqs:.1f} full-length sequences of {sizing.max_model_len} "
            f"tokens, fewer than minKvSequences {sizing.min_seqs}: concurrent long requests "
            "will queue"
        )
    util = sizing.fixed_utilization
    if util is None:
        return out
    start_limit = (sizing.total - c.context) / sizing.total
    if util > start_limit:
        out.append(
            f"gpuMemoryUtilization {util} asks for {_gib(sizing.budget()):.2f} GiB but about "
            f"{_gib(sizing.total - c.context):.2f} GiB is free once the CUDA context is up: "
            f"vLLM refuses to start above {start_limit:.4f}"
        )
    elif sizing.budget() + c.outside_budget > sizing.total:
        out.append(
            f"gpuMemoryUtilization {util} leaves {_gib(sizing.total - sizing.budget()):.2f} GiB "
            f"outside vLLM, less than the CUDA context and graph pool "
            f"({_gib(c.outside_budget):.2f} GiB): graph capture may run out of memory"
        )
    elif _gib(sizing.idle(c)) < sizing.headroom_gib:
        out.append(
            f"gpuMemoryUtilization {util} leaves {_gib(sizing.idle(c)):.2f} GiB free, less "
            f"than headroomGiB {sizing.headroom_gib:g}"
        )
    return out


def _structural(spec: BaseModelSpec, sizing: Sizing) -> tuple[list[str], str | None]:
    """Problems no amount of memory fixes, and the fix."""
    shape, tp = sizing.shape, sizing.tp
    if shape.num_heads % tp:
        why = f"tensor parallel {tp} does not divide the model's {shape.num_heads} attention heads"
        return [why], "set spec.gpu.count to a divisor of the attention heads"
    max_pos = shape.max_position_embeddings
    if max_pos is not None and sizing.max_model_len > max_pos:
        why = f"maxModelLen {sizing.max_model_len} exceeds the model's context of {max_pos} tokens"
        return [why], f"set spec.maxModelLen <= {max_pos}"
    return [], None


def _breakdown(sizing: Sizing, c: Costs) -> Breakdown:
    return Breakdown(
        weights=_gib(c.weights),
        lora_slots=_gib(c.lora),
        activations=_gib(c.activations),
        kv_cache=_gib(sizing.kv_bytes(c)),
        other=_gib(c.other),
        cuda_graphs=_gib(c.graphs),
        cuda_graphs_in_budget=c.graphs_in_budget,
        cuda_context=_gib(c.context),
        headroom=_gib(sizing.idle(c)),
        total=sizing.total_gib,
    )


@dataclass(frozen=True)
class _Verdict:
    feasible: bool
    message: str
    fix: str | None


def _verdict(
    spec: BaseModelSpec, sizing: Sizing, slots: _Slots, rank: _Rank, c: Costs, b: Breakdown
) -> _Verdict:
    """Feasible is vLLM's own rule (one full-length sequence); the message has the numbers,
    and when it does not fit, the cheapest fix."""
    util, length = sizing.utilization(), sizing.max_model_len
    structural, fix = _structural(spec, sizing)
    if structural:
        return _Verdict(False, "; ".join(structural) + f"; cheapest fix: {fix}", fix)
    if sizing.fits(c, 1):
        tokens = sizing.kv_tokens(c)
        return _Verdict(
            True,
            f"fits: {b.weights:.1f} GiB weights + {b.lora_slots:.2f} GiB for {slots.value} "
            f"LoRA slot(s) of rank {rank.value} + {b.kv_cache:.1f} GiB KV ({tokens} tokens, "
            f"{tokens / length:.1f} x {length}) at utilization {util:.4f} of "
            f"{sizing.total_gib:g} GiB per GPU",
            None,
        )
    limits = Limits(slots.value, slots.floor, rank.value, rank.needed, spec.model.dtype)
    fix = cheapest_fix(sizing, limits)
    graphs = f" + CUDA graphs {b.cuda_graphs:.1f}" if c.graphs_in_budget else ""
    return _Verdict(
        False,
        f"does not fit: needs {_gib(c.in_budget + c.sequence):.1f} GiB per GPU (weights "
        f"{b.weights:.1f} + LoRA slots {b.lora_slots:.2f} + activations "
        f"{b.activations:.1f} + other {b.other:.1f}{graphs} + KV for one sequence of "
        f"{length} tokens {_gib(c.sequence):.1f}) but {_gib(sizing.budget()):.1f} of "
        f"{sizing.total_gib:g} GiB is usable at utilization {util:.4f}; cheapest fix: {fix}",
        fix,
    )


def _assemble(
    spec: BaseModelSpec,
    adapters: Sequence[AdapterDemand],
    sizing: Sizing,
    slots: _Slots,
    rank: _Rank,
    dtype: str,
    reasons: list[str],
) -> Plan:
    c = sizing.costs(slots.value, rank.value)
    b = _breakdown(sizing, c)
    kv_tokens = sizing.kv_tokens(c)
    verdict = _verdict(spec, sizing, slots, rank, c, b)
    adapter_bytes = lora_slot_bytes(sizing.shape, 1, rank.value, sizing.dtype_bytes, 1)
    max_cpu, cpu_reason = _cpu_loras(spec, adapters, slots.value, adapter_bytes)
    return Plan(
        feasible=verdict.feasible,
        max_loras=slots.value,
        max_lora_rank=rank.value,
        max_cpu_loras=max_cpu,
        gpu_memory_utilization=sizing.utilization(),
        tensor_parallel_size=sizing.tp,
        max_model_len=sizing.max_model_len,
        dtype=dtype,
        breakdown=b,
        kv_cache_tokens=kv_tokens,
        kv_cache_sequences=kv_tokens / sizing.max_model_len,
        message=verdict.message,
        architecture_known=True,
        reasons=[*reasons, cpu_reason],
        fix=verdict.fix,
        rank_exceeded=rank.exceeded,
        warnings=tuple(_warnings(sizing, c, kv_tokens)) if verdict.feasible else (),
    )


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
