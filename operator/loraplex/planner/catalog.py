"""Known models and GPUs, for when the planner cannot read config.json.

Model numbers are copied from each repository's config.json on the Hugging Face Hub. GPU
memory is what CUDA reports as the device total (`torch.cuda.mem_get_info()[1]`), which is what
vLLM multiplies `--gpu-memory-utilization` by; it is a little below the marketing number (an
"80 GB" H100 reports about 79.2 GiB, a 48 GB RTX A6000 47.54 GiB).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loraplex.planner.architecture import ModelShape


def _m(
    model_type: str,
    hidden: int,
    inter: int,
    layers: int,
    heads: int,
    kv: int,
    head_dim: int,
    vocab: int,
    tie: bool,
    max_pos: int,
) -> ModelShape:
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
        max_position_embeddings=max_pos,
        torch_dtype="bfloat16",
    )


_LLAMA_31_8B = _m("llama", 4096, 14336, 32, 32, 8, 128, 128256, False, 131072)
_LLAMA_31_70B = _m("llama", 8192, 28672, 80, 64, 8, 128, 128256, False, 131072)
_LLAMA_32_1B = _m("llama", 2048, 8192, 16, 32, 8, 64, 128256, True, 131072)
_LLAMA_32_3B = _m("llama", 3072, 8192, 28, 24, 8, 128, 128256, True, 131072)
_QWEN25_05B = _m("qwen2", 896, 4864, 24, 14, 2, 64, 151936, True, 32768)
_QWEN25_15B = _m("qwen2", 1536, 8960, 28, 12, 2, 128, 151936, True, 32768)
_QWEN25_3B = _m("qwen2", 2048, 11008, 36, 16, 2, 128, 151936, True, 32768)
_QWEN25_7B = _m("qwen2", 3584, 18944, 28, 28, 4, 128, 152064, False, 32768)
_QWEN25_14B = _m("qwen2", 5120, 13824, 48, 40, 8, 128, 152064, False, 32768)
_QWEN25_32B = _m("qwen2", 5120, 27648, 64, 40, 8, 128, 152064, False, 32768)
_QWEN25_72B = _m("qwen2", 8192, 29568, 80, 64, 8, 128, 152064, False, 32768)
_R1_DISTILL_QWEN_14B = _m("qwen2", 5120, 13824, 48, 40, 8, 128, 152064, False, 131072)
_QWEN3_32B = _m("qwen3", 5120, 25600, 64, 64, 8, 128, 151936, False, 40960)

# Keys are lower-case "org/repo"; instruct and base variants share a shape.
MODELS: dict[str, ModelShape] = {
    "meta-llama/llama-3.1-8b": _LLAMA_31_8B,
    "meta-llama/llama-3.1-8b-instruct": _LLAMA_31_8B,
    "meta-llama/meta-llama-3.1-8b": _LLAMA_31_8B,
    "meta-llama/meta-llama-3.1-8b-instruct": _LLAMA_31_8B,
    "meta-llama/meta-llama-3-8b": _m("llama", 4096, 14336, 32, 32, 8, 128, 128256, False, 8192),
    "meta-llama/meta-llama-3-8b-instruct": _m(
        "llama", 4096, 14336, 32, 32, 8, 128, 128256, False, 8192
    ),
    "meta-llama/llama-3.1-70b": _LLAMA_31_70B,
    "meta-llama/llama-3.1-70b-instruct": _LLAMA_31_70B,
    "meta-llama/meta-llama-3.1-70b-instruct": _LLAMA_31_70B,
    "meta-llama/llama-3.3-70b-instruct": _LLAMA_31_70B,
    "meta-llama/llama-3.2-1b": _LLAMA_32_1B,
    "meta-llama/llama-3.2-1b-instruct": _LLAMA_32_1B,
    "meta-llama/llama-3.2-3b": _LLAMA_32_3B,
    "meta-llama/llama-3.2-3b-instruct": _LLAMA_32_3B,
    "qwen/qwen2.5-0.5b": _QWEN25_05B,
    "qwen/qwen2.5-0.5b-instruct": _QWEN25_05B,
    "qwen/qwen2.5-1.5b": _QWEN25_15B,
    "qwen/qwen2.5-1.5b-instruct": _QWEN25_15B,
    "qwen/qwen2.5-3b": _QWEN25_3B,
    "qwen/qwen2.5-3b-instruct": _QWEN25_3B,
    "qwen/qwen2.5-7b": _QWEN25_7B,
    "qwen/qwen2.5-7b-instruct": _QWEN25_7B,
    "qwen/qwen2.5-14b": _QWEN25_14B,
    "qwen/qwen2.5-14b-instruct": _QWEN25_14B,
    "qwen/qwen2.5-32b": _QWEN25_32B,
    "qwen/qwen2.5-32b-instruct": _QWEN25_32B,
    "qwen/qwen2.5-72b": _QWEN25_72B,
    "qwen/qwen2.5-72b-instruct": _QWEN25_72B,
    "deepseek-ai/deepseek-r1-distill-qwen-14b": _R1_DISTILL_QWEN_14B,
    "qwen/qwen3-32b": _QWEN3_32B,
    "mistralai/mistral-7b-instruct-v0.3": _m(
        "mistral", 4096, 14336, 32, 32, 8, 128, 32768, False, 32768
    ),
    "mistralai/mistral-7b-v0.3": _m("mistral", 4096, 14336, 32, 32, 8, 128, 32768, False, 32768),
    "mistralai/mistral-7b-instruct-v0.2": _m(
        "mistral", 4096, 14336, 32, 32, 8, 128, 32000, False, 32768
    ),
    "mistralai/mistral-7b-v0.1": _m("mistral", 4096, 14336, 32, 32, 8, 128, 32000, False, 32768),
    "google/gemma-2-2b-it": _m("gemma2", 2304, 9216, 26, 8, 4, 256, 256000, True, 8192),
    "google/gemma-2-9b": _m("gemma2", 3584, 14336, 42, 16, 8, 256, 256000, True, 8192),
    "google/gemma-2-9b-it": _m("gemma2", 3584, 14336, 42, 16, 8, 256, 256000, True, 8192),
    "google/gemma-2-27b": _m("gemma2", 4608, 36864, 46, 32, 16, 128, 256000, True, 8192),
    "google/gemma-2-27b-it": _m("gemma2", 4608, 36864, 46, 32, 16, 128, 256000, True, 8192),
    "microsoft/phi-3-mini-4k-instruct": _m("phi3", 3072, 8192, 32, 32, 32, 96, 32064, False, 4096),
    "microsoft/phi-3-mini-128k-instruct": _m(
        "phi3", 3072, 8192, 32, 32, 32, 96, 32064, False, 131072
    ),
}


@dataclass(frozen=True)
class GPU:
    """A GPU product: memory per device as CUDA reports it (vLLM's batch defaults follow from
    it and the name, see calibration.default_batch)."""

    name: str
    memory_gib: float


GPUS: dict[str, GPU] = {
    g.name.lower(): g
    for g in [
        GPU("H100-80GB", 79.19),
        GPU("H200", 139.8),
        GPU("A100-40GB", 39.39),
        GPU("A100-80GB", 79.15),
        GPU("L40S", 44.52),
        GPU("L4", 22.05),
        GPU("A10G", 22.07),
        GPU("RTX-4090", 23.65),
        GPU("A6000", 47.54),
    ]
}
_GPU_ALIASES = {
    "h100": "h100-80gb",
    "h100-sxm": "h100-80gb",
    "h100-pcie": "h100-80gb",
    "h200-141gb": "h200",
    "a100": "a100-80gb",
    "a10": "a10g",
    "4090": "rtx-4090",
    "rtx4090": "rtx-4090",
    "rtx-a6000": "a6000",
    "l40s-48gb": "l40s",
    "a6000-48gb": "a6000",
}


def model_key(source: str) -> str:
    """Catalog key for a model source: `hf://Org/Repo` or `Org/Repo`, case-insensitive."""
    key = source.strip()
    if key.startswith("hf://"):
        key = key[len("hf://") :]
    return key.strip("/").lower()


def find_model(source: str) -> ModelShape | None:
    return MODELS.get(model_key(source))


def find_gpu(name: str) -> GPU | None:
    """A GPU by product name; accepts common spellings (H100, RTX 4090, a100-80gb)."""
    key = re.sub(r"[\s_]+", "-", name.strip().lower())
    key = _GPU_ALIASES.get(key, key)
    return GPUS.get(key)


# GPU feature discovery (NVIDIA's gpu-feature-discovery, part of the GPU operator) labels each
# GPU node `nvidia.com/gpu.product=<NVML device name, spaces as dashes>`. One product has
# several names (SXM vs PCIe boards, NVL variants), so a product maps to every value that means
# it; render.py selects on them (`In`) so a BaseModel planned for an L40S never lands on an L4.
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_PRODUCT_LABEL_VALUES: dict[str, tuple[str, ...]] = {
    "h100-80gb": ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe"),
    "h200": ("NVIDIA-H200", "NVIDIA-H200-NVL"),
    "a100-40gb": ("NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB"),
    "a100-80gb": ("NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe"),
    "l40s": ("NVIDIA-L40S",),
    "l4": ("NVIDIA-L4",),
    "a10g": ("NVIDIA-A10G",),
    "rtx-4090": ("NVIDIA-GeForce-RTX-4090",),
    "a6000": ("NVIDIA-RTX-A6000",),
}


def gpu_product_label_values(product: str) -> tuple[str, ...]:
    """The `nvidia.com/gpu.product` values of a catalog GPU; empty for an unknown product."""
    gpu = find_gpu(product)
    return GPU_PRODUCT_LABEL_VALUES.get(gpu.name.lower(), ()) if gpu else ()
