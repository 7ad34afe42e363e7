"""What a BaseModel's pod needs besides GPUs, derived from the model's size and the plan.

Pure. Every number below is a bound a real GPU cluster enforces (a probe that restarts a slow
start, a deadline that marks a rollout failed, a volume size that evicts, a request the
scheduler reserves), so each is derived from the model, not fixed: a 70B model takes ten times
a 7B one to download and load. Constants name their source or their margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loraplex.api.basemodel import BaseModelSpec
from loraplex.planner import Plan
from loraplex.planner.footprint import Footprint

GIB = 1024**3

# When the model's shape is unknown (no catalog entry, no config.json, no spec.model.architecture):
# size as for a 32B model in bfloat16, so a guess errs towards room rather than evictions.
UNKNOWN_CHECKPOINT_BYTES = 64 * GIB
# Sustained rate assumed for downloading (Hugging Face, S3) or reading weights from a network
# volume: a conservative floor, well below a node's 10-25 Gb/s NIC, so probes do not kill a
# slow but progressing start.
LOAD_BYTES_PER_SECOND = 50 * 10**6
# Engine start without weights: process and CUDA init, torch.compile and CUDA graph capture
# (each 30-120 s for 7-70B models in vLLM's start-up log on H100), the KV cache profile run,
# doubled for margin.
ENGINE_START_SECONDS = 600
# Scheduling, volume attach and pulling the ~10 GB vLLM image, on top of the start.
ROLLOUT_EXTRA_SECONDS = 600
# The loader Job: a hard bound of its own (activeDeadlineSeconds), at a fifth of the load rate.
LOADER_BYTES_PER_SECOND = 10 * 10**6
LOADER_BASE_SECONDS = 1800
# Weights volume: the checkpoint plus 20% (formats, partial files during download) plus 2 GiB
# (tokenizer, configs, hub metadata).
VOLUME_FACTOR = 1.2
VOLUME_EXTRA_BYTES = 2 * GIB
# Host memory per vLLM process. vLLM V1 runs an API server and an engine core (which hosts the
# worker when there is one GPU; with tensor parallel N it starts N worker processes). Measured
# here: a tiny model on the CPU build used 2.9 GB RSS over its three processes (TESTING.md);
# torch, the CUDA context and the tokenizer of a real model take more, so 4 GiB each is an
# estimate with margin, not a measurement on a GPU node. Host memory also holds the CPU LoRA
# cache (--max-cpu-loras adapters at --max-lora-rank).
PROCESS_HOST_BYTES = 4 * GIB
# /dev/shm: vLLM's worker message queue and NCCL's shared-memory transport between
# tensor-parallel ranks; 1 GiB plus 1 GiB per GPU.
SHM_BASE_GIB = 1
# Small writable scratch (compile caches: torch inductor, triton, flashinfer JIT, CUDA).
SCRATCH_LIMIT = "10Gi"
SCRATCH_REQUEST_BYTES = 2 * GIB
PROBE_PERIOD_SECONDS = 10


def _gi(n_bytes: float) -> str:
    """A quantity in whole GiB, rounded up (Kubernetes prints it back the same way)."""
    return f"{max(1, math.ceil(n_bytes / GIB))}Gi"


@dataclass(frozen=True)
class PodSizing:
    """Bounds and requests for one BaseModel's pod and loader Job."""

    checkpoint_bytes: int
    checkpoint_known: bool
    startup_seconds: int
    progress_deadline_seconds: int
    loader_deadline_seconds: int
    weights_volume: str
    memory_request: str
    cpu_request: str
    shm_size: str
    ephemeral_request: str

    @property
    def startup_failure_threshold(self) -> int:
        return math.ceil(self.startup_seconds / PROBE_PERIOD_SECONDS)


def pod_sizing(
    spec: BaseModelSpec, plan: Plan, footprint: Footprint, *, downloads_in_pod: bool
) -> PodSizing:
    """Sizes for `spec` under `plan`; `downloads_in_pod` when vLLM fetches weights to disk."""
    known = footprint.checkpoint_bytes is not None
    ckpt = footprint.checkpoint_bytes or UNKNOWN_CHECKPOINT_BYTES
    load = ckpt // LOAD_BYTES_PER_SECOND
    startup = spec.rollout.startup_seconds or ENGINE_START_SECONDS + load
    startup = math.ceil(startup / PROBE_PERIOD_SECONDS) * PROBE_PERIOD_SECONDS  # whole probes
    deadline = spec.rollout.progress_deadline_seconds or startup + ROLLOUT_EXTRA_SECONDS
    volume = ckpt * VOLUME_FACTOR + VOLUME_EXTRA_BYTES
    tp = plan.tensor_parallel_size
    cpu_cache = plan.max_cpu_loras * (footprint.adapter_bytes or 0)
    processes = 2 if tp == 1 else 2 + tp
    memory = processes * PROCESS_HOST_BYTES + cpu_cache
    ephemeral = SCRATCH_REQUEST_BYTES + (volume if downloads_in_pod else 0)
    return PodSizing(
        checkpoint_bytes=ckpt,
        checkpoint_known=known,
        startup_seconds=int(startup),
        progress_deadline_seconds=int(deadline),
        loader_deadline_seconds=int(LOADER_BASE_SECONDS + ckpt // LOADER_BYTES_PER_SECOND),
        weights_volume=_gi(volume),
        memory_request=_gi(memory),
        # One core per process: the API server, the engine core's busy loop, each worker.
        cpu_request=str(processes),
        shm_size=spec.engine.shm_size or f"{SHM_BASE_GIB + tp}Gi",
        ephemeral_request=_gi(ephemeral),
    )
