"""What vLLM spends outside weights, LoRA slots and KV cache, per vLLM release.

The exact terms (weights, LoRA slots, KV per token) follow from the model shape and vLLM's
code. The terms below are measured by vLLM at start-up, so the planner estimates them, and
how they count against `--gpu-memory-utilization` changed between releases. Each constant
names its source: a line of vLLM 0.32.0's code, or the real GPU logs in
`tests/fixtures/gpu_truth_cases.json` (vLLM 0.19 on H100 unless said otherwise; case ids in
brackets). `bench/planner_vs_gpu_logs.py` replays those logs, with leave-one-out fits, and
prints the error of every term.

How the budget works (vllm/v1/worker/gpu_worker.py, 0.32.0):
- `init_snapshot` is taken after the CUDA context and NCCL communicators exist; vLLM refuses to
  start unless `free >= utilization x total` (`request_memory`, vllm/v1/worker/utils.py), so
  the context always sits outside the budget, and must fit in `(1 - utilization) x total`.
  vLLM V0 (before 0.8) measured from an empty device, so its budget held the context [B1].
- KV cache = budget - weights (LoRA slots included) - torch activation peak - non-torch
  increase, and, from vLLM 0.21.0, - the CUDA graph pool estimated by
  `profile_cudagraph_memory` (envs.py: VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS "Enabled by
  default as of v0.21.0"; gpu_worker.py subtracts `cudagraph_memory_estimate_applied`).
  Before 0.21 the graph pool was allocated after the KV cache, outside the budget, which is
  why 0.987 on an H100 ran out of memory at graph capture.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loraplex.versions import VLLM_VERSION

GIB = 1024**3


@dataclass(frozen=True)
class Calibration:
    """How one vLLM release spends GPU memory; every field's source is in the module doc."""

    vllm_version: str
    graphs_in_budget: bool  # >= 0.21.0: the graph pool is taken out of the KV cache
    context_in_budget: bool  # V0 (< 0.8): the budget was measured from an empty device
    chunked_prefill: bool  # V1: batched tokens are a fixed default, not max_model_len
    largest_batch_tier: bool  # 0.32 arg_utils: >= 160 GiB GPUs batch 16384 tokens

    @property
    def label(self) -> str:
        graphs = "inside" if self.graphs_in_budget else "outside"
        return f"vLLM {self.vllm_version} calibration (CUDA graphs {graphs} the budget)"


# --- constants, each with its source ---------------------------------------------------------

# Sampler peak of the profiling run: vLLM runs its sampler on max_num_seqs rows of fp32 logits
# with top-k and top-p on (gpu_model_runner._dummy_sampler_run), which sorts (fp32 values +
# int64 indices) and keeps probabilities: about 3.7 fp32 copies of the logits, plus the hidden
# states of the batch. Fitted per log: 3.74 [A1], 3.72 [A4], 3.68 [A8], 3.73 [A7]; the
# value is their mean, and the leave-one-out error is in docs/benchmarks.md.
SAMPLER_LOGIT_COPIES = 3.72

# Non-torch memory inside the budget ("non-torch forward increase memory"): cuBLAS workspaces
# on one GPU, 0.24-0.25 GiB [A1, A4, A8]; under tensor parallel NCCL and custom all-reduce
# buffers per rank bring it to 2.07-2.09 GiB at TP 2 [A2, A7] and 2.13 GiB at TP 4 (issue 11).
OTHER_TP1_GIB = 0.25
OTHER_TP_GIB = 2.13

# The first CUDA context (and NCCL communicators) present before vLLM's snapshot, per GPU:
# 0.51 GiB on one GPU [A1, A4, A8], 1.53 GiB per GPU under tensor parallel [A2, A7].
CONTEXT_TP1_GIB = 0.51
CONTEXT_TP_GIB = 1.53

# CUDA graph pool ("Graph capturing finished ... took"): piecewise graphs are captured per
# decoder layer for every capture size, so the pool grows with the layer count. Least squares
# over the single-GPU logs [A4 0.87 GiB / 28 layers, A1 0.91 / 32, A8 1.09 / 42]; the tensor-
# parallel logs [A2 0.76, A7 1.61 / 80 layers] lie at or below the line. With LoRA enabled,
# vLLM captures every size twice (CompilationConfig.cudagraph_specialize_lora, default True),
# which doubles the per-layer term; the one LoRA log [B4, 1.26 GiB] lies below that.
GRAPH_BASE_GIB = 0.41
GRAPH_PER_LAYER_GIB = 0.0162

# The highest utilization the logs ran at and survived [A1-A8 at 0.95]; auto never goes above
# it, whatever the headroom arithmetic allows (issue 9.6: never 0.987).
MAX_AUTO_UTILIZATION = 0.95

# vLLM's OpenAI-server batch defaults (engine/arg_utils.py, 0.32.0,
# `get_batch_defaults`): 2048 tokens / 256 sequences; 8192 / 1024 on >= 70 GiB GPUs other than
# A100; 16384 / 1024 on >= 160 GiB GPUs.
BATCHED_TOKENS = 2048
MAX_NUM_SEQS = 256
BATCHED_TOKENS_LARGE = 8192
BATCHED_TOKENS_LARGEST = 16384
MAX_NUM_SEQS_LARGE = 1024
V0_MIN_BATCHED_TOKENS = 2048  # V0 without chunked prefill: max(max_model_len, 2048)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def calibration_for(version: str) -> Calibration:
    """The calibration of a vLLM release, e.g. "0.32.0" or "0.6.5.dev"."""
    v = _version_tuple(version)
    return Calibration(
        vllm_version=version,
        graphs_in_budget=v >= (0, 21, 0),
        context_in_budget=v < (0, 8, 0),
        chunked_prefill=v >= (0, 8, 0),
        largest_batch_tier=v >= (0, 21, 0),
    )


DEFAULT_CALIBRATION = calibration_for(VLLM_VERSION)
"""The calibration of the vLLM release loraplex deploys (loraplex.versions.VLLM_VERSION)."""


def version_from_image(image: str | None) -> str | None:
    """The vLLM release in an image tag such as `vllm/vllm-openai:v0.19.0` (None if none)."""
    if not image or ":" not in image.rsplit("/", 1)[-1]:
        return None
    tag = image.rsplit(":", 1)[-1]
    found = re.fullmatch(r"v?(\d+\.\d+\.\d+)\S*", tag)
    return found.group(1) if found else None


@dataclass(frozen=True)
class Batch:
    """The profiling batch vLLM sizes its activation peak by."""

    tokens: int
    seqs: int


def default_batch(
    cal: Calibration, total_gib: float, product: str | None, max_model_len: int
) -> Batch:
    """vLLM's server defaults for max_num_batched_tokens / max_num_seqs on this GPU."""
    if not cal.chunked_prefill:
        return Batch(max(max_model_len, V0_MIN_BATCHED_TOKENS), MAX_NUM_SEQS)
    if cal.largest_batch_tier and total_gib >= 160:
        return Batch(BATCHED_TOKENS_LARGEST, MAX_NUM_SEQS_LARGE)
    if total_gib >= 70 and "a100" not in (product or "").lower():
        return Batch(BATCHED_TOKENS_LARGE, MAX_NUM_SEQS_LARGE)
    return Batch(BATCHED_TOKENS, MAX_NUM_SEQS)
