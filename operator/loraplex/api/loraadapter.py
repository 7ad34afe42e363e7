"""LoRAAdapter (short name `lora`): one fine-tuned adapter for a BaseModel."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field, field_validator

from loraplex.api.common import CEL, Conditions, Wire
from loraplex_server.manifest import SHA256_RE, check_served_name
from loraplex_server.source_uri import checked_source

Phase = Literal["Pending", "Downloading", "Loading", "Ready", "Failed"]


class LoRAAdapterSpec(Wire):
    """An adapter to serve on every replica of its BaseModel."""

    base_model: str = Field(
        min_length=1,
        max_length=253,
        description="Name of a BaseModel in the same namespace (immutable).",
        json_schema_extra={CEL: [{"rule": "self == oldSelf", "message": "baseModel is immutable"}]},
    )
    source: str = Field(
        max_length=2048,
        description="hf://org/repo[/sub], s3://bucket/prefix, https://host/file(.tar.gz), or "
        "pvc://claim/path (the claim must be in the BaseModel's spec.adapterVolumes).",
        json_schema_extra={
            CEL: [
                {
                    "rule": "self.matches('^(hf|s3|pvc|https?)://.+')",
                    "message": "source must start with hf://, s3://, https:// or pvc://",
                }
            ]
        },
    )
    revision: str | None = Field(default=None, max_length=256, description="Git revision (hf).")
    sha256: str | None = Field(
        default=None,
        description="Expected sha256 of the downloaded file (https sources).",
        pattern=SHA256_RE.pattern,
    )
    served_name: str | None = Field(
        default=None, max_length=128, description="OpenAI model name; default metadata.name."
    )
    pinned: bool = Field(default=False, description="Keep loaded on every replica; never evict.")
    rank: int | None = Field(
        default=None, ge=1, le=512, description="The adapter's LoRA rank, if known in advance."
    )

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        return checked_source(value)

    @field_validator("served_name")
    @classmethod
    def _served(cls, value: str | None) -> str | None:
        return None if value is None else check_served_name(value)


class PodAdapterState(Wire):
    """The adapter's state on one pod."""

    model_config = Wire.model_config | {"extra": "ignore"}

    pod: str
    state: str
    reason: str | None = None
    message: str | None = None
    load_seconds: float | None = None
    last_used: datetime | None = None
    proven_at: datetime | None = Field(
        default=None, description="When this pod proved the current files change outputs."
    )


class ReplicaCounts(Wire):
    """Pods that have the adapter loaded or ready to load, out of the BaseModel's pods."""

    ready: int = 0
    total: int = 0


class AdapterProof(Wire):
    """The probe that showed the adapter's files change the model's output."""

    model_config = Wire.model_config | {"extra": "ignore"}

    digest: str = Field(description="The files proven (sha256 over the adapter's files).")
    proven_at: datetime = Field(description="The first pod's proof of these files.")
    pods: int = Field(default=0, description="Pods that proved these files.")
    probe_seconds: float = Field(default=0, description="Slowest probe among the pods.")
    max_logprob_delta: float | None = Field(
        default=None, description="Largest top-logprob change from the base (null: diverged)."
    )


class LoRAAdapterStatus(Wire):
    """What the operator observed; written only by the operator."""

    model_config = Wire.model_config | {"extra": "ignore"}

    observed_generation: int | None = None
    phase: Phase = "Pending"
    conditions: Conditions
    served_name: str | None = None
    rank: int | None = None
    target_modules: list[str] = Field(default_factory=list)
    size_bytes: int | None = None
    digest: str | None = None
    replicas: ReplicaCounts = Field(default_factory=ReplicaCounts)
    ready: str = Field(default="0/0", description="ready/total pods, for kubectl get.")
    proof: AdapterProof | None = Field(
        default=None, description="Shown on a pod to change outputs (spec.adapterChecks.probe)."
    )
    pods: list[PodAdapterState] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["pod"]},
    )


class LoRAAdapterResource(Wire):
    """A LoRA adapter served on every replica of its BaseModel, selected by OpenAI `model`."""

    model_config = Wire.model_config | {"extra": "ignore"}

    spec: LoRAAdapterSpec
    status: LoRAAdapterStatus | None = None
