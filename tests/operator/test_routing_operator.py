"""spec.routing / spec.autoscaling through the operator when a CRD is missing (issue 13.1).

The emulator serves the optional APIs as if installed; here KEDA's is taken away, as on a
cluster without KEDA. The BaseModel names the missing CRD in `RoutingReady`, everything else
(InferencePool, Deployment, Service) is still applied, and the Deployment's replicas are left
to the autoscaler (the operator applies none).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from loraplex.devtools.operator_proc import OperatorProcess
from loraplex.kube import KubeClient
from tests.operator.conftest import Cluster, eventually
from tests.operator.test_reconcile_e2e import ROUTED, examples, one


@pytest.fixture
def kube_backend() -> str:
    """The emulator, whose served APIs the test can change (a real server's are shared)."""
    return "emulator"


pytestmark = [pytest.mark.operator, pytest.mark.timeout(120)]


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    conds = ((obj or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == type_), None)


async def test_missing_keda_is_named_and_the_rest_is_applied(
    cluster: Cluster, kube: KubeClient, operator: OperatorProcess
) -> None:
    del cluster.running.emulator.resources["keda.sh/v1alpha1/scaledobjects"]  # type: ignore[attr-defined]
    bm = json.loads(json.dumps(examples()[0]))
    bm["metadata"]["name"] = "routed"
    bm["spec"]["routing"] = ROUTED
    bm["spec"]["autoscaling"] = {
        "enabled": True,
        "engine": "keda",
        "maxReplicas": 3,
        "prometheusAddress": "http://prometheus.monitoring:9090",
    }
    await kube.apply(bm)
    cond = await eventually(
        lambda: condition(
            one(cluster, "loraplex.io/v1alpha1/basemodels", "routed"), "RoutingReady"
        ),
        what="RoutingReady",
    )
    assert cond["status"] == "False" and cond["reason"] == "CRDNotInstalled"
    assert "scaledobjects.keda.sh" in cond["message"]
    assert one(cluster, "inference.networking.k8s.io/v1/inferencepools", "routed") is not None
    assert one(cluster, "v1/services", "routed") is not None
    deployment = await eventually(
        lambda: one(cluster, "apps/v1/deployments", "routed"), what="Deployment"
    )
    assert "replicas" not in deployment["spec"], "the autoscaler owns replicas"
