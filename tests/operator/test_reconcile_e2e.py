"""The operator as it runs in production (a process running kopf) against a Kubernetes API.

Matrix: apply examples -> Deployment/Service/ConfigMap/Secret with the right content and
owners; add/change/delete adapters -> only the manifest changes (no rollout); hand-edited or
deleted Deployment -> restored; BaseModel deleted -> adapters BaseModelNotFound, re-created ->
recovered; operator restarted mid-way -> same state, no duplicates; every API call the
operator made is covered by loraplex.rbac. Against the real API server (tests/operator/conftest
`cluster`) the operator runs as the chart's service account, so RBAC is enforced, and its calls
come from the server's audit log. The NetworkPolicy is owned, corrected, and deleted when
spec.networkPolicy.enabled turns false (a foreign one of the same name is left alone).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from loraplex import handlers, naming, rbac
from loraplex.devtools.operator_proc import OperatorProcess
from loraplex.kube import (
    BASEMODELS,
    CONFIGMAPS,
    DEPLOYMENTS,
    KIND_OF,
    LORAADAPTERS,
    NETWORKPOLICIES,
    PDBS,
    SERVICES,
    KubeClient,
)
from loraplex_server import manifest_shards
from tests.operator.conftest import Cluster, cached_basemodel, eventually, finish_loader_job

pytestmark = [pytest.mark.operator, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parents[2]
NS = "default"
NETPOL = "networking.k8s.io/v1/networkpolicies"


def examples() -> list[dict[str, Any]]:
    docs = []
    for f in ("basemodel.yaml", "adapter.yaml"):
        docs += [d for d in yaml.safe_load_all((ROOT / "examples" / f).read_text()) if d]
    return docs


def one(cluster: Cluster, resource: str, name: str) -> dict[str, Any] | None:
    return next(
        (o for o in cluster.objects_of(resource, NS) if o["metadata"]["name"] == name),
        None,
    )


def manifest_of(cluster: Cluster, base: str) -> dict[str, Any] | None:
    cm = one(cluster, "v1/configmaps", naming.configmap_name(base))
    if cm is None:
        return None
    shards = {o["metadata"]["name"]: o for o in cluster.objects_of("v1/configmaps", NS)}
    try:
        manifest = manifest_shards.from_configmaps(cm, shards)
    except manifest_shards.TornManifest:
        return None  # caught between the operator's shard and index writes: look again
    data: dict[str, Any] = manifest.model_dump(by_alias=True, mode="json")
    return data


def adapter_names(cluster: Cluster, base: str) -> list[str] | None:
    m = manifest_of(cluster, base)
    return None if m is None else [a["name"] for a in m["adapters"]]


def adapter_obj(name: str, base: str, source: str, **spec: Any) -> dict[str, Any]:
    """A LoRAAdapter as a user would apply it."""
    return {
        "apiVersion": "loraplex.io/v1alpha1",
        "kind": "LoRAAdapter",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"baseModel": base, "source": source, **spec},
    }


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions", []):
        if c["type"] == type_:
            return dict(c)
    return None


def secret_value(secret: dict[str, Any], key: str) -> str:
    """A Secret's value as written (stringData) or as stored (data, base64: the real server)."""
    if key in (secret.get("stringData") or {}):
        return str(secret["stringData"][key])
    return base64.b64decode(secret["data"][key]).decode()


def pod_template(cluster: Cluster, base: str) -> Any:
    dep = one(cluster, "apps/v1/deployments", base)
    return None if dep is None else dep["spec"]["template"]


async def apply_all(kube: KubeClient, docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        await kube.apply(doc)


async def test_examples_reconcile_into_owned_objects(
    cluster: Cluster, kube: KubeClient, operator: OperatorProcess
) -> None:
    await apply_all(kube, examples())
    names = await eventually(
        lambda: adapter_names(cluster, "qwen-14b") == ["sql-expert", "support-bot"],
        what="both adapters in the manifest",
    )
    assert names
    # Objects are written one after another: the manifest may land before the Deployment.
    dep = await eventually(
        lambda: one(cluster, "apps/v1/deployments", "qwen-14b"), what="the Deployment"
    )
    for res, name in [
        ("v1/services", "qwen-14b"),
        ("v1/secrets", "qwen-14b-admin"),
        ("v1/configmaps", "qwen-14b-adapters"),
        ("apps/v1/deployments", "qwen-14b"),
        (NETPOL, "qwen-14b"),
    ]:
        # The manifest (ConfigMap) is written before the Service: wait for each object.
        obj = await eventually(lambda r=res, n=name: one(cluster, r, n), what=f"{res} {name}")  # type: ignore[misc]
        owner = obj["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["controller"]) == (
            "BaseModel",
            "qwen-14b",
            True,
        )
        bm = one(cluster, "loraplex.io/v1alpha1/basemodels", "qwen-14b")
        assert bm is not None and owner["uid"] == bm["metadata"]["uid"]
    containers = {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}
    vllm_args = containers["vllm"]["args"]
    assert "--enable-lora" in vllm_args
    flags = dict(itertools.pairwise(vllm_args))
    assert flags["--model"] == "Qwen/Qwen2.5-14B-Instruct"
    assert flags["--max-lora-rank"] == "32"  # adapters of rank 16 and 8, one step of headroom
    assert 0.9 < float(flags["--gpu-memory-utilization"]) < 0.99
    # A quantity: the real API server stores it as the string "1".
    assert str(containers["vllm"]["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert containers["adapter-server"]["args"] == [
        "--vllm-url",
        "http://127.0.0.1:8001",
        "--manifest",
        "/etc/loraplex/manifest/manifest.json",
        "--cache-dir",
        "/var/cache/loraplex",
        "--port",
        "8000",
        "--admin-port",
        "8090",
        "--admin-token-file",
        "/etc/loraplex/admin/token",
        "--pvc-root",
        "/mnt/loraplex/pvc",
        "--workers",
        "2",
    ]
    # Two workers at 500m each; the real API server stores the quantity canonically ("1").
    assert containers["adapter-server"]["resources"]["requests"]["cpu"] in ("1000m", "1")
    mounts = {m["mountPath"]: m for m in containers["adapter-server"]["volumeMounts"]}
    assert mounts["/mnt/loraplex/pvc/team-adapters"]["readOnly"] is True
    manifest = manifest_of(cluster, "qwen-14b")
    assert manifest is not None
    pinned = {a["name"]: a["pinned"] for a in manifest["adapters"]}
    assert pinned == {"sql-expert": True, "support-bot": False}
    secret = one(cluster, "v1/secrets", "qwen-14b-admin")
    assert secret is not None and len(secret_value(secret, "token")) == 64

    bm = await eventually(
        lambda: (
            (o := one(cluster, "loraplex.io/v1alpha1/basemodels", "qwen-14b"))
            and (o.get("status") or {}).get("plan")
            and o
        ),
        what="BaseModel status.plan",
    )
    assert condition(bm, "Planned")["status"] == "True"  # type: ignore[index]
    assert bm["status"]["phase"] == "Deploying"
    assert bm["status"]["observedGeneration"] == bm["metadata"]["generation"]
    assert bm["status"]["adapters"]["declared"] == 2
    lora = await eventually(
        lambda: condition(
            one(cluster, "loraplex.io/v1alpha1/loraadapters", "sql-expert"), "Accepted"
        ),
        what="adapter Accepted",
    )
    assert lora["status"] == "True"
    assert "kopf" not in json.dumps(bm.get("status", {}))


async def test_adapter_changes_touch_only_the_manifest(
    cluster: Cluster, kube: KubeClient, operator: OperatorProcess
) -> None:
    await apply_all(kube, examples())
    await eventually(
        lambda: adapter_names(cluster, "qwen-14b") == ["sql-expert", "support-bot"],
        what="initial manifest",
    )
    # The ConfigMaps are written before the Deployment in one pass: wait for both.
    template = await eventually(lambda: pod_template(cluster, "qwen-14b"), what="deployment")
    gen0 = (await eventually(lambda: manifest_of(cluster, "qwen-14b")))["generation"]

    new = adapter_obj("chat-helper", "qwen-14b", "s3://adapters-bucket/chat-helper", rank=8)
    await kube.apply(new)
    await eventually(
        lambda: "chat-helper" in (adapter_names(cluster, "qwen-14b") or []),
        what="hot-added adapter in the manifest",
    )
    gen1 = (await eventually(lambda: manifest_of(cluster, "qwen-14b")))["generation"]
    assert gen1 > gen0

    await kube.patch(LORAADAPTERS, NS, "chat-helper", {"spec": {"servedName": "chatty"}})
    await eventually(
        lambda: any(
            a["servedName"] == "chatty"
            for a in (manifest_of(cluster, "qwen-14b") or {"adapters": []})["adapters"]
        ),  # type: ignore[index]
        what="changed servedName in the manifest",
    )
    await kube.delete(LORAADAPTERS, NS, "chat-helper")
    await eventually(
        lambda: "chat-helper" not in (adapter_names(cluster, "qwen-14b") or ["x"]),
        what="deleted adapter out of the manifest",
    )
    await eventually(
        lambda: one(cluster, "loraplex.io/v1alpha1/loraadapters", "chat-helper") is None,
        what="finalizer released",
    )
    await asyncio.sleep(1)
    assert pod_template(cluster, "qwen-14b") == template, "adapter changes must not roll pods"
    assert (await eventually(lambda: manifest_of(cluster, "qwen-14b")))["generation"] > gen1


async def test_real_spec_change_rolls_and_drift_is_corrected(
    cluster: Cluster, kube: KubeClient, operator: OperatorProcess
) -> None:
    await apply_all(kube, examples())
    await eventually(lambda: pod_template(cluster, "qwen-14b"), what="deployment")
    template = pod_template(cluster, "qwen-14b")
    hash0 = template["metadata"]["annotations"][naming.SPEC_HASH]

    # A hand edit of the Deployment is put back.
    await kube.patch(
        DEPLOYMENTS,
        NS,
        "qwen-14b",
        {"spec": {"template": {"spec": {"containers": [{"name": "hacked", "image": "x"}]}}}},
    )
    await eventually(lambda: pod_template(cluster, "qwen-14b") == template, what="drift corrected")
    # A deleted Service comes back.
    await kube.delete(SERVICES, NS, "qwen-14b")
    await eventually(lambda: one(cluster, "v1/services", "qwen-14b"), what="service restored")
    # A real spec change rolls: the hash moves.
    await kube.patch(BASEMODELS, NS, "qwen-14b", {"spec": {"maxModelLen": 4096}})
    await eventually(
        lambda: (
            pod_template(cluster, "qwen-14b")["metadata"]["annotations"][naming.SPEC_HASH] != hash0
        ),  # type: ignore[index]
        what="rollout on a real spec change",
    )
    args = pod_template(cluster, "qwen-14b")["spec"]["containers"][0]["args"]  # type: ignore[index]
    assert args[args.index("--max-model-len") + 1] == "4096"


async def test_base_model_deleted_and_recreated(
    cluster: Cluster, kube: KubeClient, operator: OperatorProcess
) -> None:
    docs = examples()
    await apply_all(kube, docs)
    await eventually(lambda: adapter_names(cluster, "qwen-14b"), what="manifest")
    await kube.delete(BASEMODELS, NS, "qwen-14b")
    for name in ("sql-expert", "support-bot"):
        cond = await eventually(
            lambda n=name: (
                (c := condition(one(cluster, "loraplex.io/v1alpha1/loraadapters", n), "Accepted"))  # type: ignore[misc]
                and c["reason"] == "BaseModelNotFound"
                and c
            ),
            what=f"{name} BaseModelNotFound",
        )
        assert "spec.baseModel" in cond["message"]
    await kube.apply(docs[0])
    for name in ("sql-expert", "support-bot"):
        await eventually(
            lambda n=name: (
                (c := condition(one(cluster, "loraplex.io/v1alpha1/loraadapters", n), "Accepted"))  # type: ignore[misc]
                and c["status"] == "True"
            ),
            what=f"{name} accepted again",
        )


async def test_restart_converges_without_duplicates(
    cluster: Cluster, kube: KubeClient, operator: OperatorProcess
) -> None:
    await apply_all(kube, examples())
    await eventually(lambda: adapter_names(cluster, "qwen-14b"), what="manifest")
    await asyncio.to_thread(operator.stop)
    extra = adapter_obj("while-down", "qwen-14b", "hf://org/while-down")
    await kube.apply(extra)
    before = await eventually(lambda: manifest_of(cluster, "qwen-14b"))
    operator.start()
    await eventually(
        lambda: "while-down" in (adapter_names(cluster, "qwen-14b") or []),
        what="adapter created while the operator was down",
        timeout=60,
    )
    after = await eventually(lambda: manifest_of(cluster, "qwen-14b"))
    assert after["generation"] == before["generation"] + 1
    for res in ("apps/v1/deployments", "v1/services", "v1/configmaps", "v1/secrets"):
        # Only ours: a real cluster also has the `kubernetes` Service and kube-root-ca.crt.
        ours = sorted(
            o["metadata"]["name"]
            for o in cluster.objects_of(res, NS)
            if (o["metadata"].get("labels") or {}).get("app.kubernetes.io/managed-by") == "loraplex"
        )
        if res == "v1/configmaps":  # the index and one shard
            assert ours == ["qwen-14b-adapters", "qwen-14b-manifest-0"]
        else:
            assert len(ours) == 1, res
    await asyncio.sleep(3)  # a further timer tick changes nothing
    settled = await eventually(lambda: manifest_of(cluster, "qwen-14b"))
    assert settled["generation"] == after["generation"]


async def exercise_stale_shard(cluster: Cluster, kube: KubeClient) -> None:
    """An index naming a second shard (as after a manifest that shrank): the operator
    republishes and deletes the shard no index names any more."""
    index_cm = one(cluster, "v1/configmaps", naming.configmap_name("qwen-14b"))
    assert index_cm is not None
    index = json.loads(index_cm["data"][naming.MANIFEST_KEY])
    stale = naming.manifest_shard_name("qwen-14b", 1)
    index["shards"].append({**index["shards"][0], "name": stale, "key": "shard-1.gz"})
    shard = json.loads(json.dumps(one(cluster, "v1/configmaps", index["shards"][0]["name"])))
    shard["metadata"] = {
        "name": stale,
        "namespace": NS,
        "labels": shard["metadata"]["labels"],
        "ownerReferences": shard["metadata"]["ownerReferences"],
    }
    shard["binaryData"] = {"shard-1.gz": ""}
    await kube.create(CONFIGMAPS, NS, shard)
    pokes = itertools.count()

    async def deleted() -> bool:
        if one(cluster, "v1/configmaps", stale) is None:
            return True
        current = one(cluster, "v1/configmaps", naming.configmap_name("qwen-14b")) or {}
        if stale not in (current.get("data") or {}).get(naming.MANIFEST_KEY, ""):
            # (Re)publish the index naming the stale shard (a pass still running from earlier
            # events may have overwritten it before reading it), then make the operator look.
            patch = {"data": {naming.MANIFEST_KEY: json.dumps(index)}}
            await kube.patch(CONFIGMAPS, NS, naming.configmap_name("qwen-14b"), patch)
            poke = adapter_obj(f"poke-{next(pokes)}", "qwen-14b", "hf://org/poke")
            await kube.apply(poke)
        return False

    await eventually(deleted, what="stale shard deleted", timeout=60)
    await eventually(lambda: adapter_names(cluster, "qwen-14b"), what="index republished")


ROUTED = {
    "inferencePool": {
        "enabled": True,
        "endpointPicker": {"name": "epp"},
        "httpRoute": {"gateway": {"name": "gw"}},
    }
}
ROUTING_EDITS = [
    ("inference.networking.k8s.io/v1/inferencepools", "routed", {"targetPorts": [{"number": 1}]}),
    ("gateway.networking.k8s.io/v1/httproutes", "routed", {"parentRefs": [{"name": "other"}]}),
    ("keda.sh/v1alpha1/scaledobjects", "routed", {"maxReplicaCount": 9}),
    ("autoscaling/v2/horizontalpodautoscalers", "scaled", {"maxReplicas": 9}),
]


async def exercise_routing(cluster: Cluster, kube: KubeClient) -> None:
    routed = json.loads(json.dumps(examples()[0]))
    routed["metadata"]["name"] = "routed"
    routed["spec"]["routing"] = ROUTED
    routed["spec"]["autoscaling"] = {
        "enabled": True,
        "engine": "keda",
        "maxReplicas": 2,
        "prometheusAddress": "http://prometheus.monitoring:9090",
    }
    scaled = json.loads(json.dumps(examples()[0]))
    scaled["metadata"]["name"] = "scaled"
    scaled["spec"]["autoscaling"] = {"enabled": True, "engine": "hpa", "maxReplicas": 2}
    await kube.apply(routed)
    await kube.apply(scaled)
    for res, name, edit in ROUTING_EDITS:
        obj = await eventually(lambda r=res, n=name: one(cluster, r, n), what=f"{res} {name}")  # type: ignore[misc]
        kind = next(k for k in KIND_OF.values() if res.endswith(f"/{k.plural}"))
        want = {k: obj["spec"][k] for k in edit if k in obj["spec"]}
        await kube.patch(kind, NS, name, {"spec": edit})

        def restored(r: str = res, n: str = name, w: dict[str, Any] = want) -> bool:
            spec = (one(cluster, r, n) or {}).get("spec", {})
            return all(spec.get(k) == v for k, v in w.items())

        await eventually(restored, what=f"{name} corrected")


async def exercise_networkpolicy(cluster: Cluster, kube: KubeClient) -> None:
    """Open the admin port by hand (corrected), then turn the policy off (deleted)."""
    policy = await eventually(lambda: one(cluster, NETPOL, "qwen-14b"), what="NetworkPolicy")
    wanted = policy["spec"]["ingress"]
    await kube.patch(NETWORKPOLICIES, NS, "qwen-14b", {"spec": {"ingress": [{}]}})
    await eventually(
        lambda: (one(cluster, NETPOL, "qwen-14b") or {}).get("spec", {}).get("ingress") == wanted,
        what="NetworkPolicy drift corrected",
    )
    await kube.patch(BASEMODELS, NS, "qwen-14b", {"spec": {"networkPolicy": {"enabled": False}}})
    await eventually(lambda: one(cluster, NETPOL, "qwen-14b") is None, what="policy deleted")


async def test_networkpolicy_off_leaves_a_foreign_policy_alone(
    cluster: Cluster, kube: KubeClient, operator: OperatorProcess
) -> None:
    foreign = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "qwen-14b", "namespace": NS, "labels": {"team": "net"}},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }
    await kube.apply(foreign)
    base, *rest = examples()
    base["spec"]["networkPolicy"] = {"enabled": False}
    await apply_all(kube, [base, *rest])
    await eventually(lambda: adapter_names(cluster, "qwen-14b"), what="manifest")
    await asyncio.sleep(3)  # the reconciles that followed had their chance to delete it
    kept = one(cluster, NETPOL, "qwen-14b")
    assert kept is not None and kept["spec"] == foreign["spec"]
    assert not kept["metadata"].get("ownerReferences")


async def exercise_legacy_finalizer(cluster: Cluster, kube: KubeClient) -> None:
    """An adapter that an earlier operator build marked with kopf's finalizer (this one puts
    none on adapters): kopf takes the finalizer off at its first event, so deleting the
    adapter is not held up, and it leaves the manifest."""
    legacy = adapter_obj("legacy", "qwen-14b", "hf://org/legacy", rank=8)
    legacy["metadata"]["finalizers"] = [handlers.FINALIZER]
    await kube.apply(legacy)
    await eventually(
        lambda: (
            "legacy" in (adapter_names(cluster, "qwen-14b") or [])
            and not (one(cluster, "loraplex.io/v1alpha1/loraadapters", "legacy") or {})
            .get("metadata", {})
            .get("finalizers")
        ),
        what="legacy adapter served, its finalizer removed",
    )
    await kube.delete(LORAADAPTERS, NS, "legacy")
    await eventually(
        lambda: (
            one(cluster, "loraplex.io/v1alpha1/loraadapters", "legacy") is None
            and "legacy" not in (adapter_names(cluster, "qwen-14b") or [])
        ),
        what="legacy adapter deleted and out of the manifest",
    )


async def test_adapters_carry_no_kopf_bookkeeping(
    cluster: Cluster, kube: KubeClient, operator: OperatorProcess
) -> None:
    """Adapters get a status and nothing else from the operator: no finalizer, no kopf
    annotation, and so no metadata write (at 10,000 adapters those were 2 of 3 API calls)."""
    await apply_all(kube, examples())
    await eventually(
        lambda: all(
            (a.get("status") or {}).get("phase")
            for a in cluster.objects_of("loraplex.io/v1alpha1/loraadapters", NS)
        ),
        what="adapter statuses",
    )
    for adapter in cluster.objects_of("loraplex.io/v1alpha1/loraadapters", NS):
        meta = adapter["metadata"]
        assert not meta.get("finalizers"), meta
        assert not any(k.startswith("loraplex.io/") for k in meta.get("annotations") or {}), meta
    writes = [
        c for c in cluster.operator_calls() if c.resource == "loraadapters" and c.verb == "patch"
    ]
    assert writes == [], writes


async def test_rbac_is_exactly_the_calls_the_operator_makes(
    cluster: Cluster, kube: KubeClient, operator: OperatorProcess
) -> None:
    """Every request is allowed by loraplex.rbac, and every rule is used (peering aside)."""
    await apply_all(kube, examples())
    await eventually(lambda: adapter_names(cluster, "qwen-14b"), what="manifest")
    await exercise_stale_shard(cluster, kube)
    # Drift: a hand edit (patch back), a deleted Service (created again).
    await kube.patch(DEPLOYMENTS, NS, "qwen-14b", {"spec": {"replicas": 5}})
    await kube.delete(SERVICES, NS, "qwen-14b")
    await eventually(lambda: one(cluster, "v1/services", "qwen-14b"), what="service restored")
    await kube.patch(SERVICES, NS, "qwen-14b", {"spec": {"type": "NodePort"}})
    # A re-plan (an Event), then an adapter deleted (finalizer released).
    big = adapter_obj("big", "qwen-14b", "hf://org/big", rank=64)
    await kube.apply(big)
    await eventually(
        lambda: any(e.get("reason") == "Replanned" for e in cluster.objects_of("v1/events", NS)),
        what="Replanned event",
    )
    await kube.delete(LORAADAPTERS, NS, "support-bot")
    await eventually(
        lambda: one(cluster, "loraplex.io/v1alpha1/loraadapters", "support-bot") is None,
        what="adapter deleted",
    )
    await exercise_legacy_finalizer(cluster, kube)
    await exercise_networkpolicy(cluster, kube)
    await eventually(
        lambda: (
            (one(cluster, "v1/services", "qwen-14b") or {}).get("spec", {}).get("type")
            == "ClusterIP"
        ),
        what="service corrected",
    )
    # The weights cache (PVC, loader Job; the Deployment waits for the Job, which no node runs
    # here) and a PodDisruptionBudget (a second BaseModel with 2 replicas), hand-edited.
    cached = cached_basemodel(replicas=1)
    await kube.apply(cached)
    [first] = await eventually(lambda: cluster.objects_of("batch/v1/jobs", NS), what="loader Job")
    # A new revision: a new loader Job; the old one is deleted once the new one succeeded.
    await finish_loader_job(kube, NS, first["metadata"]["name"])
    cached["spec"]["model"]["revision"] = "v2"
    await kube.apply(cached)
    old = first["metadata"]["name"]

    def jobs() -> set[str]:
        return {j["metadata"]["name"] for j in cluster.objects_of("batch/v1/jobs", NS)}

    second = await eventually(lambda: next(iter(jobs() - {old}), None), what="next loader Job")
    await finish_loader_job(kube, NS, second)
    await eventually(lambda: jobs() == {second}, what="superseded Job deleted")
    pair = json.loads(json.dumps(examples()[0]))
    pair["metadata"]["name"] = "pair"
    pair["spec"]["replicas"] = 2
    await kube.apply(pair)
    await eventually(lambda: one(cluster, "policy/v1/poddisruptionbudgets", "pair"), what="PDB")
    await kube.patch(PDBS, NS, "pair", {"spec": {"maxUnavailable": 2}})
    await eventually(
        lambda: (
            (one(cluster, "policy/v1/poddisruptionbudgets", "pair") or {})
            .get("spec", {})
            .get("maxUnavailable")
            == 1
        ),
        what="PDB corrected",
    )
    # spec.routing and spec.autoscaling: InferencePool, HTTPRoute, a KEDA ScaledObject and an
    # HPA, each hand-edited and put back.
    await exercise_routing(cluster, kube)
    calls = cluster.operator_calls()
    refused = [c for c in calls if c.code == 403]
    assert refused == [], "the API server refused calls the chart's RBAC does not allow"
    # Discovery (GET /api, /apis, /version) is open to every authenticated user
    # (system:discovery); RBAC rules only name resources.
    discovery = {c.uri.split("?")[0] for c in calls if not c.resource}
    assert all(u.startswith(("/api", "/version")) for u in discovery), discovery
    seen = {(c.group, c.resource, c.verb) for c in calls if c.resource}
    allowed = rbac.expand(rbac.RULES + rbac.CLUSTER_RULES)
    assert seen - allowed == set(), "API calls not covered by loraplex.rbac"
    unused = {a for a in allowed if a[0] != rbac.PEERING_GROUP} - seen
    assert unused == set(), "rules the operator never needed: remove them (least privilege)"


async def test_larger_rank_replans_with_an_event_only_on_auto(
    cluster: Cluster, kube: KubeClient, operator: OperatorProcess
) -> None:
    docs = examples()
    fixed = json.loads(json.dumps(docs[0]))
    fixed["metadata"]["name"] = "fixed-rank"
    fixed["spec"]["lora"]["maxLoraRank"] = 16
    await apply_all(kube, [*docs, fixed])
    await eventually(lambda: pod_template(cluster, "qwen-14b"), what="deployment")
    await eventually(lambda: pod_template(cluster, "fixed-rank"), what="deployment")

    def rank_of(base: str) -> str:
        args = pod_template(cluster, base)["spec"]["containers"][0]["args"]
        return str(args[args.index("--max-lora-rank") + 1])

    # Adapters of rank 16 and 8: auto plans one allowed step of headroom above 16.
    assert rank_of("qwen-14b") == "32"
    await kube.apply(adapter_obj("mid-qwen-14b", "qwen-14b", "hf://org/mid", rank=32))
    await eventually(
        lambda: "mid-qwen-14b" in (adapter_names(cluster, "qwen-14b") or []),
        what="rank 32 accepted",
    )
    assert rank_of("qwen-14b") == "32", "an adapter within the headroom does not roll the pods"
    for base in ("qwen-14b", "fixed-rank"):
        await kube.apply(adapter_obj(f"big-{base}", base, "hf://org/big", rank=64))
    await eventually(lambda: rank_of("qwen-14b") == "128", what="re-plan to 64 + headroom")
    event = await eventually(
        lambda: next(
            (e for e in cluster.objects_of("v1/events", NS) if e.get("reason") == "Replanned"),
            None,
        ),
        what="a Replanned event",
    )
    assert event["involvedObject"]["name"] == "qwen-14b"
    assert "--max-lora-rank 32 -> 128" in event["message"]
    assert "because maxLoraRank 128: one step above 64" in event["message"], event["message"]
    cond = await eventually(
        lambda: condition(
            one(cluster, "loraplex.io/v1alpha1/loraadapters", "big-fixed-rank"), "Accepted"
        ),
        what="RankExceedsMax on the fixed base",
    )
    assert cond["reason"] == "RankExceedsMax"
    assert rank_of("fixed-rank") == "16", "a user-fixed rank never changes"


async def test_operator_serves_metrics_and_health(
    cluster: Cluster, kube: KubeClient, operator: OperatorProcess
) -> None:
    await apply_all(kube, examples())
    await eventually(lambda: adapter_names(cluster, "qwen-14b"), what="manifest")
    base = f"http://127.0.0.1:{operator.metrics_port}"

    async def metrics() -> str | None:
        async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as r:
            text = await r.text()
        done = 'loraplex_operator_adapters{phase="Pending"} 2.0' in text
        return text if done else None

    text = await eventually(metrics, what="operator metrics")
    assert 'loraplex_operator_reconciles_total{kind="BaseModel",result="ok"}' in text
    assert "loraplex_operator_reconcile_seconds_bucket" in text
    async with aiohttp.ClientSession() as s, s.get(base + "/healthz") as r:
        assert r.status == 200


async def test_adapter_without_basemodel_is_told_once(
    cluster: Cluster, kube: KubeClient, operator: OperatorProcess
) -> None:
    """An adapter with no usable spec.baseModel (only a server without the CRD's schema takes
    one) gets a status naming the field, written once: its own write coming back as an event
    must not cause another."""
    if cluster.enforces:
        pytest.skip("the CRD schema refuses an empty spec.baseModel before the operator sees it")
    await kube.apply(adapter_obj("orphan", "", "hf://org/orphan", rank=8))
    status = await eventually(
        lambda: (one(cluster, "loraplex.io/v1alpha1/loraadapters", "orphan") or {}).get("status"),
        what="orphan status",
    )
    assert "spec.baseModel" in json.dumps(status)
    await asyncio.sleep(2)
    writes = [
        c
        for c in cluster.operator_calls()
        if c.resource == "loraadapters/status" and c.verb == "patch"
    ]
    assert len(writes) == 1, writes
