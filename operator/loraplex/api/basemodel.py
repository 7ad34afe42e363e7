"""BaseModel (short name `bm`): a base LLM served by vLLM, with room for LoRA adapters."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, JsonValue, WithJsonSchema, field_validator, model_validator
from pydantic.config import JsonDict

from loraplex.api.common import CEL, Conditions, IntOrAuto, ObjectRef, Wire
from loraplex.api.plan import PlanStatus
from loraplex.api.routing import AutoscalingSpec, RoutingSpec
from loraplex_server.manifest import (
    ALLOWED_MAX_LORA_RANKS,
    DEFAULT_DOWNLOAD_TIMEOUT_SECONDS,
    DEFAULT_MAX_ADAPTER_BYTES,
    DEFAULT_MAX_ADAPTER_FILES,
    DEFAULT_MAX_CONCURRENT_DOWNLOADS,
    AdapterChecks,
    check_host,
    check_network,
    check_served_name,
)
from loraplex_server.source_uri import SourceError, parse_source_uri

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Phase = Literal["Pending", "Downloading", "Deploying", "Ready", "Degraded", "Failed"]
_RANKS = ", ".join(str(r) for r in ALLOWED_MAX_LORA_RANKS)
_PRESERVE: JsonDict = {"x-kubernetes-preserve-unknown-fields": True}
QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"  # a storage quantity, e.g. 16Gi


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
                    "rule": "self.startsWith('/') || self.matches('^(hf|s3|pvc)://.+')",
                    "message": "source must be hf://org/repo, pvc://claim/path, "
                    "s3://bucket/prefix or an absolute path (https:// is not a base-model "
                    "source: download it into a PVC and use pvc://)",
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
            uri = parse_source_uri(value)
        except SourceError as exc:
            raise ValueError(str(exc)) from exc
        if uri.scheme in ("https", "http"):
            # vLLM's loaders read hf repos, local folders and object stores (the Run:ai streamer:
            # s3://, gs://); a plain URL would reach vLLM as a repo id and fail at start-up.
            raise ValueError(
                f"{uri.scheme}:// is not a base-model source (vLLM cannot load weights from a "
                "URL); download the model into a PVC and use pvc://claim/path, or use "
                "hf://org/repo or s3://bucket/prefix"
            )
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
        description="--gpu-memory-utilization; omit for the highest safe value on this GPU "
        "(set it, or gpu.memoryGiB, to share the GPU).",
    )
    headroom_gi_b: float = Field(
        default=1.0,
        alias="headroomGiB",
        ge=0,
        description="GiB per GPU left free beyond the CUDA context and graphs (auto utilization).",
    )
    min_kv_sequences: int = Field(
        default=4,
        ge=1,
        description="Full-length sequences expected at once: LoRA slots shrink to keep them, "
        "and fewer is a warning (vLLM itself needs one).",
    )


class AdapterCacheSpec(Wire):
    """Where downloaded adapters are kept in the pod."""

    size_limit: str = Field(default="20Gi", max_length=32, description="emptyDir sizeLimit.")
    claim_name: str | None = Field(
        default=None, max_length=253, description="Use this PVC instead of an emptyDir."
    )


QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"


class AdapterLimitsSpec(Wire):
    """Bounds on what adapter sources may make a pod take, and which origins they may reach.

    Every field is optional: an unset one keeps the default named in its description. A
    refusal fails only the adapter concerned, with a reason (AdapterTooLarge, CacheFull,
    DownloadTimeout, SourceNotAllowed) and a message that names the field to raise.
    """

    max_adapter_size: str | None = Field(
        default=None,
        max_length=32,
        pattern=QUANTITY_PATTERN,
        description=f"Largest adapter, downloaded or extracted, as a quantity (default "
        f"{DEFAULT_MAX_ADAPTER_BYTES // 2**30}Gi). Larger: AdapterTooLarge.",
    )
    max_adapter_files: int | None = Field(
        default=None,
        ge=2,
        le=100_000,
        description=f"Most files (archive members, s3 objects) one adapter may have (default "
        f"{DEFAULT_MAX_ADAPTER_FILES}). More: AdapterTooLarge.",
    )
    cache_size: str | None = Field(
        default=None,
        max_length=32,
        pattern=QUANTITY_PATTERN,
        description="Budget of the pod's adapter cache, as a quantity (default 90% of "
        "spec.adapterCache.sizeLimit). Least-recently-used unpinned adapters leave the cache "
        "to make room; CacheFull when pinned and loaded ones fill it.",
    )
    max_concurrent_downloads: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description=f"Adapter downloads one pod runs at once (default "
        f"{DEFAULT_MAX_CONCURRENT_DOWNLOADS}).",
    )
    download_timeout_seconds: int | None = Field(
        default=None,
        ge=1,
        le=86_400,
        description=f"Deadline of one download attempt, retries apart (default "
        f"{DEFAULT_DOWNLOAD_TIMEOUT_SECONDS}). Over it on every attempt: DownloadTimeout.",
    )
    plain_http_hosts: list[str] = Field(
        default_factory=list,
        max_length=32,
        json_schema_extra={"items": {"type": "string", "maxLength": 260}},
        description="Hosts (host or host:port) adapter sources may reach over plain http://; "
        "every other source must be https://.",
    )
    private_networks: list[str] = Field(
        default_factory=list,
        max_length=32,
        json_schema_extra={"items": {"type": "string", "maxLength": 64}},
        description="CIDRs downloads may reach although they are loopback, link-local, "
        "private or cluster-internal (refused by default, checked on every resolved address "
        "and redirect), e.g. an in-cluster mirror's 10.0.12.0/24.",
    )

    @field_validator("plain_http_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        return [check_host(h) for h in value]

    @field_validator("private_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return [check_network(n) for n in value]


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
        description="Container resources, merged over the ones derived from the plan (CPU, "
        "memory, ephemeral storage); the GPU request and limit always come from spec.gpu.",
        json_schema_extra=_PRESERVE,
    )
    security_context: dict[str, Any] | None = Field(
        default=None,
        description="The vLLM container's securityContext, replacing the default (no privilege "
        "escalation, all capabilities dropped, root filesystem WRITABLE: NVIDIA runtimes that "
        "inject the GPU through CDI hooks write into it).",
        json_schema_extra=_PRESERVE,
    )
    shm_size: str | None = Field(
        default=None,
        max_length=32,
        pattern=QUANTITY,
        description="sizeLimit of /dev/shm (a memory-backed emptyDir); default 1Gi plus 1Gi "
        "per tensor-parallel GPU (NCCL and vLLM's worker message queues).",
    )


class ServerSpec(Wire):
    """The adapter-server container."""

    image: str | None = Field(
        default=None, max_length=512, description="Adapter-server image; operator default."
    )
    resources: dict[str, Any] | None = Field(default=None, json_schema_extra=_PRESERVE)
    security_context: dict[str, Any] | None = Field(
        default=None,
        description="The adapter-server container's securityContext, replacing the default "
        "(read-only root filesystem, no privilege escalation, all capabilities dropped).",
        json_schema_extra=_PRESERVE,
    )


class CredentialsSpec(Wire):
    """A Secret whose keys become environment variables (HF_TOKEN, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL, ...) in vLLM (gated
    or s3:// base models), the adapter-server (adapters) and the weights loader Job."""

    secret_ref: ObjectRef | None = None


class AdapterVolume(Wire):
    """A PVC adapters may read from as pvc://<claimName>/path."""

    claim_name: str = Field(
        min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
    )


_LABELS = "matchLabels: every key must be present with this value."
PEER_CEL: list[JsonValue] = [
    {
        "rule": "has(self.namespaceLabels) || has(self.podLabels)",
        "message": "set namespaceLabels, podLabels or both",
    }
]


class PublicPeer(Wire):
    """Clients allowed on the public port: pods matching both selectors (NetworkPolicy peer)."""

    model_config = ConfigDict(json_schema_extra={CEL: PEER_CEL})

    namespace_labels: dict[str, str] | None = Field(
        default=None,
        max_length=16,
        description=f"Namespaces allowed; unset: the BaseModel's own. {_LABELS} "
        "A namespace's name is its label kubernetes.io/metadata.name.",
    )
    pod_labels: dict[str, str] | None = Field(
        default=None,
        max_length=16,
        description=f"Pods allowed; unset: every pod in those namespaces. {_LABELS}",
    )

    @model_validator(mode="after")
    def _one(self) -> PublicPeer:
        if self.namespace_labels is None and self.pod_labels is None:
            raise ValueError("set namespaceLabels, podLabels or both")
        return self


class NetworkPolicySpec(Wire):
    """A NetworkPolicy for the pods: admin port from the operator only, public port as set."""

    enabled: bool = Field(
        default=True,
        description="Render it. Turn off on clusters without a NetworkPolicy engine (there it "
        "enforces nothing) or when you manage your own.",
    )
    public_from: list[PublicPeer] = Field(
        default_factory=list,
        max_length=32,
        description="Who may reach the public port (8000: inference and /metrics). Empty: "
        "anyone. Set: these peers and the operator's pods (it polls /v1/adapters). The admin "
        "port (8090) always admits only the operator's pods.",
    )


# --- The pod as a GPU cluster runs it: identity, placement, rollout, weights cache ----------
# (issue 9; defaults are chosen for EKS/GKE GPU nodes and the official vLLM image)

DEFAULT_UID = 10001  # above 10000 (checkov CKV_K8S_40); the CUDA image has no passwd entry for it
IntOrPercent = Annotated[
    Annotated[int, Field(ge=0)] | Annotated[str, Field(pattern=r"^[0-9]{1,3}%$")],
    WithJsonSchema({"x-kubernetes-int-or-string": True}),
]


class PodSecurity(Wire):
    """The uid/gid both containers run as (the pod's securityContext)."""

    run_as_user: int = Field(
        default=DEFAULT_UID, ge=1, le=2**31 - 1, description="runAsUser for both containers."
    )
    run_as_group: int = Field(
        default=DEFAULT_UID, ge=1, le=2**31 - 1, description="runAsGroup for both containers."
    )
    fs_group: int | None = Field(
        default=None,
        ge=1,
        le=2**31 - 1,
        description="fsGroup (owner group of mounted volumes); default runAsGroup.",
    )


class RolloutSpec(Wire):
    """How spec changes reach the pods and how pods stop."""

    strategy: Literal["RollingUpdate", "Recreate"] = Field(
        default="RollingUpdate",
        description="RollingUpdate (default: a new pod is ready before an old one goes, which "
        "needs a spare GPU node) or Recreate (no spare GPU needed; an outage per change).",
    )
    max_surge: IntOrPercent = Field(
        default=1, description="RollingUpdate maxSurge; 0 when the cluster has no spare GPUs."
    )
    max_unavailable: IntOrPercent = Field(
        default=0, description="RollingUpdate maxUnavailable; set 1 together with maxSurge 0."
    )
    progress_deadline_seconds: int | None = Field(
        default=None,
        ge=60,
        le=86_400,
        description="Deployment progressDeadlineSeconds; default derived from the model size "
        "(download, load, compile) plus 10 minutes for scheduling and the image pull.",
    )
    startup_seconds: int | None = Field(
        default=None,
        ge=60,
        le=86_400,
        description="How long vLLM may take to start before it is restarted (startup probes); "
        "default derived from the model size.",
    )
    termination_grace_period_seconds: int = Field(
        default=120,
        ge=10,
        le=3600,
        description="Time for in-flight streams to finish after the pod is told to stop.",
    )
    pre_stop_seconds: int = Field(
        default=10,
        ge=0,
        le=300,
        description="preStop sleep, so endpoints stop routing here before the drain begins.",
    )

    @model_validator(mode="after")
    def _fits(self) -> RolloutSpec:
        if self.pre_stop_seconds >= self.termination_grace_period_seconds:
            raise ValueError(
                "preStopSeconds must be below terminationGracePeriodSeconds, or the drain "
                "after it gets no time"
            )
        zero = (0, "0%")
        if (
            self.strategy == "RollingUpdate"
            and self.max_surge in zero
            and self.max_unavailable in zero
        ):
            raise ValueError("maxSurge and maxUnavailable cannot both be 0")
        return self


AccessMode = Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"]


class WeightsCacheSpec(Wire):
    """Keep hf:// or s3:// base weights on a PVC, downloaded once by a loader Job."""

    claim_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Use this existing PVC; omit to let the operator create <name>-weights.",
    )
    size: str | None = Field(
        default=None,
        max_length=32,
        pattern=QUANTITY,
        description="Size of the PVC the operator creates; default the model's weights plus "
        "20% and 2Gi (tokenizer, configs).",
    )
    storage_class_name: str | None = Field(
        default=None, max_length=253, description="StorageClass of the PVC the operator creates."
    )
    access_modes: list[AccessMode] = Field(
        default_factory=lambda: list[AccessMode](["ReadWriteOnce"]),
        min_length=1,
        max_length=3,
        description="accessModes of the PVC the operator creates; replicas on several nodes "
        "need ReadWriteMany (EFS, Filestore, CephFS).",
    )
    loader_image: str | None = Field(
        default=None,
        max_length=512,
        description="Image of the loader Job; default the engine image (it has "
        "huggingface_hub and boto3).",
    )


class WeightsStatus(Wire):
    """The weights cache: where the weights are and whether the loader Job has filled it."""

    phase: Literal["Pending", "Downloading", "Ready", "Failed"] = "Pending"
    claim_name: str | None = Field(default=None, description="The PVC holding the weights.")
    path: str | None = Field(default=None, description="Folder of these weights in the PVC.")
    job: str | None = Field(default=None, description="The loader Job.")
    expected_bytes: int | None = Field(default=None, description="Planned size of the weights.")
    attempts: int = Field(default=0, description="Loader pods that failed so far.")
    start_time: str | None = Field(default=None, description="When the loader Job started.")
    completion_time: str | None = Field(default=None, description="When it finished.")
    message: str = Field(default="", description="Progress, or why it failed and the fix.")


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
    adapter_limits: AdapterLimitsSpec = Field(default_factory=AdapterLimitsSpec)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    server: ServerSpec = Field(default_factory=ServerSpec)
    credentials: CredentialsSpec = Field(default_factory=CredentialsSpec)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, json_schema_extra={"items": _PRESERVE}
    )
    affinity: dict[str, Any] | None = Field(default=None, json_schema_extra=_PRESERVE)
    network_policy: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec)
    routing: RoutingSpec = Field(
        default_factory=RoutingSpec,
        description="Adapter-affinity routing across replicas (Gateway API Inference Extension).",
    )
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec,
        description="Scale replicas on the per-pod queue; when enabled, spec.replicas is only "
        "the starting count and the autoscaler owns the Deployment's replicas.",
    )
    # Issue 9: identity, placement, rollout, weights cache (see the block above).
    service_account_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="The pod's (and loader Job's) ServiceAccount, for IRSA / EKS Pod Identity / "
        "GKE Workload Identity access to s3:// or gs:// weights without keys in a Secret.",
    )
    security_context: PodSecurity = Field(default_factory=PodSecurity)
    runtime_class_name: str | None = Field(
        default=None,
        max_length=253,
        description="e.g. nvidia, where the NVIDIA runtime is not the node's default.",
    )
    priority_class_name: str | None = Field(default=None, max_length=253)
    image_pull_secrets: list[ObjectRef] = Field(default_factory=list, max_length=16)
    pod_labels: dict[str, str] = Field(
        default_factory=dict, description="Extra pod labels; the operator's own labels win."
    )
    pod_annotations: dict[str, str] = Field(
        default_factory=dict, description="Extra pod annotations; the spec-hash annotation wins."
    )
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    weights_cache: WeightsCacheSpec | None = Field(
        default=None,
        description="Cache hf:// or s3:// base weights on a PVC filled once by a loader Job "
        "before the Deployment starts; without it each pod downloads into a sized emptyDir.",
    )

    @model_validator(mode="after")
    def _cache_source(self) -> BaseModelSpec:
        source = self.model.source
        if self.weights_cache is not None and not source.startswith(("hf://", "s3://")):
            raise ValueError(
                f"spec.weightsCache caches hf:// and s3:// downloads; {source!r} is already "
                "local to the pod: remove spec.weightsCache"
            )
        return self

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
    weights: WeightsStatus | None = Field(default=None, description="The weights cache.")


class BaseModelResource(Wire):
    """A base LLM served by vLLM on GPUs, onto which LoRAAdapters are loaded at run time."""

    model_config = Wire.model_config | {"extra": "ignore"}

    spec: BaseModelSpec
    status: BaseModelStatus | None = None
