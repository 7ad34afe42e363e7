"""Pure builders for the objects that route and scale a BaseModel's replicas.

- `InferencePool` (inference.networking.k8s.io/v1, the Gateway API Inference Extension):
  selects exactly this BaseModel's pods, targets the adapter-server's public port (its
  `/metrics` carries what the endpoint picker scrapes), and names the EPP Service.
- `HTTPRoute` (gateway.networking.k8s.io/v1), optional: a Gateway's traffic to the pool.
- `HorizontalPodAutoscaler` (autoscaling/v2) on the per-pod queue metric, or a KEDA
  `ScaledObject` (keda.sh/v1alpha1) with a Prometheus trigger when KEDA is installed, as
  vLLM's production-stack does.

Optional APIs may be missing from a cluster; `OptionalApi` names each one by its CRD so the
operator can say exactly which one to install, and `Capabilities` says which are present
(offline `loraplex render` assumes all are).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from loraplex import naming
from loraplex.api.routing import AutoscalingSpec, RoutingSpec


class OptionalApi(Enum):
    """An API loraplex uses only when asked, by the CRD that provides it."""

    INFERENCE_POOL = "inferencepools.inference.networking.k8s.io"
    HTTP_ROUTE = "httproutes.gateway.networking.k8s.io"
    KEDA = "scaledobjects.keda.sh"


# apiVersion/kind -> the optional API it needs (HPA is built in).
API_OF_KIND: dict[tuple[str, str], OptionalApi] = {
    ("inference.networking.k8s.io/v1", "InferencePool"): OptionalApi.INFERENCE_POOL,
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): OptionalApi.HTTP_ROUTE,
    ("keda.sh/v1alpha1", "ScaledObject"): OptionalApi.KEDA,
}


@dataclass(frozen=True)
class Capabilities:
    """Which optional APIs the cluster serves."""

    installed: frozenset[OptionalApi] = frozenset(OptionalApi)

    def has(self, api: OptionalApi) -> bool:
        return api in self.installed


ALL_APIS = Capabilities()


class RoutingProblem(ValueError):
    """A routing or autoscaling request this cluster cannot honour (an API is missing)."""

    def __init__(self, api: OptionalApi, field: str, fix: str) -> None:
        self.api = api
        super().__init__(f"{field} needs the {api.value} CRD, which is not installed: {fix}")


def pool_name(base: str) -> str:
    return base


def _meta(name: str, namespace: str, base: str, owner_refs: list[dict[str, Any]]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": naming.labels(base)}
    if owner_refs:
        meta["ownerReferences"] = owner_refs
    return meta


def build_inference_pool(
    base: str, namespace: str, routing: RoutingSpec, owner_refs: list[dict[str, Any]]
) -> dict[str, Any]:
    """The pool over this BaseModel's pods; the EPP scrapes each pod's public port."""
    picker = routing.inference_pool.endpoint_picker
    assert picker is not None  # the API model requires it when enabled
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": _meta(pool_name(base), namespace, base, owner_refs),
        "spec": {
            "selector": {"matchLabels": naming.selector_labels(base)},
            "targetPorts": [{"number": naming.PUBLIC_PORT}],
            "endpointPickerRef": {
                "kind": "Service",
                "name": picker.name,
                "port": {"number": picker.port},
                "failureMode": picker.failure_mode,
            },
        },
    }


def build_http_route(
    base: str, namespace: str, routing: RoutingSpec, owner_refs: list[dict[str, Any]]
) -> dict[str, Any]:
    route = routing.inference_pool.http_route
    assert route is not None
    parent: dict[str, Any] = {"group": "gateway.networking.k8s.io", "kind": "Gateway"}
    parent["name"] = route.gateway.name
    if route.gateway.namespace:
        parent["namespace"] = route.gateway.namespace
    if route.gateway.section_name:
        parent["sectionName"] = route.gateway.section_name
    spec: dict[str, Any] = {
        "parentRefs": [parent],
        "rules": [
            {
                "matches": [{"path": {"type": "PathPrefix", "value": route.path_prefix}}],
                "backendRefs": [
                    {
                        "group": "inference.networking.k8s.io",
                        "kind": "InferencePool",
                        "name": pool_name(base),
                    }
                ],
            }
        ],
    }
    if route.hostnames:
        spec["hostnames"] = list(route.hostnames)
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": _meta(naming.deployment_name(base), namespace, base, owner_refs),
        "spec": spec,
    }


def autoscaler_engine(spec: AutoscalingSpec, caps: Capabilities) -> str:
    """'hpa' or 'keda' for an enabled spec; raises RoutingProblem when KEDA is needed but absent."""
    keda = caps.has(OptionalApi.KEDA)
    if spec.engine == "keda" or (spec.engine == "auto" and spec.min_replicas == 0):
        if not keda:
            raise RoutingProblem(
                OptionalApi.KEDA,
                "spec.autoscaling" + (".minReplicas 0" if spec.min_replicas == 0 else ".engine"),
                "install KEDA, or use engine hpa with minReplicas >= 1",
            )
        if not spec.prometheus_address:
            raise ValueError("spec.autoscaling.prometheusAddress is required to use KEDA")
        return "keda"
    if spec.engine == "auto" and keda and spec.prometheus_address:
        return "keda"
    return "hpa"


def build_hpa(
    base: str, namespace: str, spec: AutoscalingSpec, owner_refs: list[dict[str, Any]]
) -> dict[str, Any]:
    """An HPA on the average per-pod queue (the adapter-server exports it at /metrics)."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(naming.deployment_name(base), namespace, base, owner_refs),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": naming.deployment_name(base),
            },
            "minReplicas": max(spec.min_replicas, 1),
            "maxReplicas": spec.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": spec.metric_name},
                        "target": {
                            "type": "AverageValue",
                            "averageValue": _quantity(spec.target_waiting_requests),
                        },
                    },
                }
            ],
            "behavior": {
                "scaleDown": {"stabilizationWindowSeconds": spec.scale_down_stabilization_seconds}
            },
        },
    }


def build_scaled_object(
    base: str, namespace: str, spec: AutoscalingSpec, owner_refs: list[dict[str, Any]]
) -> dict[str, Any]:
    """A KEDA ScaledObject: total queue over the BaseModel's pods / target per pod."""
    # `namespace` and `pod` are the labels Prometheus' Kubernetes discovery (PodMonitor or
    # ServiceMonitor) puts on every series; pods of the Deployment are named <deployment>-*.
    query = (
        f'sum(vllm:num_requests_waiting{{namespace="{namespace}",'
        f'pod=~"{naming.deployment_name(base)}-[a-z0-9]+-[a-z0-9]+"}})'
    )
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _meta(naming.deployment_name(base), namespace, base, owner_refs),
        "spec": {
            "scaleTargetRef": {"name": naming.deployment_name(base)},
            "minReplicaCount": spec.min_replicas,
            "maxReplicaCount": spec.max_replicas,
            "cooldownPeriod": spec.scale_down_stabilization_seconds,
            "triggers": [
                {
                    "type": "prometheus",
                    "metadata": {
                        "serverAddress": spec.prometheus_address or "",
                        "query": query,
                        "threshold": _quantity(spec.target_waiting_requests),
                        # Scale from zero on the first waiting request.
                        "activationThreshold": "0",
                    },
                    "name": "queue",
                }
            ],
        },
    }


def _quantity(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def build_routing_objects(
    base: str,
    namespace: str,
    routing: RoutingSpec,
    autoscaling: AutoscalingSpec,
    owner_refs: list[dict[str, Any]],
    caps: Capabilities = ALL_APIS,
) -> list[dict[str, Any]]:
    """What spec.routing and spec.autoscaling ask for; RoutingProblem when an API is missing."""
    objects: list[dict[str, Any]] = []
    pool = routing.inference_pool
    if pool.enabled:
        if not caps.has(OptionalApi.INFERENCE_POOL):
            raise RoutingProblem(
                OptionalApi.INFERENCE_POOL,
                "spec.routing.inferencePool",
                "install the Gateway API Inference Extension CRDs (docs/routing.md), or set "
                "enabled: false",
            )
        objects.append(build_inference_pool(base, namespace, routing, owner_refs))
        if pool.http_route is not None:
            if not caps.has(OptionalApi.HTTP_ROUTE):
                raise RoutingProblem(
                    OptionalApi.HTTP_ROUTE,
                    "spec.routing.inferencePool.httpRoute",
                    "install the Gateway API CRDs, or remove httpRoute",
                )
            objects.append(build_http_route(base, namespace, routing, owner_refs))
    if autoscaling.enabled:
        if autoscaler_engine(autoscaling, caps) == "keda":
            objects.append(build_scaled_object(base, namespace, autoscaling, owner_refs))
        else:
            objects.append(build_hpa(base, namespace, autoscaling, owner_refs))
    return objects
