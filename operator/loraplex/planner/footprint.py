"""How big a base model is outside the GPU: bytes to download and cache, host memory for
vLLM's CPU-side adapter cache.

The pod spec is sized from these numbers (the weights volume, the loader Job's deadline, the
startup probe, the memory request), so they come from the same shape the memory planner uses:
spec.model.architecture, then config.json, then the catalog.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loraplex.api.basemodel import BaseModelSpec
from loraplex.planner.architecture import weight_bytes
from loraplex.planner.lora_memory import lora_slot_bytes
from loraplex.planner.plan import _resolve_shape

# Bytes per element of the checkpoint on disk, from config.json's torch_dtype (what is
# downloaded, whatever --dtype vLLM casts it to).
_CHECKPOINT_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Footprint:
    """Bytes of one base model outside GPU memory; None where the shape is unknown."""

    checkpoint_bytes: int | None
    adapter_bytes: int | None  # one adapter at --max-lora-rank, as vLLM's CPU cache holds it


def model_footprint(
    spec: BaseModelSpec, max_lora_rank: int, config_json: Mapping[str, Any] | None = None
) -> Footprint:
    shape = _resolve_shape(spec, config_json).shape
    if shape is None:
        return Footprint(None, None)
    disk = _CHECKPOINT_DTYPE_BYTES.get(shape.torch_dtype or "", 2)
    served = 4 if spec.model.dtype == "float32" else 2
    return Footprint(
        checkpoint_bytes=weight_bytes(shape, disk, 1),
        adapter_bytes=lora_slot_bytes(shape, 1, max_lora_rank, served, 1),
    )
