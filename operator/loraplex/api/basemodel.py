"""BaseModel (short name `bm`): a base LLM served by vLLM, with room for LoRA adapters."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, JsonValue, field_validator, model_validator
from pydantic.config import JsonDict

from loraplex.api.common import CEL, Conditions, IntOrAuto, ObjectRef, Wire
from loraplex.api.plan import PlanStatus
from loraplex_server.manifest import ALLOWED_MAX_LORA_RANKS, AdapterChecks, check_served_name
from loraplex_server.source_uri import SourceError, parse_source_uri

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Phase = Literal["Pending", "Deploying", "Ready", "Degraded", "Failed"]
_RANKS = ", ".join(str(r) for r in ALLOWED_MAX_LORA_RANKS)
_PRESERVE: JsonDict = {"x-kubernetes-preserve-unknown-fields": True}


class Architecture(Wire):
    """Model shape, as in Hugging Face config.json; overrides what the planner would read."""

    model_type: str | None = Field(default=None, description="e.g. llama, qwen2, mistral.")
    hidden_size: int = Field(ge=1, description="config.json hidden_size.")
    intermediate_size: int = Field(ge=1, description="config.json intermediate_size.")
    num_hidden_layers: int = Field(ge=1, description="config.json num_hidden_layers.")
    num_attention_heads: int = Field(ge=1, description="config.json num_attention_heads.")
    num_key_value_heads: int | None = Field(
        default=None, ge=1, description="config.json num_key_value_heads (GQA); default = heads."
    )
    head_dim: int | None = Field(default=None, ge=1, description="Default hidden/heads.")
    vocab_size: int = Field(ge=1, description="config.json vocab_size.")
    tie_word_embeddings: bool = Field(default=False, description="lm_head shares embeddings.")
    num_parameters: int | None = Field(
        default=None, ge=1, description="Total parameters, when the shape alone undercounts."
    )


class ModelSpec(Wire):
    """Where the base weights come from and how they are served."""

    source: str = Field(
        max_length=2048,
        description="hf://org/repo, pvc://claim/path, s3://bucket/prefix, or an absolute path "
        "present in the engine image.",
        json_schema_extra={
            CEL: [
                {
                    "rule": "self.startsWith('/') || self.matches('^(hf|s3|pvc|https?)://.+')",
                    "message": "source must be hf://org/repo, pvc://claim/path, "
                    "s3://bucket/prefix or an absolute path",
                }
            ]
        },
    )
    revision: str | None = Field(default=None, max_length=256, description="Git revision (hf).")
    served_name: str | None = Field(
        default=None, max_length=128, description="OpenAI model name; default metadata.name."
    )
    dtype: Dtype = Field(default="auto", description="Weights/activation dtype (--dtype).")
    architecture: Architecture | None = Field(
        default=None, description="Model shape for the planner when it cannot read config.json."
    )

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if value.startswith("/"):
            if ".." in value.split("/"):
                raise ValueError("spec.model.source must not contain '..'")
            return value
        try:
            parse_source_uri(value)
        except SourceError as exc:
            raise ValueError(str(exc)) from exc
        return value

    @field_validator("served_name")
    @classmethod
    def _served(cls, value: str | None) -> str | None:
        return None if value is None else check_served_name(value)


class GPUSpec(Wire):
    """The GPUs of one replica."""

    count: int = Field(default=1, ge=1, le=16, description="GPUs per replica (tensor parallel).")
    memory_gi_b: float | None = Field(
        default=None, alias="memoryGiB", gt=0, le=1024, description="Memory per GPU in GiB."
    )
    product: str | None = Field(
        default=None, max_length=64, description="A known GPU, e.g. H100-80GB, A100-40GB, L40S."
    )
    resource_name: str = Field(
        default="nvidia.com/gpu", max_length=253, description="Extended resource to request."
    )


class LoRALimits(Wire):
    """vLLM's LoRA limits; each a number, or `auto` for the planner to choose."""

    max_loras: IntOrAuto = Field(default="auto", description="--max-loras (GPU slots).")
    max_lora_rank: IntOrAuto = Field(
        default="auto",
        description=f"--max-lora-rank; one of {_RANKS}.",
        json_schema_extra={
            CEL: [
                {
                    "rule": f"type(self) == string ? self == 'auto' : self in [{_RANKS}]",
                    "message": f"maxLoraRank must be 'auto' or one of {_RANKS}",
                }
            ]
        },
    )
    max_cpu_loras: IntOrAuto = Field(default="auto", description="--max-cpu-loras (>= maxLoras).")

    @field_validator("max_lora_rank")
    @classmethod
    def _rank(cls, value: int | str) -> int | str:
        if value != "auto" and value not in ALLOWED_MAX_LORA_RANKS:
            raise ValueError(f"maxLoraRank {value} is not allowed by vLLM: use one of {_RANKS}")
        return value

    @model_validator(mode="after")
    def _cpu(self) -> LoRALimits:
        if (
            isinstance(self.max_loras, int)
            and isinstance(self.max_cpu_loras, int)
            and self.max_cpu_loras < self.max_loras
        ):
            raise ValueError("maxCpuLoras must be >= maxLoras")
        return self


LORA_CEL: list[JsonValue] = [
    {
        "rule": "!has(self.maxLoras) || !has(self.maxCpuLoras) || type(self.maxLoras) == string "
        "|| type(self.maxCpuLoras) == string || self.maxCpuLoras >= self.maxLoras",
        "message": "maxCpuLoras must be >= maxLoras",
    }
]


class MemorySpec(Wire):
    """How much of each GPU vLLM may take."""

    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="--gpu-memory-utilization; omit for the planner to compute it.",
    )
    headroom_gi_b: float = Field(
        default=1.0, alias="headroomGiB", ge=0, description="GiB per GPU left free."
    )
    min_kv_sequences: int = Field(
        default=4, ge=1, description="Full-length sequences the KV cache must hold at least."
    )


class AdapterCacheSpec(Wire):
    """Where downloaded adapters are kept in the pod."""

    size_limit: str = Field(default="20Gi", max_length=32, description="emptyDir sizeLimit.")
    claim_name: str | None = Field(
        default=None, max_length=253, description="Use this PVC instead of an emptyDir."
    )


class EnvVar(Wire):
    """A container environment variable (name/value or valueFrom)."""

    name: str = Field(min_length=1, max_length=256, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    value: str | None = Field(default=None, max_length=32768)
    value_from: dict[str, Any] | None = Field(default=None, json_schema_extra=_PRESERVE)


class EngineSpec(Wire):
    """The vLLM container."""

    image: str | None = Field(
        default=None, max_length=512, description="vLLM image; default set by the operator."
    )
    extra_args: list[str] = Field(
        default_factory=list, max_length=64, description="Appended to vLLM's arguments."
    )
    env: list[EnvVar] = Field(default_factory=list, max_length=64)
    resources: dict[str, Any] | None = Field(
        default=None,
        description="Container resources; the GPU limit is added from spec.gpu.",
        json_schema_extra=_PRESERVE,
    )


class ServerSpec(Wire):
    """The adapter-server container."""

    image: str | None = Field(
        default=None, max_length=512, description="Adapter-server image; operator default."
    )
    resources: dict[str, Any] | None = Field(default=None, json_schema_extra=_PRESERVE)


class CredentialsSpec(Wire):
    """Secret with HF_TOKEN / AWS_* keys, mounted into the adapter-server only."""

    secret_ref: ObjectRef | None = None


class AdapterVolume(Wire):
    """A PVC adapters may read from as pvc://<claimName>/path."""

    claim_name: str = Field(
        min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
    )


class BaseModelSpec(Wire):
    """A base model served by vLLM on GPUs, with LoRA adapters attached at run time."""

    model: ModelSpec
    gpu: GPUSpec = Field(default_factory=GPUSpec)
    replicas: int = Field(default=1, ge=0, le=1000)
    max_model_len: int | None = Field(
        default=None, ge=16, le=10_000_000, description="--max-model-len; default 4096 or less."
    )
    lora: LoRALimits = Field(default_factory=LoRALimits, json_schema_extra={CEL: LORA_CEL})
    memory: MemorySpec = Field(default_factory=MemorySpec)
    adapter_cache: AdapterCacheSpec = Field(default_factory=AdapterCacheSpec)
    adapter_volumes: list[AdapterVolume] = Field(default_factory=list, max_length=16)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    server: ServerSpec = Field(default_factory=ServerSpec)
    credentials: CredentialsSpec = Field(default_factory=CredentialsSpec)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, json_schema_extra={"items": _PRESERVE}
    )
    affinity: dict[str, Any] | None = Field(default=None, json_schema_extra=_PRESERVE)
    adapter_checks: AdapterChecks = Field(
        default_factory=AdapterChecks,
        description="How each pod proves an adapter before it is Ready: module names and "
        "shapes against this base, then a probe that the adapter changes the output.",
    )


class AdapterCounts(Wire):
    """How many adapters are declared for this base, and ready on every replica."""

    declared: int = 0
    ready: int = 0


class BaseModelStatus(Wire):
    """What the operator observed and decided; written only by the operator."""

    model_config = Wire.model_config | {"extra": "ignore"}

    observed_generation: int | None = None
    phase: Phase = "Pending"
    conditions: Conditions
    plan: PlanStatus | None = None
    replicas: int = 0
    ready_replicas: int = 0
    ready: str = Field(default="0/0", description="readyReplicas/replicas, for kubectl get.")
    adapters: AdapterCounts = Field(default_factory=AdapterCounts)
    adapters_ready: str = Field(default="0/0", description="ready/declared adapters.")
    endpoint: str | None = Field(default=None, description="In-cluster OpenAI base URL.")
    manifest_generation: int = Field(default=0, description="Adapter manifest generation.")


class BaseModelResource(Wire):
    """A base LLM served by vLLM on GPUs, onto which LoRAAdapters are loaded at run time."""

    model_config = Wire.model_config | {"extra": "ignore"}

    spec: BaseModelSpec
    status: BaseModelStatus | None = None
