"""spec.routing and spec.autoscaling (issue 13): the objects they render and their checks.

| case | checks |
|---|---|
| InferencePool | GIE CRD schema + CEL, selects exactly our pods, public port, EPP |
| HTTPRoute | real Gateway API CRD schema, backend is the pool |
| HPA | kubernetes-validate strict (autoscaling/v2), per-pod queue metric |
| ScaledObject | real KEDA CRD schema, queue query, scale to zero only with KEDA |
| Deployment | no `replicas` when an autoscaler owns it; unchanged otherwise |
| missing CRDs | a RoutingProblem naming the CRD; every other object still rendered |
| bad specs | refused with the field and the fix |
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pydantic
import pytest

from loraplex import naming
from loraplex.api.basemodel import BaseModelSpec
from loraplex.decide import decide
from loraplex.render import Owner
from loraplex.routing import ALL_APIS, Capabilities, OptionalApi, autoscaler_engine
from tests.support.crd import cel_errors, schema_errors

OWNER = Owner("acc-qwen", "team-a", "uid-1")
CORE_KINDS = {"Secret", "ConfigMap", "NetworkPolicy", "Deployment", "Service"}
MODEL = {"source": "hf://Qwen/Qwen2.5-7B-Instruct"}
POOL = {"enabled": True, "endpointPicker": {"name": "loraplex-epp"}}
ROUTE = {**POOL, "httpRoute": {"gateway": {"name": "inference-gw", "namespace": "gw"}}}
HPA = {"enabled": True, "minReplicas": 1, "maxReplicas": 4, "engine": "hpa"}
KEDA = {
    "enabled": True,
    "minReplicas": 0,
    "maxReplicas": 4,
    "engine": "keda",
    "prometheusAddress": "http://prometheus.monitoring:9090",
}


def render(caps: Capabilities = ALL_APIS, **spec: Any) -> Any:
    decision = decide(
        OWNER,
        {"model": MODEL, "gpu": {"product": "L40S"}, **spec},
        [],
        token="t",
        previous=None,
        caps=caps,
    )
    assert decision.objects, decision
    return decision


def kind(objs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == name]
    assert len(found) == 1, [o["kind"] for o in objs]
    return found[0]


def test_inference_pool_selects_exactly_the_base_models_pods() -> None:
    objs = render(routing={"inferencePool": POOL}).objects
    pool = kind(objs, "InferencePool")
    assert schema_errors("InferencePool", pool) == []
    assert cel_errors("InferencePool", pool) == []
    pod_labels = kind(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    selector = pool["spec"]["selector"]["matchLabels"]
    assert selector == naming.selector_labels(OWNER.name)
    assert selector.items() <= pod_labels.items()
    # Another BaseModel's pods do not match.
    assert not selector.items() <= naming.selector_labels("other").items()
    assert pool["spec"]["targetPorts"] == [{"number": naming.PUBLIC_PORT}]
    picker = pool["spec"]["endpointPickerRef"]
    assert picker == {
        "kind": "Service",
        "name": "loraplex-epp",
        "port": {"number": 9002},
        "failureMode": "FailClose",
    }
    assert pool["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid


def test_http_route_sends_the_gateway_to_the_pool() -> None:
    objs = render(routing={"inferencePool": ROUTE}).objects
    route = kind(objs, "HTTPRoute")
    assert schema_errors("HTTPRoute", route) == []
    assert cel_errors("HTTPRoute", route) == []
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": OWNER.name}
    ]
    assert route["spec"]["parentRefs"][0]["namespace"] == "gw"


def test_no_routing_objects_unless_asked() -> None:
    kinds = {o["kind"] for o in render().objects}
    assert kinds == CORE_KINDS
    assert kind(render().objects, "Deployment")["spec"]["replicas"] == 1


@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.latest_version()])
def test_hpa_scales_on_the_per_pod_queue(version: str) -> None:
    objs = render(autoscaling=HPA).objects
    hpa = kind(objs, "HorizontalPodAutoscaler")
    kubernetes_validate.validate(hpa, version, strict=True)
    assert hpa["spec"]["scaleTargetRef"]["name"] == kind(objs, "Deployment")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    # Up to 4 replicas: drains keep all but one serving.
    assert kind(objs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    # The operator no longer writes replicas: the HPA owns them.
    assert "replicas" not in kind(objs, "Deployment")["spec"]
    kubernetes_validate.validate(kind(objs, "Deployment"), version, strict=True)


def test_keda_scaled_object_scales_to_zero_on_the_queue() -> None:
    objs = render(autoscaling=KEDA).objects
    scaled = kind(objs, "ScaledObject")
    assert schema_errors("ScaledObject", scaled) == []
    assert scaled["spec"]["minReplicaCount"] == 0
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert 'vllm:num_requests_waiting{namespace="team-a"' in trigger["metadata"]["query"]
    assert "replicas" not in kind(objs, "Deployment")["spec"]


@pytest.mark.parametrize(
    ("engine", "installed", "address", "expected"),
    [
        ("auto", {OptionalApi.KEDA}, "http://p:9090", "keda"),
        ("auto", set(), "http://p:9090", "hpa"),
        ("auto", {OptionalApi.KEDA}, None, "hpa"),
        ("hpa", {OptionalApi.KEDA}, "http://p:9090", "hpa"),
        ("keda", {OptionalApi.KEDA}, "http://p:9090", "keda"),
    ],
)
def test_engine_choice(
    engine: str, installed: set[OptionalApi], address: str | None, expected: str
) -> None:
    spec = BaseModelSpec.model_validate(
        {
            "model": MODEL,
            "autoscaling": {
                "enabled": True,
                "engine": engine,
                "maxReplicas": 3,
                **({"prometheusAddress": address} if address else {}),
            },
        }
    )
    assert autoscaler_engine(spec.autoscaling, Capabilities(frozenset(installed))) == expected


@pytest.mark.parametrize(
    ("spec", "missing"),
    [
        ({"routing": {"inferencePool": POOL}}, "inferencepools.inference.networking.k8s.io"),
        ({"routing": {"inferencePool": ROUTE}}, "inferencepools.inference.networking.k8s.io"),
        ({"autoscaling": KEDA}, "scaledobjects.keda.sh"),
        ({"autoscaling": {**KEDA, "engine": "auto"}}, "scaledobjects.keda.sh"),
    ],
    ids=["pool", "route", "keda", "scale-to-zero-auto"],
)
def test_a_missing_crd_is_named_and_nothing_else_breaks(spec: dict[str, Any], missing: str) -> None:
    decision = render(caps=Capabilities(frozenset()), **spec)
    assert decision.routing_problem is not None
    assert missing in str(decision.routing_problem)
    # An autoscaler that may add replicas also brings a PodDisruptionBudget (issue 9.9).
    assert {o["kind"] for o in decision.objects} - {"PodDisruptionBudget"} == CORE_KINDS


def test_route_without_gateway_api_is_named() -> None:
    caps = Capabilities(frozenset({OptionalApi.INFERENCE_POOL}))
    decision = render(caps=caps, routing={"inferencePool": ROUTE})
    assert "httproutes.gateway.networking.k8s.io" in str(decision.routing_problem)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"routing": {"inferencePool": {"enabled": True}}}, "endpointPicker is required"),
        ({"autoscaling": {**HPA, "minReplicas": 0}}, "minReplicas 0 needs KEDA"),
        ({"autoscaling": {**KEDA, "prometheusAddress": None}}, "prometheusAddress is required"),
        ({"autoscaling": {**HPA, "minReplicas": 5, "maxReplicas": 2}}, "maxReplicas must be"),
        (
            {"routing": {"inferencePool": {**POOL, "endpointPicker": {"name": "Bad_Name"}}}},
            "endpointPicker.name",
        ),
    ],
    ids=["no-picker", "hpa-to-zero", "keda-no-prometheus", "max-below-min", "picker-name"],
)
def test_bad_specs_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(pydantic.ValidationError) as err:
        BaseModelSpec.model_validate({"model": MODEL, **spec})
    text = str(err.value)
    assert field in text or field.split(".")[-1] in text
