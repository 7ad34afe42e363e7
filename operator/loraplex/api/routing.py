"""How traffic reaches a BaseModel's replicas and how many there are: spec.routing and
spec.autoscaling.

Why these exist: with `replicas > 1` a plain Service round-robins, so every pod ends up
loading every adapter and GPU slots thrash. Routing by adapter is done by the Gateway API
Inference Extension (an `InferencePool` plus an endpoint picker, EPP, whose
`lora-affinity-scorer` reads each pod's `vllm:lora_requests_info`), not by a router of ours.
Autoscaling is a HorizontalPodAutoscaler, or a KEDA ScaledObject where KEDA is installed,
on the queue length the pods export (`vllm:num_requests_waiting`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from loraplex.api.common import Wire

_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class EndpointPickerRef(Wire):
    """The endpoint picker (EPP) Service the InferencePool consults for every request."""

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=_DNS_LABEL,
        description="Service name of the EPP in this namespace (the llm-d router / GIE EPP).",
    )
    port: int = Field(
        default=9002, ge=1, le=65535, description="The EPP Service's ext-proc (gRPC) port."
    )
    failure_mode: Literal["FailOpen", "FailClose"] = Field(
        default="FailClose",
        description="When the EPP does not answer: FailClose drops the request, FailOpen lets "
        "the gateway pick any pod of the pool (adapter affinity is lost until it recovers).",
    )


class GatewayRef(Wire):
    """The Gateway an HTTPRoute attaches to."""

    name: str = Field(min_length=1, max_length=253, description="Gateway name.")
    namespace: str | None = Field(
        default=None, max_length=63, pattern=_DNS_LABEL, description="Default: this namespace."
    )
    section_name: str | None = Field(
        default=None, max_length=253, description="A listener of the Gateway, by name."
    )


class HTTPRouteSpec(Wire):
    """An HTTPRoute sending the Gateway's traffic to the InferencePool."""

    gateway: GatewayRef
    hostnames: list[str] = Field(default_factory=list, max_length=16)
    path_prefix: str = Field(
        default="/v1/", max_length=1024, pattern=r"^/", description="Path prefix routed."
    )


class InferencePoolRouting(Wire):
    """An InferencePool (inference.networking.k8s.io/v1) over exactly this BaseModel's pods."""

    enabled: bool = Field(default=False, description="Create and own the InferencePool.")
    endpoint_picker: EndpointPickerRef | None = Field(
        default=None, description="Required when enabled: the EPP Service to consult."
    )
    http_route: HTTPRouteSpec | None = Field(
        default=None, description="Also create an HTTPRoute from a Gateway to the pool."
    )

    @model_validator(mode="after")
    def _picker(self) -> InferencePoolRouting:
        if self.enabled and self.endpoint_picker is None:
            raise ValueError(
                "spec.routing.inferencePool.endpointPicker is required when enabled: name the "
                "EPP Service (the loraplex chart's is <release>-epp when epp.enabled)"
            )
        return self


class RoutingSpec(Wire):
    """Adapter-aware routing across replicas."""

    inference_pool: InferencePoolRouting = Field(default_factory=InferencePoolRouting)


class AutoscalingSpec(Wire):
    """Scale replicas on the queue each pod reports (vllm:num_requests_waiting).

    When enabled the operator stops writing `replicas` on the Deployment: the autoscaler owns
    it, so the two never fight.
    """

    enabled: bool = Field(default=False)
    engine: Literal["auto", "hpa", "keda"] = Field(
        default="auto",
        description="hpa: a HorizontalPodAutoscaler on a per-pod custom metric (needs a "
        "metrics adapter such as prometheus-adapter); keda: a KEDA ScaledObject with a "
        "Prometheus trigger; auto: keda when its CRD is installed, else hpa.",
    )
    min_replicas: int = Field(
        default=1, ge=0, le=1000, description="0 (scale to zero) only with KEDA."
    )
    max_replicas: int = Field(default=1, ge=1, le=1000)
    target_waiting_requests: float = Field(
        default=4,
        gt=0,
        le=10_000,
        description="Requests waiting per pod (vLLM's queue plus those held while an adapter "
        "loads) above which another replica is added.",
    )
    metric_name: str = Field(
        default="vllm_num_requests_waiting",
        max_length=253,
        description="hpa: the per-pod metric name as the metrics adapter exposes it.",
    )
    prometheus_address: str | None = Field(
        default=None,
        max_length=1024,
        pattern=r"^https?://",
        description="keda: the Prometheus server KEDA queries (required for keda).",
    )
    scale_down_stabilization_seconds: int = Field(
        default=300,
        ge=0,
        le=3600,
        description="Wait this long before removing a replica (a GPU pod is slow to come back).",
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.max_replicas < max(self.min_replicas, 1):
            raise ValueError("spec.autoscaling.maxReplicas must be >= minReplicas and >= 1")
        if self.enabled and self.min_replicas == 0 and self.engine == "hpa":
            raise ValueError(
                "spec.autoscaling.minReplicas 0 needs KEDA (engine keda or auto): an HPA "
                "cannot scale to zero"
            )
        if self.enabled and self.engine == "keda" and not self.prometheus_address:
            raise ValueError("spec.autoscaling.prometheusAddress is required with engine keda")
        return self
