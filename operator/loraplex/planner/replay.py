"""Replay real vLLM GPU start-up logs through the planner, term by term.

The logs (tests/fixtures/gpu_truth_cases.json, with their quoted lines and sources) say what
vLLM measured: weights, activation peak, non-torch memory, KV cache, CUDA graphs, CUDA
context. `replay_case` plans the same model, GPU, tensor parallel size and utilization with
the calibration of the logged vLLM release and returns both side by side; `check_auto` asks
whether the planner's auto utilization is one vLLM accepts, using the logged numbers where
the log has them. `bench/planner_vs_gpu_logs.py` prints these; tests/unit/test_planner_gpu_truth.py
asserts the goals of issue 11 on them.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loraplex.planner.calibration import (
    MAX_NUM_SEQS,
    Batch,
    calibration_for,
    default_batch,
)
from loraplex.planner.catalog import find_model
from loraplex.planner.estimates import GIB, sampler_peak_bytes
from loraplex.planner.sizing import Costs, Sizing

CASES = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "gpu_truth_cases.json"


def load_cases(path: Path = CASES) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads(path.read_text())
    return cases


def _quoted(case: dict[str, Any], pattern: str) -> str | None:
    for line in case.get("quotes", []):
        found = re.search(pattern, line)
        if found:
            return found.group(1)
    return None


def case_sizing(case: dict[str, Any], *, utilization: float | None = None) -> Sizing:
    """The Sizing vLLM ran with in this log: its release, GPU, TP, utilization, and the
    batch and eager settings the quoted lines show (offline LLM class, enforce_eager)."""
    shape = find_model(case["model"])
    if shape is None:
        raise KeyError(f"{case['id']}: {case['model']} is not in the catalog")
    cal = calibration_for(case["vllm_version"])
    sizing = Sizing(
        shape=shape,
        dtype_bytes=2,
        tp=case["tp"],
        max_model_len=case["max_model_len"],
        total_gib=case["gpu_total_gib"],
        product=case["gpu"],
        cal=cal,
        headroom_gib=1.0,
        fixed_utilization=case["util"] if utilization is None else utilization,
        min_seqs=1,
        eager=_quoted(case, r"enforce_eager=(True)") is not None,
        lora=case["lora"] is not None,
    )
    tokens = _quoted(case, r"max_num_batched_tokens=(\d+)")
    if tokens is not None:  # the offline LLM class: its own batch, the server's max_num_seqs
        seqs = default_batch(cal, sizing.total_gib, sizing.product, sizing.max_model_len).seqs
        sizing = replace(sizing, batch_override=Batch(int(tokens), max(seqs, MAX_NUM_SEQS)))
    return sizing


def case_costs(case: dict[str, Any], sizing: Sizing) -> Costs:
    lora = case["lora"] or {"max_loras": 1, "rank": 1}
    return sizing.costs(lora["max_loras"], lora["rank"])


@dataclass(frozen=True)
class Row:
    """One log against the plan, in GiB (tokens for kv_tokens); None where the log is silent."""

    case: str
    term: str
    logged: float | None
    planned: float

    @property
    def error(self) -> float | None:
        """Relative error of the plan against the log."""
        if self.logged is None or self.logged == 0:
            return None
        return (self.planned - self.logged) / self.logged


def replay_case(case: dict[str, Any]) -> list[Row]:
    """Each term of the plan at the logged utilization, beside what vLLM logged."""
    sizing = case_sizing(case)
    c = case_costs(case, sizing)
    log = case["logged"]
    g = 1 / GIB
    act_other = None
    if log["activation_gib"] is None:  # only weights and KV logged: their difference
        act_other = case["util"] * case["gpu_total_gib"] - log["weights_gib"] - log["kv_gib"]
    rows = [
        Row(case["id"], "weights", log["weights_gib"], (c.weights + c.lora) * g),
        Row(case["id"], "activation", log["activation_gib"], c.activations * g),
        Row(case["id"], "other", log["non_torch_gib"], c.other * g),
        Row(case["id"], "activation+other", act_other, (c.activations + c.other) * g),
        Row(case["id"], "graphs", log["graph_gib"], c.graphs * g),
        Row(case["id"], "kv_gib", log["kv_gib"], sizing.kv_bytes(c) * g),
        Row(case["id"], "kv_tokens", log["kv_tokens"], float(sizing.kv_tokens(c))),
    ]
    return [r for r in rows if not (r.term == "activation+other" and r.logged is None)]


@dataclass(frozen=True)
class AutoCheck:
    """The planner's auto utilization for a log's setup, judged with the logged numbers."""

    case: str
    auto: float
    logged_util: float
    start_limit: float  # vLLM refuses above: (total - context) / total
    survives_graphs: bool  # graphs outside the budget fit beside it
    sequences: float  # full-length sequences the KV cache holds at `auto`
    idle_fraction: float  # of the GPU, beyond context and graphs outside the budget

    @property
    def accepted(self) -> bool:
        return self.auto <= self.start_limit and self.survives_graphs and self.sequences >= 1

    @property
    def ok(self) -> bool:
        return self.accepted and self.idle_fraction <= 0.10


def check_auto(case: dict[str, Any]) -> AutoCheck:
    """Auto utilization for this log's model, GPU, TP and vLLM release, and whether vLLM would
    have accepted it: logged context, graphs and non-KV memory where logged, else the plan's."""
    sizing = case_sizing(case, utilization=None)
    c = case_costs(case, sizing)
    log = case["logged"]
    total = case["gpu_total_gib"]
    auto = sizing.auto_utilization()
    context = log["init_context_gib"] if log["init_context_gib"] is not None else c.context / GIB
    graphs = log["graph_gib"] if log["graph_gib"] is not None else c.graphs / GIB
    outside = context + (0.0 if c.graphs_in_budget else graphs)
    if sizing.cal.context_in_budget:
        outside -= context  # V0 counted the context inside its budget
    kv_at_auto = log["kv_gib"] + (auto - case["util"]) * total
    if c.graphs_in_budget:
        kv_at_auto -= graphs
    seq = c.sequence / GIB
    return AutoCheck(
        case=case["id"],
        auto=auto,
        logged_util=case["util"],
        start_limit=(total - (0.0 if sizing.cal.context_in_budget else context)) / total,
        survives_graphs=auto * total + outside <= total,
        sequences=kv_at_auto / seq,
        idle_fraction=(total - auto * total - outside) / total,
    )


# --- leave-one-out: each fitted constant, refitted without the case it predicts -------------


def _sampler_fit(case: dict[str, Any]) -> tuple[float, float, float] | None:
    """(logits bytes, hidden bytes, logged activation bytes) for logs whose activation peak is
    the sampler's (V1 with the large batch)."""
    sizing = case_sizing(case)
    log = case["logged"]
    if log["activation_gib"] is None or not sizing.cal.chunked_prefill:
        return None
    batch = sizing.batch
    logits = float(batch.seqs * sizing.shape.padded_vocab * 4)
    hidden = float(batch.tokens * sizing.shape.hidden_size * 2)
    if sampler_peak_bytes(sizing.shape, 2, batch) < case_costs(case, sizing).activations:
        return None  # the forward peak sets this one
    return logits, hidden, log["activation_gib"] * GIB


def leave_one_out(cases: list[dict[str, Any]]) -> list[Row]:
    """Activation and graph pool of each log, predicted from constants fitted on the logs of
    the other models (a model logged at two TP sizes is left out whole)."""
    rows: list[Row] = []
    model = {c["id"]: c["model"] for c in cases}
    fits = {c["id"]: f for c in cases if (f := _sampler_fit(c)) is not None}
    copies = {k: (act - hidden) / logits for k, (logits, hidden, act) in fits.items()}
    for k, (logits, hidden, act) in fits.items():
        others = [v for j, v in copies.items() if model[j] != model[k]]
        predicted = (statistics.mean(others) * logits + hidden) / GIB
        rows.append(Row(k, "activation (LOO)", act / GIB, predicted))
    points: dict[str, tuple[int, float]] = {}
    for c in cases:
        shape = find_model(c["model"])
        graph = c["logged"]["graph_gib"]
        if shape is not None and c["tp"] == 1 and c["lora"] is None and graph is not None:
            points[c["id"]] = (shape.num_layers, graph)
    for k, (layers, logged) in points.items():
        xs, ys = zip(*[p for j, p in points.items() if model[j] != model[k]], strict=True)
        slope, base = statistics.linear_regression(xs, ys)
        rows.append(Row(k, "graphs (LOO)", logged, base + slope * layers))
    return rows
