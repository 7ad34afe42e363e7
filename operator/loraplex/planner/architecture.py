"""The shape of a decoder-only transformer, as the memory planner needs it.

Everything the planner computes (weights, LoRA slot buffers, KV cache per token) follows from
a handful of config.json numbers. This module turns a config.json, a user's
`spec.model.architecture`, or a catalog entry into one `ModelShape`, and knows the few ways
vLLM's implementation of a model family changes the count (fused checkpoints, extra norms,
LoRA on embeddings).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loraplex.api.basemodel import Architecture

# vLLM wraps the embedding and lm_head with LoRA only for models whose class declares
# `embedding_modules` (vllm/model_executor/models/*.py, vLLM 0.32): Llama and the classes that
# inherit from it without clearing it (Phi-3), and Qwen3. Mistral clears it; Qwen2 and Gemma 2
# never set it.
_LORA_EMBEDDING_TYPES = frozenset({"llama", "phi3", "qwen3"})
# Checkpoints with qkv_proj / gate_up_proj already fused: vLLM's packed_modules_mapping maps
# each to itself, so the LoRA A buffer has one slice instead of three (qkv) or two (gate_up).
_FUSED_TYPES = frozenset({"phi3"})
# q/k/v projections with a bias term (weights only; LoRA has no bias buffers by default).
_QKV_BIAS_TYPES = frozenset({"qwen2"})
# RMSNorm weights per decoder layer: Gemma 2 adds pre/post feed-forward norms.
_NORMS_PER_LAYER = {"gemma2": 4, "gemma3": 4}
# Per-head q/k RMSNorm (head_dim weights each): Qwen3 (vllm/model_executor/models/qwen3.py).
_QK_NORM_TYPES = frozenset({"qwen3", "gemma3"})
# vLLM pads the vocabulary of VocabParallelEmbedding / ParallelLMHead to a multiple of 64.
VOCAB_PADDING = 64


@dataclass(frozen=True)
class ModelShape:
    """A dense decoder-only model, in the terms vLLM allocates memory by."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int | None = None
    num_parameters: int | None = None
    torch_dtype: str | None = None

    @property
    def lora_embeddings(self) -> bool:
        """Whether vLLM preallocates LoRA buffers for embed_tokens and lm_head."""
        return self.model_type in _LORA_EMBEDDING_TYPES

    @property
    def fused_checkpoint(self) -> bool:
        return self.model_type in _FUSED_TYPES

    @property
    def qkv_bias(self) -> bool:
        return self.model_type in _QKV_BIAS_TYPES

    @property
    def norms_per_layer(self) -> int:
        return _NORMS_PER_LAYER.get(self.model_type, 2)

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // VOCAB_PADDING) * VOCAB_PADDING

    def kv_heads_per_rank(self, tp: int) -> int:
        """KV heads on one GPU; vLLM replicates KV heads when TP exceeds their number."""
        return max(1, self.num_kv_heads // tp)

    def kv_bytes_per_token(self, dtype_bytes: int, tp: int) -> int:
        """K and V for one token across all layers, on one GPU."""
        return 2 * self.num_layers * self.kv_heads_per_rank(tp) * self.head_dim * dtype_bytes

    def shape_parameters(self) -> int:
        """Parameters implied by the shape (all GPUs together, tp=1)."""
        return weight_elements(self, 1)


class ArchitectureError(ValueError):
    """config.json lacks what the planner needs (not a decoder-only transformer we know)."""


def _int(cfg: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def shape_from_config(cfg: Mapping[str, Any]) -> ModelShape:
    """Read a Hugging Face config.json (multimodal configs: their `text_config`)."""
    text = cfg.get("text_config")
    if isinstance(text, Mapping):
        merged = dict(cfg)
        merged.update(text)
        cfg = merged
    hidden = _int(cfg, "hidden_size", "n_embd", "d_model")
    inter = _int(cfg, "intermediate_size", "ffn_dim", "n_inner")
    layers = _int(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _int(cfg, "num_attention_heads", "n_head")
    vocab = _int(cfg, "vocab_size")
    missing = [
        name
        for name, value in [
            ("hidden_size", hidden),
            ("intermediate_size", inter),
            ("num_hidden_layers", layers),
            ("num_attention_heads", heads),
            ("vocab_size", vocab),
        ]
        if value is None
    ]
    if missing or hidden is None or inter is None or layers is None or heads is None:
        raise ArchitectureError(f"config.json lacks {', '.join(missing)}")
    assert vocab is not None
    kv = _int(cfg, "num_key_value_heads", "num_kv_heads") or heads
    head_dim = _int(cfg, "head_dim") or hidden // heads
    model_type = str(cfg.get("model_type") or "unknown")
    tie = cfg.get("tie_word_embeddings")
    if not isinstance(tie, bool):
        # transformers' default is True, but the families we serve mostly say so explicitly;
        # Gemma ties always.
        tie = model_type.startswith("gemma")
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    return ModelShape(
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        vocab_size=vocab,
        tie_word_embeddings=tie,
        max_position_embeddings=_int(cfg, "max_position_embeddings", "n_positions"),
        num_parameters=_int(cfg, "num_parameters"),
        torch_dtype=str(dtype) if isinstance(dtype, str) else None,
    )


def shape_from_architecture(arch: Architecture) -> ModelShape:
    """The user's `spec.model.architecture` override."""
    return ModelShape(
        model_type=arch.model_type or "unknown",
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_layers=arch.num_hidden_layers,
        num_heads=arch.num_attention_heads,
        num_kv_heads=arch.num_key_value_heads or arch.num_attention_heads,
        head_dim=arch.head_dim or arch.hidden_size // arch.num_attention_heads,
        vocab_size=arch.vocab_size,
        tie_word_embeddings=arch.tie_word_embeddings,
        num_parameters=arch.num_parameters,
    )


def weight_elements(shape: ModelShape, tp: int) -> int:
    """Weight elements on one GPU, sharded the way vLLM's parallel linear layers shard them.

    Column-parallel layers (qkv, gate_up) split their outputs, row-parallel ones (o, down)
    their inputs; embeddings split the padded vocabulary; norms are replicated.
    """
    h, d = shape.hidden_size, shape.head_dim
    q_out = shape.num_heads // tp * d
    kv_out = shape.kv_heads_per_rank(tp) * d
    inter = shape.intermediate_size // tp
    per_layer = (
        h * (q_out + 2 * kv_out)  # qkv_proj
        + q_out * h  # o_proj
        + h * 2 * inter  # gate_up_proj
        + inter * h  # down_proj
        + shape.norms_per_layer * h
    )
    if shape.qkv_bias:
        per_layer += q_out + 2 * kv_out
    if shape.model_type in _QK_NORM_TYPES:
        per_layer += 2 * d
    embed = shape.padded_vocab // tp * h
    lm_head = 0 if shape.tie_word_embeddings else embed
    return shape.num_layers * per_layer + embed + lm_head + h


def weight_bytes(shape: ModelShape, dtype_bytes: int, tp: int = 1) -> int:
    """Bytes of weights vLLM loads on one GPU.

    When the user gives `num_parameters` and it exceeds what the dense shape implies (MoE, vision
    towers), the larger count is used, split evenly across GPUs: an overestimate is safer here.
    """
    elements = weight_elements(shape, tp)
    if shape.num_parameters is not None and shape.num_parameters > shape.shape_parameters():
        elements = -(-shape.num_parameters // tp)
    return elements * dtype_bytes
