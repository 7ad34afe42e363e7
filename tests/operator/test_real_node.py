"""A local node for the real control plane: how far the "pod runner as the node" gets.

Matrix (real API server only): a Node registered with a GPU and a heartbeat Lease, the
adapter claim as a bound PV/PVC -> kube-scheduler binds the operator's Pod to the node; the
node writes the Pod's status back (Running, Ready, podIP) through pods/status -> the
Deployment controller counts it ready -> the operator's BaseModel shows READY 1/1 in
`kubectl get bm`. Running the pod's containers as local processes on that node is not done
here (see docs/testing.md): this shows the scheduling and status paths a local kubelet needs.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from loraplex.devtools.operator_proc import OperatorProcess
from loraplex.kube import KubeClient
from tests.operator.conftest import Cluster, RealCluster, eventually
from tests.operator.test_real_apiserver import table
from tests.operator.test_reconcile_e2e import NS, examples, one

pytestmark = [pytest.mark.operator, pytest.mark.timeout(240)]
NODE = "loraplex-local"
CAPACITY = {
    "cpu": "64",
    "memory": "512Gi",
    "ephemeral-storage": "2Ti",
    "pods": "110",
    "nvidia.com/gpu": "4",
}
# GPU feature discovery's label: the example BaseModel plans for an L40S and selects on it.
NODE_LABELS = {"nvidia.com/gpu.product": "NVIDIA-L40S"}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _node_status() -> dict[str, Any]:
    now = _now()[:19] + "Z"
    return {
        "capacity": CAPACITY,
        "allocatable": CAPACITY,
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "local pod runner",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
        ],
    }


@pytest.fixture
async def node(cluster: Cluster, tmp_path: Path) -> AsyncIterator[RealCluster]:
    """Register the node (status and a Lease renewed every 5 s) and the adapter claim."""
    if not isinstance(cluster, RealCluster):
        pytest.skip("needs the real API server (make kube-bins; --kube=real)")
    plane = cluster.plane
    s, url = plane.session(), plane.url
    merge = {"Content-Type": "application/merge-patch+json"}
    node_obj = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE, "labels": NODE_LABELS},
    }
    assert s.post(f"{url}/api/v1/nodes", json=node_obj).status_code == 201
    status = json.dumps({"status": _node_status()})
    assert s.patch(f"{url}/api/v1/nodes/{NODE}/status", data=status, headers=merge).ok
    lease_url = f"{url}/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": NODE},
        "spec": {"holderIdentity": NODE, "leaseDurationSeconds": 40, "renewTime": _now()},
    }
    assert s.post(lease_url, json=lease).status_code == 201
    claim = tmp_path / "team-adapters"
    claim.mkdir()
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": "team-adapters-local"},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadOnlyMany"],
            "storageClassName": "",
            "hostPath": {"path": str(claim)},
            "claimRef": {"namespace": NS, "name": "team-adapters"},
        },
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "team-adapters", "namespace": NS},
        "spec": {
            "accessModes": ["ReadOnlyMany"],
            "storageClassName": "",
            "volumeName": "team-adapters-local",
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    assert s.post(f"{url}/api/v1/persistentvolumes", json=pv).status_code == 201
    assert (
        s.post(f"{url}/api/v1/namespaces/{NS}/persistentvolumeclaims", json=pvc).status_code == 201
    )

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(5)
            renew = json.dumps({"spec": {"renewTime": _now()}})
            await asyncio.to_thread(s.patch, f"{lease_url}/{NODE}", data=renew, headers=merge)

    beat = asyncio.create_task(heartbeat())
    try:
        yield cluster
    finally:
        beat.cancel()
        for path in (
            f"/api/v1/namespaces/{NS}/persistentvolumeclaims/team-adapters",
            "/api/v1/persistentvolumes/team-adapters-local",
            f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{NODE}",
            f"/api/v1/nodes/{NODE}",
        ):
            s.delete(url + path)


async def test_pods_are_scheduled_to_the_local_node_and_report_ready(
    node: RealCluster, kube: KubeClient, operator: OperatorProcess
) -> None:
    plane = node.plane
    s, url = plane.session(), plane.url
    await eventually(
        lambda: (
            (pvc := plane.get("v1/persistentvolumeclaims", NS, "team-adapters"))
            and pvc.get("status", {}).get("phase") == "Bound"
        ),
        what="adapter claim bound (PV controller)",
    )
    for doc in examples():
        await kube.apply(doc)
    pod = await eventually(
        lambda: next(
            (p for p in node.objects_of("v1/pods", NS) if p["spec"].get("nodeName")), None
        ),
        what="kube-scheduler binds the pod to the local node",
        timeout=60,
    )
    assert pod["spec"]["nodeName"] == NODE
    # What a kubelet reports once the containers run (the processes themselves: not here).
    now = _now()[:19] + "Z"
    names = [c["name"] for c in pod["spec"]["containers"]]
    status = {
        "status": {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "hostIP": "127.0.0.1",
            "startTime": now,
            "conditions": [
                {"type": t, "status": "True", "lastTransitionTime": now}
                for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
            ],
            "containerStatuses": [
                {
                    "name": n,
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "image": "local",
                    "imageID": "",
                    "state": {"running": {"startedAt": now}},
                }
                for n in names
            ],
        }
    }
    r = s.patch(
        f"{url}/api/v1/namespaces/{NS}/pods/{pod['metadata']['name']}/status",
        data=json.dumps(status),
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert r.ok, r.text
    await eventually(
        lambda: (
            (one(node, "apps/v1/deployments", "qwen-14b") or {})
            .get("status", {})
            .get("readyReplicas")
            == 1
        ),
        what="Deployment controller counts the pod ready",
    )
    await eventually(
        lambda: (
            (one(node, "loraplex.io/v1alpha1/basemodels", "qwen-14b") or {})
            .get("status", {})
            .get("ready")
            == "1/1"
        ),
        what="BaseModel status.ready 1/1",
        timeout=60,
    )
    rows = table(plane.kubectl("get", "bm", "-n", NS).stdout)
    assert rows[0]["READY"] == "1/1"
