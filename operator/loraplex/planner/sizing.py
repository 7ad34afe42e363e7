"""One BaseModel's memory arithmetic, resolved once: what a configuration costs per GPU, the
utilization vLLM can safely be given, and whether sequences fit.

The plan steps (plan.py) and the cheapest-fix search (fixes.py) ask one frozen `Sizing`
questions, and try variants of it with `dataclasses.replace`, so every number they compare
comes from the same formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loraplex.planner.architecture import ModelShape, weight_bytes
from loraplex.planner.calibration import (
    GIB,
    MAX_AUTO_UTILIZATION,
    Batch,
    Calibration,
    default_batch,
)
from loraplex.planner.estimates import activation_bytes, context_bytes, graph_bytes, other_bytes
from loraplex.planner.lora_memory import lora_slot_bytes


@dataclass(frozen=True)
class Costs:
    """Bytes per GPU of one candidate configuration."""

    weights: int
    lora: int
    activations: int
    other: int
    graphs: int
    context: int
    graphs_in_budget: bool
    kv_per_token: int
    max_model_len: int

    @property
    def in_budget(self) -> int:
        """What vLLM takes out of `utilization x total` before the KV cache."""
        graphs = self.graphs if self.graphs_in_budget else 0
        return self.weights + self.lora + self.activations + self.other + graphs

    @property
    def outside_budget(self) -> int:
        """What must fit in `(1 - utilization) x total`: context, and graphs before 0.21."""
        return self.context + (0 if self.graphs_in_budget else self.graphs)

    @property
    def sequence(self) -> int:
        """KV bytes of one full-length sequence."""
        return self.kv_per_token * self.max_model_len


def _floor4(x: float) -> float:
    return math.floor(x * 10_000) / 10_000


@dataclass(frozen=True)
class Sizing:
    """Everything the memory arithmetic needs about one BaseModel on one GPU product."""

    shape: ModelShape
    dtype_bytes: int
    tp: int
    max_model_len: int
    total_gib: float
    product: str | None
    cal: Calibration
    headroom_gib: float  # spec.memory.headroomGiB: kept free beyond what vLLM needs outside
    fixed_utilization: float | None
    min_seqs: int  # spec.memory.minKvSequences: the expected concurrency
    batch_override: Batch | None = None  # replaying logs of non-default batches
    eager: bool = False  # --enforce-eager: no CUDA graphs
    lora: bool = True  # loraplex always passes --enable-lora; replayed logs may not

    @property
    def total(self) -> int:
        return int(self.total_gib * GIB)

    @property
    def batch(self) -> Batch:
        return self.batch_override or default_batch(
            self.cal, self.total_gib, self.product, self.max_model_len
        )

    def costs(self, max_loras: int, rank: int) -> Costs:
        s, db, tp = self.shape, self.dtype_bytes, self.tp
        return Costs(
            weights=weight_bytes(s, db, tp),
            lora=lora_slot_bytes(s, max_loras, rank, db, tp) if self.lora else 0,
            activations=activation_bytes(s, db, tp, rank if self.lora else 0, self.batch),
            other=other_bytes(tp, self.cal),
            graphs=graph_bytes(s, lora=self.lora, eager=self.eager),
            context=0 if self.cal.context_in_budget else context_bytes(tp),  # V0: in `other`
            graphs_in_budget=self.cal.graphs_in_budget,
            kv_per_token=s.kv_bytes_per_token(db, tp),
            max_model_len=self.max_model_len,
        )

    def auto_utilization(self) -> float:
        """The highest safe utilization.

        - vLLM's start check (free >= utilization x total, with the context taken) and room
          for the graph pool where it sits outside the budget, plus headroomGiB of slack;
        - never above MAX_AUTO_UTILIZATION of memory net of graphs: where graphs moved inside
          the budget, vLLM's own advice is to raise utilization by graphs / total to keep the
          same KV cache (gpu_worker.py, "equivalent to --gpu-memory-utilization ... without
          CUDA graph memory profiling"), so the ceiling rises by that much.
        """
        c = self.costs(1, 1)
        outside = c.outside_budget + int(self.headroom_gib * GIB)
        ceiling = MAX_AUTO_UTILIZATION + (c.graphs / self.total if c.graphs_in_budget else 0.0)
        return _floor4(min(ceiling, (self.total - outside) / self.total))

    def utilization(self) -> float:
        return self.fixed_utilization or self.auto_utilization()

    def budget(self) -> int:
        """vLLM's budget: ceil(total x utilization) (v1/worker/utils.py `request_memory`)."""
        return math.ceil(self.total * self.utilization())

    def kv_bytes(self, costs: Costs) -> int:
        return max(0, self.budget() - costs.in_budget)

    def kv_tokens(self, costs: Costs, block: int = 16) -> int:
        """Tokens vLLM reports: whole blocks of `block` tokens (vLLM's default block size)."""
        return self.kv_bytes(costs) // (costs.kv_per_token * block) * block

    def fits(self, costs: Costs, seqs: int) -> bool:
        return costs.in_budget + seqs * costs.sequence <= self.budget()

    def idle(self, costs: Costs) -> int:
        """Bytes nobody uses: outside the budget, beyond the context and graph pool."""
        return self.total - self.budget() - costs.outside_budget
