"""The base model's LoRA-capable modules and their shapes, for the pods' adapter checks.

vLLM applies LoRA to a model's attention and MLP projections (and, for some families, the
embeddings). An adapter that names other modules loads without error and changes nothing
(vLLM issue 34186); one trained on another model size fails inside the load. The manifest
carries this table (name -> unsharded in/out features) so each pod can refuse both with a
reason before loading. Names follow vLLM's checkpoint names (`packed_modules_mapping`
sources): q/k/v/o_proj and gate/up/down_proj, or the fused qkv_proj / gate_up_proj of Phi-3.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loraplex.api.basemodel import BaseModelSpec
from loraplex.planner.architecture import (
    ArchitectureError,
    ModelShape,
    shape_from_architecture,
    shape_from_config,
)
from loraplex.planner.catalog import find_model


def lora_modules(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """name -> (in_features, out_features), as a PEFT adapter's lora_A/lora_B see them."""
    h, inter = shape.hidden_size, shape.intermediate_size
    q_out = shape.num_heads * shape.head_dim
    kv_out = shape.num_kv_heads * shape.head_dim
    out: dict[str, tuple[int, int]] = {"o_proj": (q_out, h), "down_proj": (inter, h)}
    if shape.fused_checkpoint:
        out["qkv_proj"] = (h, q_out + 2 * kv_out)
        out["gate_up_proj"] = (h, 2 * inter)
    else:
        out.update(
            {
                "q_proj": (h, q_out),
                "k_proj": (h, kv_out),
                "v_proj": (h, kv_out),
                "gate_proj": (h, inter),
                "up_proj": (h, inter),
            }
        )
    if shape.lora_embeddings:
        out["embed_tokens"] = (shape.vocab_size, h)
        out["lm_head"] = (h, shape.vocab_size)
    return dict(sorted(out.items()))


def known_shape(spec: BaseModelSpec, config_json: Mapping[str, Any] | None) -> ModelShape | None:
    """The model's shape from the spec, its config.json or the catalog; None if unknown."""
    if spec.model.architecture is not None:
        return shape_from_architecture(spec.model.architecture)
    if config_json is not None:
        try:
            return shape_from_config(config_json)
        except ArchitectureError:
            return None
    return find_model(spec.model.source)


def base_modules(
    spec: BaseModelSpec, config_json: Mapping[str, Any] | None
) -> dict[str, tuple[int, int]] | None:
    shape = known_shape(spec, config_json)
    return None if shape is None else lora_modules(shape)
