"""The weights cache against the API stand-in: PVC, loader Job, and the Deployment held back.

Matrix: a BaseModel with spec.weightsCache -> a PVC sized from the model and a loader Job with
the base model's credentials, no Deployment, phase Downloading; the Job running -> progress in
status; the Job succeeded (patched as the Job controller would: nothing runs Jobs here) ->
the Deployment reads the cache folder read-only, a PDB (2 replicas), phase Deploying; a failed
Job -> phase Failed, WeightsDownloadFailed with the loader's own termination message.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from loraplex.devtools.operator_proc import OperatorProcess
from loraplex.kube import JOBS, PODS, KubeClient
from tests.operator.conftest import Cluster, cached_basemodel, eventually, finish_loader_job


@pytest.fixture
def kube_backend() -> str:
    """Always the emulator: these tests play the Job controller (they write the loader Job's
    status), which a real API server's own Job controller would contest, and no node runs the
    loader pod here. The Job and PVC calls themselves are checked against the real server by
    test_rbac_is_exactly_the_calls_the_operator_makes."""
    return "emulator"


pytestmark = [pytest.mark.operator, pytest.mark.timeout(180)]
NS = "default"


def one(cluster: Cluster, resource: str, name: str) -> dict[str, Any] | None:
    return next(
        (o for o in cluster.objects_of(resource, NS) if o["metadata"]["name"] == name),
        None,
    )


def status_of(cluster: Cluster, name: str) -> dict[str, Any]:
    bm = one(cluster, "loraplex.io/v1alpha1/basemodels", name) or {}
    return dict(bm.get("status") or {})


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


async def loader_job(cluster: Cluster) -> dict[str, Any]:
    jobs = await eventually(lambda: cluster.objects_of("batch/v1/jobs", NS), what="the loader Job")
    assert len(jobs) == 1
    return jobs[0]


async def test_deployment_waits_for_the_loader_job(
    cluster: Cluster, kube: KubeClient, operator: OperatorProcess
) -> None:
    await kube.apply(cached_basemodel())
    job = await loader_job(cluster)
    name = job["metadata"]["name"]
    assert name.startswith("cached-weights-")
    assert job["metadata"]["ownerReferences"][0]["kind"] == "BaseModel"
    pod = job["spec"]["template"]["spec"]
    [loader] = pod["containers"]
    assert loader["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
    assert loader["args"][:2] == ["hf://Qwen/Qwen2.5-7B-Instruct", "main"]
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "cached-weights"}
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == (
        "loraplex-weights-loader"
    ), "the loader pod must not match the Deployment's or Service's selector"
    pvc = one(cluster, "v1/persistentvolumeclaims", "cached-weights")
    assert pvc is not None and pvc["spec"]["storageClassName"] == "fast"
    # Qwen2.5-7B: 7.6 B parameters in bfloat16 = 14.2 GiB; x1.2 + 2 GiB = 19.02 -> 20Gi.
    assert pvc["spec"]["resources"]["requests"]["storage"] == "20Gi"

    st = await eventually(
        lambda: (s := status_of(cluster, "cached")).get("phase") == "Downloading" and s,
        what="phase Downloading",
    )
    assert st["weights"]["phase"] in ("Pending", "Downloading")
    assert condition(st, "Progressing")["reason"] == "DownloadingWeights"
    assert one(cluster, "apps/v1/deployments", "cached") is None

    await kube.patch(
        JOBS, NS, name, {"status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}}, sub="status"
    )
    st = await eventually(
        lambda: (
            (s := status_of(cluster, "cached")).get("weights", {}).get("phase") == "Downloading"
            and "1 pod(s) active" in s["weights"]["message"]
            and s
        ),
        what="download progress in status",
    )
    assert st["weights"]["startTime"] == "2026-01-01T00:00:00Z"
    assert st["weights"]["expectedBytes"] > 15 * 10**9
    await cluster_settles(cluster)
    assert one(cluster, "apps/v1/deployments", "cached") is None, "held back while downloading"

    await finish_loader_job(kube, NS, name)
    dep = await eventually(
        lambda: one(cluster, "apps/v1/deployments", "cached"), what="Deployment after the Job"
    )
    containers = {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}
    flags = dict(itertools.pairwise(containers["vllm"]["args"]))
    assert flags["--model"] == f"/mnt/loraplex/weights/{loader['args'][2].split('/', 4)[-1]}"
    assert "--revision" not in flags, "a cached folder is a local path: no revision"
    mounts = {m["name"]: m for m in containers["vllm"]["volumeMounts"]}
    assert mounts["weights"]["readOnly"] is True
    assert containers["vllm"]["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
    assert one(cluster, "policy/v1/poddisruptionbudgets", "cached") is not None
    st = await eventually(
        lambda: (
            (s := status_of(cluster, "cached")).get("weights", {}).get("phase") == "Ready" and s
        ),
        what="weights Ready",
    )
    assert st["phase"] == "Deploying"


async def cluster_settles(cluster: Cluster) -> None:
    """Give the operator a reconcile pass (event-driven, well under a second here)."""
    import asyncio

    await asyncio.sleep(1.5)


async def test_failed_loader_names_the_reason(
    cluster: Cluster, kube: KubeClient, operator: OperatorProcess
) -> None:
    await kube.apply(cached_basemodel("gated", replicas=1))
    job = await loader_job(cluster)
    name = job["metadata"]["name"]
    # The loader pod as the Job controller and kubelet leave it after its last attempt.
    await kube.create(
        PODS,
        NS,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{name}-x1",
                "namespace": NS,
                "labels": {**job["spec"]["template"]["metadata"]["labels"], "job-name": name},
            },
            "spec": {"containers": [{"name": "loader", "image": "x"}]},
            "status": {
                "phase": "Failed",
                "containerStatuses": [
                    {
                        "name": "loader",
                        "state": {
                            "terminated": {
                                "exitCode": 1,
                                "finishedAt": "2026-01-01T00:05:00Z",
                                "message": "GatedRepoError: 401 Client Error: access to model "
                                "is restricted",
                            }
                        },
                    }
                ],
            },
        },
    )
    await kube.patch(
        JOBS,
        NS,
        name,
        {
            "status": {
                "failed": 5,
                "conditions": [
                    {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}
                ],
            }
        },
        sub="status",
    )
    st = await eventually(
        lambda: (s := status_of(cluster, "gated")).get("phase") == "Failed" and s,
        what="phase Failed",
    )
    ready = condition(st, "Ready")
    assert ready["reason"] == "WeightsDownloadFailed"
    assert "GatedRepoError: 401" in ready["message"]
    assert f"kubectl delete job {name}" in ready["message"]
    assert st["weights"]["attempts"] == 5
    assert one(cluster, "apps/v1/deployments", "gated") is None


async def test_a_superseded_loader_job_is_deleted_once_the_new_one_succeeds(
    cluster: Cluster, kube: KubeClient, operator: OperatorProcess
) -> None:
    """A loader Job is named after what it loads, so a new revision makes a new Job; the old
    one (and its pods) is deleted once the new one has succeeded, never before (the running
    Deployment still reads what it loaded), and a look-alike Job that is not this
    BaseModel's is left alone."""
    bm = cached_basemodel("rev", replicas=1)
    await kube.apply(bm)
    first = (await loader_job(cluster))["metadata"]["name"]
    await finish_loader_job(kube, NS, first)
    await eventually(lambda: one(cluster, "apps/v1/deployments", "rev"), what="Deployment")
    stranger = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "rev-weights-by-hand",
            "namespace": NS,
            "labels": (await kube.get(JOBS, NS, first) or {})["metadata"]["labels"],
        },
        "spec": {
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "x", "image": "busybox"}],
                }
            }
        },
    }
    await kube.create(JOBS, NS, stranger)
    bm["spec"]["model"]["revision"] = "v2"
    await kube.apply(bm)

    def names() -> set[str]:
        return {j["metadata"]["name"] for j in cluster.objects_of("batch/v1/jobs", NS)}

    second = await eventually(
        lambda: next(iter(names() - {first, "rev-weights-by-hand"}), None), what="the new Job"
    )
    await cluster_settles(cluster)
    assert first in names(), "kept while the new one has not succeeded"
    await finish_loader_job(kube, NS, second)
    await eventually(lambda: first not in names(), what="the old Job deleted")
    assert names() == {second, "rev-weights-by-hand"}
